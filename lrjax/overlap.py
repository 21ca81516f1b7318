"""Work beside the main thread, so that a command's independent phases share the cores it has.

`Background` runs a function in a thread and hands its value, or its exception, to the caller that
asks for it (an error in a background phase is raised where the serial code would have raised it,
never lost). `PngChild` is a child process that imports matplotlib as soon as it starts, while this
process goes on with its own work, and later draws lr_find.png from the curve sent to it, writing
it atomically (a temporary file renamed into place, so a reader never sees half a PNG).

`read_ahead(argv)` is the CLI's first act: from the few flags that name the data it starts reading
the IDX files (and, where the resident path will want them, scaling them to float32: most of that
is the first touch of ~220 MB of new pages) in a thread, while the main thread imports JAX and
parses the flags. `read_idx_folder` and `from_arrays`, called where the serial code calls
lrjax.idx's and lrjax.data's, hand over what that thread made when their arguments are the ones it
read with (the arrays: the very objects), else call through: a wrong guess costs time, never a
different result. An error of the read is raised by the call that would have raised it.

`LRJAX_SERIAL=1` turns all three into the serial order (the function runs at once in the caller; the
PNG is drawn in this process when asked; nothing is read ahead), for measuring what the overlap gains.

Nothing here imports JAX or matplotlib. The child imports lrjax.plots under an empty stand-in for
the lrjax package (its folder as `__path__`, its `__init__` never run): the package's import
brings JAX, ~1.5-2 s of a core that the child would take from the parent. plots.py and what it
imports of lrjax (lrjax.numeric) must therefore need no JAX, which tests/test_overlap.py checks.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import threading
import time
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

# The PNG child warms matplotlib up (fonts, the PNG encoder) while the parent still works.
_CHILD_WARM = r"""
plots.warm_up()
"""

# The child's program: its imports first, then wait for the curve on stdin. EOF before a curve
# (the parent failed or was stopped) means: write nothing.
_CHILD = _CHILD_IMPORTS + _CHILD_WARM + r"""
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
# The PNG is in place: end without the interpreter's teardown of matplotlib (~0.05 s), which the
# parent would wait for.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
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


class _ReadAhead:
    """One IDX folder read (then scaled, when `scale`) in a Background thread; `key` is the call
    `read_idx_folder(folder, dataset, cache_dir=cache_dir)` it stands for."""

    def __init__(self, folder: str, dataset: str, cache_dir: str, scale: bool, make):
        self.key, self.make = (folder, dataset, cache_dir), make  # make: lrjax.data.from_arrays
        self.raw: dict | None = None
        self._raw_read = threading.Event()
        self._task = Background(self._work, scale, name="lrjax-read-ahead")

    def _work(self, scale: bool):
        from lrjax import idx

        folder, dataset, cache_dir = self.key
        t0 = time.perf_counter()
        try:
            self.raw = idx.read_idx_folder(folder, dataset, cache_dir=cache_dir)
        finally:
            self._raw_read.set()
        t1 = time.perf_counter()
        _spans["data_read_ahead"] = (t0, t1)
        if scale and 4 * self.raw["train_images"].nbytes <= _physical_memory() // 8:
            # what load() makes of these arrays on the resident path (a wrong guess: unused)
            made = self.make(dataset, self.raw["train_images"], self.raw["train_labels"],
                                    self.raw["test_images"], self.raw["test_labels"],
                                    source=f"IDX files in {folder}")
            _spans["data_scale_ahead"] = (t1, time.perf_counter())
            return made
        return None

    def read(self) -> dict:
        while not self._raw_read.wait(0.1):  # a short wait: Ctrl-C reaches the main thread meanwhile
            pass
        if self.raw is None:
            self._task.result()  # raises the read's error
        return self.raw

    def scaled(self, args: tuple, source: str):
        """The scaled Dataset when `args` (name, the four arrays) are this read's own, else None."""
        if self.raw is None or args[0] != self.key[1] or source != f"IDX files in {self.key[0]}":
            return None
        own = (self.raw["train_images"], self.raw["train_labels"], self.raw["test_images"], self.raw["test_labels"])
        if not all(a is b for a, b in zip(args[1:], own)):
            return None
        return self._task.result()


_ahead: _ReadAhead | None = None  # the CLI's read, until the job takes it (or main() drops it)
_spans: dict[str, tuple[float, float]] = {}  # its phases' perf_counter() [start, end]


def spans(clock: Callable[[float], float | None]) -> dict[str, list]:
    """The read ahead's phases (data_read_ahead, data_scale_ahead) as [start, end] on `clock`
    (lrjax.timing.process_clock), for lr_find.json's timeline; {} where nothing was read ahead."""
    return {name: [clock(a), clock(b)] for name, (a, b) in _spans.items()}


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _data_flags(argv: list[str]) -> argparse.Namespace | None:
    """The flags that name the data, parsed from a find-lr/train/run command line; None for any
    other command, or where these flags do not parse (the real parser reports that later)."""
    if not argv or argv[0] not in ("find-lr", "train", "run"):
        return None
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    for flag in ("--dataset", "--data-dir", "--cache-dir", "--tfds-data-dir", "--input"):
        p.add_argument(flag)
    try:
        flags, _ = p.parse_known_args(argv[1:])
    except (argparse.ArgumentError, SystemExit):
        return None
    return flags


def read_ahead(argv: list[str], *, make, data_dir, cache_dir) -> None:
    """Starts reading the data of the command line `argv` (subcommand first) in a thread, where it
    names IDX files that lrjax reads itself (not --tfds-data-dir); the dataset and the folders
    default as lrjax.config and lrjax.data default them (`data_dir()`, `cache_dir()`: lrjax.data's
    defaults; `make`: lrjax.data.from_arrays, passed in: this module imports nothing that imports it).
    Nothing under `serial()`."""
    global _ahead
    _ahead = None
    _spans.clear()
    flags = _data_flags(argv)
    if serial() or flags is None or flags.tfds_data_dir is not None:
        return
    from lrjax import idx  # numpy and lrjax.errors: no JAX

    dataset = flags.dataset or "fashion_mnist"  # Config's default
    folder = flags.data_dir or data_dir()
    if dataset not in idx.IDX_DATASETS or folder is None or not idx.has_idx_files(folder):
        return
    cache = flags.cache_dir or str(cache_dir())
    _ahead = _ReadAhead(folder, dataset, cache, scale=flags.input in (None, "auto", "resident"), make=make)


def drop_read_ahead() -> None:
    """Forgets a read that no job took (the CLI, when its command ends)."""
    global _ahead
    _ahead = None
    _spans.clear()


def read_idx_folder(folder, dataset: str, cache_dir) -> dict:
    """lrjax.idx.read_idx_folder(folder, dataset, cache_dir=cache_dir), from the read ahead when it
    is the same call (taken once), else read now."""
    global _ahead
    ahead = _ahead
    if ahead is not None and ahead.key == (os.fspath(folder), dataset, os.fspath(cache_dir)):
        try:
            return ahead.read()
        except BaseException:
            _ahead = None  # raised once, as the serial read raises it; a retry reads again
            raise
    from lrjax import idx

    return idx.read_idx_folder(folder, dataset, cache_dir=cache_dir)


def from_arrays(make, name, train_images, train_labels, test_images, test_labels, source: str,
                valid_size: int | None = None):
    """`make(...)` (lrjax.data.from_arrays; valid_size None: its default), the read ahead's scaled
    copy when these are its arrays and the split is the default one (taken once: the read is
    forgotten after), else scaled now."""
    global _ahead
    ahead, args = _ahead, (name, train_images, train_labels, test_images, test_labels)
    if ahead is not None:
        _ahead = None
        made = ahead.scaled(args, source) if valid_size is None else None
        if made is not None:
            return made
    return make(*args, source=source) if valid_size is None else make(*args, source=source, valid_size=valid_size)
