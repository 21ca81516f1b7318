"""Tests for lrjax.idx and lrjax.data: the real Fashion-MNIST files, and every kind of bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from lrjax import data as data_lib
from lrjax import idx as idx_lib
from lrjax.data import from_arrays, load_dataset
from lrjax.plots import save_samples
from lrjax.errors import DataError
from lrjax.idx import FILES, write_idx_gz

from conftest import synthetic

# --------------------------------------------------------------------------------------------
# The real Fashion-MNIST files (skipped where ../shared/data/fashion_mnist is absent)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(real_data_dir):
    return load_dataset("fashion_mnist", real_data_dir)


@pytest.fixture(scope="module")
def real_raw(real_data_dir):
    return idx_lib.read_idx_folder(real_data_dir, "fashion_mnist")


def test_real_shapes_dtypes_and_range(real):
    assert real.x_train.shape == (55000, 28, 28, 1) and real.x_train.dtype == np.float32
    assert real.x_valid.shape == (5000, 28, 28, 1) and real.x_valid.dtype == np.float32
    assert real.x_test.shape == (10000, 28, 28, 1) and real.x_test.dtype == np.float32
    assert real.y_train.shape == (55000,) and real.y_train.dtype == np.int32
    assert real.y_valid.shape == (5000,) and real.y_valid.dtype == np.int32
    assert real.y_test.shape == (10000,) and real.y_test.dtype == np.int32
    for x in (real.x_train, real.x_valid, real.x_test):
        assert x.min() == 0.0 and x.max() == 1.0  # full range used, scaled by 255
    assert real.num_classes == 10 and real.in_features == 784
    assert real.class_names[9] == "Ankle boot"


def test_real_class_balance(real):
    # Fashion-MNIST is exactly balanced: 6000 per class in the official train split, 1000 in test.
    train_valid = np.concatenate([real.y_train, real.y_valid])
    assert np.bincount(train_valid, minlength=10).tolist() == [6000] * 10
    assert np.bincount(real.y_test, minlength=10).tolist() == [1000] * 10


def test_real_validation_is_first_5000_official_images(real, real_raw):
    # Golden number: the official first training label is 9 (Ankle boot).
    assert real_raw["train_labels"][0] == 9
    assert real.y_valid[0] == 9
    np.testing.assert_array_equal(real.x_valid[..., 0], real_raw["train_images"][:5000] / np.float32(255))
    np.testing.assert_array_equal(real.y_valid, real_raw["train_labels"][:5000])
    np.testing.assert_array_equal(real.x_train[..., 0], real_raw["train_images"][5000:] / np.float32(255))
    np.testing.assert_array_equal(real.y_test, real_raw["test_labels"])


# --------------------------------------------------------------------------------------------
# Bad inputs: each a DataError with a specific one-line message
# --------------------------------------------------------------------------------------------


def _raw_arrays(n_train=30, n_test=10, size=6, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }


def _write_folder(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for key, arr in arrays.items():
        write_idx_gz(folder / FILES[key], arr)
    return folder


@pytest.fixture
def idx_folder(tmp_path):
    return _write_folder(tmp_path / "idx", _raw_arrays())


def _copy_real(real_data_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in FILES.values():
        shutil.copyfile(real_data_dir / name, dest / name)
    return dest


def test_synthetic_folder_loads(idx_folder):
    # The baseline for the error tests below: the same folder, intact, loads.
    raw = _raw_arrays()
    ds = load_dataset("mnist", idx_folder, valid_size=10)
    assert ds.x_train.shape == (20, 6, 6, 1) and ds.x_valid.shape == (10, 6, 6, 1)
    np.testing.assert_array_equal(ds.x_valid[..., 0], raw["train_images"][:10] / np.float32(255))
    np.testing.assert_array_equal(ds.y_train, raw["train_labels"][10:])
    np.testing.assert_array_equal(ds.y_test, raw["test_labels"])


def test_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=r"data folder .*nowhere does not exist"):
        load_dataset("fashion_mnist", missing)
    with pytest.raises(DataError, match=r"data folder .*nowhere does not exist"):
        idx_lib.read_idx_folder(missing)


def test_missing_file_is_named(idx_folder):
    (idx_folder / FILES["test_labels"]).unlink()
    with pytest.raises(DataError) as err:
        load_dataset("mnist", idx_folder, valid_size=10)
    msg = str(err.value)
    assert "lacks t10k-labels-idx1-ubyte.gz" in msg
    assert "train-images-idx3-ubyte.gz" not in msg  # only what is really missing is named
    assert "\n" not in msg


def test_empty_folder_names_all_files(tmp_path):
    with pytest.raises(DataError) as err:
        idx_lib.read_idx_folder(tmp_path, "fashion_mnist")
    msg = str(err.value)
    assert all(name in msg for name in FILES.values())
    assert "zalandoresearch" in msg  # says where to get them


def test_truncated_gzip(real_data_dir, tmp_path):
    folder = _copy_real(real_data_dir, tmp_path / "fm")
    path = folder / FILES["train_images"]
    path.write_bytes(path.read_bytes()[:100000])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: truncated or corrupt gzip"):
        load_dataset("fashion_mnist", folder)


def test_truncated_gzip_synthetic(idx_folder):
    path = idx_folder / FILES["test_images"]
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: truncated or corrupt gzip"):
        load_dataset("mnist", idx_folder, valid_size=10)


def test_not_gzip(idx_folder):
    (idx_folder / FILES["train_labels"]).write_bytes(b"<html>404 not found</html>")
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: truncated or corrupt gzip"):
        load_dataset("mnist", idx_folder, valid_size=10)


def test_checksum_mismatch_real(real_data_dir, tmp_path, real_raw):
    folder = _copy_real(real_data_dir, tmp_path / "fm")
    labels = real_raw["test_labels"].copy()
    # Re-compressed but identical content still verifies (the sha256 is of the uncompressed bytes).
    write_idx_gz(folder / FILES["test_labels"], labels)
    assert (folder / FILES["test_labels"]).read_bytes() != (real_data_dir / FILES["test_labels"]).read_bytes()
    assert idx_lib.read_idx_folder(folder, "fashion_mnist")["test_labels"].tolist() == labels.tolist()
    # One altered label: a valid IDX file, but not the published one.
    labels[0] = (labels[0] + 1) % 10
    write_idx_gz(folder / FILES["test_labels"], labels)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: sha256 .* does not match the "
                                        r"published fashion_mnist file"):
        load_dataset("fashion_mnist", folder)
    # Without verification (or under a name with no checksum) the structure alone is checked.
    assert idx_lib.read_idx_folder(folder, "fashion_mnist", verify=False)["test_labels"][0] == labels[0]


def test_checksum_mismatch_synthetic(idx_folder):
    # The same structurally valid files load as "mnist" (no checksum) but not as "fashion_mnist".
    idx_lib.read_idx_folder(idx_folder, "mnist")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: sha256 .* does not match"):
        load_dataset("fashion_mnist", idx_folder, valid_size=10)


def _write_raw_gz(path: Path, raw: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(raw)


def test_wrong_magic_number(idx_folder):
    images = _raw_arrays()["train_images"]
    header = (2052).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    _write_raw_gz(idx_folder / FILES["train_images"], header + images.tobytes())
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: wrong IDX magic number 0x00000804"):
        load_dataset("mnist", idx_folder, valid_size=10)


def test_header_shape_not_matching_content(idx_folder):
    images = _raw_arrays()["train_images"]  # 30 x 6 x 6
    header = (2051).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in (31, 6, 6))
    _write_raw_gz(idx_folder / FILES["train_images"], header + images.tobytes())
    with pytest.raises(DataError, match=r"header says shape \(31, 6, 6\) \(1116 bytes\) but the file holds "
                                        r"1080 bytes"):
        load_dataset("mnist", idx_folder, valid_size=10)


def test_too_short_file(idx_folder):
    _write_raw_gz(idx_folder / FILES["test_labels"], b"\x00\x00\x08")
    with pytest.raises(DataError, match=r"too short to be an IDX file \(3 bytes\)"):
        load_dataset("mnist", idx_folder, valid_size=10)


def test_label_out_of_range(idx_folder):
    labels = _raw_arrays()["test_labels"]
    labels[3] = 10
    write_idx_gz(idx_folder / FILES["test_labels"], labels)
    with pytest.raises(DataError, match=r"test labels range up to 10, expected 0\.\.9"):
        load_dataset("mnist", idx_folder, valid_size=10)


def test_images_labels_count_mismatch(idx_folder):
    write_idx_gz(idx_folder / FILES["train_labels"], _raw_arrays()["train_labels"][:29])
    with pytest.raises(DataError, match=r"train has 30 images but 29 labels"):
        load_dataset("mnist", idx_folder, valid_size=10)


def test_empty_split(idx_folder):
    write_idx_gz(idx_folder / FILES["test_images"], np.zeros((0, 8, 8), np.uint8))
    write_idx_gz(idx_folder / FILES["test_labels"], np.zeros(0, np.uint8))
    with pytest.raises(DataError, match=r"the test split holds no images"):
        load_dataset("mnist", idx_folder, valid_size=10)


def test_swapped_images_and_labels(idx_folder):
    raw = _raw_arrays()
    write_idx_gz(idx_folder / FILES["test_images"], raw["test_labels"])
    write_idx_gz(idx_folder / FILES["test_labels"], raw["test_images"])
    with pytest.raises(DataError, match=r"swapped"):
        load_dataset("mnist", idx_folder, valid_size=10)


def test_truncated_header(idx_folder):
    _write_raw_gz(idx_folder / FILES["train_images"], (2051).to_bytes(4, "big") + (5).to_bytes(4, "big"))
    with pytest.raises(DataError, match=r"truncated IDX header \(8 bytes, 16 expected\)"):
        load_dataset("mnist", idx_folder, valid_size=10)


@pytest.mark.parametrize("name", ["kmnist", "cifar10"])
def test_idx_folder_is_not_read_as_another_dataset(idx_folder, tmp_path, name):
    # the IDX files hold mnist or fashion_mnist; any other name must not load them silently
    with pytest.raises(DataError, match=rf"holds MNIST-format IDX files, .* not as '{name}'"):
        load_dataset(name, idx_folder, cache_dir=tmp_path / "cache", valid_size=10)


def test_fashion_files_are_not_read_as_mnist(real_data_dir, tmp_path):
    with pytest.raises(DataError, match=r"holds the fashion_mnist files, not mnist's"):
        load_dataset("mnist", real_data_dir, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("valid_size", [0, -3])
def test_valid_size_must_be_positive(valid_size):
    x, y = np.zeros((10, 2, 2), np.uint8), np.zeros(10, np.uint8)
    with pytest.raises(DataError, match=r"valid_size must be at least 1"):
        from_arrays("toy", x, y, x, y, valid_size=valid_size)


def test_too_few_training_images_for_validation(idx_folder):
    with pytest.raises(DataError, match=r"30 training images, need more than the 5000 held out"):
        load_dataset("mnist", idx_folder)


# --------------------------------------------------------------------------------------------
# save_samples and $LRJAX_DATA_DIR
# --------------------------------------------------------------------------------------------


def test_save_samples_writes_png(tmp_path):
    ds = synthetic(n_train=40, n_test=10, valid=10)
    path = tmp_path / "samples.png"
    save_samples(ds, path, rows=2, cols=5)
    blob = path.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    pixels = matplotlib.image.imread(path)[..., :3].mean(-1)  # 1 is white
    assert pixels.shape[1] == 600  # 5 columns of 1.2 inches at 100 dpi
    # every cell of the 2 x 5 grid shows an image (dark pixels in its lower, non-title part)
    cells = [pixels[r * pixels.shape[0] // 2:(r + 1) * pixels.shape[0] // 2][-pixels.shape[0] // 4:,
                    c * 120:(c + 1) * 120] for r in range(2) for c in range(5)]
    assert all((cell < 0.5).sum() > 50 for cell in cells)


@pytest.mark.parametrize("shape", [(40, 12, 16, 3), (40, 10, 10, 1), (33, 8, 8)])  # colour, channel axis, few
def test_save_samples_any_image_shape(tmp_path, shape):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, shape, np.uint8), rng.integers(0, 10, shape[0]).astype(np.uint8)
    ds = from_arrays("t", x, y, x[:5], y[:5], valid_size=30)  # 3..10 training images for a 4 x 10 grid
    save_samples(ds, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_env_data_dir_is_honoured(idx_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("LRJAX_DATA_DIR", str(idx_folder))
    monkeypatch.setenv("LRJAX_CACHE_DIR", str(tmp_path / "cache"))
    ds = load_dataset("mnist", valid_size=10)
    np.testing.assert_array_equal(ds.y_test, _raw_arrays()["test_labels"])
    assert str(idx_folder) in ds.source
    # An explicit data_dir wins over the variable.
    other = _write_folder(tmp_path / "other", _raw_arrays(n_train=25, seed=1))
    assert load_dataset("mnist", other, valid_size=10).x_train.shape[0] == 15
    # And a variable pointing nowhere is reported as such.
    monkeypatch.setenv("LRJAX_DATA_DIR", str(tmp_path / "gone"))
    with pytest.raises(DataError, match=r"gone does not exist \(--data-dir / LRJAX_DATA_DIR\)"):
        load_dataset("mnist")


def test_take_and_from_arrays_split():
    ds = synthetic(n_train=50, n_test=20, valid=10)
    small = ds.take(5, 3, 2)
    assert (len(small.x_train), len(small.x_valid), len(small.x_test)) == (5, 3, 2)
    np.testing.assert_array_equal(small.x_train, ds.x_train[:5])
    assert data_lib.VALID_SIZE == 5000


# --------------------------------------------------------------------------------------------
# Checksums remembered in the cache folder
# --------------------------------------------------------------------------------------------


def _settle(folder: Path) -> None:
    """Backdates the files a minute: digests are remembered only for files not just written."""
    old = time.time() - 60
    for name in FILES.values():
        os.utime(folder / name, (old, old))


def _entry(cache: Path, path: Path) -> Path:
    [entry] = [e for e in (cache / "idx").glob("*.json") if json.loads(e.read_text())["path"] == str(path)]
    return entry


@pytest.fixture
def known_mnist(idx_folder, monkeypatch):
    """The synthetic folder's files as the published MNIST ones (MNIST ships without checksums)."""
    sums = {key: hashlib.sha256(gzip.decompress((idx_folder / name).read_bytes())).hexdigest()
            for key, name in FILES.items()}
    monkeypatch.setitem(idx_lib.SHA256, "mnist", sums)
    return idx_folder


def test_a_remembered_checksum_is_used_until_the_file_changes(known_mnist, tmp_path):
    cache, labels = tmp_path / "cache", known_mnist / FILES["test_labels"]
    _settle(known_mnist)
    load_dataset("mnist", known_mnist, cache_dir=cache, valid_size=10)
    assert len(list((cache / "idx").glob("*.json"))) == 4
    assert not any(p.name != "idx" for p in known_mnist.iterdir() if p.is_dir())  # nothing next to the data
    # The next load believes the remembered digest (a forged one shows it)...
    entry = _entry(cache, labels)
    forged = json.loads(entry.read_text())
    entry.write_text(json.dumps({**forged, "sha256": "0" * 64}))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: sha256 0000000000000000\.\.\. does not match"):
        load_dataset("mnist", known_mnist, cache_dir=cache, valid_size=10)
    # ...but not once the file changed: here the same content rewritten, so it verifies again.
    write_idx_gz(labels, _raw_arrays()["test_labels"])
    load_dataset("mnist", known_mnist, cache_dir=cache, valid_size=10)


def test_a_file_altered_in_place_is_hashed_again(known_mnist, tmp_path):
    # One label changed, the same size and modification time as before: only the file's change
    # time (which no program can set back) tells, and the cached digest does not apply.
    cache, labels = tmp_path / "cache", known_mnist / FILES["test_labels"]
    raw = _raw_arrays()["test_labels"]
    header = (2049).to_bytes(4, "big") + len(raw).to_bytes(4, "big")
    with gzip.open(labels, "wb", compresslevel=0) as f:  # stored blocks: the size follows the content's
        f.write(header + raw.tobytes())
    idx_lib.SHA256["mnist"]["test_labels"] = hashlib.sha256(header + raw.tobytes()).hexdigest()
    _settle(known_mnist)
    load_dataset("mnist", known_mnist, cache_dir=cache, valid_size=10)
    before = labels.stat()
    raw[0] = (raw[0] + 1) % 10
    with gzip.open(labels, "wb", compresslevel=0) as f:
        f.write(header + raw.tobytes())
    os.utime(labels, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert labels.stat().st_size == before.st_size and labels.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: sha256 .* does not match"):
        load_dataset("mnist", known_mnist, cache_dir=cache, valid_size=10)


def test_a_checksum_is_not_remembered_for_a_file_just_written(known_mnist, tmp_path):
    # A file written within the file system's timestamp granularity could change again unseen.
    load_dataset("mnist", known_mnist, cache_dir=tmp_path / "cache", valid_size=10)
    assert not list((tmp_path / "cache").glob("idx/*.json"))


def test_a_damaged_cache_entry_is_ignored(known_mnist, tmp_path):
    cache = tmp_path / "cache"
    _settle(known_mnist)
    load_dataset("mnist", known_mnist, cache_dir=cache, valid_size=10)
    _entry(cache, known_mnist / FILES["train_images"]).write_text("{not json")
    ds = load_dataset("mnist", known_mnist, cache_dir=cache, valid_size=10)
    np.testing.assert_array_equal(ds.y_test, _raw_arrays()["test_labels"])
    assert json.loads(_entry(cache, known_mnist / FILES["train_images"]).read_text())["sha256"]  # written anew


def test_a_remembered_file_is_read_from_its_uncompressed_copy(known_mnist, tmp_path, monkeypatch):
    cache, images = tmp_path / "cache", known_mnist / FILES["train_images"]
    _settle(known_mnist)
    first = load_dataset("mnist", known_mnist, cache_dir=cache, valid_size=10)
    copy = _entry(cache, images).with_suffix(".idx")
    assert copy.stat().st_size == len(gzip.decompress(images.read_bytes()))
    real_read = idx_lib._read_bytes
    monkeypatch.setattr(idx_lib, "_read_bytes", lambda path: pytest.fail(f"decompressed {path}"))
    again = load_dataset("mnist", known_mnist, cache_dir=cache, valid_size=10)
    np.testing.assert_array_equal(again.x_train, first.x_train)
    # A damaged copy (one byte changed, same size) fails its CRC-32: the .gz is read again.
    damaged = bytearray(copy.read_bytes())
    damaged[-1] ^= 0xFF
    copy.write_bytes(bytes(damaged))
    read = []
    monkeypatch.setattr(idx_lib, "_read_bytes", lambda path: read.append(path.name) or real_read(path))
    np.testing.assert_array_equal(load_dataset("mnist", known_mnist, cache_dir=cache, valid_size=10).x_train,
                                  first.x_train)
    assert FILES["train_images"] in read and copy.read_bytes() != bytes(damaged)  # and the copy written anew


def test_multi_member_gzip_reads_whole(idx_folder):
    # gzip.open reads every member of a concatenated file; so does lrjax's one-call reader
    raw = _raw_arrays()["train_labels"]
    blob = (2049).to_bytes(4, "big") + len(raw).to_bytes(4, "big") + raw.tobytes()
    (idx_folder / FILES["train_labels"]).write_bytes(gzip.compress(blob[:5]) + gzip.compress(blob[5:]))
    ds = load_dataset("mnist", idx_folder, valid_size=10)
    np.testing.assert_array_equal(ds.y_valid, raw[:10])
