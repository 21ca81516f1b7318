"""The host training loop: compiled epochs with early stopping, Orbax checkpoints and TensorBoard.

Each epoch is one compiled program (`steps.train_epoch`) followed by a compiled evaluation of the
validation set; the host syncs once per epoch. Epoch e's metrics decide at once (early stopping,
best weights, signals) whether epoch e+1 starts; its side effects (TensorBoard, checkpoint,
printing) then run on the host while the device computes e+1. The data order of epoch e derives
from (seed, e) only, so a run resumed from its checkpoint ends bit-identical (on CPU) to an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrjax import mesh as mesh_lib
from lrjax import faults, steps, tb
from lrjax.checkpoint import Checkpointer
from lrjax.errors import ConfigError, TrainingDiverged
from lrjax.monitors import EarlyStopping
from lrjax.steps import OptimizerFactory, TrainState

# Settings that define a run: resuming a workdir with different values would mix two experiments.
RUN_IDENTITY = ("dataset", "seed", "batch_size", "hidden_sizes", "optimizer", "lr", "monitor")


@dataclasses.dataclass
class FitResult:
    state: TrainState  # best epoch's weights when restore_best_weights, else the last epoch's
    history: list[dict[str, float]]
    best_epoch: int | None
    best_val_loss: float | None
    epochs_run: int
    stopped_early: bool
    interrupted: str | None = None  # "SIGTERM"/"SIGINT", or "stop-after": ended before finishing
    run_dir: Path | None = None
    resumed_from: int | None = None
    wall_time_s: float = 0.0
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def model(self) -> nnx.Module:
        return self.state.model()

    def evaluate(self, x, y, batch_size: int = 1000) -> dict[str, float]:
        return {k: float(v) for k, v in jax.device_get(
            steps.evaluate(self.state, jnp.asarray(x), jnp.asarray(y), batch_size=batch_size)).items()}


class _StopSignals:
    """Turns SIGTERM/SIGINT into a flag checked between epochs (a second SIGINT interrupts at once).

    The handler only sets the flag: a print there could re-enter a print it interrupted. The loop
    reports the signal (`announce`), also while it waits for the device (`faults.wait_ready`).
    """

    def __init__(self):
        self.received: str | None = None
        self._announced = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def announce(self) -> None:
        if self.received and not self._announced:
            self._announced = True
            _log(f"lrjax: {self.received} received: finishing the current epoch, then saving a checkpoint")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def fit(model: nnx.Module, optimizer: OptimizerFactory, data, *, lr: float, epochs: int = 100,
        batch_size: int = 32, seed: int = 42, early_stopping: EarlyStopping | None = None,
        workdir: str | Path | None = None, checkpoints: bool = True, tensorboard: bool = True,
        keep_latest: int = 2, eval_batch_size: int = 1000, config: dict | None = None,
        mesh: jax.sharding.Mesh | None = None, stop_after: int | None = None,
        progress: Callable[[str], None] | None = print) -> FitResult:
    """Trains `model` (its weights are the starting point; the object itself is not modified).

    `optimizer` is a factory taking `learning_rate` (`optax.sgd`, `optax.adam`, ...). `data` has
    `x_train`, `y_train`, `x_valid`, `y_valid`. With a `workdir`, checkpoints go to
    `workdir/checkpoints` (and an existing one is resumed) and TensorBoard events to
    `workdir/tensorboard/run_*/{train,validation}`. `stop_after` ends the run after that epoch as a
    preemption would (for tests and time-boxed jobs). Raises `TrainingDiverged` on a non-finite loss.
    """
    t_start = time.perf_counter()
    if stop_after is not None and stop_after < 1:
        raise ConfigError(f"stop_after (--stop-after) must be an epoch >= 1, got {stop_after}")
    early_stopping = early_stopping if early_stopping is not None else EarlyStopping(patience=epochs)
    mesh = mesh if mesh is not None else mesh_lib.make_mesh("auto")
    mesh_lib.check_batch_size(batch_size, mesh)
    # What identifies the run (checked on resume, see RUN_IDENTITY), also for callers without a config.
    config = {**(config or {}), "lr": lr, "seed": seed, "batch_size": batch_size, "monitor": early_stopping.monitor}
    # train_s: compiled epochs and validation (dispatch is asynchronous: they are timed together)
    timings = {"compile_s": 0.0, "train_s": 0.0, "checkpoint_s": 0.0, "tensorboard_s": 0.0}

    state = mesh_lib.replicate(steps.init_state(model, optimizer, lr), mesh)
    x, y, xv, yv = mesh_lib.replicate_data(data, mesh)
    # The RNG key's raw data, replicated like everything else (multi-host checkpoints need global arrays).
    rng = mesh_lib.replicate(np.asarray(jax.random.key_data(jax.random.key(seed))), mesh)
    best_params = state.params  # no copy needed: the epoch programs donate nothing
    history: list[dict[str, float]] = []
    start_epoch, run_name, resumed_from = 0, tb.new_run_name(), None

    workdir = Path(workdir) if workdir is not None else None
    ckpt = None
    if workdir is not None and checkpoints:
        ckpt = Checkpointer(workdir / "checkpoints", keep_latest=keep_latest, best_metric=early_stopping.monitor,
                            mode=early_stopping.mode)
        if ckpt.latest_step() is not None:
            target = _tree(state, best_params, rng)
            try:
                resumed_from, tree, meta = ckpt.restore(
                    target, check_meta=lambda m: _check_meta(m, config, ckpt.directory))
            except BaseException:
                ckpt.close()
                raise
            state = state.replace(params=tree["params"], rest=tree["rest"], opt_state=tree["opt_state"],
                                  step=tree["step"])
            best_params, rng = tree["best_params"], tree["rng"]
            early_stopping.load_state_dict(meta["early_stopping"])
            history = list(meta["history"])
            start_epoch, run_name = int(meta["epoch"]), meta["run_name"]
            _log(f"lrjax: resuming {workdir} from epoch {start_epoch} (checkpoint {resumed_from})")

    writers = None
    if workdir is not None and tensorboard:
        writers = tb.RunWriters(workdir / "tensorboard" / run_name,
                                purge_step=start_epoch + 1 if resumed_from is not None else None)
        if resumed_from is None:
            writers.train.write_text("hparams", tb.hparams_markdown({**config, "lr": lr, "epochs": epochs}))

    seed_key = jax.random.wrap_key_data(rng)

    def may_run(epoch: int) -> tuple[bool, str | None]:
        """Whether `epoch` trains; if not, whether that interrupts the run ('stop-after')."""
        if epoch > epochs or early_stopping.should_stop:  # also when resuming a run that had stopped
            return False, None
        if stop_after is not None and epoch > stop_after:
            return False, "stop-after"
        return True, None

    def dispatch(epoch: int, state: TrainState):
        """Starts `epoch` (asynchronously): (epoch, start time, its state, train and validation metrics)."""
        t = time.perf_counter()
        new, train_m = compiled(state, x, y, steps.epoch_key(seed_key, epoch))
        return epoch, t, new, train_m, compiled_eval(new, xv, yv)

    # Epoch e+1 is dispatched as soon as epoch e's metrics decide that training goes on, before e's
    # TensorBoard writes, checkpoint and progress line, which then run on the host while the device
    # computes (they were a gap between epochs). Nothing is dispatched that might not be kept.
    go, interrupted = may_run(start_epoch + 1)
    pending, failed = None, None
    try:
        with _StopSignals() as signals, jax.set_mesh(mesh):
            if go:
                t0 = time.perf_counter()
                compiled = steps.train_epoch.lower(state, x, y, steps.epoch_key(seed_key, start_epoch + 1),
                                                   batch_size=batch_size).compile()
                compiled_eval = steps.evaluate.lower(state, xv, yv, batch_size=eval_batch_size).compile()
                t1 = time.perf_counter()
                timings["compile_s"] += t1 - t0
                pending = dispatch(start_epoch + 1, state)
                timings["train_s"] += time.perf_counter() - t1
            free = time.perf_counter()  # when the host was last free to wait for an epoch
            while pending is not None:
                t1 = time.perf_counter()
                epoch, t0, state, train_m, val_m = pending
                # the one host sync of the epoch, waited for so that signal handlers run meanwhile
                train_m, val_m = jax.device_get(faults.wait_ready((train_m, val_m), between=signals.announce))
                t2 = time.perf_counter()
                epoch_time = t2 - max(t0, free)  # not the previous epoch's outputs, written meanwhile
                metrics = {"loss": float(train_m["loss"]), "accuracy": float(train_m["accuracy"]),
                           "val_loss": float(val_m["loss"]), "val_accuracy": float(val_m["accuracy"])}
                if not _finite(*metrics.values()):
                    raise TrainingDiverged(
                        f"loss became non-finite in epoch {epoch} (train {metrics['loss']}, validation "
                        f"{metrics['val_loss']}) at lr {lr:g}; lower the learning rate"
                        + (f"; the best checkpoint so far is intact in {ckpt.directory}"
                           if ckpt is not None and ckpt.latest_step() is not None else ""))
                if early_stopping.update(epoch, metrics):
                    best_params = state.params
                go, interrupted = may_run(epoch + 1)
                signals.announce()
                received = _agreed_signal(signals.received)
                if received and (go or interrupted):  # after the last epoch a signal leaves nothing to resume
                    go, interrupted = False, received
                pending = None
                if go:
                    try:
                        pending = dispatch(epoch + 1, state)
                    except BaseException as e:  # noqa: BLE001 - this epoch is complete: its outputs first
                        failed = e
                t3 = time.perf_counter()
                timings["train_s"] += t3 - t1
                record = {"epoch": epoch, **metrics, "lr": float(lr), "epoch_time_s": epoch_time}
                history.append(record)
                if writers is not None:
                    writers.write_epoch(epoch, {"loss": metrics["loss"], "accuracy": metrics["accuracy"],
                                                "learning_rate": lr, "epoch_time_s": epoch_time},
                                        {"loss": metrics["val_loss"], "accuracy": metrics["val_accuracy"]})
                t4 = time.perf_counter()
                if ckpt is not None:
                    # a snapshot: the save is asynchronous and `history` grows next epoch (a shared list
                    # let a checkpoint's meta pick up later epochs' records, duplicated after a resume)
                    meta = {"epoch": epoch, "early_stopping": early_stopping.state_dict(), "config": config,
                            "history": list(history), "run_name": run_name, "lr": lr, "seed": seed}
                    ckpt.save(epoch, _tree(state, best_params, rng), meta, metrics)
                t5 = time.perf_counter()
                timings["tensorboard_s"] += t4 - t3
                timings["checkpoint_s"] += t5 - t4
                if progress is not None and jax.process_index() == 0:
                    progress(_epoch_line(record, epochs, early_stopping, epoch))
                if failed is not None:
                    raise failed
                free = time.perf_counter()
    finally:
        t6 = time.perf_counter()
        try:
            if ckpt is not None:
                ckpt.close()  # finishes the asynchronous save, on every exit path
        finally:
            if writers is not None:
                writers.close()
        timings["checkpoint_s"] += time.perf_counter() - t6

    final = state.replace(params=best_params) if early_stopping.restore_best_weights else state
    best_val_loss = next((h["val_loss"] for h in history if h["epoch"] == early_stopping.best_epoch), None)
    return FitResult(
        state=final, history=history, best_epoch=early_stopping.best_epoch, best_val_loss=best_val_loss,
        epochs_run=len(history), stopped_early=early_stopping.should_stop, interrupted=interrupted,
        run_dir=writers.run_dir if writers else None, resumed_from=resumed_from,
        wall_time_s=time.perf_counter() - t_start, timings=timings)


def _agreed_signal(received: str | None) -> str | None:
    """The stop signal as every process of a job sees it (any process's). A preemption signal reaches
    the processes at different moments; one that stopped alone would leave the others waiting for it
    in the next epoch's collectives."""
    if jax.process_count() == 1:
        return received
    from jax.experimental import multihost_utils

    code = np.int32(signal.Signals[received].value if received else 0)
    agreed = int(np.max(multihost_utils.process_allgather(code)))
    return signal.Signals(agreed).name if agreed else None


def _tree(state: TrainState, best_params, rng) -> dict[str, Any]:
    """What a checkpoint holds, as plain arrays (`rng`: the RNG key's raw uint32 data)."""
    return {"params": state.params, "rest": state.rest, "opt_state": state.opt_state, "step": state.step,
            "best_params": best_params, "rng": rng}


META_KEYS = ("epoch", "early_stopping", "history", "run_name")


def _check_meta(meta: dict, config: dict, where: Path) -> None:
    """A checkpoint's meta before its arrays are read: damaged (missing keys: a plain error, so the
    checkpoint counts as unreadable) or another run's (`ConfigError`)."""
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise KeyError(f"meta lacks {missing}")
    _check_same_run(meta.get("config", {}), config, where)


def _check_same_run(saved: dict, current: dict, where: Path) -> None:
    diff = {k: (saved.get(k), current.get(k)) for k in RUN_IDENTITY
            if k in saved and k in current and saved.get(k) != current.get(k)}
    if diff:
        said = ", ".join(f"{k} {a!r} (now {b!r})" for k, (a, b) in diff.items())
        raise ConfigError(f"{where} holds a run with {said}: use another --workdir to start a new run")


def _epoch_line(r: dict, epochs: int, es: EarlyStopping, epoch: int) -> str:
    mark = " *" if es.best_epoch == epoch else ""
    return (f"epoch {r['epoch']:3d}/{epochs}  loss {r['loss']:.4f}  acc {r['accuracy']:.4f}  |  "
            f"val_loss {r['val_loss']:.4f}  val_acc {r['val_accuracy']:.4f}  |  {r['epoch_time_s']:.2f}s{mark}")
