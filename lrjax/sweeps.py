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
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrjax import mesh as mesh_lib
from lrjax import steps
from lrjax.monitors import EarlyStopping
from lrjax.steps import OptimizerFactory


def lr_grid(lrs: Sequence[float], num_lrs: int = 16) -> np.ndarray:
    """Two values: a log-spaced grid of `num_lrs` rates between them; more: exactly those rates."""
    if len(lrs) == 2:
        lo, hi = sorted(lrs)
        return np.geomspace(lo, hi, num_lrs)
    return np.asarray(sorted(lrs), np.float64)


def nan_reduce(fn, values: np.ndarray, axis: int, fill: float) -> np.ndarray:
    """`fn` (np.nanmax, np.nanmean, ...) over `axis`, with `fill` where every value is NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: filled below
        out = fn(values, axis=axis)
    return np.where(np.isnan(out), fill, out)


def _member_step(state, live, batch):
    """One step of one member; a member that is not live, or whose loss is non-finite, is unchanged.

    Only the loss is checked: a finiteness test of every parameter after every step cost ~35% of a
    16-member epoch on CPU; parameters that overflow show up as a non-finite loss one step later.
    Looped members (not vmapped) skip the step entirely once they are no longer live.
    """

    def run(state):
        new, m = steps.train_step(state, batch)
        ok = jnp.isfinite(m["loss"])
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state), m["loss"], m["accuracy"], ok

    def skip(state):
        return state, jnp.full([], jnp.nan), jnp.full([], jnp.nan), jnp.zeros([], bool)

    state, loss, accuracy, ok = jax.lax.cond(live, run, skip, state)
    return state, {"loss": loss, "accuracy": accuracy, "ok": ok}


def _member_epoch(member, x, y):
    """One epoch of one member over its seed's batch order (idx, w)."""
    state, active, diverged, idx, w = member

    def body(carry, iw):
        state, diverged, sums = carry
        live = active & ~diverged
        state, m = _member_step(state, live, steps.gather_batch(x, y, *iw))
        diverged = diverged | (live & ~m["ok"])
        count = jnp.sum(iw[1]) * m["ok"]
        sums = jax.tree.map(jnp.add, sums, {"loss": jnp.where(m["ok"], m["loss"], 0.0) * count,
                                            "accuracy": jnp.where(m["ok"], m["accuracy"], 0.0) * count,
                                            "count": count})
        return (state, diverged, sums), None

    zero = jnp.zeros([])
    (state, diverged, sums), _ = jax.lax.scan(body, (state, diverged, {"loss": zero, "accuracy": zero,
                                                                         "count": zero}), (idx, w))
    count = jnp.maximum(sums["count"], 1.0)
    return state, diverged, {"loss": sums["loss"] / count, "accuracy": sums["accuracy"] / count}


def _to_members(tree, S: int, L: int):
    """(seeds, lrs, ...) -> (lrs * seeds, ...), rate-major: the `members` axis splits rates, so each
    device's members stay one contiguous block."""
    return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1).reshape(L * S, *a.shape[2:]), tree)


def _from_members(tree, S: int, L: int):
    return jax.tree.map(lambda a: jnp.swapaxes(a.reshape(L, S, *a.shape[1:]), 0, 1), tree)


@partial(jax.jit, static_argnames=("batch_size", "member_loop"))
def sweep_epoch(states, active, diverged, x, y, keys, *, batch_size: int, member_loop: str = "vmap"):
    """One epoch of every member. states/active/diverged: (seeds, lrs, ...); keys: (seeds,).

    The members of a seed share its batch order. `member_loop` ('vmap' or 'map') is how each device
    goes through its members (see `mesh.map_members`).
    """
    S, L = active.shape
    idx, w = jax.vmap(lambda k: steps.epoch_indices(k, x.shape[0], batch_size))(keys)
    idx, w = (jnp.broadcast_to(a[:, None], (S, L) + a.shape[1:]) for a in (idx, w))
    members = _to_members((states, active, diverged, idx, w), S, L)
    out = mesh_lib.map_members(_member_epoch, members, x, y, loop=member_loop)
    return _from_members(out, S, L)


@partial(jax.jit, static_argnames=("batch_size", "member_loop"))
def sweep_evaluate(states, x, y, *, batch_size: int, member_loop: str = "vmap"):
    S, L = states.step.shape
    out = mesh_lib.map_members(lambda s, x, y: steps.evaluate_arrays(s, x, y, batch_size),
                               _to_members(states, S, L), x, y, loop=member_loop)
    return _from_members(out, S, L)


@jax.jit
def _keep_best(best, params, improved):
    def pick(b, p):
        mask = improved.reshape(improved.shape + (1,) * (p.ndim - improved.ndim))
        return jnp.where(mask, p, b)

    return jax.tree.map(pick, best, params)


@dataclasses.dataclass
class SweepResult:
    lrs: np.ndarray  # (L,)
    seeds: list[int]  # (S,)
    train_loss: np.ndarray  # (E, S, L); NaN once a member has stopped or diverged
    val_loss: np.ndarray  # (E, S, L)
    val_accuracy: np.ndarray  # (E, S, L)
    diverged_epoch: np.ndarray  # (S, L), -1 where the member never diverged
    stopped_epoch: np.ndarray  # (S, L), -1 where early stopping never stopped it
    epochs: int
    wall_time_s: float
    compile_time_s: float = 0.0
    suggestions: dict[str, float | None] = dataclasses.field(default_factory=dict)
    states: Any = None  # stacked final (or best) states, (S, L, ...)

    @property
    def best_val_accuracy(self) -> np.ndarray:
        """(S, L): each member's best validation accuracy over the epochs it trained (0 if none)."""
        return nan_reduce(np.nanmax, self.val_accuracy, 0, 0.0)

    @property
    def best_val_loss(self) -> np.ndarray:
        """(S, L): each member's best validation loss (inf if it never had a finite one)."""
        return nan_reduce(np.nanmin, self.val_loss, 0, np.inf)

    @property
    def best_index(self) -> int | None:
        """None when no member ever had a finite validation accuracy (every one diverged at once)."""
        if not np.isfinite(self.val_accuracy).any():
            return None
        return int(np.argmax(self.best_val_accuracy.mean(0)))

    @property
    def best_lr(self) -> float | None:
        """The rate with the highest best-validation accuracy, averaged over seeds (None: see best_index)."""
        return None if self.best_index is None else float(self.lrs[self.best_index])

    @property
    def diverged(self) -> np.ndarray:
        return self.diverged_epoch >= 0

    def to_json(self) -> dict[str, Any]:
        members = []
        for s, seed in enumerate(self.seeds):
            for j, lr in enumerate(self.lrs):
                members.append({
                    "lr": float(lr), "seed": int(seed), "diverged": bool(self.diverged[s, j]),
                    "diverged_epoch": int(self.diverged_epoch[s, j]) if self.diverged[s, j] else None,
                    "stopped_epoch": int(self.stopped_epoch[s, j]) if self.stopped_epoch[s, j] >= 0 else None,
                    "best_val_accuracy": float(self.best_val_accuracy[s, j]),
                    "best_val_loss": _num(self.best_val_loss[s, j]),
                    "train_loss": [_num(v) for v in self.train_loss[:, s, j]],
                    "val_loss": [_num(v) for v in self.val_loss[:, s, j]],
                    "val_accuracy": [_num(v) for v in self.val_accuracy[:, s, j]],
                })
        return {"lrs": [float(v) for v in self.lrs], "seeds": list(self.seeds), "epochs": self.epochs,
                "best_lr": self.best_lr,
                "best_val_accuracy": None if self.best_lr is None else float(self.best_val_accuracy.mean(0).max()),
                "mean_best_val_accuracy": [float(v) for v in self.best_val_accuracy.mean(0)],
                "suggestions": self.suggestions, "wall_time_s": self.wall_time_s,
                "compile_time_s": self.compile_time_s, "members": members}

    def save(self, workdir: str | Path) -> None:
        """Writes sweep.json, sweep.csv and sweep.png into `workdir`."""
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "sweep.json").write_text(json.dumps(self.to_json(), indent=1))
        rows = ["epoch,lr,seed,train_loss,val_loss,val_accuracy"]
        for e in range(self.train_loss.shape[0]):
            for s, seed in enumerate(self.seeds):
                for j, lr in enumerate(self.lrs):
                    rows.append(f"{e + 1},{lr:.6g},{seed},{self.train_loss[e, s, j]:.6g},"
                                f"{self.val_loss[e, s, j]:.6g},{self.val_accuracy[e, s, j]:.6g}")
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
          on_epoch: Callable[[int, dict], None] | None = None, member_loop: str | None = None) -> SweepResult:
    """Trains one model per (lr, seed) at once; `model_fn(seed)` builds a freshly initialised model.

    With `patience`, each member stops `patience` epochs after its best validation loss (an improvement
    is a fall of more than `min_delta`) and keeps its best state. `on_epoch(epoch, metrics)` is called
    on the host after each epoch (progress, logging). `member_loop` ('vmap' or 'map', default by
    platform) is how each device goes through its members.
    """
    t_start = time.perf_counter()
    lrs = np.asarray(lrs, np.float64)
    seeds = [int(s) for s in seeds]
    S, L = len(seeds), len(lrs)
    mesh = mesh if mesh is not None else mesh_lib.make_mesh("auto", members=L)
    member_loop = member_loop or mesh_lib.default_member_loop(mesh)
    mesh_lib.check_batch_size(batch_size, mesh)
    # The rates fill whole blocks of the `members` axis: filler rates (copies of the last) never train.
    Lp = mesh_lib.padded_members(L, mesh)
    real = np.arange(Lp) < L

    def widen(a: np.ndarray, fill) -> np.ndarray:  # (S, L) -> (S, Lp)
        return np.concatenate([a, np.full((S, Lp - L), fill, a.dtype)], axis=1)
    monitors = (None if patience is None
                else [[EarlyStopping(patience=patience, min_delta=min_delta) for _ in range(L)] for _ in range(S)])
    history = {k: np.full((epochs, S, L), np.nan) for k in ("train_loss", "val_loss", "val_accuracy")}
    diverged_epoch = np.full((S, L), -1)
    stopped_epoch = np.full((S, L), -1)
    compile_time = 0.0

    with jax.set_mesh(mesh):
        per_seed = [steps.init_state(model_fn(seed), optimizer, 0.0) for seed in seeds]
        states = jax.tree.map(lambda *a: jnp.stack([jnp.broadcast_to(v, (Lp,) + v.shape) for v in a]), *per_seed)
        member_lrs = np.concatenate([lrs, np.full(Lp - L, lrs[-1])]).astype(np.float32)
        states = states.with_lr(jnp.broadcast_to(jnp.asarray(member_lrs), (S, Lp)))
        def place(tree):  # replicated, then split over the `members` axis by rate
            return mesh_lib.spread_members(mesh_lib.replicate(tree, mesh), axis=1)

        states = place(states)
        best_params = jax.tree.map(jnp.copy, states.params)
        x, y, xv, yv = mesh_lib.replicate_data(data, mesh)
        keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
        active, diverged = place(np.broadcast_to(real, (S, Lp))), place(np.zeros((S, Lp), bool))
        for epoch in range(1, epochs + 1):
            epoch_keys = jax.vmap(steps.epoch_key, in_axes=(0, None))(keys, epoch)
            was_live = mesh_lib.to_host(active & ~diverged)[:, :L]
            if epoch == 1:
                t0 = time.perf_counter()
                program = sweep_epoch.lower(states, active, diverged, x, y, epoch_keys,
                                            batch_size=batch_size, member_loop=member_loop).compile()
                compile_time = time.perf_counter() - t0
            states, diverged, train_m = program(states, active, diverged, x, y, epoch_keys)
            val_m = sweep_evaluate(states, xv, yv, batch_size=eval_batch_size, member_loop=member_loop)
            train_m, val_m, div = jax.tree.map(lambda a: a[:, :L],  # one sync per epoch
                                               mesh_lib.to_host((train_m, val_m, diverged)))
            newly = div & (diverged_epoch < 0)
            diverged_epoch[newly] = epoch
            trained = was_live & ~newly
            history["train_loss"][epoch - 1] = np.where(trained, train_m["loss"], np.nan)
            history["val_loss"][epoch - 1] = np.where(was_live, val_m["loss"], np.nan)
            # a state that overflowed in its last finite step has no meaningful accuracy (argmax of NaNs)
            history["val_accuracy"][epoch - 1] = np.where(was_live & np.isfinite(val_m["loss"]),
                                                          val_m["accuracy"], np.nan)
            if monitors is not None:
                improved = np.zeros((S, L), bool)
                for s in range(S):
                    for j in range(L):
                        if was_live[s, j] and not div[s, j]:
                            improved[s, j] = monitors[s][j].update(epoch, {"val_loss": val_m["loss"][s, j]})
                            if monitors[s][j].should_stop:
                                stopped_epoch[s, j] = epoch
                best_params = _keep_best(best_params, states.params, jnp.asarray(widen(improved, False)))
                active = place(widen(stopped_epoch < 0, False))
            if on_epoch is not None:
                on_epoch(epoch, {k: v[epoch - 1] for k, v in history.items()})
            if not np.any(was_live & ~div & (stopped_epoch < 0)):
                break
    if monitors is not None:
        states = states.replace(params=best_params)
    if Lp > L:
        states = jax.tree.map(lambda a: a[:, :L], states)
    return SweepResult(lrs=lrs, seeds=seeds, **history, diverged_epoch=diverged_epoch,
                       stopped_epoch=stopped_epoch, epochs=epochs, wall_time_s=time.perf_counter() - t_start,
                       compile_time_s=compile_time, states=states)


def write_sweep_events(result: SweepResult, logdir: Path, hparams: dict | None = None) -> None:
    """One TensorBoard run per member with its curves and hparams, for TensorBoard's HParams view."""
    from lrjax import tb

    names = run_names(result.lrs)
    for s, seed in enumerate(result.seeds):
        for j, lr in enumerate(result.lrs):
            writer = tb.Writer(Path(logdir) / f"lr_{names[j]}_seed_{seed}", purge_step=0)
            try:
                for e in range(result.train_loss.shape[0]):
                    scalars = {"train_loss": result.train_loss[e, s, j], "val_loss": result.val_loss[e, s, j],
                               "val_accuracy": result.val_accuracy[e, s, j]}
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
