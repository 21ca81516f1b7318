"""TensorBoard event files through tensorboardX, behind a tiny writer interface (as CLU's).

A training run is `tensorboard/run_%Y_%m_%d-%H_%M_%S/` with `train/` and `validation/` writers that
use the same tag names (`loss`, `accuracy`), so TensorBoard overlays the two curves. Only the main
process writes; elsewhere the writer is a no-op.

tensorboardX writes events on a thread of its own; when a write fails there (disk full, ...) that
thread dies, printing a traceback, and its queue no longer drains, so later writes would block for
ever. A `Writer` therefore watches its thread: the next write, flush or close raises one
`WriteError` naming the run folder instead, and the thread's traceback is kept quiet (shown under
`lrjax.faults.debug()`).
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from pathlib import Path
from typing import Any

import jax

from lrjax import faults


def new_run_name(now: datetime.datetime | None = None) -> str:
    return (now or datetime.datetime.now()).strftime("run_%Y_%m_%d-%H_%M_%S")


class Writer:
    """Scalars for one TensorBoard run folder; `purge_step` drops events at or after it (resume)."""

    def __init__(self, logdir: str | Path, purge_step: int | None = None, enabled: bool | None = None):
        self.logdir = Path(logdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._writer = None
        self._threads: list[threading.Thread] = []
        if self.enabled:
            from tensorboardX import SummaryWriter

            _watch_writer_threads()
            before = set(threading.enumerate())
            with faults.writing(self.logdir):
                # tensorboardX names event files by the second ('events.out.tfevents.<s>.<host>') and opens
                # them with 'wb': a writer reopened within the same second (a quick resume) would truncate the
                # earlier file. A nanosecond suffix keeps names unique and in creation order. A long queue:
                # a put into a full one would wait for ever on a thread that died between two checks.
                self._writer = SummaryWriter(str(self.logdir), purge_step=purge_step, flush_secs=30,
                                             max_queue=1000, filename_suffix=f".{time.time_ns()}")
            self._threads = [t for t in set(threading.enumerate()) - before
                             if type(t).__module__.startswith("tensorboardX")]

    def _check(self) -> None:
        """Raises the failure of this writer's thread (the writer is then closed)."""
        if self._writer is not None and not all(t.is_alive() for t in self._threads):
            writer, self._writer = self._writer, None
            try:
                writer.close()  # the queue is long enough not to block; the file's flush may fail again
            except Exception:  # noqa: BLE001 - the thread's failure is the one reported
                pass
            self._raise_thread_error(OSError("tensorboardX's writer thread ended"))

    def _raise_thread_error(self, default: BaseException | None = None) -> None:
        error = next((_thread_errors.pop(t) for t in self._threads if t in _thread_errors), default)
        if error is not None:
            raise (faults.write_error(error, self.logdir) or RuntimeError(
                f"TensorBoard events for {self.logdir} could not be written ({type(error).__name__}: {error})")
            ) from error

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self._writer is not None:
            self._check()
            for tag, value in scalars.items():
                self._writer.add_scalar(tag, float(value), global_step=step)

    def write_text(self, tag: str, text: str, step: int = 0) -> None:
        if self._writer is not None:
            self._check()
            self._writer.add_text(tag, text, global_step=step)

    def write_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """An HParams-plugin entry (one per run folder), so TensorBoard's HParams view compares runs."""
        if self._writer is not None:
            from tensorboardX.summary import hparams as hparams_summary

            self._check()
            clean = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in hparams.items()}
            for summary in hparams_summary(clean, {k: float(v) for k, v in metrics.items()}):
                self._writer.file_writer.add_summary(summary)
            self.write_scalars(0, metrics)

    def flush(self) -> None:
        if self._writer is not None:
            self._check()
            try:
                with faults.writing(self.logdir):
                    self._writer.flush()
            except BaseException:
                self._writer = None  # a failed file: closing it would only fail again
                raise

    def close(self) -> None:
        if self._writer is not None:
            self.flush()
            writer, self._writer = self._writer, None
            with faults.writing(self.logdir):
                writer.close()  # its thread first writes the events it still holds
            self._raise_thread_error()


_thread_errors: dict[threading.Thread, BaseException] = {}  # tensorboardX threads that died, by thread
_watching = threading.Lock()
_watched = False


def _watch_writer_threads() -> None:
    """Keeps (once per process) the exceptions that end tensorboardX's writer threads for their
    `Writer` to raise, instead of printing them; other threads' exceptions pass as before."""
    global _watched
    with _watching:
        if _watched:
            return
        _watched = True
        previous = threading.excepthook

        def hook(args):
            if type(args.thread).__module__.startswith("tensorboardX") and args.exc_value is not None:
                _thread_errors[args.thread] = args.exc_value
                if not faults.debug():
                    return
            previous(args)

        threading.excepthook = hook
    faults.quiet_unraisable(_failed_writer_cleanup)


def _failed_writer_cleanup(unraisable) -> bool:
    """tensorboardX's own close at exit of a writer whose failure a `Writer` has reported: its file
    still holds the events it could not write, and fails again."""
    module = getattr(unraisable.object, "__module__", None) or ""
    return module.startswith("tensorboardX") and faults.is_write_fault(unraisable.exc_value)


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
        try:
            self.train.close()
        finally:
            self.validation.close()


def write_curve(logdir: str | Path, curves: dict[str, Any], texts: dict[str, str] | None = None,
                enabled: bool | None = None) -> None:
    """A curve known in full (the range test's): step i holds the i-th value of every tag in
    `curves`, and `texts` are shown at step 0; it replaces any earlier curve in `logdir`, as a
    `Writer` with `purge_step=0` does.

    Written in one go with tensorboardX's synchronous `EventsWriter`: `SummaryWriter` passes each
    event through a multiprocessing queue to its writer thread, ~0.1 ms per event, which made a
    1,267-step curve of three tags 0.3-0.4 s instead of ~0.03 s.
    """
    if not (jax.process_index() == 0 if enabled is None else enabled):
        return
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    from tensorboardX.proto.summary_pb2 import Summary
    from tensorboardX.summary import text

    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    writer = EventsWriter(str(logdir / "events"), filename_suffix=f".{time.time_ns()}")  # as in `Writer`
    try:
        now = time.time()
        # TensorBoard drops the events of earlier files from this step on: the old curve
        writer.write_event(Event(step=0, wall_time=now, session_log=SessionLog(status=SessionLog.START)))
        tags = list(curves)
        for step, values in enumerate(zip(*(map(float, v) for v in curves.values()))):
            summary = Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in zip(tags, values)])
            writer.write_event(Event(step=step, wall_time=now, summary=summary))
        for tag, content in (texts or {}).items():
            writer.write_event(Event(step=0, wall_time=now, summary=text(tag, content)))
    finally:
        writer.close()


def hparams_markdown(hparams: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(hparams.items()))
    return "| hyperparameter | value |\n|---|---|\n" + rows
