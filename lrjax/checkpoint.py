"""Orbax checkpoints: the latest N and the best by a metric, saved asynchronously, restored with fallback.

A checkpoint is a `Composite` of two items, so plain Orbax can read it without lrjax:
  - `state`: a pytree of arrays (model parameters and state, optimizer state, best weights, RNG key
    data; typed PRNG keys, such as a Dropout stream's, are stored as their raw data),
    written with `StandardSave`;
  - `meta`: JSON (epoch, early-stopping state, config, per-epoch history, TensorBoard run name).
Per-epoch metrics are handed to the manager, which keeps the best checkpoint by `best_metric`
(`AnyPreservationPolicy([LatestN, BestN])`: `max_to_keep` with `best_fn` alone would delete the latest).

Faults: a save that fails in the background (disk full, read-only, ...) is reported at the next save
or at `close` as one `LrjaxError` naming the step and folder; Orbax's atomic saves leave the completed
checkpoints intact and the unfinished `*.orbax-checkpoint-tmp` is removed by the next run. A read
error of the OS (EIO, a shared filesystem's hiccup) is retried and then reported, never taken for
damage; only a checkpoint that reads but is damaged is moved aside. With several processes each such
decision is agreed, so every process resumes from the same step.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from lrjax import faults
from lrjax.errors import CheckpointError, LrjaxError


class Checkpointer:
    def __init__(self, directory: str | Path, keep_latest: int = 2, best_metric: str = "val_loss",
                 mode: str = "min", async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        sign = -1.0 if mode == "min" else 1.0

        def score(metrics):  # BestN keeps the highest scores; a non-finite value is never best
            value = float(metrics.get(best_metric, math.nan))
            return sign * value if math.isfinite(value) else -math.inf

        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy([
                policies.LatestN(n=keep_latest),
                policies.BestN(get_metric_fn=score, n=1, keep_checkpoints_without_metrics=False),
            ]),
            # best_fn makes Orbax write each step's metrics to disk (without it they live only in memory,
            # so a resumed run deleted the best checkpoint at its first save) and makes best_step() work.
            best_fn=score, best_mode="max",
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of a save killed midway
            create=True,
        )
        self._set_aside: list[int] = []  # steps found unreadable and moved aside
        self._saving: int | None = None  # the step whose asynchronous save may still be running
        self._failed = False  # a save failed and was reported: closing raises nothing more
        faults.quiet_background_errors()  # Orbax's thread tracebacks: the error is raised here instead
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise (faults.write_error(e, self.directory) or e) from e
        # Handlers named up front, so a reopened manager can read a step's metadata before restoring it.
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}

        def open_manager():
            return faults.retry(lambda: ocp.CheckpointManager(self.directory, options=options,
                                                              item_handlers=handlers))

        self.manager, error = None, None
        try:
            self.manager = open_manager()
        except Exception as e:  # noqa: BLE001 - Orbax reads every step's metrics here and fails on a damaged one
            error = e
        if not _agree(error is not None):
            return
        damaged = [p for p in sorted(self.directory.iterdir())
                   if p.name.isdigit() and not _json_ok(p / "metrics" / "metrics")]
        if _agree(not damaged):  # some process found no damage to explain its failure
            if error is not None:
                raise error
            raise CheckpointError(f"another process could not open the checkpoints in {self.directory}")
        for p in damaged:
            if jax.process_index() == 0:
                print(f"lrjax: checkpoint {p} is unreadable (damaged metrics file)", file=sys.stderr)
            self._rename_aside(int(p.name))
        _barrier("lrjax_checkpoints_set_aside")
        if self.manager is not None:
            self.manager.close()
        self.manager = open_manager()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def latest_meta(self) -> dict | None:
        """The meta of the newest checkpoint whose meta reads (None if none); reads no arrays and moves
        nothing (`restore` judges the arrays)."""
        self._finish()
        for s in reversed(self.all_steps()):
            try:
                return self._read_meta(s)
            except Exception:  # noqa: BLE001 - an unreadable step: the next older one
                continue
        return None

    def save(self, step: int, tree: Any, meta: dict, metrics: dict[str, float], force: bool = False) -> None:
        """Starts an (asynchronous) save once the previous one has finished; a failure of either raises
        one `LrjaxError` naming its step (`WriteError` for a full or read-only filesystem)."""
        self._finish()
        try:
            with faults.uninterruptible():  # a Ctrl-C inside Orbax's Thread.start would half-start it
                self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_storable(tree)),
                                                                meta=ocp.args.JsonSave(meta)),
                                  metrics={k: float(v) for k, v in metrics.items()}, force=force)
                self._saving = step
        except Exception as e:
            raise self._save_failed(e, step) from e

    def _finish(self) -> None:
        """Waits for the asynchronous save; its failure is raised here (once: Orbax raises it once)."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(e, self._saving) from e
        finally:
            self._saving = None

    def _save_failed(self, error: Exception, step: int | None) -> LrjaxError:
        self._failed = True
        _join_orbax_threads()
        what = "a checkpoint" if step is None else f"checkpoint {step}"
        done = _complete_steps(self.directory)
        then = f"then run the same command again to resume from checkpoint {done[-1]}" if done else \
            "then run the same command again"
        found = faults.write_error(error, self.directory, what, then=then)
        if found is not None:
            return found
        cause = faults.describe_os_error(error) or f"{type(error).__name__}: {_first_line(error)}"
        return CheckpointError(f"saving {what} in {self.directory} failed ({cause})")

    def restore(self, target: Any, step: int | None = None,
                check_meta: Callable[[dict], None] | None = None) -> tuple[int, Any, dict]:
        """Restores `step` (default: the newest intact one) into the structure of `target`.

        `check_meta(meta)` runs on the checkpoint's meta before its arrays are read, so a run that
        differs (another model, rate, ...) is refused by the caller's error, and nothing is moved.
        An unreadable checkpoint is reported and moved aside to `checkpoints/unreadable-STEP` (never
        deleted), and the next older one is tried; raises `CheckpointError` naming them if none is readable.
        A read error of the OS (EIO, ESTALE, ...) is retried (`faults.retry`), then raised as a
        `CheckpointError` without moving anything: the checkpoint may well be intact.
        """
        self._finish()
        candidates = [step] if step is not None else list(reversed(self.all_steps()))
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _storable(target))
        failures = []
        for s in candidates:
            where = self.directory / str(s)
            verdict, result, error = self._read(s, abstract, check_meta)
            if verdict == _INTACT:
                if failures or self._set_aside:
                    _log(f"lrjax: resuming from checkpoint {where} instead")
                return result[0], _from_storable(result[1], target), result[2]
            if verdict == _REFUSED:
                raise error if isinstance(error, LrjaxError) else CheckpointError(
                    f"another process could not read checkpoint {where}; nothing was moved")
            failures.append(s)
            why = f"{type(error).__name__}: {_first_line(error)}" if error is not None else "on another process"
            _log(f"lrjax: checkpoint {where} is unreadable ({why})")
            if step is None:
                self._move_aside(s)
        raise CheckpointError(f"no readable checkpoint in {self.directory} (tried steps {failures}); "
                              "move the folder away to start afresh")

    def _read(self, s: int, abstract: Any, check_meta) -> tuple[int, Any, Exception | None]:
        """(_INTACT, (step, state, meta), None), (_DAMAGED, None, error) or (_REFUSED, None, error).

        The meta and the arrays' metadata are read by each process alone, and their verdict is
        agreed before the arrays are read: Orbax's restore ends in a barrier of all processes, which
        a process that failed before it would leave the others waiting in."""
        where = self.directory / str(s)
        try:
            meta = self._read_meta(s)
            if check_meta is not None:
                check_meta(meta)
            stored = faults.retry(lambda: self.manager.item_metadata(s))["state"]
            if stored is None:  # a damaged step (its _METADATA gone), not another model
                raise ValueError("the arrays' metadata is missing")
            if _shapes(stored) != _shapes(abstract):
                raise _different_model(where)  # refused before any array is read
        except Exception as e:  # noqa: BLE001 - classified: another run, the filesystem's error, damage
            verdict, error = _verdict(e, where)
        else:
            verdict, error = _INTACT, None
        agreed = _agree(verdict)  # one decision for all processes: the worst any of them met
        if agreed != _INTACT:
            return agreed, None, error
        try:
            restored = faults.retry(lambda: self.manager.restore(
                s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))))
        except Exception as e:  # noqa: BLE001
            verdict, error = _verdict(e, where)
            if jax.process_count() > 1:  # the others wait in Orbax's barrier: no further agreement
                raise CheckpointError(f"cannot read the arrays of checkpoint {where} "
                                      f"({type(e).__name__}: {_first_line(e)}); nothing was moved: check it, "
                                      "move it aside by hand if it is damaged, then run again") from e
            return verdict, None, error
        return _INTACT, (s, restored["state"], meta), None

    def _read_meta(self, s: int) -> dict:
        """The meta of step `s`, read as the plain JSON file it is (by this process alone)."""
        return dict(faults.retry(lambda: json.loads((self.directory / str(s) / "meta" / "metadata").read_text())))

    def _move_aside(self, step: int) -> None:
        self._rename_aside(step)
        _barrier(f"lrjax_checkpoint_set_aside_{step}")  # renamed before any process looks again
        self.manager.reload()

    def _rename_aside(self, step: int) -> None:
        src = self.directory / str(step)
        if jax.process_index() == 0 and src.exists():
            dst = self.directory / f"unreadable-{step}"
            n = 1
            while dst.exists():
                dst, n = self.directory / f"unreadable-{step}.{n}", n + 1
            src.rename(dst)
        self._set_aside.append(step)

    def wait(self) -> None:
        self._finish()

    def close(self) -> None:
        """Finishes the asynchronous save (raising its failure, unless one was raised already)."""
        try:
            self._finish()
        finally:
            try:
                self.manager.close()
            except Exception:
                if not self._failed:
                    raise


_INTACT, _DAMAGED, _REFUSED = 0, 1, 2  # ordered: processes agree on the worst


def _verdict(e: Exception, where: Path) -> tuple[int, Exception]:
    """What a failure to read checkpoint `where` means: refused (another run, the filesystem's
    error, which is no damage) or damaged."""
    if isinstance(e, LrjaxError):  # the caller's verdict on an intact checkpoint
        return _REFUSED, e
    if _is_mismatch(e):  # an intact checkpoint of another model: never moved, never skipped
        return _REFUSED, _different_model(where)
    if faults.os_errno(e) is not None:  # the filesystem's error (after retries), not damage
        return _REFUSED, CheckpointError(
            f"cannot read checkpoint {where}: {faults.cause_of(e)}; it was left in place (it may be intact): "
            f"check the filesystem, then run the same command again")
    return _DAMAGED, e


def _agree(value: int) -> int:
    """The largest of `value` over the processes of a job (each process's own value when alone)."""
    value = int(value)
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr)


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0][:200] if str(error) else ""


def _join_orbax_threads(timeout_s: float = 60.0) -> None:
    """Waits (bounded) for Orbax's threads: at a save's first failed write Orbax raises, while its other
    writes go on into the step's tmp folder; a retry in the same process would race them (Orbax's
    cleanup of that folder then fails with 'Directory not empty')."""
    import threading

    deadline = time.monotonic() + timeout_s
    for t in threading.enumerate():
        if t is not threading.current_thread() and type(t).__module__.startswith("orbax"):
            # the plain join: Orbax's own thread classes re-raise the thread's failure from join()
            threading.Thread.join(t, max(0.0, deadline - time.monotonic()))


def _complete_steps(directory: Path) -> list[int]:
    """The steps whose saves finished (Orbax renames a step's folder to its number when it is complete)."""
    try:
        return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    except OSError:
        return []


def _is_key(a) -> bool:
    return jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)


def _storable(tree: Any) -> Any:
    """Typed PRNG keys (an RNG stream's state inside a model) as their raw uint32 data, which Orbax stores."""
    return jax.tree.map(lambda a: jax.random.key_data(a) if _is_key(a) else a, tree)


def _from_storable(tree: Any, like: Any) -> Any:
    """`_storable`'s inverse: the leaves that are keys in `like` become keys again (of the same impl)."""
    return jax.tree.map(lambda a, t: jax.random.wrap_key_data(a, impl=jax.random.key_impl(t)) if _is_key(t) else a,
                        tree, like)


def _shapes(tree: Any) -> list[tuple[int, ...]]:
    """The arrays' shapes, sorted: Orbax's stored metadata and a restore target share no tree types."""
    return sorted(tuple(a.shape) for a in jax.tree.leaves(tree))


def _different_model(where: Path) -> CheckpointError:
    return CheckpointError(f"checkpoint {where} holds a different model or optimizer state than this run's; "
                           "use another --workdir")


def _is_mismatch(error: Exception) -> bool:
    """Orbax's errors for a restore target whose tree structure or array shapes differ from the disk's."""
    return isinstance(error, ValueError) and any(
        m in str(error) for m in ("structures do not match", "not compatible with the stored shape"))


def _json_ok(path: Path) -> bool:
    """False when `path` exists but is not valid JSON (a missing file is fine: Orbax skips it)."""
    try:
        json.loads(path.read_text())
    except FileNotFoundError:
        return True
    except OSError as e:
        if faults.os_errno(e) is not None:  # the filesystem's error, not damage
            raise
        return False
    except ValueError:
        return False
    return True
