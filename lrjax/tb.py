"""TensorBoard event files through tensorboardX, behind a tiny writer interface (as CLU's).

A training run is `tensorboard/run_%Y_%m_%d-%H_%M_%S/` with `train/` and `validation/` writers that
use the same tag names (`loss`, `accuracy`), so TensorBoard overlays the two curves. Only the main
process writes; elsewhere the writer is a no-op.
"""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from typing import Any

import jax


def new_run_name(now: datetime.datetime | None = None) -> str:
    return (now or datetime.datetime.now()).strftime("run_%Y_%m_%d-%H_%M_%S")


class Writer:
    """Scalars for one TensorBoard run folder; `purge_step` drops events at or after it (resume)."""

    def __init__(self, logdir: str | Path, purge_step: int | None = None, enabled: bool | None = None):
        self.logdir = Path(logdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._writer = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            # tensorboardX names event files by the second ('events.out.tfevents.<s>.<host>') and opens
            # them with 'wb': a writer reopened within the same second (a quick resume) would truncate the
            # earlier file. A nanosecond suffix keeps names unique and in creation order.
            self._writer = SummaryWriter(str(self.logdir), purge_step=purge_step, flush_secs=30,
                                         filename_suffix=f".{time.time_ns()}")

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self._writer is not None:
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, float(value), global_step=step)

    def write_text(self, tag: str, text: str, step: int = 0) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, text, global_step=step)

    def write_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """An HParams-plugin entry (one per run folder), so TensorBoard's HParams view compares runs."""
        if self._writer is not None:
            from tensorboardX.summary import hparams as hparams_summary

            clean = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in hparams.items()}
            for summary in hparams_summary(clean, {k: float(v) for k, v in metrics.items()}):
                self._writer.file_writer.add_summary(summary)
            self.write_scalars(0, metrics)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class RunWriters:
    """The `train/` and `validation/` writers of one run folder."""

    def __init__(self, run_dir: str | Path, purge_step: int | None = None, enabled: bool | None = None):
        self.run_dir = Path(run_dir)
        self.train = Writer(self.run_dir / "train", purge_step, enabled)
        self.validation = Writer(self.run_dir / "validation", purge_step, enabled)

    def write_epoch(self, epoch: int, train: dict[str, float], validation: dict[str, float]) -> None:
        self.train.write_scalars(epoch, train)
        self.validation.write_scalars(epoch, validation)

    def flush(self) -> None:
        self.train.flush()
        self.validation.flush()

    def close(self) -> None:
        self.train.close()
        self.validation.close()


def hparams_markdown(hparams: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(hparams.items()))
    return "| hyperparameter | value |\n|---|---|\n" + rows
