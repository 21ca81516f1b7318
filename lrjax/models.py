"""Flax NNX models. Only module definitions live here; training code never needs more than
`nnx.split(model)`, so any NNX module with a `__call__(x) -> logits` works with lrjax."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
from flax import nnx

from lrjax.steps import ONE_SHOT

# Keras Dense defaults (Glorot uniform kernel, zero bias), so results compare with the seed's Keras model.
glorot_uniform = jax.nn.initializers.glorot_uniform()


class MLP(nnx.Module):
    """Flatten -> Dense+ReLU for each hidden width -> Dense logits (softmax lives in the loss)."""

    def __init__(self, in_features: int, hidden_sizes: Sequence[int] = (300, 100),
                 num_classes: int = 10, *, rngs: nnx.Rngs):
        widths = [in_features, *hidden_sizes]
        self.hidden = nnx.List([nnx.Linear(a, b, kernel_init=glorot_uniform, rngs=rngs)
                                for a, b in zip(widths[:-1], widths[1:])])
        self.out = nnx.Linear(widths[-1], num_classes, kernel_init=glorot_uniform, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for layer in self.hidden:
            x = jax.nn.relu(layer(x))
        return self.out(x)


def mlp(in_features: int, hidden_sizes: Sequence[int] = (300, 100), num_classes: int = 10,
        seed: int = 42) -> MLP:
    """The seed article's 784-300-100-10 MLP (by default), initialised from `seed`.

    The weights come from one compiled program (the same weights as building the model eagerly,
    which compiles every random draw separately: ~1 s in every new process on a 2-core CPU).
    """
    hidden_sizes = tuple(hidden_sizes)
    graphdef = _mlp_graphdef(in_features, hidden_sizes, num_classes)
    return nnx.merge(graphdef, _mlp_state(in_features, hidden_sizes, num_classes, jax.random.key(seed)))


@functools.lru_cache
def _mlp_graphdef(in_features: int, hidden_sizes: tuple[int, ...], num_classes: int) -> nnx.GraphDef:
    return nnx.split(nnx.eval_shape(lambda: MLP(in_features, hidden_sizes, num_classes, rngs=nnx.Rngs(0))))[0]


@functools.partial(jax.jit, static_argnums=(0, 1, 2), compiler_options=ONE_SHOT)
def _mlp_state(in_features: int, hidden_sizes: tuple[int, ...], num_classes: int, key: jax.Array) -> nnx.State:
    return nnx.state(MLP(in_features, hidden_sizes, num_classes, rngs=nnx.Rngs(key)))
