"""`fit`: a model trained by the chunked step loop (`lrjax.loop`) with Keras-style callbacks.

fit sets the run up (devices, data, compiled programs, the callbacks that its keywords ask for),
resumes it from its newest checkpoint, runs the loop and returns a `FitResult`. Early stopping,
checkpoints, TensorBoard and the progress line are callbacks (`lrjax.callbacks`). The data order
of epoch e derives from (seed, e) only, and a checkpoint holds the position inside an epoch, so a
run resumed from its checkpoint ends bit-identical (on CPU) to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lrjax import inputs, loop, optimizers, schedules, sharding, steps, tasks, validate
from lrjax import mesh as mesh_lib
from lrjax.callbacks import Callback, Checkpoint, EarlyStopping, Progress, TensorBoard
from lrjax.errors import ConfigError, TrainingDiverged
from lrjax.steps import OptimizerFactory, TrainState
from lrjax.tasks import LossFn

# Settings that define a run: resuming a workdir with different values would mix two experiments.
RUN_IDENTITY = ("dataset", "model", "seed", "batch_size", "hidden_sizes", "optimizer", "lr", "monitor", "dtype",
                "schedule", "weight_decay", "grad_accum_steps", "eval_every_steps", "checkpoint_every_steps",
                "input", "context", "d_model", "layers", "heads")


@dataclasses.dataclass
class FitResult:
    state: TrainState  # best evaluation's weights and state when restore_best_weights, else the last
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
    # the run's parts: {mesh_shape, state_bytes_per_device (largest device's params + optimizer state), first_epoch}
    segments: list[dict] = dataclasses.field(default_factory=list)

    def model(self) -> nnx.Module:
        return self.state.model()

    def evaluate(self, x, y=None, batch_size: int = 1000) -> dict[str, float]:
        """The loss and the task's metrics (`accuracy` for the default) on (x, y) in eval mode; with
        `y` None, `x` is the examples pytree the loss function receives."""
        validate.check_examples("evaluate", self.model(), x, y, loss_fn=self.state.loss_fn)
        examples = jax.tree.map(jnp.asarray, x if y is None else (x, y))
        return {k: float(v) for k, v in jax.device_get(
            steps.evaluate(self.state, examples, batch_size=batch_size)).items()}


def fit(model: nnx.Module, optimizer: OptimizerFactory, data, *, lr: float, epochs: int = 100,
        batch_size: int = 32, seed: int = 42, early_stopping: EarlyStopping | None = None,
        workdir: str | Path | None = None, checkpoints: bool = True, tensorboard: bool = True,
        keep_latest: int = 2, eval_batch_size: int = 1000, config: dict | None = None,
        mesh: jax.sharding.Mesh | None = None, stop_after: int | None = None,
        progress: Callable[[str], None] | None = print, loss_fn: LossFn = tasks.classification,
        dtype=None, callbacks: list[Callback] = (), schedule: str = "constant",
        eval_every_steps: int | None = None, checkpoint_every_steps: int | None = None,
        log_every_steps: int | None = None, stream_chunk_steps: int = 64,
        stream_workers: int | None = None, valid=None, steps_per_epoch: int | None = None,
        sharding_rules=None) -> FitResult:
    """Trains `model` from its weights (the object itself is not modified) and returns a `FitResult`.

    `optimizer` is a factory taking `learning_rate` (`optax.sgd`, `lrjax.optimizers.Recipe`, ...).
    `data` is arrays (`x_train`, `y_train`, `x_valid`, `y_valid`), a `lrjax.sources.Splits` (streamed
    through Grain in chunks of `stream_chunk_steps`, `stream_workers` processes) or any iterable of
    batches with the validation examples as `valid` (`steps_per_epoch` where it has no length): see
    `lrjax.inputs.make_input` and docs/input.md. `loss_fn(model, batch) -> (losses, metrics)` is the
    task (`lrjax.tasks`); `dtype` the compute dtype. `early_stopping`, `callbacks` and `progress`
    (a function taking a line; None: silent) act per evaluation (each epoch, or every
    `eval_every_steps`); with a `workdir`, `checkpoints` (resumed when present) and `tensorboard`
    (`log_every_steps` for per-step scalars). `schedule` (`lrjax.schedules`) peaks at `lr`.
    On a `mesh` with `fsdp`/`tensor` axes the state is sharded by `sharding_rules` (`lrjax.sharding`).
    `stop_after` ends after that epoch as a preemption would. SIGTERM/SIGINT stop after the current
    chunk, with a checkpoint. Raises `TrainingDiverged` on a non-finite loss. See docs/guide.md.
    """
    t_start = time.perf_counter()
    _check_positive(stop_after=stop_after, eval_every_steps=eval_every_steps,
                    checkpoint_every_steps=checkpoint_every_steps, log_every_steps=log_every_steps)
    early_stopping = early_stopping if early_stopping is not None else EarlyStopping(patience=epochs)
    mesh = mesh if mesh is not None else mesh_lib.make_mesh("auto")
    validate.check_input("fit", model, data, loss_fn=loss_fn, valid=valid)  # before any copy to a device
    inp = inputs.make_input("fit", data, batch_size=batch_size, mesh=mesh, valid=valid, steps_per_epoch=steps_per_epoch,
                            chunk_steps=stream_chunk_steps, workers=stream_workers)
    mesh_lib.check_batch_size(inp.batch_size, mesh)
    validate.check_first_batch("fit", model, inp, loss_fn=loss_fn)  # an iterable's, before anything is written
    # What identifies the run (checked on resume, see RUN_IDENTITY), also for callers without a config.
    config = {**(config or {}), "lr": lr, "seed": seed, "batch_size": inp.batch_size, "input": inp.kind,
              "monitor": early_stopping.monitor, "schedule": schedule, "eval_every_steps": eval_every_steps,
              "checkpoint_every_steps": checkpoint_every_steps}
    timings = {"compile_s": 0.0, "train_s": 0.0, "checkpoint_s": 0.0, "tensorboard_s": 0.0}
    accum = getattr(optimizer, "grad_accum_steps", 1)
    spe = inp.steps_per_epoch
    sched = schedules.make(schedule, lr, -(-epochs * spe // accum), accum)
    state = steps.init_state(model, optimizer, lr, loss_fn=loss_fn, dtype=dtype, schedule=sched, mesh=mesh,
                             rules=sharding_rules)
    tr = loop.Trainer(state, epochs=epochs, steps_per_epoch=spe, eval_every_steps=eval_every_steps,
                      checkpoint_every_steps=checkpoint_every_steps, stop_after=stop_after,
                      meta={"config": config, "run_name": None, "lr": lr, "seed": seed})
    tr.early_stopping = early_stopping
    # One program for every chunk: a whole epoch, or the longest gap between step cadences.
    tr.feed = inp.train_feed(seed, min(tr.cadences()), tr.total_steps)
    evaluator = inp.evaluator(eval_batch_size)
    workdir = Path(workdir) if workdir is not None else None
    cbs = [early_stopping, *callbacks]
    ckpt = next((cb for cb in cbs if isinstance(cb, Checkpoint)), None)
    if ckpt is None and workdir is not None and checkpoints:
        ckpt = Checkpoint(workdir / "checkpoints", keep_latest=keep_latest, by_step=tr.by_step)
        cbs.append(ckpt)
    resumed_from, board = None, None
    try:
        resumed_from = _resume(tr, ckpt, config, workdir)
        _new_segment(tr, mesh)
        from lrjax import tb

        tr.meta["run_name"] = tr.meta["run_name"] or tb.new_run_name()
        if workdir is not None and tensorboard:
            board = TensorBoard(workdir / "tensorboard" / tr.meta["run_name"], log_every_steps,
                                hparams={**config, "epochs": epochs})
            cbs.append(board)
        if progress is not None:
            cbs.append(Progress(progress))
        for cb in cbs:
            cb.set_trainer(tr)
        tr.callbacks = cbs
        with jax.set_mesh(mesh):
            interrupted = _train(tr, cbs, evaluator, timings, ckpt)
    finally:
        _close(ckpt, tr.feed, evaluator, cbs, timings)
    return _result(tr, interrupted, board, resumed_from, time.perf_counter() - t_start, timings)


def _check_positive(**values) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ConfigError(f"{name}{' (--stop-after)' if name == 'stop_after' else ''} must be >= 1, got {value}")


def _resume(tr: loop.Trainer, ckpt: Checkpoint | None, config: dict, workdir) -> int | None:
    """The run continued from its newest checkpoint, if it has one: the checkpoint's number."""
    if ckpt is None:
        return None
    manager = ckpt.open(tr.early_stopping.monitor, tr.early_stopping.mode)
    if manager.latest_step() is None:
        return None
    target, _ = tr.snapshot()
    resumed_from, tree, meta = manager.restore(target, check_meta=lambda m: _check_meta(m, config, manager.directory))
    tr.restore(tree, meta)
    tr.meta["run_name"], tr.meta["segments"] = meta["run_name"], list(meta.get("segments", []))
    loop.log(f"lrjax: resuming {workdir} from epoch {tr.epoch}" + (f", step {tr.step}" if tr.by_step else "")
             + f" (checkpoint {resumed_from})")
    return resumed_from


def _new_segment(tr: loop.Trainer, mesh) -> None:
    """This process's part of the run (a fresh start or a resume) in the meta checkpoints carry: its mesh,
    the largest device's parameter and optimizer-state bytes there, the first epoch it trains."""
    shape = ",".join(f"{a}={n}" for a, n in zip(mesh.axis_names, mesh.axis_sizes) if n > 1) or "data=1"
    state_bytes = sharding.bytes_per_device((tr.state.params, tr.state.opt_state))
    tr.meta["segments"] = [*tr.meta.get("segments", []), {"mesh_shape": shape, "state_bytes_per_device": state_bytes,
                                                          "first_epoch": tr.epoch + 1}]


def _train(tr: loop.Trainer, cbs: list, evaluator, timings: dict, ckpt) -> str | None:
    """Compiles the chunk and evaluation programs (when there is something to train) and runs the loop."""
    feed = tr.feed

    def compile_programs():
        t0 = time.perf_counter()
        program = steps.train_chunk.lower(tr.state, feed.context, *feed.zeros(), np.int32(feed.k), length=feed.k,
                                          masked=feed.masked, fetch=feed.fetch).compile()
        _check_monitor(tr.early_stopping.monitor, evaluator.compile(tr.state))
        timings["compile_s"] += time.perf_counter() - t0
        return program, evaluator

    try:
        return loop.run(tr, cbs, compile_programs=compile_programs, timings=timings)
    except TrainingDiverged as e:
        where = ckpt.directory if ckpt is not None and ckpt.manager.latest_step() is not None else None
        raise TrainingDiverged(str(e) + (f"; the best checkpoint so far is intact in {where}" if where else "")) from None


def _close(ckpt, feed, evaluator, cbs: list, timings: dict) -> None:
    """Every exit path: the asynchronous save finished (raising its failure), the input and writers closed."""
    t = time.perf_counter()
    try:
        if ckpt is not None:
            ckpt.close()
    finally:
        feed.close()
        evaluator.close()
        for cb in cbs:
            if isinstance(cb, TensorBoard):
                cb.close()
    timings["checkpoint_s"] += (ckpt.seconds if ckpt is not None else 0.0) + time.perf_counter() - t
    timings["tensorboard_s"] += sum(cb.seconds for cb in cbs if isinstance(cb, TensorBoard))


def _result(tr: loop.Trainer, interrupted, board, resumed_from, wall_time_s: float, timings: dict) -> FitResult:
    es, state, history = tr.early_stopping, tr.state, tr.history
    # the best weights are already a schedule-free optimizer's evaluation point: at_eval_point keeps them so
    final = state.replace(params=tr.best[0], rest=tr.best[1], opt_state=optimizers.at_eval_point(
        state.opt_state, tr.best[0])) if es.restore_best_weights else state
    best_val_loss = next((h["val_loss"] for h in history if h["epoch"] == es.best_epoch), None)
    if tr.by_step:
        best_val_loss = next((h["val_loss"] for h in history if h[es.monitor] == es.best), best_val_loss)
    return FitResult(state=final, history=history, best_epoch=es.best_epoch, best_val_loss=best_val_loss,
                     epochs_run=len(history), stopped_early=es.should_stop, interrupted=interrupted,
                     run_dir=board.run_dir if board else None, resumed_from=resumed_from,
                     wall_time_s=wall_time_s, timings=timings, segments=list(tr.meta.get("segments", [])))


META_KEYS = ("epoch", "early_stopping", "history", "run_name")


def _check_meta(meta: dict, config: dict, where: Path) -> None:
    """A checkpoint's meta before its arrays are read: damaged (missing keys: a plain error, so the
    checkpoint counts as unreadable) or another run's (`ConfigError`)."""
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise KeyError(f"meta lacks {missing}")
    check_same_run(meta.get("config", {}), config, where)


def check_same_run(saved: dict, current: dict, where: Path) -> None:
    diff = {k: (saved.get(k), current.get(k)) for k in RUN_IDENTITY
            if k in saved and k in current and saved.get(k) != current.get(k)}
    if diff:
        said = ", ".join(f"{k} {a!r} (now {b!r})" for k, (a, b) in diff.items())
        raise ConfigError(f"{where} holds a run with {said}: use another --workdir to start a new run")




def _check_monitor(monitor: str, val_metrics: dict) -> None:
    """The early-stopping monitor must be one of the task's validation metrics (known before training)."""
    names = ["loss", *sorted(k for k in val_metrics if k != "loss")]
    if monitor not in {f"val_{k}" for k in names}:
        raise ConfigError(f"early stopping monitors {monitor!r}, which the task does not report; choose one of "
                          f"{', '.join(f'val_{k}' for k in names)} (--monitor)")
