"""Streamed input through Grain: uint8 examples read from the host in chunks of batches, for data that
does not fit on the device (or should not be copied whole onto every device).

Sources: `tfds_splits` (a TFDS ArrayRecord preparation read with `tfds.data_source`; lrjax prepares
MNIST and Fashion-MNIST so, see `lrjax.tfds_source`) and `array_splits` (numpy arrays or memmaps). Both
split as the resident path does (`lrjax.data.from_arrays`): validation = the first `valid_size` train
examples, train = the rest, in the same order, so both paths see the same examples in each split.

`Stream` is a Grain `MapDataset` whose element is a chunk of K batches, x uint8 [K, B, H, W, C], y int32
[K, B], w float32 [K, B] (0 = padding), active bool [K] (False = a whole padding step), steps int64 [K]
(global step of each, -1 padding), iterated through Grain's threads and worker processes; its iterator
state (`state()` / `restore()`, or Grain's Orbax handler via `get_state()` / `set_state()`) resumes to
exactly the same chunks. Each epoch is a fresh permutation drawn from (seed, epoch); an epoch's last
partial batch is padded with the epoch's first examples at weight 0, as the resident path pads.
Several processes each read only their rows of every global batch (`grain.sharding.ShardByJaxProcess`)
and `to_device` assembles the global arrays. `to_float` is the device-side uint8 -> float32 conversion.

`parse_size`, `default_budget` and `choose_input` decide between the resident and the streamed path.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import queue
import re
import sys
import threading
from typing import Any, Callable, Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np

from lrjax.errors import CheckpointError, ConfigError, DataError

VALID_SIZE = 5000  # as lrjax.data: the first 5,000 train examples validate
# Two cores: the device program takes one, one worker process decodes on the other (see README, Input).
DEFAULT_WORKERS = 1
STATE_FORMAT = 1


# ---------------------------------------------------------------------------------------------
# Memory: resident or streamed
# ---------------------------------------------------------------------------------------------

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'20MB' -> 20_000_000, '1.5GiB' -> 1610612736, '512' -> 512 bytes (decimal and binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match and (match.group(2).lower() or "b")
    if not match or unit not in _UNITS:
        raise ConfigError(f"size {text!r} is not a number with a unit such as 20MB, 4GB or 512MiB "
                          f"(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(nbytes) < 1000:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def host_memory() -> int:
    """Physical memory, or the container's (cgroup) limit where that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                total = min(total, int(f.read().strip()))
        except (OSError, ValueError):  # absent, or "max"
            pass
    return total


def default_budget(share: float = 0.5) -> int:
    """Device memory the resident dataset may take on each device: `share` of an accelerator's
    `bytes_limit`; on CPU, `share` of host memory divided among the local devices and the host's own
    float32 copy (the resident path keeps one), since they all live in the same RAM."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(share * stats["bytes_limit"])
    return int(share * host_memory() / (jax.local_device_count() + 1))


def choose_input(mode: str, nbytes: int, budget: int) -> tuple[str, str]:
    """('resident' | 'stream', a printable reason) for --input resident|stream|auto, where `nbytes`
    is what the resident path puts on each device and `budget` the --device-memory-budget."""
    size, limit = format_size(nbytes), format_size(budget)
    if mode == "resident":
        return "resident", f"input: resident (--input resident; the dataset takes {size} per device)"
    if mode == "stream":
        return "stream", f"input: streamed from the host in uint8 chunks (--input stream; resident it would take {size} per device)"
    if mode != "auto":
        raise ConfigError(f"--input {mode!r}: choose resident, stream or auto")
    if nbytes <= budget:
        return "resident", f"input: resident (the dataset's {size} fit the device-memory budget of {limit})"
    return "stream", (f"input: streamed from the host in uint8 chunks (the dataset's {size} exceed the "
                      f"device-memory budget of {limit})")


def resident_nbytes(splits: "Splits") -> int:
    """Bytes the resident path holds per device for these splits: float32 images, int32 labels."""
    n = sum(len(s) for s in (splits.train, splits.valid, splits.test))
    return n * (int(np.prod(splits.train.example_shape)) * 4 + 4)


def to_float(x: jax.Array) -> jax.Array:
    """uint8 images to float32 in [0, 1] on the device, bit-identical to the resident path's host-side
    `x / 255` (a 256-entry table: XLA turns a division by 255 into an inexact multiplication)."""
    return jnp.asarray(np.arange(256, dtype=np.float32) / np.float32(255.0))[x]


# ---------------------------------------------------------------------------------------------
# Sources: examples by key, read a batch at a time
# ---------------------------------------------------------------------------------------------

class ArrayExamples:
    """uint8 images (N, H, W[, C]) and integer labels (N,), numpy arrays or memmaps. A memmap travels
    to Grain's worker processes as its file name and is mapped there again, never copied."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, name: str = "arrays"):
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise DataError(f"{name}: images must be uint8 of shape (N, H, W) or (N, H, W, C), "
                            f"got {images.dtype} {images.shape}")
        if len(labels) != len(images):
            raise DataError(f"{name}: {len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.name = images, labels, name
        self.example_shape = tuple(images.shape[1:]) + ((1,) if images.ndim == 3 else ())

    def __len__(self) -> int:
        return len(self.images)

    def read(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(self.images[keys]).reshape(len(keys), *self.example_shape)
        return x, np.asarray(self.labels[keys], np.int32)

    def __reduce__(self):
        def mapped(a):
            return (_open_memmap, (a.filename, a.dtype.str, a.shape, a.offset)) if _is_memmap(a) else a

        return _array_examples, (mapped(self.images), mapped(self.labels), self.name)


def _is_memmap(a) -> bool:
    return isinstance(a, np.memmap) and a.filename is not None and a.flags.c_contiguous


def _open_memmap(filename, dtype, shape, offset):
    return np.memmap(filename, dtype=dtype, mode="r", shape=shape, offset=offset)


def _array_examples(images, labels, name):
    unpack = lambda a: _open_memmap(*a[1]) if isinstance(a, tuple) else a  # noqa: E731
    return ArrayExamples(unpack(images), unpack(labels), name)


class TfdsExamples:
    """A TFDS split prepared as ArrayRecord, read with `tfds.data_source`. Keys are record positions.

    Records are read as raw bytes and parsed here (image bytes, integer label) with TFDS's own
    `tf.train.Example` proto: 15 us a record instead of 80 us through TFDS's per-feature deserializer
    (which also decodes nothing here: the PNGs are decoded with Pillow, as `lrjax.tfds_source` does).
    """

    def __init__(self, name: str, split: str, data_dir: str | os.PathLike | None):
        import tensorflow_datasets as tfds
        from array_record.python.array_record_module import ArrayRecordReader
        from tensorflow_datasets.core.registered import DatasetNotFoundError

        self.name, self.split = name, split
        try:
            self.source = tfds.data_source(name, split=split, data_dir=data_dir and str(data_dir), download=False,
                                           deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        except DatasetNotFoundError:
            raise DataError(f"unknown TFDS dataset '{name}'") from None
        except (NotImplementedError, KeyError, ValueError):  # what data_source raises when unprepared
            raise DataError(f"TFDS dataset {name} (split {split}) is not prepared as array_record in "
                            f"{data_dir or 'the default data_dir'}; lrjax prepares MNIST and Fashion-MNIST "
                            f"there from their IDX files (--data-dir with --tfds-data-dir)") from None
        features = self.source.dataset_info.features
        if "image" not in features or "label" not in features:
            raise DataError(f"TFDS dataset {name} has no 'image' and 'label' features")
        self.example_shape = tuple(features["image"].shape)
        if None in self.example_shape or features["image"].np_dtype != np.uint8:
            raise DataError(f"TFDS dataset {name}: images of shape {self.example_shape} and dtype "
                            f"{features['image'].np_dtype} are not supported (need fixed-size uint8)")
        info = self.source.dataset_info.splits[split]
        # Opening every shard now (it reads only the footer) turns a missing or damaged file into one
        # clear error before anything runs, instead of a failure deep inside a worker.
        for path, expected in zip(info.filepaths, info.shard_lengths):
            if not os.path.exists(path):
                raise DataError(f"TFDS dataset {name}: shard {path} is missing")
            try:
                reader = ArrayRecordReader(str(path))
                count = reader.num_records()
                reader.close()
            except RuntimeError as e:
                raise DataError(f"TFDS dataset {name}: shard {path} is damaged ({_first_line(e)})") from None
            if count != expected:
                raise DataError(f"TFDS dataset {name}: shard {path} holds {count} records, its metadata "
                                f"says {expected}")

    def __len__(self) -> int:
        return len(self.source)

    def read(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from google.protobuf.message import DecodeError
        from tensorflow_datasets.proto import tf_example_pb2

        try:
            records = self.source.__getitems__([int(k) for k in keys])
        except RuntimeError as e:
            raise DataError(f"TFDS dataset {self.name}: cannot read {self.split} records "
                            f"({_first_line(e)})") from None
        x = np.empty((len(keys), *self.example_shape), np.uint8)
        y = np.empty(len(keys), np.int32)
        for i, (key, record) in enumerate(zip(keys, records)):
            what = f"{self.name} {self.split} record {key}"
            try:
                feature = tf_example_pb2.Example.FromString(record).features.feature
                png, y[i] = feature["image"].bytes_list.value[0], feature["label"].int64_list.value[0]
            except (DecodeError, IndexError) as e:
                raise DataError(f"{what}: not an example with an encoded image and a label "
                                f"({_first_line(e)})") from None
            x[i] = _check_shape(_decode(png, what), self.example_shape, what)
        return x, y


def _decode(png: bytes, what: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(png)) as im:
            return np.asarray(im)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{what}: the image cannot be decoded ({_first_line(e)})") from None


def _check_shape(image: np.ndarray, shape: tuple, what: str) -> np.ndarray:
    if image.size != int(np.prod(shape)) or image.dtype != np.uint8:
        raise DataError(f"{what}: image of shape {image.shape} ({image.dtype}), the others are {shape} uint8")
    return image.reshape(shape)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:300]


@dataclasses.dataclass(frozen=True)
class Split:
    """The examples of one split: `keys[i]` is the source key of the split's i-th example."""

    examples: Any  # ArrayExamples | TfdsExamples | anything with read(keys) and example_shape
    keys: np.ndarray
    name: str

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def example_shape(self) -> tuple[int, ...]:
        return self.examples.example_shape

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.examples.read(self.keys[positions])


@dataclasses.dataclass(frozen=True)
class Splits:
    train: Split
    valid: Split
    test: Split


def _split_train(train, test, valid_size: int, train_keys: np.ndarray, test_keys: np.ndarray,
                 name: str) -> Splits:
    if valid_size < 1 or len(train_keys) <= valid_size:
        raise DataError(f"{name}: {len(train_keys)} training examples, need more than the {valid_size} "
                        f"held out for validation")
    return Splits(train=Split(train, train_keys[valid_size:], "train"),
                  valid=Split(train, train_keys[:valid_size], "valid"), test=Split(test, test_keys, "test"))


def array_splits(train_images, train_labels, test_images, test_labels, valid_size: int = VALID_SIZE,
                 name: str = "arrays") -> Splits:
    """Splits of numpy arrays or memmaps (uint8 images), as `lrjax.data.from_arrays` splits them."""
    train = ArrayExamples(train_images, train_labels, f"{name} train")
    test = ArrayExamples(test_images, test_labels, f"{name} test")
    if train.example_shape != test.example_shape:
        raise DataError(f"{name}: train images are {train.example_shape}, test images {test.example_shape}")
    return _split_train(train, test, valid_size, np.arange(len(train)), np.arange(len(test)), name)


def tfds_splits(name: str, data_dir: str | os.PathLike | None, valid_size: int = VALID_SIZE) -> Splits:
    """Splits of a prepared TFDS dataset, in the example order of `lrjax.tfds_source.load_tfds_arrays`
    (for MNIST-format sets the IDX order, which TFDS's stored order shuffles), so validation holds the
    same examples as on the resident path."""
    from lrjax import tfds_source

    train, test = (TfdsExamples(name, split, data_dir) for split in ("train", "test"))
    keys = [tfds_source.record_keys(name, s.split, s.source) for s in (train, test)]
    return _split_train(train, test, valid_size, *keys, name)


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

    def __init__(self, split: Split, plan: Plan, transform):
        self.split, self.plan, self.transform = split, plan, transform
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        # The whole epoch's permutation at once (~1 ms for 55k): Grain's per-index MapDataset.shuffle
        # costs ~11 us an index, ~3 ms a batch of 256, 10x reading that batch from a memmap.
        if epoch not in self._orders:
            seed = np.random.SeedSequence([self.plan.seed, epoch])
            self._orders = {epoch: np.random.default_rng(seed).permutation(self.plan.n),
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


class Stream:
    """Chunks of K batches of a split, through Grain; an iterator with exact, saveable state.

    `epochs` (or `steps`) bounds the stream, else it is endless. `epoch_aligned` chunks stop at each
    epoch's end (training: host work between epochs); otherwise they run on across epochs (the range
    test). `transform(example, rng) -> example` (dicts with 'image' uint8 and 'label') runs per example
    on the host. `workers` processes read and decode; `threads` threads in each; `buffer` chunks ahead.
    `shard` (default `grain.sharding.ShardByJaxProcess()`) picks this process's rows of each batch.
    """

    def __init__(self, split: Split, batch_size: int, *, chunk_steps: int = 1, shuffle: bool = True,
                 seed: int = 0, epochs: int | None = None, steps: int | None = None,
                 epoch_aligned: bool = True, transform: Callable | None = None,
                 workers: int = DEFAULT_WORKERS, threads: int = 1, buffer: int = 2,
                 shard: grain.sharding.ShardOptions | None = None):
        shard = shard or grain.sharding.ShardByJaxProcess()
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
            _ReadChunk(split, self.plan, transform))
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
                                                             per_worker_buffer_size=self.buffer))
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

def chunk_sharding(mesh: jax.sharding.Mesh, axis: str = "data") -> jax.sharding.NamedSharding:
    """Chunks [K, B, ...] split along the batch over `axis` of `mesh`."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, axis))


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
            _check_process_rows(sharding, shape)
            out[key] = jax.make_array_from_process_local_data(sharding, value, shape)
        else:
            out[key] = jax.make_array_from_process_local_data(replicated, value, value.shape)
    return out


def _check_process_rows(sharding, shape) -> None:
    local = shape[1] // jax.process_count()
    starts = {index[1].start or 0 for index in sharding.addressable_devices_indices_map(shape).values()}
    stops = {index[1].stop or shape[1] for index in sharding.addressable_devices_indices_map(shape).values()}
    p = jax.process_index()
    if min(starts) != p * local or max(stops) != (p + 1) * local:
        raise ConfigError(f"the sharding gives process {p} batch rows {min(starts)}:{max(stops)}, but the "
                          f"stream reads rows {p * local}:{(p + 1) * local} (ShardByJaxProcess): split the "
                          "batch over a mesh axis whose devices are ordered by process")


class DevicePrefetch:
    """Chunks staged onto the devices `size` ahead by a background thread, so that reading, stacking
    and copying chunk i+1 overlaps the computation of chunk i. `state()` is the stream's state after
    the last chunk returned, not after the ones staged ahead."""

    def __init__(self, stream: Stream, sharding: jax.sharding.NamedSharding, size: int = 2):
        self.stream, self.sharding, self.size = stream, sharding, size
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = None

    def _run(self, q: queue.Queue, stop: threading.Event) -> None:
        try:
            for chunk in self.stream:
                item = (to_device(chunk, self.sharding), self.stream.state())
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            q.put(StopIteration())
        except BaseException as e:  # handed to the consumer, which raises it
            q.put(e)

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

    def close(self) -> None:
        self._join()
        self.stream.close()
