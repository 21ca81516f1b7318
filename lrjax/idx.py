"""Reading and verifying the IDX files of MNIST-format datasets (MNIST, Fashion-MNIST).

Only numpy and the standard library: no JAX, no TFDS. `read_idx_folder` returns raw uint8 images
and labels for the official train and test splits; splitting and scaling live in `lrjax.data`.
Given a cache folder, the sha256 of each file's uncompressed content is computed once and kept
there, keyed by the file's absolute path, size, modification and change times and inode, with a
copy of the uncompressed content (so a later load skips decompressing: ~55 MB for Fashion-MNIST);
any change to the file means reading and hashing it again. Gzip's own integrity checks (CRC-32,
length) run on every read of a .gz file; the cached copy is checked against its own CRC-32.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
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

IDX_DATASETS = ("mnist", "fashion_mnist")  # the datasets published as MNIST-format IDX files

_MAGIC = {2049: 1, 2051: 3}  # labels: 1-d, images: 3-d (uint8 content, type code 0x08)


def has_idx_files(folder: str | os.PathLike) -> bool:
    """True when `folder` holds at least one of the four official IDX file names."""
    folder = Path(folder)
    return any((folder / name).exists() for name in FILES.values())


def _read_bytes(path: Path) -> bytes:
    """The uncompressed content of a gzip file (every member, as `gzip.open` reads them).

    One zlib call on the whole file instead of `gzip.open`'s chunked reads: less Python per byte,
    and zlib releases the GIL, so the four files decompress side by side. zlib checks each member's
    CRC-32 and length as gzip does.
    """
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e})") from None
    parts = []
    try:
        while blob:
            stream = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip header and trailer
            parts.append(stream.decompress(blob))
            if not stream.eof:
                raise EOFError("compressed file ended before the end-of-stream marker was reached")
            blob = stream.unused_data.lstrip(b"\x00")  # the next member, after gzip's optional padding
    except (EOFError, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip file ({e}); download it again") from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


# A digest is only remembered for a file last modified this long before: a later write within the
# file system's timestamp granularity (2 s on FAT, far less elsewhere) could otherwise leave size and
# times as they were.
_SETTLED_NS = 2_000_000_000


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _content_and_digest(path: Path, st: os.stat_result, cache_dir: Path | None) -> tuple[bytes, str]:
    """The uncompressed content of `path` (whose stat before reading was `st`) and its sha256. With a
    cache folder that remembers this very file, both come from there: the digest from its entry,
    the content from the uncompressed copy beside it (checked against the CRC-32 it was written
    with; a damaged or missing copy means reading the file again). Otherwise the file is read and
    hashed, and both are remembered once the file has settled."""
    if cache_dir is None:
        raw = _read_bytes(path)
        return raw, hashlib.sha256(raw).hexdigest()
    where = str(path.absolute())
    entry = cache_dir / f"{hashlib.sha1(where.encode()).hexdigest()[:20]}.json"
    copy = entry.with_suffix(".idx")
    known = None
    try:
        known = json.loads(entry.read_text())
        if known["path"] != where or known["stat"] != _identity(st):
            known = None
    except (OSError, ValueError, KeyError, TypeError):
        known = None  # no entry, or an unreadable one: read and hash the file
    if known is not None:
        try:
            raw = copy.read_bytes()
            if len(raw) == known["size"] and zlib.crc32(raw) == known["crc32"]:
                return raw, known["sha256"]
            _say(f"lrjax: the cached copy {copy} is damaged ({len(raw)} bytes, its CRC-32 does not match); "
                 f"reading {path.name} again and rebuilding it")
        except FileNotFoundError:
            pass  # removed by hand: rebuilt below
        except (OSError, KeyError, TypeError) as e:
            _say(f"lrjax: the cached copy {copy} is unreadable ({e}); reading {path.name} again and rebuilding it")
    raw = _read_bytes(path)
    digest = known["sha256"] if known is not None else hashlib.sha256(raw).hexdigest()
    if time.time_ns() - st.st_mtime_ns > _SETTLED_NS:
        tmp = None
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            for target, data in ((copy, raw), (entry, json.dumps({
                    "path": where, "stat": _identity(st), "sha256": digest, "size": len(raw),
                    "crc32": zlib.crc32(raw)}).encode())):
                tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
                tmp.write_bytes(data)
                tmp.replace(target)  # atomic: concurrent runs each write a whole file
        except OSError as e:  # a read-only or full cache is only slower
            try:
                if tmp is not None:
                    tmp.unlink(missing_ok=True)  # a partial file would keep the space
            except OSError:
                pass
            _say(f"lrjax: cannot write the IDX cache in {cache_dir} ({e.strerror or e}); running without the cache",
                 once=str(cache_dir))
    return raw, digest


_said: set[str] = set()


def _say(line: str, once: str | None = None) -> None:
    """One line on stderr; with `once`, only the first time in this process (four files share a folder)."""
    if once is not None:
        if once in _said:
            return
        _said.add(once)
    print(line, file=sys.stderr)


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
                    verify: bool = True, cache_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Reads the four official IDX .gz files of an MNIST-format dataset from `folder`.

    Returns uint8 arrays `train_images` (60000, 28, 28), `train_labels` (60000,), `test_images`,
    `test_labels`. Raises `DataError` with one clear line for a missing folder or file, a corrupt
    gzip, a checksum mismatch, a wrong magic number, shape or label range (for several faults, the
    first in the order above of the files). With `cache_dir`, each file's sha256 is remembered there
    (see the module's docstring); nothing is written next to the data.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist")
    missing = [name for name in FILES.values() if not (folder / name).is_file()]
    if missing:
        where = SOURCES.get(dataset, "the dataset's publisher")
        raise DataError(f"{folder} lacks {', '.join(missing)}; get the official IDX files from {where}")
    known = SHA256.get(dataset, {}) if verify else {}
    digests = None if cache_dir is None else Path(cache_dir) / "idx"

    def read(key: str) -> np.ndarray:
        path = folder / FILES[key]
        st = path.stat()  # before reading: a file changed meanwhile is then hashed again next time
        if key in known:
            raw, digest = _content_and_digest(path, st, digests)
            if digest != known[key]:
                raise DataError(f"{path}: sha256 {digest[:16]}... does not match the published "
                                f"{dataset} file ({known[key][:16]}...); the file is damaged or another dataset")
        elif verify and key == "train_images":  # no checksum of its own: at least not another known dataset
            raw, digest = _content_and_digest(path, st, digests)
            other = [d for d, sums in SHA256.items() if sums.get(key) == digest]
            if other:
                raise DataError(f"{folder} holds the {other[0]} files, not {dataset}'s (--dataset / --data-dir)")
        else:
            raw = _read_bytes(path)
        return parse_idx(raw, path)

    # Two threads: the train images (most of the time) beside the other three files. Results, and
    # so the error reported, come in the files' order.
    with ThreadPoolExecutor(max_workers=2) as pool:
        out = dict(zip(FILES, pool.map(read, FILES)))
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
