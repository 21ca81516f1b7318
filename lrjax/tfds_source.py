"""Loading TFDS image-classification datasets as numpy arrays, without TensorFlow.

`load_tfds_arrays` reads a prepared TFDS dataset (any with an `image` and a `label` feature: mnist,
fashion_mnist, kmnist, cifar10, ...) through `tfds.data_source` (array_record files, plain numpy).
A dataset that is not prepared yet is prepared first: MNIST and Fashion-MNIST from a folder of the
official IDX files, by a TFDS builder that needs no TensorFlow; anything else by TFDS's own builder,
which needs TensorFlow (`lrjax[tf]`). Without either, a one-line `DataError` says what to do.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core import hashing
from tensorflow_datasets.core.registered import DatasetNotFoundError

from lrjax import faults
from lrjax.errors import DataError
from lrjax.idx import IDX_DATASETS, read_idx_folder
SPLITS = ("train", "test")


def _builder(name: str, data_dir: str | None):
    try:
        with _quiet_absl():  # TFDS warns about every unprepared version folder it looks at
            return tfds.builder(name, data_dir=data_dir)
    except DatasetNotFoundError:
        raise DataError(f"unknown TFDS dataset '{name}'") from None


def is_prepared(name: str, data_dir: str | None) -> bool:
    """True when `name` is prepared in `data_dir` in the array_record format `data_source` reads."""
    builder = _builder(name, data_dir)
    # TFDS logs a warning for every unprepared version folder it looks at: not news to the user here.
    with _quiet_absl():
        prepared = builder.is_prepared()
    return (prepared
            and tfds.core.FileFormat.ARRAY_RECORD in builder.info.available_file_formats())


@contextlib.contextmanager
def _quiet_absl():
    from absl import logging as absl_logging

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def load_tfds_arrays(name: str, data_dir: str | None, idx_dir: str | os.PathLike | None = None,
                     progress: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Returns {"train": (images, labels), "test": (images, labels)}, preparing the dataset if needed.

    Images are uint8 (N, H, W, C), labels int64 (N,). For MNIST and Fashion-MNIST the examples come
    in the order of the official IDX files (TFDS stores them shuffled; the shuffle is undone), so
    both sources give identical arrays; other datasets come in TFDS's fixed record order.
    `idx_dir` (a folder of the four IDX .gz files) is only read, never written to. `progress`
    False hides TFDS's progress bars while it prepares (its setting is global, and left so).
    """
    builder = _builder(name, data_dir)  # fails early, with one line, on an unknown name
    try:
        # Tried before checking the files: tfds.testing.mock_data fakes data_source, not the files.
        sources = _open(name, data_dir)
    except (NotImplementedError, KeyError):  # what data_source raises for an unprepared dataset
        with _quiet_absl():
            prepared = builder.is_prepared()
        if prepared:
            raise DataError(f"TFDS dataset {name} in {builder.data_dir} is prepared as "
                            f"{builder.info.file_format.value}, but lrjax reads array_record: delete that "
                            f"folder to prepare it again") from None
        tfds.display_progress_bar(progress)
        with faults.writing(builder.data_dir_root):  # TFDS removes its unfinished folder itself
            _prepare(name, data_dir, idx_dir)
        sources = _open(name, data_dir)
    return {split: _to_arrays(name, split, source) for split, source in zip(SPLITS, sources)}


def ensure_prepared(name: str, data_dir: str | None, idx_dir: str | os.PathLike | None = None,
                    progress: bool = True) -> None:
    """Prepares `name` as array_record in `data_dir` (from the IDX files in `idx_dir` for MNIST and
    Fashion-MNIST) unless it is prepared so already: what the streamed path reads."""
    if is_prepared(name, data_dir):
        return
    builder = _builder(name, data_dir)
    with _quiet_absl():
        prepared = builder.is_prepared()
    if prepared:
        raise DataError(f"TFDS dataset {name} in {builder.data_dir} is prepared as "
                        f"{builder.info.file_format.value}, but lrjax reads array_record: delete that "
                        f"folder to prepare it again")
    tfds.display_progress_bar(progress)
    _prepare(name, data_dir, idx_dir)


def _open(name: str, data_dir: str | None):
    with _quiet_absl():
        sources = tfds.data_source(name, split=list(SPLITS), data_dir=data_dir, download=False)
    # Decoding the PNGs ourselves with Pillow skips TFDS's per-feature decode machinery: 2.8 s
    # instead of 3.7 s for the 60k Fashion-MNIST train images (threads do not help: GIL-bound).
    # Set after opening because mock_data, given decoders, fakes encoded examples with TensorFlow.
    for source in sources:
        source.decoders = {"image": tfds.decode.SkipDecoding()}
    return sources


def _to_arrays(name: str, split: str, source) -> tuple[np.ndarray, np.ndarray]:
    features = source.dataset_info.features
    if "image" not in features or "label" not in features:
        raise DataError(f"TFDS dataset {name} has no 'image' and 'label' features; "
                        f"not an image classification set")
    shape = tuple(features["image"].shape)
    if None in shape or features["image"].np_dtype != np.uint8:
        raise DataError(f"TFDS dataset {name}: images of shape {shape} and dtype {features['image'].np_dtype} "
                        f"are not supported (need fixed-size uint8)")
    n = len(source)
    # Position of each record in the returned arrays: IDX order for MNIST-format sets.
    if name in IDX_DATASETS and not source.dataset_info.disable_shuffling:
        target = _idx_order(split, n)
    else:
        target = np.arange(n)
    images = np.empty((n, *shape), np.uint8)
    labels = np.empty(n, np.int64)
    chunk = 4096  # one __getitems__ per chunk: 3x faster than record by record (0.86 s vs 2.6 s per 20k)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        for i, example in zip(target[start:stop], source.__getitems__(list(range(start, stop)))):
            images[i] = _decode(example["image"]).reshape(shape)
            labels[i] = example["label"]
    return images, labels


def record_keys(name: str, split: str, source) -> np.ndarray:
    """Record key (position in the TFDS source) of each example, in the order `load_tfds_arrays`
    returns them: what a streamed reader needs to see the same examples in each split."""
    n = len(source)
    if name in IDX_DATASETS and not source.dataset_info.disable_shuffling:
        return np.argsort(_idx_order(split, n)).astype(np.int64)
    return np.arange(n, dtype=np.int64)


def _decode(image) -> np.ndarray:
    if isinstance(image, np.ndarray):  # already decoded (tfds.testing.mock_data)
        return image
    with Image.open(io.BytesIO(image)) as im:
        return np.asarray(im)


def _idx_order(split: str, n: int) -> np.ndarray:
    """IDX index of each TFDS record of an MNIST-format split.

    TFDS's MNIST builders use the IDX index as example key and store records sorted by md5 of the
    key salted with the split name; the same order results from our IDX builder below.
    """
    hasher = hashing.Hasher(split)
    return np.argsort([hasher.hash_key(i) for i in range(n)], kind="stable")


def _tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _prepare(name: str, data_dir: str | None, idx_dir: str | os.PathLike | None) -> None:
    if name in IDX_DATASETS and idx_dir is not None:
        if data_dir is not None:
            tfds_dir, idx = Path(data_dir).resolve(), Path(idx_dir).resolve()
            if idx == tfds_dir or idx in tfds_dir.parents:  # the IDX folder may be read-only or shared
                raise DataError(f"TFDS data dir {data_dir} lies inside the IDX folder {idx_dir}; "
                                f"use a separate folder")
        arrays = read_idx_folder(idx_dir, name)  # DataError for missing or damaged files, before TFDS starts
        builder_cls = {"mnist": _MnistFromIdx, "fashion_mnist": _FashionMnistFromIdx}[name]
        # Fashion-MNIST (70k images): ~6 s on 2 CPU cores, of which 3.4 s PNG encoding.
        builder_cls(arrays=arrays, data_dir=data_dir).download_and_prepare(file_format="array_record")
    elif _tensorflow_available():
        _builder(name, data_dir).download_and_prepare(file_format="array_record")
    else:
        where = _builder(name, data_dir).data_dir_root
        hint = ("pass --data-dir with the IDX files, or install lrjax[tf] to let TFDS download it"
                if name in IDX_DATASETS else "install lrjax[tf] to let TFDS download and prepare it")
        raise DataError(f"dataset {name} is not prepared in {where} and cannot be prepared offline without "
                        f"TensorFlow: {hint}")


def _png(image: np.ndarray) -> bytes:
    # Encoded here because tfds.features.Image encodes numpy arrays with TensorFlow; it stores
    # bytes as they are. Pillow: 3.4 s for the 70k Fashion-MNIST images.
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class _FromIdx:
    """Builder mixin: examples from IDX arrays already in memory instead of a download.

    Keeps the parent's name, version and features, and its keys (the IDX index), so the prepared
    dataset is the one `tfds.builder(name)` expects, with the same record order.
    """

    def __init__(self, *, arrays: dict[str, np.ndarray], **kwargs):
        self._arrays = arrays
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split):
        images, labels = self._arrays[f"{split}_images"], self._arrays[f"{split}_labels"]
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {"image": _png(image), "label": int(label)}


# skip_registration: the names belong to TFDS's own builders, which readers keep using.
class _MnistFromIdx(_FromIdx, tfds.image_classification.MNIST, skip_registration=True):
    name = "mnist"


class _FashionMnistFromIdx(_FromIdx, tfds.image_classification.FashionMNIST, skip_registration=True):
    name = "fashion_mnist"


def prepared_version(name: str, data_dir: str | None) -> str:
    """The version TFDS reads for `name` in `data_dir` (part of lrjax's cache key)."""
    return str(_builder(name, data_dir).version)


def prepared_fingerprint(name: str, data_dir: str | None) -> str:
    """Names, sizes and modification times of the prepared files TFDS reads for `name` (part of
    lrjax's cache key): the same until the dataset is deleted or prepared again."""
    folder = Path(str(_builder(name, data_dir).data_dir))
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def class_names(name: str, data_dir: str | None) -> list[str] | None:
    """The label names TFDS declares for `name`, or None when it declares none."""
    label = _builder(name, data_dir).info.features["label"]
    names = getattr(label, "names", None)
    return list(names) if names else None
