"""A grid of learning rates (x seeds) trained simultaneously: one compiled program per epoch.

Members are laid out as (seeds, lrs): the models of one seed start from the same weights and see
the same batch order, so the learning rate is the only difference between them. Inside the epoch
program the members are vmapped (accelerators) or, on a CPU, looped over by each core (see
`mesh.map_members`). Rates are traced values in each member's optimizer state: a new grid never
recompiles. A member whose loss turns non-finite is frozen (its update is dropped from that step
on) and marked; with `patience`, a member stops updating once its
validation loss has not improved for `patience` epochs and keeps its best state.
Members can be spread over devices along a `members` mesh axis.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrjax import mesh as mesh_lib
from lrjax import feeds, steps, tasks
from lrjax.data import split_examples
from lrjax.errors import ConfigError
from lrjax.callbacks import EarlyStopping
from lrjax.numeric import nan_reduce
from lrjax.steps import OptimizerFactory
from lrjax.tasks import LossFn


def lr_grid(lrs: Sequence[float], num_lrs: int = 16) -> np.ndarray:
    """Two values: a log-spaced grid of `num_lrs` rates between them; more: exactly those rates."""
    if len(lrs) == 2:
        lo, hi = sorted(lrs)
        return np.geomspace(lo, hi, num_lrs)
    return np.asarray(sorted(lrs), np.float64)


def _member_step(state, live, batch, weights):
    """One step of one member; a member that is not live, or whose loss is non-finite, is unchanged.

    Only the loss is checked: a finiteness test of every parameter after every step cost ~35% of a
    16-member epoch on CPU; parameters that overflow show up as a non-finite loss one step later.
    Looped members (not vmapped) skip the step entirely once they are no longer live.
    """

    def run(state):
        new, m = steps.train_step(state, batch, weights)
        ok = jnp.isfinite(m["loss"])
        m = {k: v for k, v in m.items() if k != "lr"}
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state), m, ok

    def skip(state):
        shapes = jax.eval_shape(run, state)[1]
        return state, {k: jnp.full([], jnp.nan) for k in shapes}, jnp.zeros([], bool)

    return jax.lax.cond(live, run, skip, state)


def _member_steps(member, fetch, rows, count):
    """Steps of one member over `rows` (scanned along their leading axis; `fetch(row)` gives a
    step's (batch, weights); steps from `count` on are padding and skipped): its state, whether it
    has diverged, and the example-weighted sums of its loss and metrics over the steps that ran,
    with their example `count`."""
    state, active, diverged = member

    def body(carry, inputs):
        state, diverged, sums = carry
        row, i = inputs
        live = active & ~diverged & (i < count)
        batch, wi = fetch(row)
        state, m, ok = _member_step(state, live, batch, wi)
        diverged = diverged | (live & ~ok)
        n = jnp.sum(wi) * ok
        sums = jax.tree.map(jnp.add, sums, {**{k: jnp.where(ok, v, 0.0) * n for k, v in m.items()}, "count": n})
        return (state, diverged, sums), None

    names = jax.eval_shape(_member_step, state, active, *fetch(jax.tree.map(lambda a: a[0], rows)))[1]
    zero = {k: jnp.zeros([]) for k in (*names, "count")}
    length = jax.tree.leaves(rows)[0].shape[0]
    (state, diverged, sums), _ = jax.lax.scan(body, (state, diverged, zero), (rows, jnp.arange(length)))
    return state, diverged, sums


def means(sums: dict) -> dict:
    """Weighted sums (with their `count`) as means."""
    sums = dict(sums)
    count = jnp.maximum(sums.pop("count"), 1.0)
    return {k: v / count for k, v in sums.items()}


def _to_members(tree, S: int, L: int):
    """(seeds, lrs, ...) -> (lrs * seeds, ...), rate-major: the `members` axis splits rates, so each
    device's members stay one contiguous block."""
    return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1).reshape(L * S, *a.shape[2:]), tree)


def _from_members(tree, S: int, L: int):
    return jax.tree.map(lambda a: jnp.swapaxes(a.reshape(L, S, *a.shape[1:]), 0, 1), tree)


@partial(jax.jit, static_argnames=("member_loop",))
def sweep_epoch(states, active, diverged, examples, idx, w, *, member_loop: str = "vmap"):
    """One epoch of every member. states/active/diverged: (seeds, lrs, ...); idx, w: (seeds, steps,
    batch), each seed's batches (`steps.host_batch_order`), which the members of a seed share.
    `member_loop` ('vmap' or 'map') is how each device goes through its members (see `mesh.map_members`).
    """
    S, L = active.shape
    idx, w = (jnp.broadcast_to(a[:, None], (S, L) + a.shape[1:]) for a in (idx, w))
    members = _to_members((states, active, diverged, idx, w), S, L)

    def epoch(member, examples):
        *member, idx, w = member
        state, diverged, sums = _member_steps(member, lambda r: steps.gather_batch(examples, *r), (idx, w),
                                              idx.shape[0])
        return state, diverged, means(sums)

    return _from_members(mesh_lib.map_members(epoch, members, examples, loop=member_loop), S, L)


@partial(jax.jit, static_argnames=("prepare", "member_loop"))
def sweep_fed_chunk(states, active, diverged, batch, w, count, *, prepare=None, member_loop: str = "vmap"):
    """Steps [0, count) of a feed's chunk (`lrjax.feeds`: [K, B, ...] leaves, w [K, B]) for every
    member, all on the same batches: (states, diverged, weighted sums with their `count`)."""
    S, L = active.shape
    members = _to_members((states, active, diverged), S, L)
    out = mesh_lib.map_members(
        lambda m, batch, w, count: _member_steps(m, lambda r: steps.fed_batch(*r, prepare), (batch, w), count),
        members, batch, w, count, loop=member_loop)
    return _from_members(out, S, L)


@partial(jax.jit, static_argnames=("batch_size", "member_loop"))
def sweep_evaluate(states, examples, *, batch_size: int, member_loop: str = "vmap"):
    """Every member's loss and metrics on `examples`, in eval mode."""
    S, L = states.step.shape
    out = mesh_lib.map_members(lambda s, examples: steps.evaluate_arrays(s, examples, batch_size),
                               _to_members(states, S, L), examples, loop=member_loop)
    return _from_members(out, S, L)


@jax.jit
def _keep_best(best, current, improved):
    """Members' (params, rest) where `improved` (S, L), else the best kept so far."""
    def pick(b, p):
        mask = improved.reshape(improved.shape + (1,) * (p.ndim - improved.ndim))
        return jnp.where(mask, p, b)

    return jax.tree.map(pick, best, current)


@dataclasses.dataclass
class SweepResult:
    lrs: np.ndarray  # (L,)
    seeds: list[int]  # (S,)
    # per epoch, as in fit's history: "loss", the task's metrics, "val_loss", "val_<metric>": (E, S, L),
    # NaN once a member has stopped or diverged (validation values also where its val_loss is not finite)
    metrics: dict[str, np.ndarray]
    diverged_epoch: np.ndarray  # (S, L), -1 where the member never diverged
    stopped_epoch: np.ndarray  # (S, L), -1 where early stopping never stopped it
    epochs: int
    wall_time_s: float
    compile_time_s: float = 0.0
    suggestions: dict[str, float | None] = dataclasses.field(default_factory=dict)
    states: Any = None  # stacked final (or best) states, (S, L, ...)
    rank_by: str = "val_accuracy"  # the metric that ranks the rates ("val_loss" where the task has no accuracy)

    @property
    def train_loss(self) -> np.ndarray:
        return self.metrics["loss"]

    @property
    def val_loss(self) -> np.ndarray:
        return self.metrics["val_loss"]

    @property
    def val_accuracy(self) -> np.ndarray:
        """(E, S, L); all NaN for a task without an `accuracy` metric."""
        return self.metrics.get("val_accuracy", np.full_like(self.val_loss, np.nan))

    @property
    def mode(self) -> str:
        return EarlyStopping(monitor=self.rank_by).mode

    def best(self, name: str) -> np.ndarray:
        """(S, L): each member's best value of metric `name` over the epochs it trained (the highest for
        accuracy-like metrics, else the lowest; -inf/inf where it never had one)."""
        if EarlyStopping(monitor=name).mode == "max":
            return nan_reduce(np.nanmax, self.metrics[name], 0, -np.inf)
        return nan_reduce(np.nanmin, self.metrics[name], 0, np.inf)

    @property
    def best_val_accuracy(self) -> np.ndarray:
        """(S, L): each member's best validation accuracy over the epochs it trained (0 if none)."""
        return nan_reduce(np.nanmax, self.val_accuracy, 0, 0.0)

    @property
    def best_val_loss(self) -> np.ndarray:
        """(S, L): each member's best validation loss (inf if it never had a finite one)."""
        return self.best("val_loss")

    @property
    def best_index(self) -> int | None:
        """The rate whose best `rank_by`, averaged over seeds, is best; None when no member ever had a
        finite value (every one diverged at once)."""
        if not np.isfinite(self.metrics[self.rank_by]).any():
            return None
        score = self.best(self.rank_by).mean(0)
        return int(np.argmax(score) if self.mode == "max" else np.argmin(score))

    @property
    def best_lr(self) -> float | None:
        """The best rate by `rank_by` (see best_index; None there, None here)."""
        return None if self.best_index is None else float(self.lrs[self.best_index])

    @property
    def diverged(self) -> np.ndarray:
        return self.diverged_epoch >= 0

    def _columns(self) -> list[str]:
        """Metric names in file order: the losses, then validation metrics, then training metrics."""
        rest = sorted(k for k in self.metrics if k not in ("loss", "val_loss"))
        return ["loss", "val_loss"] + [k for k in rest if k.startswith("val_")] + [k for k in rest
                                                                                  if not k.startswith("val_")]

    def to_json(self) -> dict[str, Any]:
        label = lambda k: "train_loss" if k == "loss" else k  # noqa: E731 - the files' name for the loss
        rank = self.best(self.rank_by)
        members = []
        for s, seed in enumerate(self.seeds):
            for j, lr in enumerate(self.lrs):
                members.append({
                    "lr": float(lr), "seed": int(seed), "diverged": bool(self.diverged[s, j]),
                    "diverged_epoch": int(self.diverged_epoch[s, j]) if self.diverged[s, j] else None,
                    "stopped_epoch": int(self.stopped_epoch[s, j]) if self.stopped_epoch[s, j] >= 0 else None,
                    "best_val_accuracy": float(self.best_val_accuracy[s, j]),
                    "best_val_loss": _num(self.best_val_loss[s, j]),
                    f"best_{self.rank_by}": _num(rank[s, j]),
                    **{label(k): [_num(v) for v in self.metrics[k][:, s, j]] for k in self._columns()},
                })
        best = self.best_index
        return {"lrs": [float(v) for v in self.lrs], "seeds": list(self.seeds), "epochs": self.epochs,
                "best_lr": self.best_lr, "rank_by": self.rank_by,
                "best_score": None if best is None else float(rank.mean(0)[best]),
                "best_val_accuracy": None if best is None else float(self.best_val_accuracy.mean(0).max()),
                "mean_best_val_accuracy": [float(v) for v in self.best_val_accuracy.mean(0)],
                "suggestions": self.suggestions, "wall_time_s": self.wall_time_s,
                "compile_time_s": self.compile_time_s, "members": members}

    def save(self, workdir: str | Path) -> None:
        """Writes sweep.json, sweep.csv and sweep.png into `workdir`."""
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "sweep.json").write_text(json.dumps(self.to_json(), indent=1))
        columns = self._columns()
        rows = [",".join(["epoch", "lr", "seed", "train_loss", *columns[1:]])]
        for e in range(self.train_loss.shape[0]):
            for s, seed in enumerate(self.seeds):
                for j, lr in enumerate(self.lrs):
                    values = ",".join(f"{self.metrics[k][e, s, j]:.6g}" for k in columns)
                    rows.append(f"{e + 1},{lr:.6g},{seed},{values}")
        (workdir / "sweep.csv").write_text("\n".join(rows) + "\n")
        self.plot(workdir / "sweep.png")

    def plot(self, path: str | Path) -> None:
        from lrjax import plots

        plots.plot_sweep(self, path)


def _num(v) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


def sweep(model_fn: Callable[[int], nnx.Module], optimizer: OptimizerFactory, data, lrs: Sequence[float], *,
          seeds: Sequence[int] = (42,), epochs: int = 5, batch_size: int = 32, patience: int | None = None,
          min_delta: float = 0.0, eval_batch_size: int = 1000, mesh: jax.sharding.Mesh | None = None,
          on_epoch: Callable[[int, dict], None] | None = None, member_loop: str | None = None,
          loss_fn: LossFn = tasks.classification, dtype=None, rank_by: str | None = None, valid=None,
          steps_per_epoch: int | None = None, chunk_steps: int = 64) -> SweepResult:
    """Trains one model per (lr, seed) at once; `model_fn(seed)` builds a freshly initialised model.

    With `patience`, each member stops `patience` epochs after its best validation loss (an improvement
    is a fall of more than `min_delta`) and keeps its best state (weights and non-parameter state,
    e.g. batch statistics, of the same epoch). `loss_fn` and `dtype` as in `fit`; `rank_by` is the
    validation metric that ranks the rates (default val_accuracy where the task reports accuracy,
    else val_loss; highest wins for accuracy-like names, lowest otherwise). `on_epoch(epoch, metrics)`
    is called on the host after each epoch (progress, logging). `member_loop` ('vmap' or 'map',
    default by platform) is how each device goes through its members.

    Your own pipeline: `data` may be an iterable of batches with the validation examples as `valid`,
    as in `fit` (`steps_per_epoch` where it has no length); every member then trains on the same
    batches, in calls of `chunk_steps` steps. With arrays each seed draws its own batch order.
    """
    t_start = time.perf_counter()
    lrs = np.asarray(lrs, np.float64)
    seeds = [int(s) for s in seeds]
    S, L = len(seeds), len(lrs)
    mesh = mesh if mesh is not None else mesh_lib.make_mesh("auto", members=L)
    member_loop = member_loop or mesh_lib.default_member_loop(mesh)
    kind = feeds.kind(data)
    if kind == "splits":
        raise ConfigError("sweep: a lrjax.sources.Splits is not supported; give arrays or an iterable of batches")
    feed = None
    if kind == "batches":
        feed, spe, batch_size, valid = feeds.for_training("sweep", data, valid, steps_per_epoch, chunk_steps, mesh)
    mesh_lib.check_batch_size(batch_size, mesh)
    # The rates fill whole blocks of the `members` axis: filler rates (copies of the last) never train.
    Lp = mesh_lib.padded_members(L, mesh)
    real = np.arange(Lp) < L

    def widen(a: np.ndarray, fill) -> np.ndarray:  # (S, L) -> (S, Lp)
        return np.concatenate([a, np.full((S, Lp - L), fill, a.dtype)], axis=1)
    monitors = (None if patience is None
                else [[EarlyStopping(patience=patience, min_delta=min_delta) for _ in range(L)] for _ in range(S)])
    history: dict[str, np.ndarray] = {}  # filled from the first epoch's metric names
    diverged_epoch = np.full((S, L), -1)
    stopped_epoch = np.full((S, L), -1)
    compile_time = 0.0

    with jax.set_mesh(mesh):
        per_seed = [steps.init_state(model_fn(seed), optimizer, 0.0, loss_fn=loss_fn, dtype=dtype)
                    for seed in seeds]
        states = jax.tree.map(lambda *a: jnp.stack([jnp.broadcast_to(v, (Lp,) + v.shape) for v in a]), *per_seed)
        member_lrs = np.concatenate([lrs, np.full(Lp - L, lrs[-1])]).astype(np.float32)
        states = states.with_lr(jnp.broadcast_to(jnp.asarray(member_lrs), (S, Lp)))
        def place(tree):  # replicated, then split over the `members` axis by rate
            return mesh_lib.spread_members(mesh_lib.replicate(tree, mesh), axis=1)

        states = place(states)
        best = jax.tree.map(jnp.copy, (states.params, states.rest))
        if feed is None:
            train, valid = mesh_lib.replicate((split_examples(data, "train"), split_examples(data, "valid")), mesh)
        else:
            valid = mesh_lib.replicate(valid, mesh)
        active, diverged = place(np.broadcast_to(real, (S, Lp))), place(np.zeros((S, Lp), bool))
        for epoch in range(1, epochs + 1):
            was_live = mesh_lib.to_host(active & ~diverged)[:, :L]
            t0 = time.perf_counter()
            if feed is None:
                # each seed's batches of this epoch, as `fit` draws them
                order = mesh_lib.replicate([np.stack(a) for a in zip(*(steps.epoch_batches(
                    int(seed), epoch, steps.num_examples(train), batch_size) for seed in seeds))], mesh)
                if epoch == 1:
                    program = sweep_epoch.lower(states, active, diverged, train, *order,
                                                member_loop=member_loop).compile()
                    compile_time = time.perf_counter() - t0
                states, diverged, train_m = program(states, active, diverged, train, *order)
            else:
                sums = None
                for start in range(0, spe, feed.k):
                    count = np.int32(min(feed.k, spe - start))
                    chunk = feed.take(count)
                    if epoch == 1 and start == 0:
                        program = sweep_fed_chunk.lower(states, active, diverged, *chunk, count, prepare=feed.prepare,
                                                        member_loop=member_loop).compile()
                        compile_time = time.perf_counter() - t0
                    states, diverged, s = program(states, active, diverged, *chunk, count)
                    sums = s if sums is None else jax.tree.map(jnp.add, sums, s)
                train_m = means(sums)
            val_m = sweep_evaluate(states, valid, batch_size=eval_batch_size, member_loop=member_loop)
            train_m, val_m, div = jax.tree.map(lambda a: a[:, :L],  # one sync per epoch
                                               mesh_lib.to_host((train_m, val_m, diverged)))
            newly = div & (diverged_epoch < 0)
            diverged_epoch[newly] = epoch
            trained = was_live & ~newly
            # a state that overflowed in its last finite step has no meaningful metrics (an argmax of NaNs
            # scores some accuracy): validation values count only where the validation loss is finite
            scored = was_live & np.isfinite(val_m["loss"])
            values = {**{k: np.where(trained, v, np.nan) for k, v in train_m.items()},
                      "val_loss": np.where(was_live, val_m["loss"], np.nan),
                      **{f"val_{k}": np.where(scored, v, np.nan) for k, v in val_m.items() if k != "loss"}}
            for k, v in values.items():
                history.setdefault(k, np.full((epochs, S, L), np.nan))[epoch - 1] = v
            if monitors is not None:
                improved = np.zeros((S, L), bool)
                for s in range(S):
                    for j in range(L):
                        if was_live[s, j] and not div[s, j]:
                            improved[s, j] = monitors[s][j].update(epoch, {"val_loss": val_m["loss"][s, j]})
                            if monitors[s][j].should_stop:
                                stopped_epoch[s, j] = epoch
                best = _keep_best(best, (states.params, states.rest), jnp.asarray(widen(improved, False)))
                active = place(widen(stopped_epoch < 0, False))
            if on_epoch is not None:
                on_epoch(epoch, {k: v[epoch - 1] for k, v in history.items()})
            if not np.any(was_live & ~div & (stopped_epoch < 0)):
                break
    if feed is not None:
        feed.close()
    if monitors is not None:
        states = states.replace(params=best[0], rest=best[1])
    if Lp > L:
        states = jax.tree.map(lambda a: a[:, :L], states)
    rank_by = rank_by or ("val_accuracy" if "val_accuracy" in history else "val_loss")
    if rank_by not in history:
        raise ValueError(f"sweep: rank_by {rank_by!r} is not a validation metric of this task "
                         f"(have {sorted(k for k in history if k.startswith('val_'))})")
    return SweepResult(lrs=lrs, seeds=seeds, metrics=history, diverged_epoch=diverged_epoch,
                       stopped_epoch=stopped_epoch, epochs=epochs, wall_time_s=time.perf_counter() - t_start,
                       compile_time_s=compile_time, states=states, rank_by=rank_by)


def write_sweep_events(result: SweepResult, logdir: Path, hparams: dict | None = None) -> None:
    """One TensorBoard run per member with its curves and hparams, for TensorBoard's HParams view."""
    from lrjax import tb

    names = run_names(result.lrs)
    for s, seed in enumerate(result.seeds):
        for j, lr in enumerate(result.lrs):
            writer = tb.Writer(Path(logdir) / f"lr_{names[j]}_seed_{seed}", purge_step=0)
            try:
                for e in range(result.train_loss.shape[0]):
                    scalars = {"train_loss" if k == "loss" else k: v[e, s, j] for k, v in result.metrics.items()}
                    writer.write_scalars(e + 1, {k: v for k, v in scalars.items() if np.isfinite(v)})
                writer.write_hparams({**(hparams or {}), "lr": float(lr), "seed": int(seed)},
                                     {"best_val_accuracy": float(result.best_val_accuracy[s, j]),
                                      "diverged": float(result.diverged[s, j])})
            finally:
                writer.close()


def run_names(lrs) -> list[str]:
    """The rates as short distinct strings ('0.01', '0.0316', ...): 4 significant digits, more where
    two rates would share a name (and so one TensorBoard run)."""
    for digits in (4, 6, 8, 17):
        names = [f"{float(lr):.{digits}g}" for lr in lrs]
        if len(set(names)) == len(names):
            return names
    return [f"{float(lr)!r}_{i}" for i, lr in enumerate(lrs)]  # a rate given twice: numbered apart
