"""Reading and verifying the IDX files of MNIST-format datasets (MNIST, Fashion-MNIST).

Only numpy and the standard library: no JAX, no TFDS. `read_idx_folder` returns raw uint8 images
and labels for the official train and test splits; splitting and scaling live in `lrjax.data`.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from pathlib import Path

import numpy as np

from lrjax.errors import DataError

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# sha256 of the *uncompressed* IDX content, so re-compressed copies (e.g. Debian's) also verify.
# Fashion-MNIST: Zalando Research's published files.  MNIST: no verified values are shipped with
# lrjax yet, so MNIST files are checked for structure (magic, shape, label range) only.
SHA256 = {
    "fashion_mnist": {
        "train_images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train_labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "test_images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "test_labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}

SOURCES = {
    "fashion_mnist": "https://github.com/zalandoresearch/fashion-mnist (data/fashion/*.gz)",
    "mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
}

_MAGIC = {2049: 1, 2051: 3}  # labels: 1-d, images: 3-d (uint8 content, type code 0x08)


def has_idx_files(folder: str | os.PathLike) -> bool:
    """True when `folder` holds at least one of the four official IDX file names."""
    folder = Path(folder)
    return any((folder / name).exists() for name in FILES.values())


def _read_bytes(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip file ({e}); download it again") from None


def parse_idx(raw: bytes, path: Path | str = "<bytes>") -> np.ndarray:
    """Parses one uncompressed IDX buffer into a uint8 array, checking magic number and size."""
    if len(raw) < 8:
        raise DataError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in _MAGIC:
        raise DataError(f"{path}: wrong IDX magic number {magic:#010x} (expected 0x00000801 or 0x00000803)")
    ndim = _MAGIC[magic]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, {header} expected)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the file holds "
                        f"{len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_folder(folder: str | os.PathLike, dataset: str = "fashion_mnist",
                    verify: bool = True) -> dict[str, np.ndarray]:
    """Reads the four official IDX .gz files of an MNIST-format dataset from `folder`.

    Returns uint8 arrays `train_images` (60000, 28, 28), `train_labels` (60000,), `test_images`,
    `test_labels`. Raises `DataError` with one clear line for a missing folder or file, a corrupt
    gzip, a checksum mismatch, a wrong magic number, shape or label range.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist")
    missing = [name for name in FILES.values() if not (folder / name).is_file()]
    if missing:
        where = SOURCES.get(dataset, "the dataset's publisher")
        raise DataError(f"{folder} lacks {', '.join(missing)}; get the official IDX files from {where}")
    known = SHA256.get(dataset, {}) if verify else {}
    out = {}
    for key, name in FILES.items():
        path = folder / name
        raw = _read_bytes(path)
        if key in known:
            digest = hashlib.sha256(raw).hexdigest()
            if digest != known[key]:
                raise DataError(f"{path}: sha256 {digest[:16]}... does not match the published "
                                f"{dataset} file ({known[key][:16]}...); the file is damaged or another dataset")
        elif verify and key == "train_images":  # no checksum of its own: at least not another known dataset
            digest = hashlib.sha256(raw).hexdigest()
            other = [d for d, sums in SHA256.items() if sums.get(key) == digest]
            if other:
                raise DataError(f"{folder} holds the {other[0]} files, not {dataset}'s (--dataset / --data-dir)")
        out[key] = parse_idx(raw, path)
    _check_structure(out, folder)
    return out


def _check_structure(arrays: dict[str, np.ndarray], folder: Path) -> None:
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(f"{folder}: {split} images must be 3-d and labels 1-d, got {images.shape} "
                            f"and {labels.shape} (images and labels files swapped?)")
        if images.shape[0] == 0:
            raise DataError(f"{folder}: the {split} split holds no images")
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{folder}: {split} has {images.shape[0]} images but {labels.shape[0]} labels")
        if labels.size and labels.max() > 9:
            raise DataError(f"{folder}: {split} labels range up to {labels.max()}, expected 0..9")
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise DataError(f"{folder}: train images {arrays['train_images'].shape[1:]} and test images "
                        f"{arrays['test_images'].shape[1:]} differ in shape")


def write_idx_gz(path: str | os.PathLike, array: np.ndarray) -> None:
    """Writes a uint8 array as a gzipped IDX file (for tests and for preparing small datasets)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = {1: 2049, 3: 2051}[array.ndim]
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())
