"""Orbax checkpoints: the latest N and the best by a metric, saved asynchronously, restored with fallback.

A checkpoint is a `Composite` of two items, so plain Orbax can read it without lrjax:
  - `state`: a pytree of arrays (model parameters and state, optimizer state, best weights, RNG key
    data; typed PRNG keys, such as a Dropout stream's, are stored as their raw data),
    written with `StandardSave`;
  - `meta`: JSON (epoch, early-stopping state, config, per-epoch history, TensorBoard run name).
Per-epoch metrics are handed to the manager, which keeps the best checkpoint by `best_metric`
(`AnyPreservationPolicy([LatestN, BestN])`: `max_to_keep` with `best_fn` alone would delete the latest).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

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
        # Handlers named up front, so a reopened manager can read a step's metadata before restoring it.
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        except Exception:  # noqa: BLE001 - Orbax reads every step's metrics here and fails on a damaged one
            damaged = [p for p in self.directory.iterdir()
                       if p.name.isdigit() and not _json_ok(p / "metrics" / "metrics")]
            if not damaged:
                raise
            for p in damaged:
                print(f"lrjax: checkpoint {p} is unreadable (damaged metrics file)", file=sys.stderr)
                self._rename_aside(int(p.name))
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def latest_meta(self) -> dict | None:
        """The meta of the newest checkpoint whose meta reads (None if none); reads no arrays and moves
        nothing (`restore` judges the arrays)."""
        self.manager.wait_until_finished()
        for s in reversed(self.all_steps()):
            try:
                return dict(self.manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
            except Exception:  # noqa: BLE001 - an unreadable step: the next older one
                continue
        return None

    def save(self, step: int, tree: Any, meta: dict, metrics: dict[str, float], force: bool = False) -> None:
        """Starts an (asynchronous) save; the previous save is finished first by Orbax."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_storable(tree)),
                                                        meta=ocp.args.JsonSave(meta)),
                          metrics={k: float(v) for k, v in metrics.items()}, force=force)

    def restore(self, target: Any, step: int | None = None,
                check_meta: Callable[[dict], None] | None = None) -> tuple[int, Any, dict]:
        """Restores `step` (default: the newest intact one) into the structure of `target`.

        `check_meta(meta)` runs on the checkpoint's meta before its arrays are read, so a run that
        differs (another model, rate, ...) is refused by the caller's error, and nothing is moved.
        An unreadable checkpoint is reported and moved aside to `checkpoints/unreadable-STEP` (never
        deleted), and the next older one is tried; raises `CheckpointError` naming them if none is readable.
        """
        self.manager.wait_until_finished()
        candidates = [step] if step is not None else list(reversed(self.all_steps()))
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _storable(target))
        failures = []
        for s in candidates:
            try:
                meta = dict(self.manager.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
                if check_meta is not None:
                    check_meta(meta)
                stored = self.manager.item_metadata(s)["state"]
                if stored is None:  # a damaged step (its _METADATA gone), not another model
                    raise ValueError("the arrays' metadata is missing")
                if _shapes(stored) != _shapes(abstract):
                    raise _different_model(self.directory / str(s))  # refused before any array is read
                restored = self.manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
                if failures or self._set_aside:
                    print(f"lrjax: resuming from checkpoint {self.directory / str(s)} instead", file=sys.stderr)
                return s, _from_storable(restored["state"], target), meta
            except LrjaxError:  # the caller's verdict on an intact checkpoint
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read means: try an older one
                if _is_mismatch(e):  # an intact checkpoint of another model: never moved, never skipped
                    raise _different_model(self.directory / str(s)) from None
                failures.append(s)
                print(f"lrjax: checkpoint {self.directory / str(s)} is unreadable "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})",
                      file=sys.stderr)
                if step is None:
                    self._move_aside(s)
        raise CheckpointError(f"no readable checkpoint in {self.directory} (tried steps {failures}); "
                              "move the folder away to start afresh")

    def _move_aside(self, step: int) -> None:
        self._rename_aside(step)
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
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


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
    except (OSError, ValueError):
        return False
    return True
