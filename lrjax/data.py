"""Classification datasets as device-ready numpy arrays, from IDX files or tensorflow-datasets.

`load_dataset` is the one entry point. Splits follow the seed article: validation = the FIRST
5,000 images of the official train split, train = the rest (55,000), test = the official 10,000;
pixels scaled to [0, 1] float32 in NHWC layout, labels int32.

Sources, in order: a folder of the four official IDX .gz files (`data_dir` or $LRJAX_DATA_DIR; the
fast offline path, ~0.3 s, which never imports TFDS; each file's checksum is remembered in the
cache folder, see `lrjax.idx`), else a TFDS data_dir read with `tfds.data_source` (see
`lrjax.tfds_source`). Decoded TFDS arrays are cached as .npz under the cache folder, keyed by
dataset, version and data_dir, so a second run starts in well under a second. Nothing is ever
written next to the source data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lrjax import idx as idx_lib
from lrjax.errors import DataError

VALID_SIZE = 5000

CLASS_NAMES = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
    "mnist": tuple(str(i) for i in range(10)),
}


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_valid: np.ndarray
    y_valid: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_features(self) -> int:
        return int(np.prod(self.x_train.shape[1:]))

    def take(self, train: int, valid: int | None = None, test: int | None = None) -> "Dataset":
        """A smaller copy (the first examples of each split), for quick experiments and tests."""
        valid = train if valid is None else valid
        test = valid if test is None else test
        return dataclasses.replace(self, x_train=self.x_train[:train], y_train=self.y_train[:train],
                                   x_valid=self.x_valid[:valid], y_valid=self.y_valid[:valid],
                                   x_test=self.x_test[:test], y_test=self.y_test[:test])


def split_examples(data, split: str):
    """The examples of `split` ('train', 'valid', 'test') as the loss function receives them: the pair
    (x_<split>, y_<split>), or x_<split> itself where y_<split> is None (a pytree such as TFDS's
    {"image", "label"} dicts). `data` is any object with those attributes, e.g. a `Dataset`."""
    x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}", None)
    return x if y is None else (x, y)


def from_arrays(name: str, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                test_labels: np.ndarray, class_names=None, source: str = "arrays",
                valid_size: int = VALID_SIZE) -> Dataset:
    """Splits and scales raw uint8 images (first `valid_size` train images become validation)."""
    if valid_size < 1:
        raise DataError(f"{name}: valid_size must be at least 1 (training monitors the validation loss), "
                        f"got {valid_size}")
    if len(train_images) <= valid_size:
        raise DataError(f"{name}: {len(train_images)} training images, need more than the {valid_size} "
                        "held out for validation")
    train_images, test_images = np.asarray(train_images), np.asarray(test_images)
    x_train, x_valid, x_test = _scaled([train_images[valid_size:], train_images[:valid_size], test_images])
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    names = tuple(class_names or CLASS_NAMES.get(name) or (str(i) for i in range(num_classes)))
    return Dataset(
        name=name,
        x_train=x_train, y_train=np.asarray(train_labels[valid_size:], np.int32),
        x_valid=x_valid, y_valid=np.asarray(train_labels[:valid_size], np.int32),
        x_test=x_test, y_test=np.asarray(test_labels, np.int32),
        class_names=names, source=source)


def _scaled(splits: list[np.ndarray]) -> list[np.ndarray]:
    """Each split as NHWC float32 in [0, 1] (IDX images have no channel axis): the same values as
    `images.astype(np.float32) / 255`, written in one pass without a float temporary. Most of the
    time is the first touch of the new arrays' pages (~220 MB for Fashion-MNIST), so two threads
    fill halves of them (numpy releases the GIL)."""
    splits = [s[..., None] if s.ndim == 3 else s for s in splits]
    outs = [np.empty(s.shape, np.float32) for s in splits]
    jobs = []
    for src, dst in zip(splits, outs):
        half = len(src) // 2
        jobs += [(src[:half], dst[:half]), (src[half:], dst[half:])]
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda job: np.divide(job[0], np.float32(255.0), out=job[1], dtype=np.float32), jobs))
    return outs


def default_data_dir() -> str | None:
    """$LRJAX_DATA_DIR, or None (then TFDS's default data_dir)."""
    return os.environ.get("LRJAX_DATA_DIR") or None


def default_cache_dir() -> Path:
    """$LRJAX_CACHE_DIR, else ~/.cache/lrjax: decoded TFDS arrays, and the CLI's compiled programs."""
    return Path(os.environ.get("LRJAX_CACHE_DIR") or Path.home() / ".cache" / "lrjax")


def load_dataset(name: str = "fashion_mnist", data_dir: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None, valid_size: int = VALID_SIZE,
                 tfds_data_dir: str | os.PathLike | None = None, progress: bool = True) -> Dataset:
    """Loads `name` from IDX files in `data_dir` (or $LRJAX_DATA_DIR) or through tensorflow-datasets.

    With `tfds_data_dir`, the TFDS path is used with that data_dir; an MNIST-format dataset that is
    not prepared there yet is prepared from the IDX files in `data_dir` (without TensorFlow), with
    TFDS's progress bars unless `progress` is False.

    Raises `DataError` (one clear line) for a missing folder or file, corrupt or truncated gzip,
    checksum mismatch, wrong magic number or shape, or an unknown/unprepared TFDS dataset offline.
    """
    data_dir = data_dir or default_data_dir()
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if tfds_data_dir is not None:
        raw = _cached_tfds(name, str(tfds_data_dir), cache_dir, idx_dir=data_dir, progress=progress)
        return _from_raw(name, raw, f"tensorflow-datasets {name} ({tfds_data_dir})", valid_size)
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            what = "is a file, not a folder" if folder.exists() else "does not exist"
            raise DataError(f"data folder {folder} {what} (--data-dir / LRJAX_DATA_DIR)")
        has_idx = idx_lib.has_idx_files(folder)
        # TFDS (imported only when asked, ~0.5 s) is not consulted when the IDX files are there
        if name in idx_lib.IDX_DATASETS:
            if has_idx or not _tfds_prepared(name, folder):
                from lrjax import overlap  # the CLI's read ahead of these files, where it made one

                raw = overlap.read_idx_folder(folder, name, cache_dir=cache_dir)
                return overlap.from_arrays(from_arrays, name, raw["train_images"], raw["train_labels"],
                                           raw["test_images"], raw["test_labels"], source=f"IDX files in {folder}",
                                           valid_size=None if valid_size == VALID_SIZE else valid_size)
        elif has_idx and not _tfds_prepared(name, folder):
            raise DataError(f"{folder} holds MNIST-format IDX files, which lrjax reads as "
                            f"{' or '.join(idx_lib.IDX_DATASETS)}, not as {name!r} (--dataset / --data-dir)")
    tfds_dir = None if data_dir is None else str(data_dir)
    raw = _cached_tfds(name, tfds_dir, cache_dir, progress=progress)
    return _from_raw(name, raw, f"tensorflow-datasets {name} ({tfds_dir or 'default data_dir'})", valid_size)


def _tfds_prepared(name: str, folder: Path) -> bool:
    from lrjax import tfds_source

    return tfds_source.is_prepared(name, str(folder))


def _from_raw(name: str, raw: dict[str, np.ndarray], source: str, valid_size: int) -> Dataset:
    """A Dataset from the raw uint8 splits of either source (TFDS's may carry class names)."""
    names = raw.get("class_names")
    return from_arrays(name, raw["train_images"], raw["train_labels"], raw["test_images"], raw["test_labels"],
                       class_names=None if names is None else tuple(str(n) for n in names), source=source,
                       valid_size=valid_size)


def _cached_tfds(name: str, data_dir: str | None, cache_dir: Path, idx_dir=None,
                 progress: bool = True) -> dict[str, np.ndarray]:
    from lrjax import tfds_source

    where = os.path.abspath(data_dir) if data_dir else "default"
    version = tfds_source.prepared_version(name, data_dir)
    folder = cache_dir / "tfds" / name.replace("/", "_")
    prefix = f"{version}-{hashlib.sha1(f'{name}|{version}|{where}'.encode()).hexdigest()[:12]}"

    def entry():  # a dataset deleted or prepared again gets a new entry, never the old arrays
        fingerprint = tfds_source.prepared_fingerprint(name, data_dir)
        return folder / f"{prefix}-{hashlib.sha1(fingerprint.encode()).hexdigest()[:12]}.npz"

    path = entry()
    if path.exists():
        raw = _read_entry(path)
        if raw is not None:
            return raw
    splits = tfds_source.load_tfds_arrays(name, data_dir, idx_dir=idx_dir, progress=progress)
    path = entry()  # load_tfds_arrays may just have prepared the files
    raw = {"train_images": splits["train"][0], "train_labels": splits["train"][1],
           "test_images": splits["test"][0], "test_labels": splits["test"][1]}
    names = tfds_source.class_names(name, data_dir)
    if names:
        raw["class_names"] = np.asarray(names)
    # A name of this process's own: two processes filling the same entry at once each write a whole
    # file, and the last rename leaves one good entry.
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, **raw)
        tmp.replace(path)  # atomic: a killed run never leaves a half-written cache
        for stale in folder.glob(f"{prefix}-*.npz"):  # earlier preparations of the same data_dir
            if stale != path and ".tmp" not in stale.name:  # never another process's file in progress
                stale.unlink(missing_ok=True)
    except OSError as e:  # a read-only or full cache is only slower
        print(f"lrjax: cannot write the array cache in {folder} ({e.strerror or e}); running without the cache",
              file=sys.stderr)
        try:
            tmp.unlink(missing_ok=True)  # a partial file would keep the space
        except OSError:
            pass
    return raw


_ENTRY_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def _read_entry(path: Path) -> dict[str, np.ndarray] | None:
    """A cache entry's arrays, verified: the zip's CRC-32 of every array (checked as numpy reads it),
    the four splits present, uint8 images with one label per image. A damaged or partial entry (a
    killed writer on a filesystem without atomic rename, a disk error, a hand edit) is removed with
    one line and None is returned, so the caller rebuilds it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = dict(z)
        missing = [k for k in _ENTRY_KEYS if k not in raw]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        for split in ("train", "test"):
            images, labels = raw[f"{split}_images"], raw[f"{split}_labels"]
            if images.dtype != np.uint8 or images.ndim not in (3, 4) or labels.shape != images.shape[:1]:
                raise ValueError(f"{split} images {images.dtype} {images.shape} with labels {labels.shape}")
        return raw
    except Exception as e:  # noqa: BLE001 - zipfile, zlib, numpy's format reader: each raises its own
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        print(f"lrjax: the cached arrays {path} are damaged ({type(e).__name__}: {reason}); removed, rebuilding "
              "them", file=sys.stderr)
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only cache: rebuilt in memory, the write below says so
        return None


