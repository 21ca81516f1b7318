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

from lrjax import feeds, loop, optimizers, schedules, steps, tasks
from lrjax import mesh as mesh_lib
from lrjax.callbacks import Callback, Checkpoint, EarlyStopping, Progress, TensorBoard
from lrjax.data import split_examples
from lrjax.errors import ConfigError, TrainingDiverged
from lrjax.steps import OptimizerFactory, TrainState
from lrjax.tasks import LossFn

# Settings that define a run: resuming a workdir with different values would mix two experiments.
RUN_IDENTITY = ("dataset", "model", "seed", "batch_size", "hidden_sizes", "optimizer", "lr", "monitor", "dtype",
                "schedule", "weight_decay", "grad_accum_steps", "eval_every_steps", "checkpoint_every_steps",
                "input")


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

    def model(self) -> nnx.Module:
        return self.state.model()

    def evaluate(self, x, y=None, batch_size: int = 1000) -> dict[str, float]:
        """The loss and the task's metrics (`accuracy` for the default) on (x, y) in eval mode; with
        `y` None, `x` is the examples pytree the loss function receives."""
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
        stream_workers: int | None = None, valid=None, steps_per_epoch: int | None = None) -> FitResult:
    """Trains `model` (its weights are the starting point; the object itself is not modified).

    `optimizer` is a factory taking `learning_rate` (`optax.sgd`, `optax.adam`, `lrjax.optimizers.Recipe`
    for weight decay, accumulation and plateau reduction, ...). `data` has `x_train`, `y_train`,
    `x_valid`, `y_valid` (arrays of any dtype and shape, or example pytrees with `y_*` None: see
    `lrjax.data.split_examples`). `loss_fn(model, batch) -> (losses, metrics)` (per-example arrays;
    default softmax cross-entropy with accuracy, see `lrjax.tasks`) defines the task; history,
    TensorBoard and the early-stopping monitor name its metrics `<name>` and `val_<name>`. `dtype`
    (e.g. `jnp.bfloat16`) is the compute dtype of mixed precision. Training steps run the model in
    train mode, evaluation in eval mode; the best weights kept and checkpointed come with the same
    evaluation's non-parameter state (batch statistics, RNG streams).

    `callbacks` are `lrjax.callbacks.Callback`s; `early_stopping` and `progress` (a function taking
    a line; None: silent) build the matching built-ins, and with a `workdir` so do `checkpoints`
    (`workdir/checkpoints`, resumed when present) and `tensorboard` (`workdir/tensorboard/run_*`).
    `schedule` (`lrjax.schedules.SCHEDULES`) peaks at `lr`. Evaluation is per epoch, or every
    `eval_every_steps` steps (each one history row and one unit of patience); checkpoints at each
    evaluation and every `checkpoint_every_steps` steps (Orbax steps are then global steps);
    `log_every_steps` writes per-step `batch_loss`/`batch_learning_rate` to TensorBoard. SIGTERM
    and SIGINT stop the run after the current chunk of steps, with a checkpoint.

    Streamed input: `data` may be a `lrjax.sources.Splits` (`sources.tfds_splits` for a TFDS
    ArrayRecord preparation, `sources.array_splits` for uint8 arrays or memmaps). The training set is
    then read through Grain (`lrjax.stream.Stream`, shuffled by (seed, epoch), `stream_workers`
    processes, default `stream.default_workers`) in chunks of `stream_chunk_steps` batches that stay
    uint8 until the device; `epochs` x steps per epoch (from the split's length) bounds it, and the
    stream's position is in every checkpoint, so a resumed run sees the same batches. The
    validation split is streamed in order too (`stream.StreamEvaluator`, batches of `eval_batch_size`).

    Your own pipeline: `data` may be any iterable of batches (a Grain `DataLoader` or `IterDataset`,
    a generator, a list), each batch what `loss_fn` receives, with the validation examples as
    `valid` (arrays: `(x_valid, y_valid)`, a pytree of arrays, or an object with `x_valid`). The
    first batch sets the batch size (`batch_size` is for array data); an epoch is `len(data)`
    batches, or `steps_per_epoch` for an iterable without a length; an iterable that ends is iterated
    again. Batches go to the device in calls of `stream_chunk_steps` steps (`lrjax.feeds.BatchFeed`);
    checkpoints hold the iterator's `get_state()` where it has one (Grain's do), else the count of
    batches taken, which a resume replays.

    `stop_after` ends the run after that epoch as a preemption would (tests, time-boxed jobs). Raises
    `TrainingDiverged` on a non-finite loss.
    """
    t_start = time.perf_counter()
    for name, value in (("stop_after (--stop-after)", stop_after), ("eval_every_steps", eval_every_steps),
                        ("checkpoint_every_steps", checkpoint_every_steps), ("log_every_steps", log_every_steps)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    early_stopping = early_stopping if early_stopping is not None else EarlyStopping(patience=epochs)
    mesh = mesh if mesh is not None else mesh_lib.make_mesh("auto")
    kind = feeds.kind(data)
    feed, train = None, None
    if kind == "batches":
        feed, spe, batch_size, valid = feeds.for_training("fit", data, valid, steps_per_epoch, stream_chunk_steps, mesh)
        valid = mesh_lib.replicate(valid, mesh)
    elif kind == "splits":
        valid, n = None, len(data.train)
    else:
        train, valid = mesh_lib.replicate((split_examples(data, "train"), split_examples(data, "valid")), mesh)
        n = steps.num_examples(train)
    if kind != "batches":
        spe = steps.steps_per_epoch(n, batch_size)
    mesh_lib.check_batch_size(batch_size, mesh)
    # What identifies the run (checked on resume, see RUN_IDENTITY), also for callers without a config.
    config = {**(config or {}), "lr": lr, "seed": seed, "batch_size": batch_size, "monitor": early_stopping.monitor,
              "schedule": schedule, "eval_every_steps": eval_every_steps,
              "checkpoint_every_steps": checkpoint_every_steps,
              "input": {"splits": "stream", "arrays": "resident", "batches": "iterable"}[kind]}
    timings = {"compile_s": 0.0, "train_s": 0.0, "checkpoint_s": 0.0, "tensorboard_s": 0.0}
    accum = getattr(optimizer, "grad_accum_steps", 1)
    sched = schedules.make(schedule, lr, -(-epochs * spe // accum), accum)
    state = mesh_lib.replicate(steps.init_state(model, optimizer, lr, loss_fn=loss_fn, dtype=dtype,
                                                schedule=sched), mesh)
    tr = loop.Trainer(state, epochs=epochs, steps_per_epoch=spe, eval_every_steps=eval_every_steps,
                      checkpoint_every_steps=checkpoint_every_steps, stop_after=stop_after,
                      meta={"config": config, "run_name": None, "lr": lr, "seed": seed})
    tr.early_stopping = early_stopping
    evaluator = None
    if kind == "splits":
        from lrjax import stream

        feed = stream.StepFeed(
            stream.Stream(data.train, batch_size, chunk_steps=min(stream_chunk_steps, spe), seed=seed,
                          steps=tr.total_steps, epoch_aligned=False, workers=stream_workers),
            feeds.chunk_sharding(mesh))
        evaluator = stream.StreamEvaluator(data.valid, eval_batch_size, feeds.chunk_sharding(mesh))
    tr.feed = feed
    cbs = [early_stopping, *callbacks]
    workdir = Path(workdir) if workdir is not None else None
    ckpt = next((cb for cb in cbs if isinstance(cb, Checkpoint)), None)
    if ckpt is None and workdir is not None and checkpoints:
        ckpt = Checkpoint(workdir / "checkpoints", keep_latest=keep_latest, by_step=tr.by_step)
        cbs.append(ckpt)
    resumed_from = None
    try:
        if ckpt is not None:
            manager = ckpt.open(early_stopping.monitor, early_stopping.mode)
            if manager.latest_step() is not None:
                target, _ = tr.snapshot()
                resumed_from, tree, meta = manager.restore(
                    target, check_meta=lambda m: _check_meta(m, config, manager.directory))
                tr.restore(tree, meta)
                tr.meta["run_name"] = meta["run_name"]
                loop.log(f"lrjax: resuming {workdir} from epoch {tr.epoch}"
                         + (f", step {tr.step}" if tr.by_step else "") + f" (checkpoint {resumed_from})")
        from lrjax import tb

        tr.meta["run_name"] = tr.meta["run_name"] or tb.new_run_name()
        board = None
        if workdir is not None and tensorboard:
            board = TensorBoard(workdir / "tensorboard" / tr.meta["run_name"], log_every_steps,
                                hparams={**config, "epochs": epochs})
            cbs.append(board)
        if progress is not None:
            cbs.append(Progress(progress))
        for cb in cbs:
            cb.set_trainer(tr)
        tr.callbacks = cbs

        def epoch_order(epoch: int):  # the epoch's batches (host, from (seed, epoch)), on every device
            return mesh_lib.replicate(steps.epoch_order(seed, epoch, n, batch_size=batch_size, pad=length), mesh)

        # One program for every chunk: a whole epoch, or the longest gap between step cadences.
        length = min(tr.cadences())
        masked = length != spe
        with jax.set_mesh(mesh):
            def compile_programs():
                t0 = time.perf_counter()
                if feed is not None:
                    program = steps.train_stream_chunk.lower(tr.state, *feed.zeros(), np.int32(feed.k), length=feed.k,
                                                             prepare=feed.prepare).compile()
                else:
                    program = steps.train_chunk.lower(tr.state, train, *epoch_order(tr.epoch + 1), np.int32(0),
                                                      np.int32(length), length=length, masked=masked).compile()
                if evaluator is not None:
                    lowered_eval = steps.evaluate_stream_chunk.lower(tr.state, *evaluator.zeros(), prepare=feed.prepare)
                else:
                    lowered_eval = steps.evaluate.lower(tr.state, valid, batch_size=eval_batch_size)
                _check_monitor(early_stopping.monitor, {k for k in lowered_eval.out_info if k != "count"})
                compiled = lowered_eval.compile()
                evaluate = compiled if evaluator is None else lambda state, _: evaluator(compiled, state)
                timings["compile_s"] += time.perf_counter() - t0
                return program, evaluate

            try:
                interrupted = loop.run(tr, cbs, compile_programs=compile_programs, examples=train, valid=valid,
                                       epoch_order=epoch_order, timings=timings, feed=feed)
            except TrainingDiverged as e:
                where = ckpt.directory if ckpt is not None and ckpt.manager.latest_step() is not None else None
                raise TrainingDiverged(str(e) + (f"; the best checkpoint so far is intact in {where}"
                                                 if where else "")) from None
    finally:
        t6 = time.perf_counter()
        try:
            if ckpt is not None:
                ckpt.close()  # finishes the asynchronous save (raising its failure), on every exit path
        finally:
            if feed is not None:
                feed.close()
            if evaluator is not None:
                evaluator.close()
            for cb in cbs:
                if isinstance(cb, TensorBoard):
                    cb.close()
        timings["checkpoint_s"] += (ckpt.seconds if ckpt is not None else 0.0) + time.perf_counter() - t6
        timings["tensorboard_s"] += sum(cb.seconds for cb in cbs if isinstance(cb, TensorBoard))

    state = tr.state
    # the best weights are already a schedule-free optimizer's evaluation point: at_eval_point keeps them so
    final = state.replace(params=tr.best[0], rest=tr.best[1], opt_state=optimizers.at_eval_point(
        state.opt_state, tr.best[0])) if early_stopping.restore_best_weights else state
    history = tr.history
    best_val_loss = next((h["val_loss"] for h in history if h["epoch"] == early_stopping.best_epoch), None)
    if tr.by_step:
        best_val_loss = next((h["val_loss"] for h in history if h[early_stopping.monitor] == early_stopping.best),
                             best_val_loss)
    return FitResult(
        state=final, history=history, best_epoch=early_stopping.best_epoch, best_val_loss=best_val_loss,
        epochs_run=len(history), stopped_early=early_stopping.should_stop, interrupted=interrupted,
        run_dir=board.run_dir if board else None, resumed_from=resumed_from,
        wall_time_s=time.perf_counter() - t_start, timings=timings)


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
