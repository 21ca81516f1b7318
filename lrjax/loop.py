"""The training loop: compiled chunks of steps, host work between them, callbacks, signals.

`Trainer` is what the callbacks see (state, best state, history, position); `run` drives it. A
chunk is run by the input's feed (`lrjax.feeds.Feed`, calls of `steps.train_chunk`); chunk
boundaries fall on every epoch's end and on every multiple of the step cadences (evaluation, checkpoint). At a boundary with an evaluation the host
reads the validation metrics, lets the deciding callbacks (early stopping, the user's) act, then
dispatches the next chunk, and only then does the writing callbacks' work (TensorBoard,
checkpoint, progress) while the device computes. Nothing is dispatched that is not kept.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from typing import Any

import jax
import numpy as np

from lrjax import faults, optimizers, validate
from lrjax.errors import TrainingDiverged


class Signals:
    """SIGTERM/SIGINT become a flag read between chunks; a second SIGINT interrupts at once, also
    while the host waits for the device (`faults.wait_ready` sleeps in slices so the handler runs),
    but never inside a `faults.uninterruptible()` section: there it is raised as the section ends.
    The handler only records (no I/O: a print could re-enter one it interrupted); the loop reports it.

    A KeyboardInterrupt that lands where Python cannot raise it (a garbage-collector callback, a
    finalizer) would be printed as "Exception ignored" and lost; `sys.unraisablehook` catches that
    one silently and `check()` (between chunks and while waiting) raises it again."""

    def __init__(self):
        self.received: str | None = None
        self._old = {}
        self._hook, self._lost = None, False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
            self._hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            if faults.defer_interrupt():  # raised as the section (a checkpoint's start) ends
                return
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def _unraisable(self, unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            self._lost = True
        else:
            self._hook(unraisable)

    def check(self) -> None:
        if self._lost:
            self._lost = False
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if self._hook is not None:
            sys.unraisablehook = self._hook
        if exc[0] is None:
            self.check()  # one lost after the last check: still an interrupt


def agreed_signal(received: str | None) -> str | None:
    """The stop signal as every process of a job sees it (any process's). A preemption signal reaches
    the processes at different moments; one that stopped alone would leave the others waiting for it
    in the next chunk's collectives."""
    if jax.process_count() == 1:
        return received
    from jax.experimental import multihost_utils

    code = np.int32(signal.Signals[received].value if received else 0)
    agreed = int(np.max(multihost_utils.process_allgather(code)))
    return signal.Signals(agreed).name if agreed else None


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


class Trainer:
    """The run as the callbacks see it. `step` counts the batches trained (global), `epoch` the
    epochs completed; `state` is the device state after `step` steps."""

    def __init__(self, state, *, epochs: int, steps_per_epoch: int, eval_every_steps: int | None,
                 checkpoint_every_steps: int | None, stop_after: int | None, meta: dict):
        self.state, self.best = state, (optimizers.eval_params(state.opt_state, state.params), state.rest)
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.eval_every_steps, self.checkpoint_every_steps = eval_every_steps, checkpoint_every_steps
        self.stop_after, self.meta = stop_after, meta  # meta: config, run_name, lr, seed
        self.history: list[dict] = []
        self.step, self.resumed, self.stop_training = 0, False, False
        self.sums: dict[str, float] = {}  # training metrics since the last evaluation (weighted sums)
        self.period_time = 0.0
        self.early_stopping = None  # the EarlyStopping callback whose state checkpoints carry
        self.last_was_best = False
        self.callbacks: list = []
        self.feed = None  # the input's `lrjax.feeds.Feed`: runs the chunks; checkpoints carry its position

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def by_step(self) -> bool:
        """Whether chunks (and checkpoint numbers) are finer than epochs."""
        return self.eval_every_steps is not None or self.checkpoint_every_steps is not None

    @property
    def best_epoch(self) -> int | None:
        return self.early_stopping.best_epoch if self.early_stopping is not None else None

    def keep_best(self) -> None:
        # the weights evaluated: a schedule-free optimizer's evaluation point (lrjax.optimizers.eval_params)
        self.best, self.last_was_best = (optimizers.eval_params(self.state.opt_state, self.state.params),
                                         self.state.rest), True

    def snapshot(self) -> tuple[dict[str, Any], dict]:
        """What a checkpoint holds: the arrays and the JSON meta of the run at this point."""
        s = self.state
        tree = {"params": s.params, "rest": s.rest, "opt_state": s.opt_state, "step": s.step,
                "best_params": self.best[0], "best_rest": self.best[1]}
        # a snapshot of every list and dict: the save is asynchronous and the loop goes on
        meta = {**self.meta, "epoch": self.epoch, "step": self.step, "history": list(self.history),
                "pending": {"sums": dict(self.sums), "time": self.period_time},
                "early_stopping": self.early_stopping.state_dict() if self.early_stopping else None}
        position = self.feed.state(self.step) if self.feed is not None else None
        if position is not None:  # a resident input's position follows from the step: nothing saved
            meta["input"] = position
        return tree, meta

    def restore(self, tree: dict, meta: dict) -> None:
        self.state = self.state.replace(params=tree["params"], rest=tree["rest"], opt_state=tree["opt_state"],
                                        step=tree["step"])
        self.best = tree["best_params"], tree["best_rest"]
        self.history = list(meta["history"])
        self.step = int(meta.get("step", int(meta["epoch"]) * self.steps_per_epoch))
        pending = meta.get("pending") or {}
        self.sums, self.period_time = dict(pending.get("sums", {})), float(pending.get("time", 0.0))
        if self.early_stopping is not None and meta.get("early_stopping"):
            self.early_stopping.load_state_dict(meta["early_stopping"])
        if self.feed is not None and meta.get("input") is not None:
            self.feed.restore(meta["input"])
        self.resumed = True

    # -- the schedule of boundaries ---------------------------------------------------------------
    def cadences(self) -> list[int]:
        return [self.steps_per_epoch] + [n for n in (self.eval_every_steps, self.checkpoint_every_steps) if n]

    def next_boundary(self, g: int) -> int:
        return min([(g // n + 1) * n for n in self.cadences()] + [self.total_steps])

    def is_eval(self, g: int) -> bool:
        n = self.eval_every_steps or self.steps_per_epoch
        return g % n == 0 or g == self.total_steps

    def is_checkpoint(self, g: int) -> bool:
        return self.is_eval(g) or bool(self.checkpoint_every_steps and g % self.checkpoint_every_steps == 0)

    def checkpoint_number(self, g: int) -> int:
        return g if self.by_step else g // self.steps_per_epoch

    def stop_reason(self, g: int) -> tuple[bool, str | None]:
        """Whether training goes on from global step `g`; if not, whether that interrupts ('stop-after')."""
        if g >= self.total_steps or self.stop_training or (self.early_stopping and self.early_stopping.should_stop):
            return False, None
        if self.stop_after is not None and g >= self.stop_after * self.steps_per_epoch:
            return False, "stop-after"
        return True, None


class _Chunk:
    """A dispatched chunk [start, end): its resulting state and metric futures."""

    def __init__(self, start, end, state, metrics, val, dispatched):
        self.start, self.end, self.state, self.metrics, self.val = start, end, state, metrics, val
        self.dispatched = dispatched


def run(tr: Trainer, callbacks: list, *, compile_programs, timings: dict) -> str | None:
    """Trains from `tr.step` to the end (or a stop); returns why it ended early ('SIGTERM',
    'SIGINT', 'stop-after') or None. `compile_programs()` gives the compiled chunk program (run by
    `tr.feed`, see `lrjax.feeds.Feed`) and the evaluation (`evaluate(state)`); it is called only when
    there is something to train (after the callbacks' train begin)."""
    deciders = [cb for cb in callbacks if not cb.overlaps_next_chunk]
    writers = [cb for cb in callbacks if cb.overlaps_next_chunk]
    feed = tr.feed

    def dispatch(g: int) -> _Chunk:
        t, end = time.perf_counter(), tr.next_boundary(g)
        state, metrics = feed(program, tr.state, g, end)
        return _Chunk(g, end, state, metrics, evaluate(state) if tr.is_eval(end) else None, t)

    def since(c: _Chunk) -> float:
        # A chunk's time runs from when the host was free to wait for it; a chunk read on the host
        # (streamed, iterable) from its dispatch, which reads its batches.
        return c.dispatched if feed.host_bound else max(c.dispatched, free)

    def announce():  # outside the handler, which only records (see Signals)
        signals.check()
        if signals.received and signals.received not in said:
            said.append(signals.received)
            log(f"lrjax: {signals.received} received: stopping after this chunk of steps, with a checkpoint")

    pending, failed, said = None, None, []
    with Signals() as signals:
        for cb in callbacks:
            cb.on_train_begin({})
        go, interrupted = tr.stop_reason(tr.step)
        if go:
            program, evaluate = compile_programs()
            t = time.perf_counter()
            pending = dispatch(tr.step)
            if feed.host_bound:  # the dispatch read its batches: training time
                timings["train_s"] += time.perf_counter() - t
        free = time.perf_counter()  # when the host was last free to wait for a chunk
        while pending is not None:
            t1 = time.perf_counter()
            c, tr.state = pending, pending.state
            step_m, val_m = (jax.device_get(faults.wait_ready((c.metrics, c.val), between=announce))
                             if c.val is not None or any(cb.every_n_steps for cb in deciders) else (None, None))
            batches = [] if step_m is None else _read_chunk(tr, step_m, c, since(c))
            _batch_hooks(deciders, batches)
            row, tr.last_was_best = None, False
            if val_m is not None:
                row = _row(tr, val_m, step_m, c)
                tr.history.append(row)
                for cb in deciders:
                    cb.on_epoch_end(row["epoch"], row)
            tr.step = c.end
            go, interrupted = tr.stop_reason(tr.step)
            announce()
            received = agreed_signal(signals.received)
            if received and (go or interrupted):  # after the last chunk a signal leaves nothing to resume
                go, interrupted = False, received
            pending = None
            if go:
                try:
                    pending = dispatch(tr.step)
                except BaseException as e:  # noqa: BLE001 - this chunk is complete: its outputs first
                    failed = e
            timings["train_s"] += time.perf_counter() - t1
            if step_m is None:  # a chunk without evaluation: read now, while the next one runs
                t = time.perf_counter()
                step_m = jax.device_get(faults.wait_ready(c.metrics, between=announce))
                batches = _read_chunk(tr, step_m, c, since(c))
                timings["train_s"] += time.perf_counter() - t
            _write(tr, callbacks, writers, batches, row, go)
            if failed is not None:
                raise failed
            free = time.perf_counter()
        for cb in callbacks:
            cb.on_train_end(tr.history[-1] if tr.history else {})
    return interrupted


def _read_chunk(tr: Trainer, step_m: dict, c: _Chunk, since: float) -> list[tuple[int, dict]]:
    tr.period_time += time.perf_counter() - since
    return _accumulate(tr, step_m, c)


def _write(tr: Trainer, callbacks: list, writers: list, batches: list, row: dict | None, go: bool) -> None:
    """The finished chunk's writing work (TensorBoard, progress, checkpoint) while the device runs the next."""
    _batch_hooks(writers, batches)
    if row is not None:
        for cb in writers:
            cb.on_epoch_end(row["epoch"], row)
    if tr.is_checkpoint(tr.step) or not go:
        latest = tr.history[-1] if tr.history else {}
        metrics = {k: v for k, v in latest.items() if k not in ("epoch", "step")} if row is not None else {}
        for cb in callbacks:
            cb.on_checkpoint(tr.checkpoint_number(tr.step), metrics)


def _accumulate(tr: Trainer, step_m: dict, c: _Chunk) -> list[tuple[int, dict]]:
    """Adds a chunk's per-step metrics to the period's weighted sums; returns its steps' records."""
    count = np.asarray(step_m["count"], np.float64)[: c.end - c.start]
    names = [k for k in step_m if k not in ("count", "lr")]
    for k in names:
        tr.sums[k] = tr.sums.get(k, 0.0) + float(np.sum(np.asarray(step_m[k], np.float64)[: len(count)] * count))
    tr.sums["count"] = tr.sums.get("count", 0.0) + float(count.sum())
    tr.sums["lr"] = float(np.asarray(step_m["lr"])[len(count) - 1])
    return [(c.start + i + 1, {**{f"batch_{k}": float(step_m[k][i]) for k in names},
                               "batch_learning_rate": float(step_m["lr"][i])}) for i in range(len(count))]


def _batch_hooks(callbacks: list, batches: list[tuple[int, dict]]) -> None:
    for cb in callbacks:
        if cb.every_n_steps:
            for step, logs in batches:
                if step % cb.every_n_steps == 0:
                    cb.on_train_batch_end(step, logs)


def _row(tr: Trainer, val_m: dict, step_m, c: _Chunk) -> dict:
    """The history row of an evaluation at the end of chunk `c`: the training metrics since the last
    evaluation, the validation metrics, and where and when."""
    count = max(tr.sums.pop("count", 0.0), 1.0)
    lr = tr.sums.pop("lr", math.nan)
    train = {k: v / count for k, v in tr.sums.items()}
    ordered = lambda m: {"loss": m["loss"], **{k: m[k] for k in sorted(m) if k != "loss"}}  # noqa: E731
    row = {"epoch": -(-c.end // tr.steps_per_epoch), "step": c.end, **ordered(train),
           **{f"val_{k}": float(v) for k, v in ordered(val_m).items()}, "lr": lr, "epoch_time_s": tr.period_time}
    tr.sums, tr.period_time = {}, 0.0
    if not (math.isfinite(row["loss"]) and math.isfinite(row["val_loss"])):
        validate.check_first_step(c.start, step_m)  # before any update: the data or the model, not the rate
        raise TrainingDiverged(
            f"loss became non-finite in epoch {row['epoch']} (step {row['step']}; train {row['loss']}, "
            f"validation {row['val_loss']}) at lr {lr:g}; lower the learning rate")
    return row
