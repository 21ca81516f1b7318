"""Tests of lrjax.tfds_source: TFDS datasets as numpy arrays, prepared offline without TensorFlow."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lrjax import tfds_source
from lrjax.errors import DataError
from lrjax.idx import FILES, read_idx_folder, write_idx_gz
from lrjax.tfds_source import IDX_DATASETS, is_prepared, load_tfds_arrays

REAL_FASHION = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion_mnist"


@pytest.fixture
def idx_dir(tmp_path):
    """A small MNIST-format IDX folder: 120 train and 30 test random images."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "idx"
    folder.mkdir()
    for split, n in (("train", 120), ("test", 30)):
        write_idx_gz(folder / FILES[f"{split}_images"], rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx_gz(folder / FILES[f"{split}_labels"], rng.integers(0, 10, n, dtype=np.uint8))
    return folder


@pytest.fixture
def no_tensorflow(monkeypatch):
    monkeypatch.setattr(tfds_source, "_tensorflow_available", lambda: False)


def test_idx_datasets_constant():
    assert IDX_DATASETS == ("mnist", "fashion_mnist")


@pytest.fixture
def fix_mock_getitems(monkeypatch):
    """Works around a TFDS 4.9.10 bug: mock_data's fake data source fails on batch reads.

    mock_data assigns `__getitems__` to a MagicMock as a plain attribute (unlike `__getitem__`,
    MagicMock does not treat it as a magic method), so it is called without `self` and raises
    "TypeError: _getitems() missing 1 required positional argument: 'record_keys'".
    """
    from tensorflow_datasets.testing import mocking

    def getitems(*args, generator, serialized=False):
        assert not serialized
        return [generator[key] for key in args[-1]]

    monkeypatch.setattr(mocking, "_getitems", getitems)


def test_mock_data_source_without_tensorflow(fix_mock_getitems):
    with tfds.testing.mock_data(num_examples=7):
        out = load_tfds_arrays("mnist", None)
    assert set(out) == {"train", "test"}
    for images, labels in out.values():
        assert images.shape == (7, 28, 28, 1) and images.dtype == np.uint8
        assert labels.shape == (7,) and labels.dtype == np.int64
        assert labels.min() >= 0 and labels.max() <= 9


def test_prepare_from_idx_gives_idx_arrays_in_idx_order(idx_dir, tmp_path, no_tensorflow):
    data_dir = str(tmp_path / "tfds")
    before = sorted(os.listdir(idx_dir))
    assert not is_prepared("mnist", data_dir)

    out = load_tfds_arrays("mnist", data_dir, idx_dir=idx_dir)

    assert is_prepared("mnist", data_dir)
    assert sorted(os.listdir(idx_dir)) == before  # nothing written next to the IDX files
    ref = read_idx_folder(idx_dir, "mnist")
    for split in ("train", "test"):
        images, labels = out[split]
        assert images.dtype == np.uint8 and labels.dtype == np.int64
        np.testing.assert_array_equal(images, ref[f"{split}_images"][..., None])
        np.testing.assert_array_equal(labels, ref[f"{split}_labels"])
    # Reading again needs no IDX folder and gives the same arrays.
    again = load_tfds_arrays("mnist", data_dir)
    np.testing.assert_array_equal(again["train"][0], out["train"][0])


def test_prepared_dataset_is_standard_tfds_with_shuffled_records(idx_dir, tmp_path):
    data_dir = str(tmp_path / "tfds")
    load_tfds_arrays("mnist", data_dir, idx_dir=idx_dir)

    builder = tfds.builder("mnist", data_dir=data_dir)
    assert builder.info.version == tfds.builder("mnist").info.version
    assert builder.info.splits["train"].num_examples == 120
    assert builder.info.splits["test"].num_examples == 30
    train = tfds.data_source("mnist", data_dir=data_dir)["train"]
    stored = np.stack([ex["image"][..., 0] for ex in train])
    ref = read_idx_folder(idx_dir, "mnist")["train_images"]
    # TFDS stores the records shuffled: load_tfds_arrays has to undo that to match the IDX order.
    assert not np.array_equal(stored, ref)
    np.testing.assert_array_equal(stored[np.lexsort(stored.reshape(120, -1).T)],
                                  ref[np.lexsort(ref.reshape(120, -1).T)])


def test_unknown_dataset_name():
    with pytest.raises(DataError, match=r"^unknown TFDS dataset 'no_such_dataset_xyz'$"):
        load_tfds_arrays("no_such_dataset_xyz", None)
    with pytest.raises(DataError, match="unknown TFDS dataset"):
        is_prepared("no_such_dataset_xyz", None)


def test_unprepared_non_idx_dataset_without_tensorflow(tmp_path, idx_dir, no_tensorflow):
    with pytest.raises(DataError) as e:
        load_tfds_arrays("cifar10", str(tmp_path / "tfds"), idx_dir=idx_dir)
    message = str(e.value)
    assert "\n" not in message
    assert "cifar10 is not prepared" in message and "without TensorFlow" in message and "lrjax[tf]" in message


def test_unprepared_mnist_without_idx_dir_or_tensorflow(tmp_path, no_tensorflow):
    with pytest.raises(DataError, match=r"fashion_mnist is not prepared .*--data-dir with the IDX files"):
        load_tfds_arrays("fashion_mnist", str(tmp_path / "tfds"))


def test_bad_idx_folder_is_a_data_error(tmp_path, no_tensorflow):
    with pytest.raises(DataError, match="does not exist"):
        load_tfds_arrays("mnist", str(tmp_path / "tfds"), idx_dir=tmp_path / "missing")
    assert not is_prepared("mnist", str(tmp_path / "tfds"))


def test_data_dir_inside_idx_dir_is_refused(idx_dir):
    with pytest.raises(DataError, match="inside the IDX folder"):
        load_tfds_arrays("mnist", str(idx_dir / "tfds"), idx_dir=idx_dir)
    assert not (idx_dir / "tfds").exists()


@pytest.mark.slow
@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason=f"real Fashion-MNIST IDX files not at {REAL_FASHION}")
def test_real_fashion_mnist(tmp_path, no_tensorflow):
    # About 10 s: ~6 s to prepare (PNG encoding), ~3.5 s to read back 70k images.
    out = load_tfds_arrays("fashion_mnist", str(tmp_path / "tfds"), idx_dir=REAL_FASHION)
    ref = read_idx_folder(REAL_FASHION, "fashion_mnist")
    assert out["train"][0].shape == (60000, 28, 28, 1) and out["test"][0].shape == (10000, 28, 28, 1)
    for split in ("train", "test"):
        np.testing.assert_array_equal(out[split][0][..., 0], ref[f"{split}_images"])
        np.testing.assert_array_equal(out[split][1], ref[f"{split}_labels"])


def test_load_dataset_through_tfds_caches_the_decoded_arrays(tmp_path, idx_dir, monkeypatch):
    from lrjax.data import load_dataset

    idx = read_idx_folder(idx_dir, "mnist")
    kw = dict(cache_dir=tmp_path / "cache", valid_size=20, tfds_data_dir=tmp_path / "tfds")
    first = load_dataset("mnist", idx_dir, **kw)  # prepares from the IDX files, decodes, caches
    assert first.source.startswith("tensorflow-datasets mnist")
    np.testing.assert_array_equal(first.x_train[..., 0], idx["train_images"][20:] / np.float32(255))
    assert list((tmp_path / "cache" / "tfds" / "mnist").glob("*.npz"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    with monkeypatch.context() as m:
        m.setattr(tfds_source, "load_tfds_arrays", no_decoding)
        second = load_dataset("mnist", idx_dir, **kw)
    np.testing.assert_array_equal(second.x_train, first.x_train)
    np.testing.assert_array_equal(second.y_test, first.y_test)
    assert second.class_names == first.class_names

    # The TFDS folder deleted and prepared again from other files: the new data, never the cached arrays.
    shutil.rmtree(tmp_path / "tfds")
    other = tmp_path / "idx2"
    other.mkdir()
    for key, array in idx.items():
        write_idx_gz(other / FILES[key], (array + 1) % 10 if key.endswith("labels") else array)
    third = load_dataset("mnist", other, **kw)
    np.testing.assert_array_equal(third.y_train, (idx["train_labels"][20:] + 1) % 10)
    assert len(list((tmp_path / "cache" / "tfds" / "mnist").glob("*.npz"))) == 1  # the stale entry is gone


def test_unprepared_dataset_in_the_default_data_dir_is_one_clear_error(no_tensorflow, monkeypatch, tmp_path):
    # With data_dir=None, TFDS 4.9.10's data_source raises KeyError (empty splits), not
    # NotImplementedError as for an explicit folder: both must end in the same DataError.
    monkeypatch.setattr(tfds_source, "_open", _raise(KeyError("splits is empty")))
    with pytest.raises(DataError, match="not prepared"):
        load_tfds_arrays("cifar10", str(tmp_path / "nowhere"))


def _raise(error):
    def fail(*args, **kwargs):
        raise error
    return fail
