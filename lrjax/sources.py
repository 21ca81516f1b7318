"""Random-access sources of uint8 examples for the streamed input path (`lrjax.stream`), split as the
resident path splits (`lrjax.data.from_arrays`): validation = the first `valid_size` train examples,
train = the rest, test = the test split, in the same order, so both paths see the same examples.

`tfds_splits` reads a TFDS ArrayRecord preparation with `tfds.data_source` (lrjax prepares MNIST and
Fashion-MNIST so, see `lrjax.tfds_source`); `array_splits` reads numpy arrays or memmaps. A `Split`
reads a batch at a time: `read(positions) -> (x uint8 [b, H, W, C], y int32 [b])`. Missing or damaged
files and images of another shape are `DataError`s.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import numpy as np

from lrjax.data import VALID_SIZE
from lrjax.errors import DataError


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
            offset = _file_offset(a)
            return a if offset is None else (_open_memmap, (a.filename, a.dtype.str, a.shape, offset))

        return _array_examples, (mapped(self.images), mapped(self.labels), self.name)


def _file_offset(a) -> int | None:
    """Where a contiguous memmap (or a view of one) starts in its file; None for anything else."""
    if not isinstance(a, np.memmap) or a.filename is None or not a.flags.c_contiguous:
        return None
    root = a
    while isinstance(root.base, np.memmap):
        root = root.base
    # A view inherits its parent's `offset` attribute unchanged, so it is measured from the root.
    return root.offset + (a.ctypes.data - root.ctypes.data)


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


def resident_arrays(split: Split, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The whole split as the resident path holds it: float32 NHWC images in [0, 1] (the values of
    `lrjax.data.from_arrays`) and int32 labels, read `batch` examples at a time (the streamed path's
    validation and test sets, which are small next to the training set)."""
    x = np.empty((len(split), *split.example_shape), np.float32)
    y = np.empty(len(split), np.int32)
    for start in range(0, len(split), batch):
        xs, ys = split.read(np.arange(start, min(start + batch, len(split))))
        np.divide(xs, np.float32(255.0), out=x[start:start + len(xs)], dtype=np.float32)
        y[start:start + len(ys)] = ys
    return x, y


def num_classes(splits: Splits) -> int:
    """Classes of a TFDS dataset's label feature, else one more than the largest label."""
    source = getattr(splits.train.examples, "source", None)
    label = source.dataset_info.features["label"] if source is not None else None
    if getattr(label, "num_classes", None):
        return int(label.num_classes)
    return int(max(splits.train.examples.labels.max(), splits.test.examples.labels.max())) + 1
