"""Keras-style callbacks of `lrjax.fit`: the hooks, and the built-in EarlyStopping, Checkpoint,
TensorBoard and Progress.

Hooks (Keras' names), all on the host between compiled chunks of steps:
  - `on_train_begin(logs)`: before the first chunk (after a resume has restored the run's state);
    every built-in resets its own state here, so an object reused in a second `fit` starts fresh;
  - `on_train_batch_end(step, logs)`: for every global step that is a multiple of `every_n_steps`
    (None: never), with that step's `batch_loss`, `batch_learning_rate` and `batch_<metric>`;
  - `on_epoch_end(epoch, logs)`: after every evaluation, with its history row (`loss`, the task's
    metrics, `val_loss`, `val_<metric>`, `epoch`, `step`, `lr`, `epoch_time_s`); `epoch` is
    lrjax's, counted from 1 as in history, TensorBoard and checkpoints. Evaluations are per epoch
    unless `fit(eval_every_steps=N)`: then each is one row, one call and one unit of patience;
  - `on_checkpoint(step, logs)`: where the run may be checkpointed (each evaluation, each
    `checkpoint_every_steps`, and before a stop), with the metrics of the latest evaluation;
  - `on_train_end(logs)`: once, after the last chunk (also after a signal), with the last row.
A callback stops training by setting `trainer.stop_training = True` (`self.trainer` is set before
`on_train_begin`). Hooks of a callback whose `overlaps_next_chunk` is True (the writers) run while
the device computes the next chunk, so they cannot stop training at that point; every other
callback's hooks run before the next chunk is dispatched, so a stop takes effect at once.

Device-to-host syncs: the loop reads each chunk's per-step metrics once, after dispatching the next
chunk (and the validation metrics at an evaluation); hooks receive host numbers and add no sync.
`trainer.state` is the device state: reading its arrays in a hook is a sync of your own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any


class Callback:
    """Base class: override the hooks you need (they do nothing here)."""

    every_n_steps: int | None = None  # cadence of on_train_batch_end
    overlaps_next_chunk: bool = False  # True: hooks run while the next chunk computes (cannot stop it)
    trainer: Any = None

    def set_trainer(self, trainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, logs=None): ...

    def on_train_batch_end(self, step, logs=None): ...

    def on_epoch_end(self, epoch, logs=None): ...

    def on_checkpoint(self, step, logs=None): ...

    def on_train_end(self, logs=None): ...


@dataclasses.dataclass
class EarlyStopping(Callback):
    """Keras' `EarlyStopping`: stop once `patience` evaluations in a row brought no improvement of
    `monitor` (by more than `min_delta`); with `restore_best_weights` the run ends with the best
    evaluation's weights and non-parameter state. Its state (best, wait, best epoch) is a plain
    dict, so it travels in checkpoints and a resumed run stops at exactly the same point. The sweep
    runs one per member (`update` only)."""

    monitor: str = "val_loss"
    mode: str = "auto"  # "min", "max", or "auto": max for accuracy-like monitors, else min
    patience: int = 20
    min_delta: float = 0.0
    restore_best_weights: bool = True
    # state
    best: float | None = None
    wait: int = 0
    best_epoch: int | None = None
    stopped_epoch: int | None = None

    def __post_init__(self):
        if self.mode == "auto":
            self.mode = "max" if "acc" in self.monitor else "min"
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be min, max or auto, got {self.mode!r}")
        if self.patience < 0 or self.min_delta < 0:
            raise ValueError("patience and min_delta must be >= 0")

    def is_improvement(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Records one evaluation's metrics; returns True when it is the new best."""
        if self.monitor not in metrics:
            raise KeyError(f"early stopping monitors {self.monitor!r}, which the metrics lack "
                           f"(have {sorted(metrics)})")
        value = float(metrics[self.monitor])
        if self.is_improvement(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            return True
        self.wait += 1
        if self.wait >= self.patience and self.stopped_epoch is None:
            self.stopped_epoch = epoch
        return False

    @property
    def should_stop(self) -> bool:
        """Keras: stop once `patience` evaluations in a row brought no improvement (wait >= patience)."""
        return self.stopped_epoch is not None

    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait, "best_epoch": self.best_epoch,
                "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.wait = state["best"], int(state["wait"])
        self.best_epoch, self.stopped_epoch = state["best_epoch"], state["stopped_epoch"]

    # hooks
    def on_train_begin(self, logs=None):
        if self.trainer is None or not self.trainer.resumed:
            self.load_state_dict({"best": None, "wait": 0, "best_epoch": None, "stopped_epoch": None})

    def on_epoch_end(self, epoch, logs=None):
        if self.update(epoch, logs):
            self.trainer.keep_best()
        if self.should_stop:
            self.trainer.stop_training = True


class Checkpoint(Callback):
    """Orbax checkpoints in `directory` (latest `keep_latest` + the best by the early-stopping
    monitor), saved asynchronously at every `on_checkpoint`. A `fit` with this callback resumes
    from the newest intact checkpoint there. Orbax step numbers are epochs, or global steps when
    `by_step` (fit's checkpoint_every_steps); a workdir never mixes the two."""

    overlaps_next_chunk = True

    def __init__(self, directory: str | Path, keep_latest: int = 2, by_step: bool = False):
        self.directory, self.keep_latest, self.by_step = Path(directory), keep_latest, by_step
        self.manager = None
        self.seconds = 0.0  # host time spent in saves (the save itself runs in the background)

    def open(self, monitor: str, mode: str):
        from lrjax.checkpoint import Checkpointer

        self.manager = Checkpointer(self.directory, keep_latest=self.keep_latest, best_metric=monitor, mode=mode)
        return self.manager

    def on_checkpoint(self, step, logs=None):
        import time

        t = time.perf_counter()
        tree, meta = self.trainer.snapshot()
        self.manager.save(step, tree, meta, logs or {})
        self.seconds += time.perf_counter() - t

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()  # finishes the asynchronous save, on every exit path
            self.manager = None


class TensorBoard(Callback):
    """tensorboardX event files: `run_dir/train` and `run_dir/validation` with the same tag names
    (`loss`, `accuracy`, ...) per evaluation at x = epoch, and with `log_every_steps` Keras' per-step
    `batch_loss` and `batch_learning_rate` in `train` at x = global step."""

    overlaps_next_chunk = True

    def __init__(self, run_dir: str | Path, log_every_steps: int | None = None, hparams: dict | None = None):
        self.run_dir, self.every_n_steps, self.hparams = Path(run_dir), log_every_steps, hparams
        self.writers = None
        self.seconds = 0.0

    def on_train_begin(self, logs=None):
        from lrjax import tb

        # A resumed run drops the events past its checkpoint; step-indexed batch scalars share the
        # train writer, whose purge would drop them all, so they are kept (a few may repeat).
        resumed = self.trainer.resumed
        purge = self.trainer.epoch + 1 if resumed and self.every_n_steps is None else None
        self.writers = tb.RunWriters(self.run_dir, purge_step=purge)
        if not resumed and self.hparams:
            self.writers.train.write_text("hparams", tb.hparams_markdown(self.hparams))

    def on_train_batch_end(self, step, logs=None):
        self._timed(self.writers.train.write_scalars, step, logs)

    def on_epoch_end(self, epoch, logs=None):
        train = {**{k: v for k, v in logs.items() if not k.startswith("val_") and k not in ("epoch", "step", "lr")},
                 "learning_rate": logs["lr"]}
        validation = {k[4:]: v for k, v in logs.items() if k.startswith("val_")}
        self._timed(self.writers.write_epoch, epoch, train, validation)

    def on_train_end(self, logs=None):
        self.close()

    def close(self) -> None:
        if self.writers is not None:
            self.writers.close()
            self.writers = None

    def _timed(self, fn, *args):
        import time

        t = time.perf_counter()
        fn(*args)
        self.seconds += time.perf_counter() - t


class Progress(Callback):
    """One line per evaluation through `write` (default `print`), main process only."""

    overlaps_next_chunk = True

    def __init__(self, write: Callable[[str], None] = print):
        self.write = write

    def on_epoch_end(self, epoch, logs=None):
        import jax

        if jax.process_index() == 0:
            self.write(epoch_line(logs, self.trainer.epochs, self.trainer.last_was_best,
                                  show_step=self.trainer.eval_every_steps is not None))


def epoch_line(r: dict, epochs: int, best: bool = False, show_step: bool = False) -> str:
    """`epoch   3/100  loss 0.41  acc 0.85  |  val_loss 0.39  val_acc 0.86  |  0.34s *` (* = the best so far)."""
    short = lambda k: k.replace("accuracy", "acc")  # noqa: E731
    train = "  ".join(f"{short(k)} {v:.4f}" for k, v in r.items()
                      if k not in ("epoch", "step", "lr", "epoch_time_s") and not k.startswith("val_"))
    val = "  ".join(f"{short(k)} {v:.4f}" for k, v in r.items() if k.startswith("val_"))
    where = f"epoch {r['epoch']:3d}/{epochs}" + (f"  step {r['step']}" if show_step else "")
    return f"{where}  {train}  |  {val}  |  {r['epoch_time_s']:.2f}s{' *' if best else ''}"
