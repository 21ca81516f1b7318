"""Streamed input through Grain: uint8 examples read on the host in chunks of batches, for data that
does not fit on the device (or should not be copied whole onto every device).

`Stream` is a Grain `MapDataset` whose element is a chunk of K batches of a `lrjax.sources.Split`:
x uint8 [K, B, H, W, C], y int32 [K, B], w float32 [K, B] (0 = padding), active bool [K] (False = a
whole padding step), steps int64 [K] (global step of each, -1 for padding), iterated through Grain's
threads and worker processes. Its iterator state (`state()` / `restore()`, or Grain's Orbax handler
through `get_state()` / `set_state()`) resumes to exactly the same chunks. Each epoch is a fresh
permutation drawn from (seed, epoch) (`lrjax.steps.epoch_permutation`, as resident training draws
it); an epoch's last partial batch is padded with the epoch's first
examples at weight 0, as the resident path pads. Several processes each read only their rows of every
global batch (`grain.sharding.ShardByJaxProcess`) and `to_device` assembles the global arrays;
`DevicePrefetch` stages chunks ahead in a thread. `to_float` (from `lrjax.steps`) is the device-side uint8 -> float32.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import queue
import sys
import threading
import time
from typing import Callable, Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np

from lrjax import steps as steps_lib
from lrjax.steps import epoch_permutation, to_float  # noqa: F401 (to_float: stream's public name too)
from lrjax.errors import CheckpointError, ConfigError, DataError
from lrjax import feeds, sources
from lrjax import mesh as mesh_lib
from lrjax.feeds import Feed, check_process_rows, chunk_sharding, put, stack_steps  # noqa: F401
from lrjax.sources import ArrayExamples, Split

STATE_FORMAT = 1


# ---------------------------------------------------------------------------------------------
# The pipeline: a Grain MapDataset of chunks
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Plan:
    """Which global steps each chunk holds and which rows of each global batch this process reads."""

    n: int  # examples in the split
    batch_size: int  # global
    chunk_steps: int
    shuffle: bool
    seed: int
    steps_per_epoch: int
    total_steps: int | None  # None: endless
    epoch_aligned: bool  # chunks stop at epoch ends (the last one of an epoch padded with inactive steps)
    shard_index: int
    shard_count: int

    @property
    def local_batch(self) -> int:
        return self.batch_size // self.shard_count

    @property
    def chunks_per_epoch(self) -> int:
        return -(-self.steps_per_epoch // self.chunk_steps)

    @property
    def num_chunks(self) -> int | None:
        if self.total_steps is None:
            return None
        if self.epoch_aligned:
            epochs, rest = divmod(self.total_steps, self.steps_per_epoch)
            return epochs * self.chunks_per_epoch + -(-rest // self.chunk_steps)
        return -(-self.total_steps // self.chunk_steps)

    def steps(self, chunk: int) -> np.ndarray:
        """Global step of each of the chunk's K steps, -1 for padding steps."""
        k = np.arange(self.chunk_steps)
        if self.epoch_aligned:
            epoch, c = divmod(chunk, self.chunks_per_epoch)
            within = c * self.chunk_steps + k
            steps = np.where(within < self.steps_per_epoch, epoch * self.steps_per_epoch + within, -1)
        else:
            steps = chunk * self.chunk_steps + k
        if self.total_steps is not None:
            steps = np.where(steps < self.total_steps, steps, -1)
        return steps.astype(np.int64)


class _ReadChunk:
    """Chunk index -> chunk (the Grain map); picklable for worker processes."""

    def __init__(self, split: Split, plan: Plan, transform, order: Callable[[int], np.ndarray] | None = None):
        self.split, self.plan, self.transform = split, plan, transform
        self.draw = order or functools.partial(epoch_permutation, plan.seed, n=plan.n)
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        # The whole epoch's permutation at once (~1 ms for 55k): Grain's per-index MapDataset.shuffle
        # costs ~11 us an index, ~3 ms a batch of 256, 10x reading that batch from a memmap.
        if epoch not in self._orders:
            self._orders = {epoch: self.draw(epoch),
                            **{e: o for e, o in self._orders.items() if e == epoch - 1}}
        return self._orders[epoch]

    def __call__(self, chunk: int, _) -> dict[str, np.ndarray]:
        plan, shape = self.plan, self.split.example_shape
        steps = plan.steps(chunk)
        active = steps >= 0
        rows = np.arange(plan.local_batch) + plan.shard_index * plan.local_batch
        epoch, batch = np.divmod(steps[active], plan.steps_per_epoch)
        pos = (batch * plan.batch_size)[:, None] + rows  # positions in the padded epoch
        weight = pos < plan.n
        pos = np.where(weight, pos, pos - plan.n)  # padding: the epoch's first examples again, weight 0
        if plan.shuffle:
            pos = np.stack([self.order(e)[p] for e, p in zip(epoch, pos)]) if len(pos) else pos
        x = np.zeros((plan.chunk_steps, plan.local_batch, *shape), np.uint8)
        y = np.zeros((plan.chunk_steps, plan.local_batch), np.int32)
        w = np.zeros((plan.chunk_steps, plan.local_batch), np.float32)
        if len(pos):
            xs, ys = self.split.read(pos.reshape(-1))
            if self.transform is not None:
                xs, ys = self._transform(xs, ys, steps[active], rows)
            x[active], y[active] = xs.reshape(len(pos), plan.local_batch, *xs.shape[1:]), ys.reshape(pos.shape)
            w[active] = weight
        return {"x": x, "y": y, "w": w, "active": active, "steps": steps}

    def _transform(self, xs, ys, steps, rows):
        # The generator of an example depends on (seed, step, row) only: a resumed stream and any
        # number of workers draw the same augmentations.
        out = []
        for i, (image, label) in enumerate(zip(xs, ys)):
            step, row = steps[i // len(rows)], rows[i % len(rows)]
            rng = np.random.default_rng([self.plan.seed, int(step), int(row)])
            example = self.transform({"image": image, "label": int(label)}, rng)
            out.append((np.asarray(example["image"]), int(example["label"])))
        if len({im.shape for im, _ in out} | {self.split.example_shape}) > 1 or any(
                im.dtype != np.uint8 for im, _ in out):
            raise DataError(f"{self.split.name}: the transform must return uint8 images of shape "
                            f"{self.split.example_shape}, got {sorted({im.shape for im, _ in out})}")
        return np.stack([im for im, _ in out]), np.array([lb for _, lb in out], np.int32)


def default_workers(split: Split) -> int:
    """Worker processes for `split`: none for arrays and memmaps (a batch is one numpy gather, cheaper
    than handing it between processes), else one per core beyond the one the device program uses,
    at most 4 (decoding PNGs is Python-bound: threads do not help, processes do)."""
    if isinstance(split.examples, ArrayExamples):
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores - 1))


class Stream:
    """Chunks of K batches of a split, through Grain; an iterator with exact, saveable state.

    `epochs` (or `steps`) bounds the stream, else it is endless. `epoch_aligned` chunks stop at each
    epoch's end (training: host work between epochs); otherwise they run on across epochs (the range
    test). `transform(example, rng) -> example` (dicts with 'image' uint8 and 'label') runs per example
    on the host. `workers` processes read and decode (default `default_workers`; they take seconds to
    start, so keep one stream for a run: an endless one, or `epoch()` passes); `threads` threads in each
    read ahead; `buffer` chunks ahead. Workers are spawned processes: a script using them needs the
    `if __name__ == "__main__":` guard.
    `shard` (default `grain.sharding.ShardByJaxProcess()`) picks this process's rows of each batch.
    `order(epoch) -> positions` (0-based epochs, a picklable function) is what a shuffled pass reads
    in turn, instead of `epoch_permutation(seed, epoch, len(split))` (a text corpus: window starts).
    """

    def __init__(self, split: Split, batch_size: int, *, chunk_steps: int = 1, shuffle: bool = True,
                 seed: int = 0, epochs: int | None = None, steps: int | None = None,
                 epoch_aligned: bool = True, transform: Callable | None = None,
                 workers: int | None = None, threads: int = 1, buffer: int = 2,
                 shard: grain.sharding.ShardOptions | None = None, order: Callable[[int], np.ndarray] | None = None):
        shard = shard or grain.sharding.ShardByJaxProcess()
        workers = default_workers(split) if workers is None else workers
        if batch_size < 1 or chunk_steps < 1 or workers < 0 or threads < 0 or buffer < 1:
            raise ConfigError("batch_size and chunk_steps must be positive, workers and threads at least 0, "
                              "buffer at least 1")
        if batch_size % shard.shard_count:
            raise ConfigError(f"batch size {batch_size} does not split evenly over {shard.shard_count} processes")
        if len(split) < batch_size:
            raise DataError(f"the {split.name} split has {len(split)} examples, fewer than one batch of {batch_size}")
        per_epoch = -(-len(split) // batch_size)
        total = steps if steps is not None else (None if epochs is None else epochs * per_epoch)
        self.plan = Plan(n=len(split), batch_size=batch_size, chunk_steps=chunk_steps, shuffle=shuffle,
                         seed=int(seed), steps_per_epoch=per_epoch, total_steps=total,
                         epoch_aligned=epoch_aligned, shard_index=shard.shard_index, shard_count=shard.shard_count)
        self.split = split
        count = self.plan.num_chunks
        self.dataset = grain.MapDataset.range(sys.maxsize if count is None else count).map_with_index(
            _ReadChunk(split, self.plan, transform, order))
        self.workers, self.threads, self.buffer = workers, threads, buffer
        self._iter = None
        self._pending: dict | None = None  # a state to continue from when the iterator is next made
        self._chunks_done = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    def _new_iterator(self):
        ds = self.dataset.to_iter_dataset(grain.ReadOptions(num_threads=self.threads,
                                                            prefetch_buffer_size=self.buffer))
        if self.workers:
            _absl_flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers,
                                                             per_worker_buffer_size=self.buffer),
                                worker_init_fn=functools.partial(end_with_parent, os.getpid()))
        return iter(ds)

    def _iterator(self):
        if self._iter is None:
            self._iter = self._new_iterator()
            state, self._pending = self._pending, None
            if state is not None:
                try:
                    self._iter.set_state(state["grain"])
                except (KeyError, ValueError, TypeError, IndexError):
                    # Saved with another worker count: a chunk is a function of its index alone.
                    self._iter.close()
                    self._iter = self._new_iterator()
                    grain.experimental.set_next_index(self._iter, state["chunks"])
                self._chunks_done = state["chunks"]
        return self._iter

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        # Stopping by count: asking Grain's worker for the end of a finite dataset costs ~1.4 s.
        if self.plan.num_chunks is not None and self._chunks_done >= self.plan.num_chunks:
            raise StopIteration
        chunk = next(self._iterator())
        self._chunks_done += 1
        return chunk

    def epoch(self) -> Iterator[dict[str, np.ndarray]]:
        """The chunks of the next epoch (epoch-aligned streams, between epochs): with an endless
        `eval_stream`, one evaluation pass, without starting the workers again."""
        if not self.plan.epoch_aligned or self._chunks_done % self.plan.chunks_per_epoch:
            raise ValueError("epoch() needs an epoch-aligned stream positioned at an epoch's start")
        for _ in range(self.plan.chunks_per_epoch):
            yield next(self)

    def _config(self) -> dict:
        return dataclasses.asdict(self.plan)

    def state(self) -> dict:
        """JSON-serialisable position after the last chunk returned (Grain's iterator state)."""
        if self._iter is None and self._pending is not None:
            return self._pending
        return {"format": STATE_FORMAT, "chunks": self._chunks_done, "config": self._config(),
                "grain": self._iterator().get_state()}

    def restore(self, state: dict) -> None:
        """Continues after the chunk `state` was taken at; the stream must be configured alike."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CheckpointError("the checkpoint's input-stream state is not one this lrjax writes")
        saved, now = state["config"], self._config()
        diff = [f"{k} {saved.get(k)} -> {now[k]}" for k in now if saved.get(k) != now[k]]
        if diff:
            raise CheckpointError(f"the input stream differs from the checkpoint's: {', '.join(diff)}")
        self._drop_iterator()
        self._pending = state
        self._chunks_done = state["chunks"]

    # Grain's Orbax handler (grain.checkpoint.CheckpointSave / CheckpointRestore) calls these.
    def get_state(self) -> bytes:
        return json.dumps(self.state()).encode()

    def set_state(self, state: bytes) -> None:
        self.restore(json.loads(state))

    def start_prefetch(self) -> None:
        self._iterator()

    def close(self) -> None:
        """Ends the worker processes and threads; iterating again continues where it stopped."""
        if self._iter is not None:
            self._pending = self.state()
            self._drop_iterator()

    def _drop_iterator(self) -> None:
        if self._iter is not None:
            self._iter.close()
            self._iter = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def end_with_parent(parent: int, worker_index: int = 0, worker_count: int = 1, interval_s: float = 0.5) -> None:
    """Grain's `worker_init_fn` for lrjax's workers: a daemon thread ends this worker (`os._exit`) within
    `interval_s` of its parent process `parent` ending, however it ended (SIGKILL included), where a
    worker would otherwise wait on its full queue for ever. A watch on the parent's pid rather than
    prctl's PR_SET_PDEATHSIG, which fires when the parent's *thread* that started the worker ends
    (Grain starts its workers from short-lived threads)."""

    def watch():
        while os.getppid() == parent:
            time.sleep(interval_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="lrjax-parent-watch").start()


def _absl_flags_parsed() -> None:
    # grain 0.2.18's mp_prefetch reads an absl flag, which raises unless flags were parsed (outside
    # absl.app they are not): google/grain#1355, fixed after that release. Defaults are all we use.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def eval_stream(split: Split, batch_size: int, epochs: int | None = 1, **kwargs) -> Stream:
    """`split` in order, an epoch's last batch padded with weight-0 rows (validation, test). With
    `epochs=None` it repeats endlessly: take each evaluation pass with `.epoch()`, and the workers
    (which take seconds to start) serve every pass."""
    return Stream(split, batch_size, shuffle=False, epochs=epochs, **kwargs)


# ---------------------------------------------------------------------------------------------
# Onto the devices
# ---------------------------------------------------------------------------------------------

def to_device(chunk: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
    """A chunk as global device arrays: x, y, w along `sharding` (batch on dimension 1), active and
    steps replicated. With several processes each passes its own rows of every batch."""
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    shardings = {k: sharding if k in ("x", "y", "w") else replicated for k in chunk}
    if jax.process_count() == 1:
        return jax.device_put(chunk, shardings)
    out = {}
    for key, value in chunk.items():
        if key in ("x", "y", "w"):
            shape = (value.shape[0], value.shape[1] * jax.process_count(), *value.shape[2:])
            check_process_rows(sharding, shape)
            out[key] = jax.make_array_from_process_local_data(sharding, value, shape)
        else:
            out[key] = jax.make_array_from_process_local_data(replicated, value, value.shape)
    return out


class DevicePrefetch:
    """Chunks staged onto the devices `size` ahead by a background thread, so that reading and copying
    chunk i+1 can overlap the computation of chunk i (on a 2-core CPU it does not: XLA's program keeps
    both cores busy; see docs/input.md). `state()` is the stream's position after the last
    chunk returned, not after the ones staged ahead; `close()` leaves the stream there too."""

    def __init__(self, stream: Stream, sharding: jax.sharding.NamedSharding, size: int = 2):
        self.stream, self.sharding, self.size = stream, sharding, size
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = None

    def _run(self, q: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:  # gives up once the consumer has asked the thread to stop
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            for chunk in self.stream:
                if not put((to_device(chunk, self.sharding), self.stream.state())):
                    return
            put(StopIteration())
        except BaseException as e:  # handed to the consumer, which raises it
            put(e)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        if self._thread is None:
            self._stop = threading.Event()
            self._queue = queue.Queue(maxsize=self.size)
            self._thread = threading.Thread(target=self._run, args=(self._queue, self._stop), daemon=True,
                                            name="lrjax-device-prefetch")
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._join()
            raise item
        staged, self._state = item
        return staged

    def state(self) -> dict:
        return self._state if self._state is not None else self.stream.state()

    def restore(self, state: dict) -> None:
        self._join()
        self.stream.restore(state)
        self._state = state

    get_state = Stream.get_state
    set_state = Stream.set_state

    def _join(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            if self._state is not None:  # the thread read ahead: back to what the consumer has seen
                self.stream.restore(self._state)

    def close(self) -> None:
        self._join()
        self.stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------
# Training from a stream: any range of global steps, in compiled calls of K steps
# ---------------------------------------------------------------------------------------------

def _zeros(stream: Stream, sharding: jax.sharding.NamedSharding):
    """A chunk of the stream's shape (K padding steps of uint8 images, labels, weights) on the devices."""
    shape = (stream.plan.chunk_steps, stream.plan.local_batch)
    return put((np.zeros((*shape, *stream.split.example_shape), np.uint8), np.zeros(shape, np.int32)),
               np.zeros(shape, np.float32), sharding)


def _check_chunk(check, chunk: dict[str, np.ndarray], name: str) -> None:
    """`check` (`lrjax.validate.later_batches`, or None) on a chunk's examples, its K batches as one
    (views: an example's index is step * batch + row)."""
    if check is not None:
        x, y = chunk["x"], chunk["y"]
        check((x.reshape(-1, *x.shape[2:]), y.reshape(-1)), name)


class StepFeed(Feed):
    """Runs the training steps [g, end) that the loop asks for (`lrjax.loop.run`'s chunks, which
    end at epoch ends and at multiples of the step cadences) from a stream whose chunks of K steps
    run straight across epochs (`epoch_aligned=False`): the steps are taken from the stream in order,
    packed into calls of the compiled K-step program (`lrjax.feeds.Feed`), so any range works with
    one program.

    `state(g)` is the input position before step g, JSON for a checkpoint's meta: the stream's state
    before the chunk holding step g, and the steps of that chunk to skip. `restore` goes back there."""

    fetch = staticmethod(steps_lib.given_uint8)

    def __init__(self, stream: Stream, sharding: jax.sharding.NamedSharding):
        if stream.plan.epoch_aligned:
            raise ValueError("StepFeed needs a stream with epoch_aligned=False")
        self.stream, self.sharding, self.k = stream, sharding, stream.plan.chunk_steps
        self._buffer: list[dict[str, np.ndarray]] = []  # steps read but not trained yet, in order
        self._next = 0  # global step of the buffer's first entry
        self._read, self._skip = 0, 0  # chunks read; steps of the next chunk already trained (a resume)
        self._states = {0: stream.state()}  # chunk index -> the stream's state before reading it

    def zeros(self):
        return _zeros(self.stream, self.sharding)

    def _take(self, count: int):
        while len(self._buffer) < count:
            chunk = next(self.stream)
            _check_chunk(self.check, chunk, f"data (its {self.stream.split.name} split, chunk {self._read})")
            self._read += 1
            self._states[self._read] = self.stream.state()
            self._buffer += [((chunk["x"][i], chunk["y"][i]), chunk["w"][i]) for i in range(self._skip, self.k)
                             if chunk["active"][i]]
            self._skip = 0
        taken, self._buffer = self._buffer[:count], self._buffer[count:]
        self._next += count
        return stack_steps(taken, self.k)

    def __call__(self, program, state, g: int, end: int):
        self._states = {c: s for c, s in self._states.items() if c >= g // self.k}
        return super().__call__(program, state, g, end)

    def state(self, g: int) -> dict:
        return {"stream": self._states[g // self.k], "skip": g % self.k, "step": g}

    def restore(self, state: dict) -> None:
        self.stream.restore(state["stream"])
        self._buffer, self._next = [], int(state["step"])
        self._read, self._skip = divmod(self._next, self.k)
        self._states = {self._read: state["stream"]}

    def close(self) -> None:
        self.stream.close()


class StreamEvaluator:
    """Evaluation passes over a split streamed in order (`eval_stream`, endless, so its workers start
    once): after `compile(state)`, `evaluator(state)` adds up the compiled `steps.evaluate_chunk`'s
    weighted sums over one pass and returns the means (device arrays, nothing waited for). `fetch`
    turns a chunk's (x, y) into the loss's batch on the device (default: uint8 images, float32)."""

    def __init__(self, split: Split, batch_size: int, sharding: jax.sharding.NamedSharding, chunk_steps: int = 8,
                 workers: int | None = None, fetch=steps_lib.given_uint8):
        devices = mesh_lib.data_axis_size(sharding.mesh)
        batch_size = max(devices, min(batch_size, len(split)) // devices * devices)  # a small split: one batch
        self.stream = eval_stream(split, batch_size, epochs=None,
                                  chunk_steps=min(chunk_steps, -(-len(split) // batch_size)), workers=workers)
        self.sharding, self.fetch = sharding, fetch
        self.check = None  # check(batch, name) of each chunk (lrjax.validate.later_batches)

    def zeros(self):
        return _zeros(self.stream, self.sharding)

    def compile(self, state) -> set[str]:
        """Compiles the evaluation of a chunk for `state`'s shapes; returns the names it reports."""
        lowered = steps_lib.evaluate_chunk.lower(state, None, *self.zeros(), fetch=self.fetch)
        self._program = lowered.compile()
        return {k for k in lowered.out_info if k != "count"}

    def __call__(self, state) -> dict[str, jax.Array]:
        sums = None
        for i, chunk in enumerate(self.stream.epoch()):
            _check_chunk(self.check, chunk, f"data (its {self.stream.split.name} split, chunk {i})")
            s = self._program(state, None, *put((chunk["x"], chunk["y"]), chunk["w"], self.sharding))
            sums = s if sums is None else jax.tree.map(jnp.add, sums, s)
        count = sums.pop("count")
        return {k: v / count for k, v in sums.items()}

    def close(self) -> None:
        self.stream.close()


class StreamInput(feeds.Input):
    """A `lrjax.sources.Splits` streamed through Grain: uint8 chunks read on the host, shuffled by
    (seed, epoch), in calls of `chunk_steps` steps; `workers` processes (default `default_workers`)."""

    kind = "stream"

    def __init__(self, splits: sources.Splits, batch_size: int, mesh, chunk_steps: int, workers: int | None):
        self.splits, self.batch_size, self.mesh = splits, batch_size, mesh
        self.chunk_steps, self.workers = chunk_steps, workers
        self.num_examples = len(splits.train)
        self.steps_per_epoch = steps_lib.steps_per_epoch(self.num_examples, batch_size)

    def _feed(self, seed: int, chunk: int, total_steps: int, workers=None) -> StepFeed:
        feed = StepFeed(Stream(self.splits.train, self.batch_size, chunk_steps=chunk, seed=seed, steps=total_steps,
                               epoch_aligned=False, workers=workers), chunk_sharding(self.mesh))
        feed.check = self.check
        return feed

    def train_feed(self, seed: int, cadence: int, total_steps: int) -> StepFeed:
        return self._feed(seed, min(self.chunk_steps, self.steps_per_epoch), total_steps, self.workers)

    def range_feed(self, seeds: list[int], chunk: int, num_steps: int) -> StepFeed:
        return self._feed(seeds[0], chunk, num_steps)

    def valid_examples(self, count: int | None = None):
        valid = self.splits.valid
        return sources.resident_arrays(valid if count is None else dataclasses.replace(valid, keys=valid.keys[:count]))

    def evaluator(self, batch_size: int) -> StreamEvaluator:
        evaluator = StreamEvaluator(self.splits.valid, batch_size, chunk_sharding(self.mesh))
        evaluator.check = self.check
        return evaluator
