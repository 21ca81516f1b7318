"""TensorBoard event files through tensorboardX, behind a tiny writer interface (as CLU's).

A training run is `tensorboard/run_%Y_%m_%d-%H_%M_%S/` with `train/` and `validation/` writers that
use the same tag names (`loss`, `accuracy`), so TensorBoard overlays the two curves. Only the main
process writes; elsewhere the writer is a no-op.

Events are written synchronously with tensorboardX's `RecordWriter` (the file layer under its
`SummaryWriter`), not through `SummaryWriter`'s queue and writer thread. lrjax writes a few scalars
per evaluation, where the queue saves nothing (a put costs ~0.1 ms, a direct write less), and the
thread turns a write failure into a hang: when a write fails there (a full disk) the thread dies,
its queue stops draining, the next put into a full queue blocks for ever, and at exit
multiprocessing joins the queue's feeder thread, which then never returns. Written here, a failure
is raised in the caller as one `WriteError` naming the run folder.
"""

from __future__ import annotations

import datetime
import json
import socket
import time
from pathlib import Path
from typing import Any

import jax

from lrjax import faults


def new_run_name(now: datetime.datetime | None = None) -> str:
    return (now or datetime.datetime.now()).strftime("run_%Y_%m_%d-%H_%M_%S")


class Writer:
    """Scalars for one TensorBoard run folder; `purge_step` drops events at or after it (resume:
    TensorBoard hides an earlier file's events from a `SessionLog.START` event's step on)."""

    def __init__(self, logdir: str | Path, purge_step: int | None = None, enabled: bool | None = None):
        self.logdir = Path(logdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._file = None
        if self.enabled:
            from tensorboardX.record_writer import RecordWriter

            # tensorboardX's file name ('events.out.tfevents.<s>.<host>') with a nanosecond suffix: a
            # file is opened with 'wb', and a writer reopened within the same second (a quick resume)
            # would truncate the earlier one. The suffix keeps names unique and in creation order.
            name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{time.time_ns()}"
            with faults.writing(self.logdir):
                self.logdir.mkdir(parents=True, exist_ok=True)
                self._file = RecordWriter(str(self.logdir / name))
            self._write(0, file_version="brain.Event:2")
            if purge_step is not None:
                from tensorboardX.proto.event_pb2 import SessionLog

                self._write(purge_step, session_log=SessionLog(status=SessionLog.START))

    def _write(self, step: int, **fields) -> None:
        from tensorboardX.proto.event_pb2 import Event

        event = Event(step=int(step), wall_time=time.time(), **fields)
        self._guarded(self._file.write, event.SerializeToString())

    def _guarded(self, fn, *args) -> None:
        """fn(*args) on the open file; a write fault closes the writer and raises one `WriteError`."""
        try:
            with faults.writing(self.logdir):
                fn(*args)
        except BaseException:
            file, self._file = self._file, None
            try:
                file.close()  # closes the file even where flushing its buffered rest fails again
            except Exception:  # noqa: BLE001 - the first failure is the one reported
                pass
            raise

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self._file is not None and scalars:
            from tensorboardX.proto.summary_pb2 import Summary

            values = [Summary.Value(tag=tag, simple_value=float(v)) for tag, v in scalars.items()]
            self._write(step, summary=Summary(value=values))

    def write_text(self, tag: str, text: str, step: int = 0) -> None:
        if self._file is not None:
            from tensorboardX.summary import text as text_summary

            self._write(step, summary=text_summary(tag, text))

    def write_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """An HParams-plugin entry (one per run folder), so TensorBoard's HParams view compares runs."""
        if self._file is not None:
            from tensorboardX.summary import hparams as hparams_summary

            clean = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in hparams.items()}
            for summary in hparams_summary(clean, {k: float(v) for k, v in metrics.items()}):
                self._write(0, summary=summary)
            self.write_scalars(0, metrics)

    def flush(self) -> None:
        if self._file is not None:
            self._guarded(self._file.flush)

    def close(self) -> None:
        if self._file is not None:
            self._guarded(self._file.close)
            self._file = None


class RunWriters:
    """The `train/` and `validation/` writers of one run folder."""

    def __init__(self, run_dir: str | Path, purge_step: int | None = None, enabled: bool | None = None):
        self.run_dir = Path(run_dir)
        self.train = Writer(self.run_dir / "train", purge_step, enabled)
        self.validation = Writer(self.run_dir / "validation", purge_step, enabled)

    def write_epoch(self, epoch: int, train: dict[str, float], validation: dict[str, float]) -> None:
        """One evaluation's scalars, flushed so that a running TensorBoard shows them."""
        self.train.write_scalars(epoch, train)
        self.validation.write_scalars(epoch, validation)
        self.flush()

    def flush(self) -> None:
        self.train.flush()
        self.validation.flush()

    def close(self) -> None:
        try:
            self.train.close()
        finally:
            self.validation.close()


def write_curve(logdir: str | Path, curves: dict[str, Any], texts: dict[str, str] | None = None,
                enabled: bool | None = None) -> None:
    """A curve known in full (the range test's): step i holds the i-th value of every tag in
    `curves`, and `texts` are shown at step 0; it replaces any earlier curve in `logdir`, as a
    `Writer` with `purge_step=0` does."""
    writer = Writer(logdir, purge_step=0, enabled=enabled)
    try:
        tags = list(curves)
        for step, values in enumerate(zip(*(map(float, v) for v in curves.values()))):
            writer.write_scalars(step, dict(zip(tags, values)))
        for tag, content in (texts or {}).items():
            writer.write_text(tag, content)
    finally:
        writer.close()


def hparams_markdown(hparams: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(hparams.items()))
    return "| hyperparameter | value |\n|---|---|\n" + rows
