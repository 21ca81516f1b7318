"""Pure training and evaluation steps, and the compiled whole-epoch programs built from them.

The NNX model is split once into a static `GraphDef` and state pytrees; every function here is a
pure function of pytrees (`TrainState`, arrays) that merges the model inside the trace, so plain
`jax.jit` compiles it once per shape. No printing, files or other side effects in this module.

The learning rate lives in the optimizer state (`optax.inject_hyperparams`), so it is a traced value:
changing it never recompiles, a range test can set it every step, and a sweep can vmap over it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from lrjax import mesh as mesh_lib

# XLA options for programs that run once per run (initialisation, the range test's rates): the
# lowest backend optimisation level compiles the MLP's initialisation in 0.2 s instead of 0.8 s
# (threefry code) and runs it in 5 ms instead of 2 ms, with bit-identical results (tests pin them).
ONE_SHOT = {"xla_backend_optimization_level": 0}

OptimizerFactory = Callable[..., optax.GradientTransformation]
Batch = tuple[jax.Array, jax.Array, jax.Array]  # images, int labels, per-example weights (0 = padding)


class TrainState(struct.PyTreeNode):
    """Everything that changes during training, as one pytree; `graphdef` and `optimizer` are static."""

    params: Any
    rest: Any  # non-parameter model state (e.g. batch statistics); empty for the MLP
    opt_state: Any
    step: jax.Array
    graphdef: Any = struct.field(pytree_node=False)
    optimizer: OptimizerFactory = struct.field(pytree_node=False)

    @property
    def tx(self) -> optax.GradientTransformation:
        return make_tx(self.optimizer)

    @property
    def lr(self) -> jax.Array:
        return self.opt_state.hyperparams["learning_rate"]

    def with_lr(self, lr) -> "TrainState":
        return self.replace(opt_state=optax.tree_utils.tree_set(self.opt_state, learning_rate=lr))

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params, self.rest)


def make_tx(optimizer: OptimizerFactory, lr: float = 0.0) -> optax.GradientTransformation:
    """`optimizer` is a factory taking `learning_rate` (e.g. `optax.sgd`, `optax.adam`)."""
    return optax.inject_hyperparams(optimizer)(learning_rate=lr)


def init_state(model: nnx.Module, optimizer: OptimizerFactory = optax.sgd, lr: float = 1e-3) -> TrainState:
    """Splits `model` once and builds the optimizer state; the model object itself is not touched later."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return _init_state(params, rest, lr, graphdef=graphdef, optimizer=optimizer)


@partial(jax.jit, static_argnames=("graphdef", "optimizer"), compiler_options=ONE_SHOT)
def _init_state(params, rest, lr, *, graphdef, optimizer) -> TrainState:
    # One compiled program (not a dozen eager ops), and its outputs are fresh buffers owned by the
    # state, so later donation never touches the model's arrays.
    return TrainState(params=params, rest=rest, opt_state=make_tx(optimizer, lr).init(params),
                      step=jnp.zeros([], jnp.int32), graphdef=graphdef, optimizer=optimizer)


def _forward(params, rest, graphdef, x):
    model = nnx.merge(graphdef, params, rest)
    logits = model(x)
    return logits, nnx.state(model, nnx.Not(nnx.Param))


def _weighted_metrics(logits, labels, weights):
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    total = jnp.maximum(jnp.sum(weights), 1.0)
    loss = jnp.sum(losses * weights) / total
    accuracy = jnp.sum((jnp.argmax(logits, -1) == labels) * weights) / total
    return loss, accuracy


def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on `batch`; metrics are the loss and accuracy *before* the update and the
    learning rate the step used (the record is the truth)."""
    x, y, w = batch

    def loss_fn(params):
        logits, rest = _forward(params, state.rest, state.graphdef, x)
        loss, accuracy = _weighted_metrics(logits, y, w)
        return loss, (accuracy, rest)

    (loss, (accuracy, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(params=params, rest=rest, opt_state=opt_state, step=state.step + 1)
    return new, {"loss": loss, "accuracy": accuracy, "lr": state.lr}


def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    """Weighted sums (not means) so batches of a padded evaluation set add up exactly."""
    x, y, w = batch
    logits, _ = _forward(state.params, state.rest, state.graphdef, x)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return {"loss_sum": jnp.sum(losses * w), "correct": jnp.sum((jnp.argmax(logits, -1) == y) * w),
            "count": jnp.sum(w)}


# ---------------------------------------------------------------------------------------------
# Batch order, drawn on device
# ---------------------------------------------------------------------------------------------

def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def epoch_indices(key: jax.Array, n: int, batch_size: int, num_steps: int | None = None):
    """Index matrix (num_steps, batch_size) and weights for shuffled passes over `n` examples.

    Each pass is a fresh permutation (pass p uses `fold_in(key, p)`); a pass's last partial batch is
    padded with weight-0 rows, so every step has the same shape and no example is dropped (as Keras).
    Traceable: the training epoch draws its order inside its compiled program.
    """
    return _batch_order(lambda p: jax.random.permutation(jax.random.fold_in(key, p), n), jnp, n, batch_size,
                        num_steps)


def host_batch_order(seed: int, n: int, batch_size: int, num_steps: int | None = None):
    """`epoch_indices` drawn on the host (numpy's PCG64 seeded with `seed`, one permutation per pass)
    as numpy arrays: the range test's order, where ~1 ms of numpy replaces a threefry-and-sort program
    that took ~0.18 s to compile (see README, Performance)."""
    rng = np.random.default_rng(seed)
    return _batch_order(lambda p: rng.permutation(n).astype(np.int32), np, n, batch_size, num_steps)


def _batch_order(permutation, xp, n: int, batch_size: int, num_steps: int | None):
    per_epoch = steps_per_epoch(n, batch_size)
    num_steps = per_epoch if num_steps is None else num_steps
    passes = steps_per_epoch(num_steps, per_epoch)
    padded = per_epoch * batch_size
    wrap = xp.arange(padded) % n  # the padding repeats the pass's first examples (weight 0)
    idx = xp.concatenate([permutation(p)[wrap] for p in range(passes)]).reshape(-1, batch_size)[:num_steps]
    w = xp.tile(xp.arange(padded) < n, passes).reshape(-1, batch_size)[:num_steps].astype(xp.float32)
    return idx, w


def gather_batch(x, y, idx, w) -> Batch:
    """Rows `idx` of the device-resident data, sharded along the batch over the `data` mesh axis."""
    idx = mesh_lib.shard_batch(idx)
    return mesh_lib.shard_batch(x[idx]), y[idx], mesh_lib.shard_batch(w)


def epoch_key(seed_key: jax.Array, epoch: int | jax.Array) -> jax.Array:
    """Data order of an epoch derives from (seed, epoch) only, so a resumed run sees the same batches."""
    return jax.random.fold_in(seed_key, epoch)


# ---------------------------------------------------------------------------------------------
# Compiled programs
# ---------------------------------------------------------------------------------------------

def scan_train(state: TrainState, x, y, idx, w):
    """Runs `train_step` over the rows of (idx, w); returns the state and per-step metrics."""

    def body(state, batch_idx):
        i, wi = batch_idx
        return train_step(state, gather_batch(x, y, i, wi))

    return jax.lax.scan(body, state, (idx, w))


def epoch_metrics(metrics, w):
    """Example-weighted means of per-step metrics over an epoch."""
    counts = jnp.sum(w, axis=-1)
    total = jnp.sum(counts)
    return {"loss": jnp.sum(metrics["loss"] * counts) / total,
            "accuracy": jnp.sum(metrics["accuracy"] * counts) / total}


# Not donated: the host keeps references to the state between epochs (async checkpoint, best weights).
@partial(jax.jit, static_argnames=("batch_size",))
def train_epoch(state: TrainState, x, y, key, *, batch_size: int):
    """One shuffled epoch as one compiled program: (state, epoch metrics)."""
    idx, w = epoch_indices(key, x.shape[0], batch_size)
    state, metrics = scan_train(state, x, y, idx, w)
    return state, epoch_metrics(metrics, w)


def evaluate_arrays(state: TrainState, x, y, batch_size: int) -> dict[str, jax.Array]:
    """Loss and accuracy over all of (x, y), scanned in padded batches (traceable, vmappable)."""
    n = x.shape[0]
    steps = steps_per_epoch(n, batch_size)
    pos = jnp.arange(steps * batch_size).reshape(steps, batch_size)
    idx, w = jnp.minimum(pos, n - 1), (pos < n).astype(jnp.float32)

    def body(acc, batch_idx):
        i, wi = batch_idx
        sums = eval_step(state, gather_batch(x, y, i, wi))
        return jax.tree.map(jnp.add, acc, sums), None

    zero = {"loss_sum": jnp.zeros([]), "correct": jnp.zeros([]), "count": jnp.zeros([])}
    sums, _ = jax.lax.scan(body, zero, (idx, w))
    return {"loss": sums["loss_sum"] / sums["count"], "accuracy": sums["correct"] / sums["count"]}


evaluate = jax.jit(evaluate_arrays, static_argnames=("batch_size",))
