"""Faults a job meets outside its own code: what a failed write or read means, in one line; bounded
retries of transient reads; quieting libraries' background reports of a failure lrjax reports itself;
and a wait for the device during which signal handlers run.

Libraries report one OS error in many forms: an `OSError` with its errno, a tensorstore `ValueError`
ending in "[os_error_code='28']", a message quoting `os.strerror`, an exception chained to any of
these. `os_errno` finds the errno behind all of them; `describe_os_error` says what it means.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from lrjax.errors import WriteError

T = TypeVar("T")

# What the user can fix: the cause in words (ENOSPC's says "space": what a full disk is searched by).
WRITE_FAULTS = {
    errno.ENOSPC: ("no space left on the device", "free some space"),
    errno.EDQUOT: ("disk quota exceeded (no space left in the quota)", "free some space or raise the quota"),
    errno.EROFS: ("read-only file system", "use a writable folder"),
    errno.EACCES: ("permission denied", "fix the folder's permissions or use another folder"),
    errno.EPERM: ("operation not permitted", "fix the folder's permissions or use another folder"),
}
# Read errors that a shared filesystem can throw once and not again: retried, never taken for damage.
TRANSIENT = {errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EBUSY, errno.EINTR,
             errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN, errno.EHOSTUNREACH, errno.ENETUNREACH}
RETRY_DELAY_S = 0.5  # first pause of `retry`; doubled after each further failure

_BY_MESSAGE = {os.strerror(code): code for code in (*WRITE_FAULTS, *TRANSIENT)}
_CODE_IN_TEXT = re.compile(r"os_error_code='(\d+)'|\[Errno (\d+)\]")
_PATH_IN_TEXT = re.compile(r"""(?:local file|Failed writing:|Error opening|Error writing)[^"']*["'](/[^"']+)["']""")


def debug() -> bool:
    """Whether lrjax shows tracebacks and libraries' own error logs (`--debug` or $LRJAX_DEBUG=1)."""
    return os.environ.get("LRJAX_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def os_errno(exc: BaseException) -> int | None:
    """The errno of the write fault or transient error behind `exc` (or any exception it chains),
    from the exception type or its message; None when there is none."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _BY_MESSAGE.values():
            return e.errno
    for e in _chain(exc):
        text = str(e)
        for match in _CODE_IN_TEXT.finditer(text):
            code = int(match.group(1) or match.group(2))
            if code in _BY_MESSAGE.values():
                return code
        for message, code in _BY_MESSAGE.items():
            if message in text:
                return code
    return None


def is_write_fault(exc: BaseException) -> bool:
    return os_errno(exc) in WRITE_FAULTS


def is_transient(exc: BaseException) -> bool:
    return os_errno(exc) in TRANSIENT


def fault_path(exc: BaseException) -> str | None:
    """The file a fault names: an `OSError`'s filename, else a path quoted in a library's message."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.filename:
            return os.fsdecode(e.filename)
    for e in _chain(exc):
        match = _PATH_IN_TEXT.search(str(e))
        if match:
            return match.group(1)
    return None


def cause_of(exc: BaseException) -> str | None:
    """The fault behind `exc` in words ('no space left on the device', 'input/output error'), or None."""
    code = os_errno(exc)
    if code is None:
        return None
    return WRITE_FAULTS[code][0] if code in WRITE_FAULTS else os.strerror(code).lower()


def describe_os_error(exc: BaseException) -> str | None:
    """One line for a failed write or read ('cannot write PATH: no space left on the device; free
    some space, then run the same command again'), or None when `exc` is no such fault."""
    code = os_errno(exc)
    if code is None:
        return None
    path = fault_path(exc)
    where = f" {path}" if path else ""
    if code in WRITE_FAULTS:
        return f"cannot write{where}: {cause_of(exc)}; {WRITE_FAULTS[code][1]}, then run the same command again"
    return f"cannot read{where}: {cause_of(exc)} (a transient filesystem error?); run the same command again"


def write_error(exc: BaseException, path: str | os.PathLike, what: str | None = None,
                then: str = "then run the same command again") -> WriteError | None:
    """The `WriteError` for `exc` when it is a write fault, naming `what` (default: the path) and
    `path`; None for any other exception (a bug, a transient error, ...)."""
    code = os_errno(exc)
    if code not in WRITE_FAULTS:
        return None
    cause, hint = WRITE_FAULTS[code]
    return WriteError(f"cannot write {what or path}{f' in {path}' if what else ''}: {cause}; {hint}, {then}",
                      path=Path(path), errno=code)


@contextmanager
def writing(path: str | os.PathLike, what: str | None = None) -> Iterator[None]:
    """Turns a write fault inside the block into a `WriteError` naming `path` (or the file the fault
    names, when it lies inside `path`); anything else passes unchanged."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        named = fault_path(e)
        inside = named is not None and Path(named).is_relative_to(Path(path))
        err = write_error(e, named if inside and what is None else path, what)
        if err is None:
            raise
        raise err from e


def retry(fn: Callable[[], T], attempts: int = 4, delay: float | None = None,
          transient: Callable[[BaseException], bool] = is_transient) -> T:
    """`fn()`, called again after a transient error (pauses `delay`, doubling; default
    `RETRY_DELAY_S`) at most `attempts` times in all; the last error propagates."""
    pause = RETRY_DELAY_S if delay is None else delay
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:
            if attempt == attempts - 1 or not transient(e):
                raise
        time.sleep(pause)
        pause *= 2
    raise AssertionError("unreachable")


# Background failures that lrjax reports itself ---------------------------------------------------

class _OrbaxThreadTracebacks(logging.Filter):
    """Drops Orbax's logged tracebacks of a failed background save: Orbax raises the same error in
    the thread that waits for the save, where `lrjax.checkpoint` turns it into one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.levelno >= logging.ERROR
                    and f"{os.sep}orbax{os.sep}" in record.pathname and not debug())


def _from_abandoned_orbax_write(unraisable) -> bool:
    """An unraisable exception left by Orbax's writes of a failed save: tensorstore completing a write
    for an event loop that Orbax closed at the first error ('Event loop is closed'), and the coroutines
    of those writes collected later, possibly while Python shuts down."""
    exc, obj = unraisable.exc_value, unraisable.object
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True
    code = getattr(obj, "cr_code", None)
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


_installed = threading.Lock()
_unraisable_filters: list[Callable[[Any], bool]] = []
_quieted = False


def quiet_unraisable(predicate: Callable[[Any], bool]) -> None:
    """Drops the unraisable exceptions (`sys.unraisablehook`'s argument) for which `predicate` is
    true, unless `debug()`: a library's late report of a failure that lrjax has reported itself."""
    with _installed:
        if predicate in _unraisable_filters:
            return
        if not _unraisable_filters:
            previous = sys.unraisablehook
            is_debug, filters = debug, _unraisable_filters  # bound now: the hook may run at shutdown

            def hook(unraisable):
                try:
                    if not is_debug() and any(f(unraisable) for f in filters):
                        return
                except Exception:  # noqa: BLE001 - e.g. while Python shuts down: report as it would have
                    pass
                previous(unraisable)

            sys.unraisablehook = hook
        _unraisable_filters.append(predicate)


def quiet_background_errors() -> None:
    """Installs (once) the filters above for Orbax: its logged tracebacks of a failed background
    save and the unraisable exceptions of its abandoned writes; all else passes as before."""
    global _quieted
    with _installed:
        if _quieted:
            return
        _quieted = True
        logging.getLogger("absl").addFilter(_OrbaxThreadTracebacks())
    quiet_unraisable(_from_abandoned_orbax_write)


# Sections a Ctrl-C must not cut ---------------------------------------------------------------

_uninterruptible = {"depth": 0, "pending": False}


@contextmanager
def uninterruptible() -> Iterator[None]:
    """A section an interrupt must not cut in two, e.g. Orbax starting a save's thread (cut inside
    `Thread.start`, the thread is half-started and the save can be neither finished nor joined).
    `lrjax.loop.Signals` asks `defer_interrupt()` before it raises; a deferred interrupt is raised
    here as the (outermost) section ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _uninterruptible["depth"] += 1
    try:
        yield
    finally:  # an error leaving the section ends the run anyway: the deferred interrupt goes with it
        _uninterruptible["depth"] -= 1
        pending = _uninterruptible["depth"] == 0 and _uninterruptible["pending"]
        if pending:
            _uninterruptible["pending"] = False
    if pending:
        raise KeyboardInterrupt


def defer_interrupt() -> bool:
    """Inside an `uninterruptible()` section: records the interrupt for the section's end, True."""
    if _uninterruptible["depth"]:
        _uninterruptible["pending"] = True
        return True
    return False


# Waiting for the device ------------------------------------------------------------------------

def wait_ready(tree: Any, poll_s: float = 0.002, between: Callable[[], None] | None = None) -> Any:
    """Returns `tree` once its arrays are computed. JAX's own wait blocks the main thread in C++,
    where Python runs no signal handler until it returns (a second Ctrl-C would wait for the whole
    epoch); here the main thread sleeps in short slices, so a handler runs, and may raise, at once.
    `between()` runs after each slice (e.g. to report a signal received meanwhile)."""
    import jax

    arrays = [a for a in jax.tree.leaves(tree) if hasattr(a, "is_ready")]
    pause = poll_s / 8
    while not all(a.is_ready() for a in arrays):
        time.sleep(pause)
        pause = min(pause * 2, poll_s)  # quick epochs are seen at once, long ones cost ~poll_s
        if between is not None:
            between()
    return tree
