"""Bad input gets one clear error before any work (issue 24): the error's type, the argument it names,
and nothing written to the workdir. Tiny arrays and a tiny MLP; the refusals come before any compile."""

from __future__ import annotations

import re
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrjax
from lrjax import sources, steps, tasks, validate
from lrjax.errors import ConfigError, DataError, TrainingDiverged

H, CLASSES = 4, 3  # 4x4 images, 3 classes


def model(seed: int = 0):
    return lrjax.mlp(H * H, hidden_sizes=(8,), num_classes=CLASSES, seed=seed)


def dataset(n: int = 32, m: int = 16, **changes) -> SimpleNamespace:
    rng = np.random.default_rng(0)
    d = dict(x_train=rng.random((n, H, H), np.float32), y_train=rng.integers(0, CLASSES, n),
             x_valid=rng.random((m, H, H), np.float32), y_valid=rng.integers(0, CLASSES, m))
    d.update(changes)
    return SimpleNamespace(**d)


def with_nan(shape, at):
    x = np.random.default_rng(1).random(shape, np.float32)
    x[at] = np.nan
    return x


# (data changes, the argument the error must name, a phrase of what is wrong)
CASES = {
    "length": (dict(y_train=np.zeros(30, np.int64)), "y_train", "30 examples but x_train has 32"),
    "label_high": (dict(y_train=np.full(32, CLASSES)), "y_train", f"label {CLASSES} at index 0, outside [0, {CLASSES})"),
    "label_negative": (dict(y_train=np.r_[np.zeros(5, int), -1, np.zeros(26, int)]), "y_train",
                       "label -1 at index 5"),
    "nan_pixels": (dict(x_train=with_nan((32, H, H), (7, 1, 2))), "x_train", "nan at x_train[7, 1, 2]"),
    "valid_labels": (dict(y_valid=np.full(16, 15)), "y_valid", "label 15 at index 0"),
    "valid_length": (dict(y_valid=np.zeros(15, np.int64)), "y_valid", "15 examples but x_valid has 16"),
    "empty": (dict(x_train=np.zeros((0, H, H), np.float32), y_train=np.zeros(0, np.int64)), "x_train", "empty"),
    "image_shape": (dict(x_train=np.zeros((32, H + 1, H), np.float32)), "x_train", "does not take examples"),
    "float_labels": (dict(y_train=np.full(32, 1.0)), "y_train", "float64 labels"),
    "string_labels": (dict(y_train=np.array(["cat"] * 32)), "y_train", "not numbers"),
    "one_hot_labels": (dict(y_train=np.eye(CLASSES, dtype=np.int32)[np.zeros(32, int)]), "y_train", "argmax"),
}


def call(fn: str, data, workdir, **kw):
    if fn == "find_lr":
        return lrjax.find_lr(model(), optax.sgd, data, num_steps=4, progress=None, **kw)
    if fn == "sweep":
        return lrjax.sweep(model, optax.sgd, data, [0.01, 0.1], epochs=1, **kw)
    return lrjax.fit(model(), optax.sgd, data, lr=0.01, epochs=1, progress=None, workdir=workdir, **kw)


def assert_nothing_written(workdir):
    assert not workdir.exists() or not any(workdir.rglob("*")), sorted(workdir.rglob("*"))


@pytest.mark.parametrize("fn", ["find_lr", "fit", "sweep"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_arrays_are_refused_naming_the_argument(case, fn, tmp_path):
    changes, arg, what = CASES[case]
    workdir = tmp_path / "w"
    with pytest.raises(DataError) as info:
        call(fn, dataset(**changes), workdir)
    message = str(info.value)
    assert message.startswith(f"{fn}: ") and arg in message and what in message, message
    assert "\n" not in message
    assert_nothing_written(workdir)


def check(who, model, data, **kw):
    """`validate.check_input` on arrays, as the entry points call it."""
    validate.check_input(who, model, data, **kw)


def test_good_arrays_pass_the_checks_without_compiling():
    d = dataset()
    check("fit", model(), d)  # raises nothing
    check("find_lr", model(), dataset(x_valid=None, y_valid=None), need_valid=False)
    # bfloat16 inputs and uint8 images are numbers too
    check("fit", model(), dataset(x_train=d.x_train.astype(jnp.bfloat16)))
    check("fit", model(), dataset(x_train=(d.x_train * 255).astype(np.uint8)))


def test_fit_without_validation_split_names_x_valid(tmp_path):
    with pytest.raises(DataError, match="x_valid"):
        call("fit", dataset(x_valid=None, y_valid=None), tmp_path / "w")
    assert_nothing_written(tmp_path / "w")


def test_nonfinite_value_found_past_an_overflowing_sum():
    # every value finite, the float32 sum overflows: no error
    big = np.full((4, 3), 3e38, np.float32)
    assert validate._first_not_finite(big) is None
    big[2, 1] = np.inf
    index, value, count = validate._first_not_finite(big)
    assert index == (2, 1) and value == np.inf and count == 1


# ---------------------------------------------------------------------------------------------
# Iterables of batches and streamed splits
# ---------------------------------------------------------------------------------------------

def batches(n: int = 6, labels=None, first=None):
    rng = np.random.default_rng(2)
    out = [(rng.random((8, H, H), np.float32), rng.integers(0, CLASSES, 8)) for _ in range(n)]
    if labels is not None:
        out[0] = (out[0][0], labels)
    if first is not None:
        out[0] = first
    return out


def valid_pair():
    d = dataset()
    return d.x_valid, d.y_valid


@pytest.mark.parametrize("fn", ["find_lr", "fit"])
def test_iterable_first_batch_is_checked(fn, tmp_path):
    workdir = tmp_path / "w"
    with pytest.raises(DataError) as info:
        call(fn, batches(labels=np.full(8, 7)), workdir, valid=valid_pair())
    assert "data (its first batch)" in str(info.value) and "label 7" in str(info.value)
    assert_nothing_written(workdir)


@pytest.mark.parametrize("fn", ["find_lr", "fit"])
def test_iterable_of_another_structure_is_refused(fn, tmp_path):
    x = np.zeros((8, H, H), np.float32)
    workdir = tmp_path / "w"
    with pytest.raises(DataError) as info:  # a dict where the default task takes (x, y) pairs
        call(fn, batches(first={"image": x, "label": np.zeros(8, int)}), workdir, valid=valid_pair())
    assert "data (its first batch)" in str(info.value) and "(x, y) pair" in str(info.value)
    assert_nothing_written(workdir)


def test_iterable_of_list_pairs_is_checked_as_pairs():
    data = [list(b) for b in batches(labels=np.full(8, -2))]
    with pytest.raises(DataError, match=r"data \(its first batch\)\[1\] holds label -2"):
        validate.check_first_batch("fit", model(), SimpleNamespace(kind="iterable", feed=SimpleNamespace(
            peek=lambda: data[0])))


def test_iterable_whose_later_batch_changes_structure_names_the_training_data():
    data = batches()
    data[2] = (data[2][0][:, :2], data[2][1])  # images of another shape in the third batch
    with pytest.raises(DataError, match=r"batch 3 .* of the training data differs from the first"):
        call("find_lr", data, None)


@pytest.mark.parametrize("fn", ["find_lr", "fit"])
@pytest.mark.parametrize("bad, message", [
    ("labels", r"data \(its batch 3, pass 1\)\[1\] holds label 7 at index 2, outside \[0, 3\)"),
    ("nan", r"data \(its batch 3, pass 1\)\[0\] holds nan at data \(its batch 3, pass 1\)\[0\]\[4, 1, 0\]")])
def test_iterable_later_batches_are_checked_as_they_are_read(fn, bad, message, tmp_path):
    data = batches()
    x, y = data[2]
    if bad == "labels":
        y = y.copy()
        y[2] = 7
    else:
        x = x.copy()
        x[4, 1, 0] = np.nan
    data[2] = (x, y)
    with pytest.raises(DataError, match=message):
        call(fn, data, tmp_path / "w", valid=valid_pair())


class LabelsHidden:
    """An ArrayExamples whose labels are not an attribute (as a TFDS split's): seen only as they are read."""

    def __init__(self, examples):
        self.examples, self.example_shape = examples, examples.example_shape

    def __len__(self):
        return len(self.examples)

    def read(self, keys):
        return self.examples.read(keys)


def test_streamed_chunks_are_checked_as_they_are_read(tmp_path, monkeypatch):
    import dataclasses

    monkeypatch.setattr(validate, "_STREAM_PROBE", 8)  # the first 8 examples pass; a later one is out of range
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (40, H, H), np.uint8)
    labels = rng.integers(0, CLASSES, 40)
    labels[30] = CLASSES  # validation is the first 8: a training example, past the first chunk
    splits = sources.array_splits(images, labels, images[:8], labels[:8], valid_size=8)
    splits = dataclasses.replace(splits, train=dataclasses.replace(
        splits.train, examples=LabelsHidden(splits.train.examples)))
    for fn in ("find_lr", "fit"):
        with pytest.raises(DataError, match=rf"data \(its train split, chunk \d+\)\[1\] holds label {CLASSES}"):
            call(fn, splits, tmp_path / fn, batch_size=8)


def test_valid_given_beside_an_iterable_is_checked(tmp_path):
    x, y = valid_pair()
    with pytest.raises(DataError, match=r"valid\[1\] holds label 9"):
        call("fit", batches(), tmp_path / "w", valid=(x, np.full_like(y, 9)))
    assert_nothing_written(tmp_path / "w")


def test_streamed_split_labels_are_checked(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (40, H, H), np.uint8)
    labels = rng.integers(0, CLASSES, 40)
    labels[20] = CLASSES + 2  # a training example (validation is the first 8)
    splits = sources.array_splits(images, labels, images[:8], labels[:8], valid_size=8)
    for fn in ("find_lr", "fit"):
        with pytest.raises(DataError) as info:
            call(fn, splits, tmp_path / fn)
        assert "data (its train split) labels" in str(info.value) and f"label {CLASSES + 2}" in str(info.value)
        assert_nothing_written(tmp_path / fn)
    # past the first examples read: every label of an array split is checked (positions in split order)
    monkeypatch.setattr(validate, "_STREAM_PROBE", 4)
    labels[20], labels[39] = 0, -1
    splits = sources.array_splits(images, labels, images[:8], labels[:8], valid_size=8)
    with pytest.raises(DataError, match=r"data \(its train split\) labels holds label -1 at index 31"):
        validate.check_input("fit", model(), splits)


# ---------------------------------------------------------------------------------------------
# Loss functions of the wrong shape
# ---------------------------------------------------------------------------------------------

def scalar_loss(m, batch):
    losses, metrics = tasks.classification(m, batch)
    return losses.mean(), metrics


def wrong_metric(m, batch):
    x, y = batch
    losses, metrics = tasks.classification(m, batch)
    return losses, {"accuracy": metrics["accuracy"], "logits": m(x)}


@pytest.mark.parametrize("fn", ["find_lr", "fit", "sweep"])
@pytest.mark.parametrize("loss_fn, what", [(scalar_loss, "losses for a batch of 2 have shape (), need (2,)"),
                                           (wrong_metric, "metric 'logits' for a batch of 2 have shape (2, 3)")])
def test_loss_fn_of_the_wrong_shape_is_refused(fn, loss_fn, what, tmp_path):
    with pytest.raises(ConfigError) as info:
        call(fn, dataset(), tmp_path / "w", loss_fn=loss_fn)
    assert "loss_fn" in str(info.value) and what in str(info.value), str(info.value)
    assert_nothing_written(tmp_path / "w")


def test_custom_task_skips_the_label_range():
    # a regression task: float targets, no classes
    def mse(m, batch):
        x, y = batch
        return ((m(x)[:, 0] - y) ** 2), {}
    check("fit", model(), dataset(y_train=np.full(32, 5.5), y_valid=np.full(16, -2.0)), loss_fn=mse)
    with pytest.raises(DataError, match="y_train holds nan"):
        check("fit", model(), dataset(y_train=np.full(32, np.nan)), loss_fn=mse)


# ---------------------------------------------------------------------------------------------
# FitResult.evaluate
# ---------------------------------------------------------------------------------------------

def test_evaluate_checks_its_examples():
    result = lrjax.FitResult(state=steps.init_state(model()), history=[], best_epoch=None, best_val_loss=None,
                             epochs_run=0, stopped_early=False)
    d = dataset()
    with pytest.raises(DataError, match=r"evaluate: y holds label 4 at index 0"):
        result.evaluate(d.x_valid, np.full(16, 4))
    with pytest.raises(DataError, match=r"evaluate: y has 10 examples but x has 16"):
        result.evaluate(d.x_valid, d.y_valid[:10])
    with pytest.raises(DataError, match=r"evaluate: x holds nan at x\[3, 0, 0\]"):
        result.evaluate(with_nan((16, H, H), (3, 0, 0)), d.y_valid)


# ---------------------------------------------------------------------------------------------
# A loss that is not finite at the first step: the data or the model, not the rate
# ---------------------------------------------------------------------------------------------

def test_range_test_names_a_nonfinite_parameter():
    m = model()
    m.hidden[0].kernel[...] = m.hidden[0].kernel[...].at[2, 3].set(jnp.nan)
    with pytest.raises(TrainingDiverged) as info:
        lrjax.find_lr(m, optax.sgd, dataset(), num_steps=4, progress=None)
    message = str(info.value)
    assert re.search(r"not finite at the first step at rate [\d.e-]+: the data or the model, not the rate", message)
    assert "parameter hidden.0.kernel holds nan at [2, 3]" in message, message


def nan_loss(m, batch):
    losses, metrics = tasks.classification(m, batch)
    return losses * jnp.nan, metrics


def test_fit_says_first_step_not_the_rate(tmp_path):
    with pytest.raises(TrainingDiverged) as info:
        lrjax.fit(model(), optax.sgd, dataset(), lr=1e-3, epochs=1, progress=None, loss_fn=nan_loss,
                  workdir=None, batch_size=16)
    message = str(info.value)
    assert "not finite at the first step at rate 0.001" in message and "lower the learning rate" not in message


def test_range_test_first_step_without_a_bad_parameter():
    with pytest.raises(TrainingDiverged, match="loss function that is not finite"):
        lrjax.find_lr(model(), optax.sgd, dataset(), num_steps=4, progress=None, loss_fn=nan_loss)


# ---------------------------------------------------------------------------------------------
# Caches that heal: the decoded TFDS arrays (.npz) and the IDX copies
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def fake_tfds(monkeypatch):
    """lrjax.tfds_source without TFDS: a prepared 'mnist' of 30 train and 10 test images; counts decodes."""
    from lrjax import tfds_source

    rng = np.random.default_rng(4)
    splits = {s: (rng.integers(0, 256, (n, 28, 28, 1), np.uint8), rng.integers(0, 10, n).astype(np.int64))
              for s, n in (("train", 30), ("test", 10))}
    decodes = []
    monkeypatch.setattr(tfds_source, "prepared_version", lambda name, data_dir: "3.0.1")
    monkeypatch.setattr(tfds_source, "prepared_fingerprint", lambda name, data_dir: "fixed")
    monkeypatch.setattr(tfds_source, "class_names", lambda name, data_dir: None)
    monkeypatch.setattr(tfds_source, "load_tfds_arrays", lambda *a, **k: decodes.append(1) or splits)
    return splits, decodes


def load_through_tfds(tmp_path):
    return lrjax.load_dataset("mnist", cache_dir=tmp_path / "cache", tfds_data_dir=tmp_path / "tfds", valid_size=5)


def entries(tmp_path):
    return sorted((tmp_path / "cache" / "tfds" / "mnist").glob("*"))


def test_a_truncated_array_cache_entry_is_removed_and_rebuilt(fake_tfds, tmp_path, capsys):
    splits, decodes = fake_tfds
    load_through_tfds(tmp_path)
    [entry] = entries(tmp_path)
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # a partial write
    capsys.readouterr()
    again = load_through_tfds(tmp_path)
    np.testing.assert_array_equal(again.y_test, splits["test"][1])
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "damaged" in lines[0] and str(entry) in lines[0], lines
    assert len(decodes) == 2 and entries(tmp_path) == [entry]
    load_through_tfds(tmp_path)  # the rebuilt entry is good: read, not decoded
    assert len(decodes) == 2 and capsys.readouterr().err == ""


def test_an_array_cache_entry_of_another_shape_is_rebuilt(fake_tfds, tmp_path, capsys):
    splits, decodes = fake_tfds
    load_through_tfds(tmp_path)
    [entry] = entries(tmp_path)
    np.savez(entry, train_images=splits["train"][0], train_labels=splits["train"][1][:3],
             test_images=splits["test"][0], test_labels=splits["test"][1])
    assert load_through_tfds(tmp_path).y_train.shape == (25,)
    assert "damaged" in capsys.readouterr().err and len(decodes) == 2


@pytest.mark.parametrize("errno_", ["EROFS", "ENOSPC"])
def test_a_read_only_or_full_cache_folder_means_running_without_the_cache(fake_tfds, tmp_path, capsys, monkeypatch,
                                                                          errno_):
    import errno
    import os

    from lrjax import data as data_lib

    def refuse(path, **arrays):  # as the filesystem refuses (a chmod would not stop root)
        open(path, "wb").close() if errno_ == "ENOSPC" else None  # a full disk leaves a partial file
        raise OSError(getattr(errno, errno_), os.strerror(getattr(errno, errno_)))

    monkeypatch.setattr(data_lib.np, "savez", refuse)
    ds = load_through_tfds(tmp_path)
    np.testing.assert_array_equal(ds.y_test, fake_tfds[0]["test"][1])
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "running without the cache" in lines[0] and os.strerror(getattr(errno, errno_)) in lines[0]
    assert entries(tmp_path) == []  # the partial file is gone too


def test_two_writers_at_once_leave_one_good_entry(fake_tfds, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    other = tmp_path / "cache" / "tfds" / "mnist"
    other.mkdir(parents=True)
    in_progress = other / "3.0.1-000000000000-000000000000.4242.1.tmp.npz"  # another process's, mid-write
    in_progress.write_bytes(b"PK")
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda _: load_through_tfds(tmp_path), range(2)))
    good = [e for e in entries(tmp_path) if ".tmp" not in e.name]
    assert len(good) == 1 and in_progress.exists()  # the other writer's file is left alone
    with np.load(good[0]) as z:
        np.testing.assert_array_equal(z["train_labels"], fake_tfds[0]["train"][1])


def idx_folder(tmp_path, monkeypatch):
    """Four small settled IDX files whose checksums lrjax.idx knows; (folder, their arrays)."""
    import gzip
    import hashlib
    import os
    import time

    from lrjax import idx as idx_lib

    rng = np.random.default_rng(5)
    folder = tmp_path / "idx"
    folder.mkdir()
    arrays = {"train_images": rng.integers(0, 256, (20, 28, 28)), "train_labels": rng.integers(0, 10, 20),
              "test_images": rng.integers(0, 256, (5, 28, 28)), "test_labels": rng.integers(0, 10, 5)}
    old = time.time() - 60  # settled files: only those are remembered
    for key, array in arrays.items():
        idx_lib.write_idx_gz(folder / idx_lib.FILES[key], array)
        os.utime(folder / idx_lib.FILES[key], (old, old))
    sums = {key: hashlib.sha256(gzip.decompress((folder / name).read_bytes())).hexdigest()
            for key, name in idx_lib.FILES.items()}
    monkeypatch.setitem(idx_lib.SHA256, "mnist", sums)  # checked files are the ones remembered
    return folder, arrays


def test_a_damaged_idx_copy_is_said_and_rebuilt(tmp_path, capsys, monkeypatch):
    from lrjax import idx as idx_lib

    folder, arrays = idx_folder(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    idx_lib.read_idx_folder(folder, "mnist", cache_dir=cache)
    copies = sorted((cache / "idx").glob("*.idx"))
    assert len(copies) == 4
    sizes = [c.stat().st_size for c in copies]
    big = int(np.argmax(sizes))
    copies[big].write_bytes(copies[big].read_bytes()[:100])  # truncated
    capsys.readouterr()
    out = idx_lib.read_idx_folder(folder, "mnist", cache_dir=cache)
    np.testing.assert_array_equal(out["test_labels"], arrays["test_labels"])
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "damaged" in lines[0] and "rebuilding" in lines[0], lines
    assert [c.stat().st_size for c in copies] == sizes  # rebuilt


@pytest.mark.parametrize("errno_", ["EROFS", "ENOSPC"])
def test_a_read_only_or_full_idx_cache_means_running_without_it(tmp_path, capsys, monkeypatch, errno_):
    import errno
    import os
    import pathlib

    from lrjax import idx as idx_lib

    folder, arrays = idx_folder(tmp_path, monkeypatch)

    def refuse(self, target):  # as the filesystem refuses (a chmod would not stop root)
        raise OSError(getattr(errno, errno_), os.strerror(getattr(errno, errno_)))

    monkeypatch.setattr(pathlib.Path, "replace", refuse)
    out = idx_lib.read_idx_folder(folder, "mnist", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(out["train_labels"], arrays["train_labels"])
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "running without the cache" in lines[0] and os.strerror(getattr(errno, errno_)) in lines[0]
    assert list((tmp_path / "cache" / "idx").iterdir()) == []  # nor a partial file


def test_device_arrays_are_checked_where_they_live(monkeypatch):
    # jax arrays off the host (an accelerator's, another process's rows) are reduced with jax.numpy;
    # here the CPU's arrays are taken for such arrays
    monkeypatch.setattr(validate, "_on_host", lambda a: False)
    d = dataset()
    x = jnp.asarray(d.x_train).at[5, 2, 3].set(jnp.inf)
    with pytest.raises(DataError, match=r"x_train holds inf at x_train\[5, 2, 3\] \(1 of"):
        check("fit", model(), dataset(x_train=x))
    with pytest.raises(DataError, match="y_train holds label 3 at index 4"):
        check("fit", model(), dataset(y_train=jnp.asarray(d.y_train).at[4].set(3)))
    check("fit", model(), dataset(x_train=jnp.asarray(d.x_train), y_train=jnp.asarray(d.y_train)))


# ---------------------------------------------------------------------------------------------
# The compilation cache folder (lrjax.jaxcache)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def compilation_cache(tmp_path):
    import jax

    from lrjax import jaxcache

    folder = tmp_path / "jax"
    jaxcache.enable(folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # every program kept, however quick
    yield folder
    jaxcache.enable(None)


def compile_one(scale: float):
    """A program of its own (a constant no other test uses), compiled again after clear_caches."""
    import jax

    jax.clear_caches()
    return float(jax.jit(lambda x: (jnp.sin(x) * scale).sum())(np.arange(5, dtype=np.float32)))


def whole_entry(entry) -> bool:
    from lrjax import jaxcache

    return jaxcache.HealingCache(entry.parent).get(entry.name.removesuffix(jaxcache.SUFFIX)) is not None


def test_a_truncated_compilation_cache_entry_is_removed_and_compiled_again(compilation_cache, capsys):
    from lrjax import jaxcache

    want = compile_one(3.25)
    [entry] = compilation_cache.glob(f"*{jaxcache.SUFFIX}")
    whole = entry.read_bytes()
    assert whole.startswith(jaxcache.MAGIC)
    capsys.readouterr()
    assert compile_one(3.25) == want and capsys.readouterr().err == ""  # read back, no word
    entry.write_bytes(whole[: len(whole) // 2])  # a partial write
    assert compile_one(3.25) == want
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "damaged" in lines[0] and str(entry) in lines[0], lines
    assert whole_entry(entry)  # compiled again and written anew
    entry.write_bytes(whole[:20] + bytes([whole[20] ^ 1]) + whole[21:])  # one bit flipped
    assert compile_one(3.25) == want and "CRC-32" in capsys.readouterr().err
    assert [p.name for p in compilation_cache.iterdir()] == [entry.name]  # no temporary file left


def test_an_entry_jax_wrote_itself_is_replaced_without_a_word(compilation_cache, capsys):
    from lrjax import jaxcache

    compile_one(4.5)
    [entry] = compilation_cache.glob(f"*{jaxcache.SUFFIX}")
    whole = entry.read_bytes()
    entry.write_bytes(whole[jaxcache.HEADER.size:])  # JAX's own format: no header
    capsys.readouterr()
    compile_one(4.5)
    assert capsys.readouterr().err == "" and whole_entry(entry)


@pytest.mark.parametrize("errno_", ["EROFS", "ENOSPC"])
def test_a_read_only_or_full_compilation_cache_means_running_without_it(compilation_cache, capsys, monkeypatch,
                                                                        errno_):
    import errno
    import os

    from lrjax import jaxcache

    def refuse(src, dst):  # as the filesystem refuses (a chmod would not stop root)
        raise OSError(getattr(errno, errno_), os.strerror(getattr(errno, errno_)))

    monkeypatch.setattr(jaxcache.os, "replace", refuse)
    capsys.readouterr()
    assert compile_one(5.75) == pytest.approx(float(np.sin(np.arange(5.0)).sum()) * 5.75, rel=1e-5)
    compile_one(6.75)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "running without the cache" in lines[0] and os.strerror(getattr(errno, errno_)) in lines[0]
    assert list(compilation_cache.iterdir()) == []  # nor a partial file


def test_two_processes_filling_one_entry_leave_it_whole(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from lrjax import jaxcache

    caches = [jaxcache.HealingCache(tmp_path) for _ in range(4)]
    values = [bytes([i]) * 200_000 for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: caches[i].put("k", values[i]), range(4)))
    assert caches[0].get("k") in values and [p.name for p in tmp_path.iterdir()] == ["k-cache"]
