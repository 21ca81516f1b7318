"""Flax NNX models and the small registry the CLI's `--model` chooses from.

Only module definitions live here; training code never needs more than `nnx.split(model)`, so any
NNX module works with lrjax (with the default loss, one whose `__call__(x)` returns logits). A
script adds its own model to the CLI's choices with `register_model`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lrjax import sharding
from lrjax.steps import ONE_SHOT

# Keras Dense defaults (Glorot uniform kernel, zero bias), so results compare with the seed's Keras model.
glorot_uniform = jax.nn.initializers.glorot_uniform()


def _sharded(init, *names):
    """`init` with logical axis names (`nnx.with_partitioning`), so that a mesh can shard the parameter.
    Annotations only (no eager sharding): `lrjax.sharding`'s rules turn them into shardings where the
    state is created (`steps.init_state`); on a mesh of `data` alone the parameters are replicated."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


class MLP(nnx.Module):
    """Flatten -> Dense+ReLU for each hidden width -> Dense logits (softmax lives in the loss)."""

    def __init__(self, in_features: int, hidden_sizes: Sequence[int] = (300, 100),
                 num_classes: int = 10, *, rngs: nnx.Rngs):
        widths = [in_features, *hidden_sizes]
        # logical axes: each layer's inputs "embed" (fsdp), its hidden units "mlp" (tensor), the classes "vocab"
        self.hidden = nnx.List([nnx.Linear(a, b, kernel_init=_sharded(glorot_uniform, "embed", "mlp"),
                                           bias_init=_sharded(nnx.initializers.zeros, "mlp"), rngs=rngs)
                                for a, b in zip(widths[:-1], widths[1:])])
        self.out = nnx.Linear(widths[-1], num_classes, kernel_init=_sharded(glorot_uniform, "embed", "vocab"),
                              bias_init=_sharded(nnx.initializers.zeros, "vocab"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for layer in self.hidden:
            x = jax.nn.relu(layer(x))
        return self.out(x)


class CNN(nnx.Module):
    """A compact Keras-style CNN for small images (28x28 here): two blocks of 3x3 Conv -> BatchNorm ->
    ReLU -> 2x2 max-pool (32 and 64 channels), then Dropout -> Dense(128)+ReLU -> Dropout -> logits."""

    def __init__(self, input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10,
                 channels: Sequence[int] = (32, 64), dense: int = 128, dropout: float = 0.3, *,
                 rngs: nnx.Rngs):
        height, width, depth = input_shape
        convs, norms = [], []
        for c in channels:
            # logical axes: the window "conv" (replicated), input channels "embed", output channels "channels"
            convs.append(nnx.Conv(depth, c, (3, 3), padding="SAME",
                                  kernel_init=_sharded(glorot_uniform, "conv", "conv", "embed", "channels"),
                                  bias_init=_sharded(nnx.initializers.zeros, "channels"),
                                  conv_general_dilated=conv_general_dilated, rngs=rngs))
            norms.append(nnx.BatchNorm(c, scale_init=_sharded(nnx.initializers.ones, "channels"),
                                       bias_init=_sharded(nnx.initializers.zeros, "channels"), rngs=rngs))
            depth, height, width = c, height // 2, width // 2
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.drop_features = nnx.Dropout(dropout, rngs=rngs)
        self.dense = nnx.Linear(height * width * depth, dense, kernel_init=_sharded(glorot_uniform, "embed", "mlp"),
                                bias_init=_sharded(nnx.initializers.zeros, "mlp"), rngs=rngs)
        self.drop_dense = nnx.Dropout(dropout, rngs=rngs)
        self.out = nnx.Linear(dense, num_classes, kernel_init=_sharded(glorot_uniform, "mlp", "vocab"),
                              bias_init=_sharded(nnx.initializers.zeros, "vocab"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv, norm in zip(self.convs, self.norms):
            x = max_pool_2x2(jax.nn.relu(norm(conv(x))))
        x = self.drop_features(x.reshape(x.shape[0], -1))
        return self.out(self.drop_dense(jax.nn.relu(self.dense(x))))


class Block(nnx.Module):
    """A pre-LayerNorm Transformer block: x + attention(LN(x)), then x + MLP(LN(x)) (GELU, 4x wide)."""

    def __init__(self, d_model: int, heads: int, dropout: float, *, rngs: nnx.Rngs):
        if d_model % heads:
            raise ValueError(f"--d-model {d_model} is not divisible by --heads {heads}")
        self.heads = heads
        dense = jax.nn.initializers.normal(0.02)
        ln = dict(scale_init=_sharded(nnx.initializers.ones, "embed"), bias_init=_sharded(nnx.initializers.zeros, "embed"))
        self.ln1, self.ln2 = nnx.LayerNorm(d_model, rngs=rngs, **ln), nnx.LayerNorm(d_model, rngs=rngs, **ln)
        self.qkv = nnx.Linear(d_model, 3 * d_model, kernel_init=_sharded(dense, "embed", "heads"),
                              bias_init=_sharded(nnx.initializers.zeros, "heads"), rngs=rngs)
        self.proj = nnx.Linear(d_model, d_model, kernel_init=_sharded(dense, "heads", "embed"),
                               bias_init=_sharded(nnx.initializers.zeros, "embed"), rngs=rngs)
        self.up = nnx.Linear(d_model, 4 * d_model, kernel_init=_sharded(dense, "embed", "mlp"),
                             bias_init=_sharded(nnx.initializers.zeros, "mlp"), rngs=rngs)
        self.down = nnx.Linear(4 * d_model, d_model, kernel_init=_sharded(dense, "mlp", "embed"),
                               bias_init=_sharded(nnx.initializers.zeros, "embed"), rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(self.ln1(x)).reshape(b, t, 3 * self.heads, d // self.heads), 3, axis=2)
        att = causal_attention(q, k, v).reshape(b, t, d)
        x = x + self.drop(self.proj(att))
        return x + self.drop(self.down(jax.nn.gelu(self.up(self.ln2(x)))))


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal softmax attention over [B, T, heads, head_dim]: `jax.nn.dot_product_attention` on
    accelerators; on CPUs two einsums and a masked softmax, whose forward and backward pass took
    21 ms against dot_product_attention's 52 ms (batch 32, context 128, 4 heads of 32, 2-core EPYC)."""
    if jax.default_backend() != "cpu":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    t = q.shape[1]
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(jnp.float32(q.shape[-1])).astype(q.dtype)
    scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, jnp.finfo(scores.dtype).min)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)


class Transformer(nnx.Module):
    """A decoder-only Transformer over tokens [B, T] (T <= `context`): token embeddings plus learned
    positions, `layers` pre-LayerNorm blocks with causal attention, a final LayerNorm, and logits
    from the embedding table itself (tied embeddings) -> [B, T, vocab]. Dropout is off by default, as
    in nanoGPT's pretraining: a model that sees most windows once gains nothing from it and learns
    slower in the few epochs a range test and a short run give it."""

    def __init__(self, vocab: int = 256, context: int = 256, d_model: int = 128, layers: int = 4,
                 heads: int = 4, dropout: float = 0.0, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, d_model, embedding_init=_sharded(jax.nn.initializers.normal(0.02), "vocab", "embed"),
                               rngs=rngs)
        self.positions = nnx.Param(jax.nn.initializers.normal(0.02)(rngs.params(), (context, d_model)),
                                   out_sharding=(None, "embed"), eager_sharding=False)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.blocks = nnx.List([Block(d_model, heads, dropout, rngs=rngs) for _ in range(layers)])
        self.ln = nnx.LayerNorm(d_model, scale_init=_sharded(nnx.initializers.ones, "embed"),
                                bias_init=_sharded(nnx.initializers.zeros, "embed"), rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        t = tokens.shape[1]
        x = self.drop(self.embed(tokens) + self.positions[:t])
        for block in self.blocks:
            x = block(x)
        return self.embed.attend(self.ln(x))


def transformer(vocab: int = 256, context: int = 256, d_model: int = 128, layers: int = 4, heads: int = 4,
                dropout: float = 0.0, seed: int = 42) -> Transformer:
    """The decoder-only `Transformer`, initialised from `seed`."""
    return initialised(Transformer, vocab, context, d_model, layers, heads, dropout, seed=seed)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pooling with stride 2 (NHWC; odd edges dropped, as VALID pooling does) written as a
    reshape and a max: the same values as `nnx.max_pool`, and on XLA's CPU backend a backward pass
    ~2.5x faster than reduce_window's select-and-scatter (measured in a training step)."""
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def conv_general_dilated(inputs, kernel, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """`jax.lax.conv_general_dilated` for nnx.Conv, as matrix products on CPUs.

    XLA's CPU convolutions are slow where lrjax runs them: inside a compiled loop (`lax.scan`) a
    training step of the CNN ran ~6x slower than the same step jitted alone, and a kernel gradient
    computed as a convolution ~5x slower than the forward pass. As one matrix product of the input's
    kh*kw shifted windows with the kernel (im2col), the forward pass and both gradients (autodiff:
    two more matrix products) are plain dots. Only plain 2-D NHWC convolutions (no dilation, one
    feature group) on the CPU take that path; everything else is lax's own."""
    nhwc = ("NHWC", "HWIO", "NHWC")
    plain = (jax.default_backend() == "cpu" and inputs.ndim == 4 and feature_group_count == 1
             and all(v is None for v in kwargs.values())  # nnx.Conv passes out_sharding=None
             and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
             and jax.lax.conv_dimension_numbers(inputs.shape, kernel.shape, dimension_numbers or nhwc)
             == jax.lax.conv_dimension_numbers(inputs.shape, kernel.shape, nhwc))
    if not plain:
        return jax.lax.conv_general_dilated(inputs, kernel, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, precision=precision, **kwargs)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(inputs.shape[1:3], kernel.shape[:2], window_strides, padding)
    return _conv2d(inputs, kernel, tuple(window_strides), tuple(tuple(p) for p in padding))


def _conv2d(x, k, strides, pads):
    """NHWC x HWIO convolution as one matrix product of the padded input's shifted windows."""
    kh, kw, cin, cout = k.shape
    (sh, sw), ((top, bottom), (left, right)) = strides, pads
    padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    n, height, width, _ = padded.shape
    h, w = (height - kh) // sh + 1, (width - kw) // sw + 1
    windows = jnp.concatenate([padded[:, i:i + sh * (h - 1) + 1:sh, j:j + sw * (w - 1) + 1:sw]
                               for i in range(kh) for j in range(kw)], axis=-1)  # [n, h, w, (i, j, c)]
    return (windows.reshape(n * h * w, kh * kw * cin) @ k.reshape(kh * kw * cin, cout)).reshape(n, h, w, cout)


def mlp(in_features: int, hidden_sizes: Sequence[int] = (300, 100), num_classes: int = 10,
        seed: int = 42) -> MLP:
    """The seed article's 784-300-100-10 MLP (by default), initialised from `seed`."""
    return initialised(MLP, in_features, tuple(hidden_sizes), num_classes, seed=seed)


def cnn(input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10, seed: int = 42) -> CNN:
    """The compact CNN (`CNN`) for `input_shape` (height, width, channels), initialised from `seed`."""
    return initialised(CNN, tuple(input_shape), num_classes, seed=seed)


def initialised(cls: type[nnx.Module], *args, seed: int) -> nnx.Module:
    """`cls(*args, rngs=nnx.Rngs(seed))` with its weights from one compiled program: the same weights
    as building the model eagerly, which compiles every random draw separately (~1 s for the MLP in
    every new process on a 2-core CPU). `args` must be hashable. Inside a trace (`create_sharded`'s
    program, `nnx.eval_shape`) the module is built directly: the enclosing program compiles it."""
    key = jax.random.key(seed)
    if isinstance(key, jax.core.Tracer):
        return cls(*args, rngs=nnx.Rngs(key))
    return nnx.merge(_graphdef(cls, *args), _state(cls, args, key))


def create_sharded(make, mesh, rules=None) -> nnx.Module:
    """The module `make()` builds, its arrays created sharded on `mesh` by the rules (`lrjax.sharding`;
    flax's `nnx.eval_shape` + `jax.jit(..., out_shardings=...)` pattern), so a model larger than one
    device is never whole on one; the same weights as `make()` itself (JAX's partitionable threefry)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    targets = sharding.shardings(abstract, mesh, rules)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda: nnx.state(make()), out_shardings=targets, compiler_options=ONE_SHOT)()
    return nnx.merge(graphdef, state)


@functools.lru_cache
def _graphdef(cls, *args) -> nnx.GraphDef:
    return nnx.graphdef(nnx.eval_shape(lambda: cls(*args, rngs=nnx.Rngs(0))))


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=ONE_SHOT)
def _state(cls, args: tuple, key: jax.Array) -> nnx.State:
    return nnx.state(cls(*args, rngs=nnx.Rngs(key)))


# ---------------------------------------------------------------------------------------------
# The registry behind --model
# ---------------------------------------------------------------------------------------------

# name -> builder(input_shape, num_classes, seed, **options) -> a freshly initialised model. The CLI
# passes its model options (hidden_sizes) to every builder; a builder ignores the ones it has no use for.
ModelBuilder = Callable[..., nnx.Module]
MODELS: dict[str, ModelBuilder] = {}
OPTIMIZER = {}  # name -> the CLI's default --optimizer for the model
WEIGHT_DECAY = {}  # name -> the CLI's default --weight-decay for the model


def register_model(name: str, builder: ModelBuilder | None = None, *, optimizer: str = "sgd",
                   weight_decay: float = 0.0):
    """Adds `builder` to the CLI's `--model` choices (usable as a decorator); replaces a same-named one.
    `optimizer` (a name of `lrjax.optimizers.OPTIMIZERS`) and `weight_decay` are the model's default
    `--optimizer` and `--weight-decay`."""
    if builder is None:
        return functools.partial(register_model, name, optimizer=optimizer, weight_decay=weight_decay)
    MODELS[name], OPTIMIZER[name], WEIGHT_DECAY[name] = builder, optimizer, weight_decay
    return builder


def default_optimizer(name: str) -> str:
    return OPTIMIZER.get(name, "sgd")


def default_weight_decay(name: str) -> float:
    return WEIGHT_DECAY.get(name, 0.0)


def build_model(name: str, input_shape: Sequence[int], num_classes: int, seed: int, **options) -> nnx.Module:
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(MODELS)}") from None
    return builder(tuple(input_shape), num_classes, seed, **options)


@register_model("mlp")
def _build_mlp(input_shape, num_classes, seed, hidden_sizes=(300, 100), **_):
    return mlp(math.prod(input_shape), hidden_sizes, num_classes, seed=seed)


@register_model("cnn", optimizer="adam")  # 10 epochs: test accuracy 0.9211 with adam, 0.9071 with sgd (docs/measurements.md)
def _build_cnn(input_shape, num_classes, seed, **_):
    if len(input_shape) != 3:
        raise ValueError(f"--model cnn needs images (height, width, channels), got examples of shape {input_shape}")
    return cnn(input_shape, num_classes, seed=seed)


# nanoGPT's recipe for small language models: AdamW with weight decay 0.1
@register_model("transformer", optimizer="adamw", weight_decay=0.1)
def _build_transformer(input_shape, num_classes, seed, d_model=128, layers=4, heads=4, **_):
    if len(input_shape) != 1:
        raise ValueError(f"--model transformer needs token sequences (--dataset text), got examples of shape "
                         f"{input_shape}")
    return transformer(num_classes, input_shape[0], d_model, layers, heads, seed=seed)
