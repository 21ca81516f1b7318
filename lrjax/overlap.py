"""Work beside the main thread, so that a command's independent phases share the cores it has.

`Background` runs a function in a thread and hands its value, or its exception, to the caller that
asks for it (an error in a background phase is raised where the serial code would have raised it,
never lost). `PngChild` is a child process that imports matplotlib as soon as it starts, while this
process goes on with its own work, and later draws lr_find.png from the curve sent to it, writing
it atomically (a temporary file renamed into place, so a reader never sees half a PNG).

`LRJAX_SERIAL=1` turns both into the serial order (the function runs at once in the caller; the
PNG is drawn in this process when asked), for measuring what the overlap gains.

Nothing here imports JAX or matplotlib. The child imports lrjax.plots under an empty stand-in for
the lrjax package (its folder as `__path__`, its `__init__` never run): the package's import
brings JAX, ~1.5-2 s of a core that the child would take from the parent. plots.py and what it
imports of lrjax (lrjax.numeric) must therefore need no JAX, which tests/test_overlap.py checks.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def serial() -> bool:
    """True when $LRJAX_SERIAL asks for the serial order (any value but "", "0")."""
    return os.environ.get("LRJAX_SERIAL", "") not in ("", "0")


class Background(Generic[T]):
    """`fn(*args, **kwargs)` in a daemon thread started now; `result()` waits for it and returns its
    value or raises its exception (with its traceback) in the caller. A daemon thread: Ctrl-C in the
    main thread ends the process without waiting for it. Under `serial()` the call runs at once, in
    the caller, and `result()` returns or raises what it did."""

    def __init__(self, fn: Callable[..., T], *args: Any, name: str | None = None, **kwargs: Any):
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = None
        if serial():
            self._run(fn, args, kwargs)
        else:
            self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs),
                                            name=name or getattr(fn, "__name__", "lrjax-background"), daemon=True)
            self._thread.start()

    def _run(self, fn, args, kwargs) -> None:
        try:
            self._value = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller by result(), KeyboardInterrupt included
            self._error = e

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def result(self) -> T:
        if self._thread is not None:
            self._thread.join()  # interruptible: Ctrl-C reaches the main thread while it waits
        if self._error is not None:
            error, self._error = self._error, None  # raised once: a second call returns None
            raise error
        return self._value


# The child's imports: lrjax.plots under a stand-in lrjax package (sys.argv[1], the package's folder,
# as its __path__), so that lrjax/__init__.py and its JAX import never run here; then matplotlib's
# PNG writer, which savefig would import on the first save otherwise.
_CHILD_IMPORTS = r"""
import json, os, pickle, sys, types
_package = types.ModuleType("lrjax")
_package.__path__ = [sys.argv[1]]
sys.modules["lrjax"] = _package
from lrjax import plots
from matplotlib.backends import backend_agg
"""

# The child's program: its imports first, then wait for the curve on stdin. EOF before a curve
# (the parent failed or was stopped) means: write nothing.
_CHILD = _CHILD_IMPORTS + r"""
try:
    job = pickle.load(sys.stdin.buffer)
except (EOFError, KeyboardInterrupt):
    sys.exit(0)
path = job.pop("path")
tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp.png")
try:
    plots.plot_lr_find(types.SimpleNamespace(**job), tmp)
    os.replace(tmp, path)
except OSError as e:
    try:
        os.unlink(tmp)
    except OSError:
        pass
    name = path if e.filename in (None, tmp) else e.filename  # the error names the file asked for
    print(json.dumps({"errno": e.errno, "strerror": e.strerror or str(e), "filename": name}), flush=True)
    sys.exit(3)
except KeyboardInterrupt:
    sys.exit(130)
"""


def _curve(result) -> dict[str, Any]:
    """What plots.plot_lr_find reads of a RangeTestResult, as plain values (the child has no lrjax)."""
    fields = ("lrs", "losses", "smoothed", "num_seeds", "suggestions", "method", "diverged_lr", "val_steps",
              "val_losses", "optimizer", "batch_size")
    job = {name: getattr(result, name) for name in fields}
    job["band"] = result.band if result.num_seeds > 1 else None
    return job


class PngChild:
    """lr_find.png drawn by a child process: started early (it imports matplotlib meanwhile, on
    another core), sent the curve by `draw(result, path)`, waited for by `wait()`, which raises what
    the drawing raised in this process (an OSError with the child's errno, naming `path`, so that
    `lrjax.faults.writing` reports a full or read-only disk as it does for any file). `close()`
    ends a child that was never sent a curve; use the object as a context manager.

    Under `serial()`, or not `enabled` (a process that draws nothing), no child starts: `draw`
    draws here, at once (the serial order)."""

    def __init__(self, enabled: bool = True):
        self._proc = None
        self._pending = None
        if enabled and not serial():
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(Path(__file__).parent)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env={**os.environ, "MPLBACKEND": "agg"})

    def draw(self, result, path: str | os.PathLike) -> None:
        path = Path(path)
        if self._proc is None:
            from lrjax import plots

            plots.plot_lr_find(result, path)
            return
        self._pending = path
        try:
            pickle.dump({"path": str(path), **_curve(result)}, self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._proc.stdin.close()
        except BrokenPipeError:
            pass  # the child died before reading: wait() reports why

    def wait(self) -> None:
        if self._proc is None or self._pending is None:
            return
        # stderr first: a long traceback could fill its pipe; stdout holds one short line at most
        # (communicate() would flush the stdin closed by draw(), an error before Python 3.12)
        err = self._proc.stderr.read()
        out = self._proc.stdout.read()
        self._reap()
        path, self._pending = self._pending, None
        if self._proc.returncode == 3:
            fault = json.loads(out.decode().strip().splitlines()[-1])
            raise OSError(fault["errno"], fault["strerror"], fault["filename"])
        if self._proc.returncode != 0:
            last = (err.decode(errors="replace").strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"drawing {path} failed in its child process (exit {self._proc.returncode}): {last}")

    def close(self) -> None:
        """Ends the child if it still runs (no curve sent, or an error on the way): EOF on its stdin,
        then a kill if it does not go."""
        if self._proc is None or self._proc.stdout.closed:
            return
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._reap()

    def _reap(self) -> None:
        self._proc.wait()
        for pipe in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            pipe.close()

    def __enter__(self) -> PngChild:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
