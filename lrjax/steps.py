"""Pure training and evaluation steps, and the compiled whole-epoch programs built from them.

The NNX model is split once into a static `GraphDef` and state pytrees; every function here is a
pure function of pytrees (`TrainState`, arrays) that merges the model inside the trace, so plain
`jax.jit` compiles it once per shape. No printing, files or other side effects in this module.

Train and eval mode are two static graphdefs of the same model (`model.train()`, `model.eval()`):
training steps merge the first and return the updated non-parameter state (batch statistics, RNG
stream counts), every evaluation merges the second (running averages, no dropout). A loss function
(`lrjax.tasks`) maps (model, batch) to per-example losses and metrics; padding rows carry weight 0.

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
from lrjax import optimizers, sharding, tasks
from lrjax.errors import ConfigError
from lrjax.tasks import LossFn

# XLA options for programs that run once per run (initialisation, the range test's rates): the
# lowest backend optimisation level compiles the MLP's initialisation in 0.2 s instead of 0.8 s
# (threefry code) and runs it in 5 ms instead of 2 ms, with bit-identical results (tests pin them).
ONE_SHOT = {"xla_backend_optimization_level": 0}

OptimizerFactory = Callable[..., optax.GradientTransformation]
Batch = Any  # what the loss function receives: an (x, y) pair of arrays, or any pytree of arrays
RESERVED = ("loss", "lr", "count")  # names lrjax gives to its own entries beside the task's metrics


class TrainState(struct.PyTreeNode):
    """Everything that changes during training, as one pytree; the rest is static (hashed by the
    compiled programs): the model's structure in train and in eval mode, the optimizer factory, the
    loss function and the compute dtype."""

    params: Any
    rest: Any  # non-parameter model state: batch statistics, RNG stream keys and counts, ...
    opt_state: Any
    step: jax.Array
    graphdef: Any = struct.field(pytree_node=False)  # train mode (`model.train()`)
    eval_graphdef: Any = struct.field(pytree_node=False)  # eval mode (`model.eval()`)
    optimizer: OptimizerFactory = struct.field(pytree_node=False)
    loss_fn: LossFn = struct.field(pytree_node=False)
    dtype: Any = struct.field(pytree_node=False, default=None)  # compute dtype; None: the parameters'
    schedule: Any = struct.field(pytree_node=False, default=None)  # step -> rate (lrjax.schedules), or None
    rules: Any = struct.field(pytree_node=False, default=None)  # logical-axis rules (lrjax.sharding); None: RULES

    @property
    def tx(self) -> optax.GradientTransformation:
        return make_tx(self.optimizer)

    @property
    def lr(self) -> jax.Array:
        """The rate of the next update: the injected rate times a plateau reduction's scale, if any."""
        plateau = optax.contrib.ReduceLROnPlateauState
        found = [s for s in jax.tree.leaves(self.opt_state, is_leaf=lambda s: isinstance(s, plateau))
                 if isinstance(s, plateau)]  # not tree_get("scale"): a BatchNorm's scale has that name too
        rate = optax.tree_utils.tree_get(self.opt_state, "learning_rate")
        return rate * found[0].scale if found else rate

    def with_lr(self, lr) -> "TrainState":
        return self.replace(opt_state=optax.tree_utils.tree_set(self.opt_state, learning_rate=lr))

    def model(self) -> nnx.Module:
        """The model with these weights and state, in train mode (call `.eval()` on it to evaluate)."""
        return nnx.merge(self.graphdef, self.params, self.rest)


def make_tx(optimizer: OptimizerFactory, lr: float = 0.0) -> optax.GradientTransformation:
    """`optimizer` is a factory taking `learning_rate` (e.g. `optax.sgd`, `optax.adam`)."""
    return optax.inject_hyperparams(optimizer)(learning_rate=lr)


def check_optimizer(optimizer) -> None:
    """A factory is needed (the rate is injected into its state); an optimizer instance is refused."""
    if isinstance(optimizer, optax.GradientTransformation) or not callable(optimizer):
        raise ConfigError(
            f"the optimizer must be a factory taking learning_rate, such as optax.adam or "
            f"functools.partial(optax.adamw, weight_decay=1e-4), not {type(optimizer).__name__} "
            f"{optimizer!r:.60}: lrjax sets the rate itself (range test, sweeps, schedules)")


def init_state(model: nnx.Module, optimizer: OptimizerFactory = optax.sgd, lr: float = 1e-3, *,
               loss_fn: LossFn = tasks.classification, dtype=None, schedule=None, mesh=None,
               rules=None) -> TrainState:
    """Splits `model` once and builds the optimizer state; the model object itself is not touched later.

    `dtype` (e.g. `jnp.bfloat16`) is the compute dtype of mixed precision: parameters and optimizer
    state stay as they are (float32), each step computes with a copy cast to `dtype`. `schedule`
    (step -> rate, see `lrjax.schedules`) sets the rate before every training step. With a `mesh` the
    state is placed on it: replicated, or, where it has `fsdp`/`tensor` axes, created sharded by the
    logical-axis `rules` (`lrjax.sharding`; None: `sharding.RULES`) by one program whose outputs are
    the shards (`jax.jit(..., out_shardings=...)`), so no device holds the whole state.
    """
    check_optimizer(optimizer)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # A second Python view over the same arrays, to read the static train/eval attributes (Dropout's
    # `deterministic`, BatchNorm's `use_running_average`) the NNX way; the user's model keeps its mode.
    view = nnx.merge(graphdef, params, rest)
    view.train()
    train_def = nnx.graphdef(view)
    view.eval()
    eval_def = nnx.graphdef(view)
    dtype = None if dtype is None or jnp.dtype(dtype) == jnp.float32 else jnp.dtype(dtype)
    static = dict(graphdef=train_def, eval_graphdef=eval_def, optimizer=optimizer, loss_fn=loss_fn, dtype=dtype,
                  schedule=schedule, rules=None if rules is None else tuple(map(tuple, rules)))
    if mesh is None or not sharding.is_sharded(mesh):
        state = _init_state(params, rest, lr, **static)
        return state if mesh is None else mesh_lib.replicate(state, mesh)
    if jax.process_count() > 1:  # each process's copy of the model as one global (replicated) input
        params, rest = mesh_lib.replicate((params, rest), mesh)
    build = partial(_new_state, **static)
    targets = sharding.shardings(jax.eval_shape(build, params, rest, lr), mesh, static["rules"])
    with jax.set_mesh(mesh):
        return jax.jit(build, out_shardings=targets, compiler_options=ONE_SHOT)(params, rest, lr)


def _new_state(params, rest, lr, **static) -> TrainState:
    return TrainState(params=params, rest=rest, opt_state=make_tx(static["optimizer"], lr).init(params),
                      step=jnp.zeros([], jnp.int32), **static)


# One compiled program (not a dozen eager ops), and its outputs are fresh buffers owned by the state,
# so later donation never touches the model's arrays.
_init_state = jax.jit(_new_state, static_argnames=("graphdef", "eval_graphdef", "optimizer", "loss_fn", "dtype",
                                                   "schedule", "rules"), compiler_options=ONE_SHOT)


class _Precision:
    """The model as the loss sees it under mixed precision: floating inputs cast to the compute
    dtype, floating outputs back to float32 (the loss and its gradient's start stay float32).
    Attribute access reaches the model itself."""

    def __init__(self, model, dtype):
        self._model, self._dtype = model, dtype

    def __call__(self, *args, **kwargs):
        cast = lambda to: (lambda a: a.astype(to) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a)
        args, kwargs = jax.tree.map(cast(self._dtype), (args, kwargs))
        return jax.tree.map(cast(jnp.float32), self._model(*args, **kwargs))

    def __getattr__(self, name):
        return getattr(self._model, name)


def _apply(state: TrainState, graphdef, params, batch: Batch):
    """The loss function on `batch` with the model merged inside the trace: (losses, metrics, rest)."""
    if state.dtype is not None:
        params = jax.tree.map(lambda p: p.astype(state.dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p,
                              params)
    # copy=True: fresh Variables of this trace level, which BatchNorm and RNG streams may update
    model = nnx.merge(graphdef, params, state.rest, copy=True)
    losses, metrics = state.loss_fn(model if state.dtype is None else _Precision(model, state.dtype), batch)
    # The updated state keeps its dtypes (a bfloat16 batch would otherwise turn float32 statistics to bf16).
    rest = jax.tree.map(lambda new, old: new.astype(old.dtype) if new.dtype != old.dtype else new,
                        nnx.state(model, nnx.Not(nnx.Param)), state.rest)
    return losses, metrics, rest


def _per_example(losses, metrics: dict, weights) -> dict[str, jax.Array]:
    """The loss and metrics as one dict of float32 per-example arrays, checked against the batch."""
    reserved = [name for name in metrics if name in RESERVED or name.startswith("val_")]
    if reserved:
        raise ValueError(f"loss_fn: metrics may not be named {reserved} (lrjax reports loss, lr, count and "
                         "val_<name> itself)")
    values = {"loss": losses, **metrics}
    for name, v in values.items():
        if jnp.shape(v) != weights.shape:
            raise ValueError(f"loss_fn must return per-example arrays of shape {weights.shape} (lrjax applies "
                             f"the padding weights and averages); {name!r} has shape {jnp.shape(v)}")
    return {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}


def train_step(state: TrainState, batch: Batch, weights) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on `batch` (train mode); metrics are the weighted means of the loss and the
    task's metrics *before* the update, and the learning rate the step used (the record is the truth).
    `weights` (shape [batch]) are 0 for padding rows."""
    if state.schedule is not None:
        state = state.with_lr(state.schedule(state.step))

    def objective(params):
        losses, metrics, rest = _apply(state, state.graphdef, params, batch)
        values = _per_example(losses, metrics, weights)
        total = jnp.maximum(jnp.sum(weights), 1.0)
        means = {k: jnp.sum(v * weights) / total for k, v in values.items()}
        return means["loss"], (means, rest)

    (_, (means, rest)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    # `value`: the loss, for a plateau reduction in the optimizer (lrjax.optimizers.Recipe); others ignore it
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params, value=means["loss"])
    # on a mesh with parameter axes, the new parameters and optimizer state stay sharded as they came
    params, opt_state = sharding.constrain((optax.apply_updates(state.params, updates), opt_state), state.rules)
    new = state.replace(params=params, rest=rest, opt_state=opt_state, step=state.step + 1)
    return new, {**means, "lr": state.lr}


def eval_step(state: TrainState, batch: Batch, weights) -> dict[str, jax.Array]:
    """Eval mode (running averages, no dropout); weighted sums (not means) of the loss and metrics and
    the example `count`, so batches of a padded evaluation set add up exactly."""
    # a schedule-free optimizer's evaluation point, not its training iterate (lrjax.optimizers.eval_params)
    losses, metrics, _ = _apply(state, state.eval_graphdef, optimizers.eval_params(state.opt_state, state.params),
                                batch)
    sums = {k: jnp.sum(v * weights) for k, v in _per_example(losses, metrics, weights).items()}
    return {**sums, "count": jnp.sum(weights)}


def batch_statistics(state: TrainState) -> TrainState:
    """`state` whose evaluation normalises each evaluated batch by its own statistics (BatchNorm's
    `use_running_average=False`, dropout still off) instead of the running averages; the same state
    for a model without such layers. For scoring weights trained a few dozen steps: BatchNorm's
    averages (momentum 0.99) still hold 0.99**40 = 67% of their initial values after 40 steps, and
    they, not the weights, decide such an evaluation (`lrjax.verify`)."""
    view = nnx.merge(state.eval_graphdef, state.params, state.rest)
    view.set_attributes(use_running_average=False, raise_if_not_found=False)
    return state.replace(eval_graphdef=nnx.graphdef(view))


# ---------------------------------------------------------------------------------------------
# Batch order, drawn on the host
# ---------------------------------------------------------------------------------------------

def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of pass `epoch` (0-based) over `n` examples, from (seed, epoch) alone: numpy's PCG64
    seeded with ``SeedSequence([seed, epoch])`` (pass 0 is ``default_rng(seed)``'s first permutation).
    Training draws its batches from it on every path: resident, streamed (in the stream's workers)
    and every sweep member, on any number of devices or processes, so they all see the same batches
    (the range test's first pass is the same permutation too)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)])).permutation(n).astype(np.int32)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def host_batch_order(seed: int, n: int, batch_size: int, num_steps: int | None = None):
    """Index matrix (num_steps, batch_size) and weights for shuffled passes over `n` examples, drawn
    on the host (numpy's PCG64 seeded with `seed`, one permutation per pass; ~1 ms of numpy instead
    of a threefry-and-sort program that took ~0.18 s to compile): the range test's order. Each pass's
    last partial batch is padded with weight-0 rows (the pass's first examples again), so every step
    has the same shape and no example is dropped (as Keras). Its first pass is `epoch_batches(seed, 1)`'s."""
    rng = np.random.default_rng(seed)
    return _batch_order(lambda p: rng.permutation(n).astype(np.int32), n, batch_size, num_steps)


def epoch_batches(seed: int, epoch: int, n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The batches (idx, w) of training epoch `epoch` (1-based), drawn on the host from
    `epoch_permutation(seed, epoch - 1, n)` alone: the order of `fit` (resident or streamed)
    and of every member of a sweep with that seed."""
    return _batch_order(lambda p: epoch_permutation(seed, epoch - 1, n), n, batch_size, None)


def _batch_order(permutation, n: int, batch_size: int, num_steps: int | None):
    per_epoch = steps_per_epoch(n, batch_size)
    num_steps = per_epoch if num_steps is None else num_steps
    passes = steps_per_epoch(num_steps, per_epoch)
    padded = per_epoch * batch_size
    wrap = np.arange(padded) % n  # the padding repeats the pass's first examples (weight 0)
    idx = np.concatenate([permutation(p)[wrap] for p in range(passes)]).reshape(-1, batch_size)[:num_steps]
    w = np.tile(np.arange(padded) < n, passes).reshape(-1, batch_size)[:num_steps].astype(np.float32)
    return idx, w


def num_examples(examples) -> int:
    return int(jax.tree.leaves(examples)[0].shape[0])


def gather_batch(examples, idx, w) -> tuple[Batch, jax.Array]:
    """Rows `idx` of the device-resident examples (a pytree) and their weights, sharded along the
    batch over the `data` mesh axis."""
    idx = mesh_lib.shard_batch(idx)
    return jax.tree.map(lambda a: mesh_lib.shard_batch(a[idx]), examples), mesh_lib.shard_batch(w)


# ---------------------------------------------------------------------------------------------
# Compiled programs
# ---------------------------------------------------------------------------------------------

def evaluate_arrays(state: TrainState, examples, batch_size: int) -> dict[str, jax.Array]:
    """The loss and the task's metrics over all of `examples` in eval mode, scanned in padded
    batches (traceable, vmappable)."""
    n = num_examples(examples)
    steps = steps_per_epoch(n, batch_size)
    pos = jnp.arange(steps * batch_size).reshape(steps, batch_size)
    idx, w = jnp.minimum(pos, n - 1), (pos < n).astype(jnp.float32)

    def body(acc, batch_idx):
        sums = eval_step(state, *gather_batch(examples, *batch_idx))
        return jax.tree.map(jnp.add, acc, sums), None

    zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(eval_step, state, *gather_batch(examples, idx[0], w[0])))
    sums, _ = jax.lax.scan(body, zero, (idx, w))
    count = sums.pop("count")
    return {k: v / count for k, v in sums.items()}


evaluate = jax.jit(evaluate_arrays, static_argnames=("batch_size",))


def _scan_steps(state: TrainState, fetch, rows, count, *, length: int, masked: bool):
    """`train_step` over `length` rows (a pytree scanned along its leading axis; `fetch(row)` gives
    the (batch, weights) of a row), skipping rows from `count` on when `masked`: (state, per-step
    metrics with each step's example `count`)."""

    def body(state, inputs):
        row, k = inputs

        def run(state):
            batch, wi = fetch(row)
            new, m = train_step(state, batch, wi)
            return new, {**m, "count": jnp.sum(wi)}

        if not masked:
            return run(state)
        shapes = jax.eval_shape(run, state)[1]
        return jax.lax.cond(k < count, run, lambda s: (s, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                                                         shapes)), state)

    return jax.lax.scan(body, state, (rows, jnp.arange(length)))


# Not donated: the host keeps references to the state between chunks (async checkpoint, best weights).
@partial(jax.jit, static_argnames=("length", "masked", "fetch"))
def train_chunk(state: TrainState, context, rows, w, count, *, length: int, masked: bool, fetch):
    """`length` training steps as one program: step i trains on `fetch(context, rows[i], w[i])` (an
    input's static fetch: `gather_batch` of resident examples, `given` for batches handed over), and
    with `masked` the steps from `count` (traced) on are skipped (lax.cond), otherwise all run.
    Returns (state, per-step metrics with each step's example `count`)."""
    return _scan_steps(state, lambda r: fetch(context, *r), (rows, w), count, length=length, masked=masked)


def to_float(x: jax.Array) -> jax.Array:
    """uint8 images to float32 in [0, 1] on the device, bit-identical to the resident path's host-side
    `x / 255` (a 256-entry table: XLA turns a division by 255 into an inexact multiplication)."""
    table = jnp.asarray(np.arange(256, dtype=np.float32) / np.float32(255.0))
    # The output is laid out like `x`: with explicitly sharded mesh axes a gather must be told.
    return table.at[x].get(out_sharding=jax.typeof(x).sharding)


def uint8_images(batch):
    """The Grain stream's batch (uint8 images, int32 labels) as the default task receives it: images
    turned into float32 on the device (`to_float`, bit-identical to the resident path's)."""
    x, y = batch
    return to_float(x), y


def fed_batch(batch, w) -> tuple[Batch, jax.Array]:
    """A batch handed to a program whole (a feed's, `lrjax.feeds`), split like a gathered batch."""
    return jax.tree.map(mesh_lib.shard_batch, batch), mesh_lib.shard_batch(w)


def given(_, batch, w) -> tuple[Batch, jax.Array]:
    """The fetch of inputs that hand whole batches over (no resident examples): the batch as it is."""
    return fed_batch(batch, w)


def given_uint8(_, batch, w) -> tuple[Batch, jax.Array]:
    """The fetch of lrjax's Grain stream: uint8 images turned float32 on the device (`uint8_images`)."""
    return fed_batch(uint8_images(batch), w)


@partial(jax.jit, static_argnames=("fetch",))
def evaluate_chunk(state: TrainState, context, rows, w, *, fetch) -> dict[str, jax.Array]:
    """`eval_step`'s weighted sums and example `count` over a chunk of evaluation batches (rows [K, ...],
    w [K, B]; padding rows and steps at weight 0), added up over the chunk."""

    def body(acc, row):
        return jax.tree.map(jnp.add, acc, eval_step(state, *fetch(context, *row))), None

    first = jax.tree.map(lambda a: a[0], (rows, w))
    zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: eval_step(state, *fetch(context, *first))))
    return jax.lax.scan(body, zero, (rows, w))[0]
