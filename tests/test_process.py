"""The CLI's read ahead (lrjax.overlap.read_ahead): the data a job loads are the serial code's, and
its errors are, whether the guess from the command line was right, wrong, or turned off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lrjax import overlap, workflow
from lrjax.config import Config
from lrjax.errors import DataError
from lrjax.idx import FILES, write_idx_gz

ROOT = Path(__file__).resolve().parents[1]

from lrjax import data as _data

AHEAD = dict(make=_data.from_arrays, data_dir=_data.default_data_dir, cache_dir=_data.default_cache_dir)


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "idx"
    folder.mkdir()
    for split, n in (("train", 5040), ("test", 10)):  # 5000 of train: validation
        write_idx_gz(folder / FILES[f"{split}_images"], rng.integers(0, 256, (n, 6, 6), dtype=np.uint8))
        write_idx_gz(folder / FILES[f"{split}_labels"], (np.arange(n) % 10).astype(np.uint8))
    return folder


@pytest.fixture(autouse=True)
def no_read_left(monkeypatch):
    monkeypatch.delenv("LRJAX_SERIAL", raising=False)
    yield
    overlap.drop_read_ahead()


def argv(idx_dir, cache, *more):
    return ["find-lr", "--dataset", "mnist", "--data-dir", str(idx_dir), "--cache-dir", str(cache), *more]


def cfg(idx_dir, cache, **kw):
    return Config(dataset="mnist", data_dir=str(idx_dir), cache_dir=str(cache), progress=False, **kw)


def same(a, b):
    for name in ("x_train", "y_train", "x_valid", "y_valid", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert getattr(a, name).dtype == getattr(b, name).dtype
    assert a.source == b.source and a.name == b.name


@pytest.mark.parametrize("mode", ["auto", "resident"])
def test_the_job_takes_the_read_ahead_and_gets_the_serial_data(idx_dir, tmp_path, monkeypatch, mode):
    serial = workflow.load(cfg(idx_dir, tmp_path / "c0", input=mode))
    overlap.read_ahead(argv(idx_dir, tmp_path / "c", "--input", mode), **AHEAD)
    ahead = overlap._ahead
    assert ahead is not None
    data = workflow.load(cfg(idx_dir, tmp_path / "c", input=mode))
    assert data is ahead._task._value  # the thread's own arrays are handed over
    assert overlap._ahead is None  # taken once
    same(data, serial)
    assert set(overlap.spans(lambda t: t)) >= {"data_read_ahead"}


def test_a_wrong_guess_reads_again_with_the_same_result(idx_dir, tmp_path, monkeypatch):
    from lrjax import idx

    overlap.read_ahead(argv(idx_dir, tmp_path / "guessed"), **AHEAD)  # the job then reads with another cache folder
    overlap._ahead.read()
    calls, read = [], idx.read_idx_folder
    monkeypatch.setattr(idx, "read_idx_folder", lambda *a, **kw: calls.append(kw["cache_dir"]) or read(*a, **kw))
    data = workflow.load(cfg(idx_dir, tmp_path / "actual"))
    assert calls == [str(tmp_path / "actual")]  # read by the job itself, with its own arguments
    monkeypatch.undo()
    same(data, workflow.load(cfg(idx_dir, tmp_path / "c0")))


def test_a_read_error_is_raised_by_the_job_as_the_serial_read_raises_it(idx_dir, tmp_path):
    (idx_dir / FILES["test_labels"]).write_bytes(b"not gzip at all")
    with pytest.raises(DataError) as serial:
        workflow.load(cfg(idx_dir, tmp_path / "c0"))
    overlap.read_ahead(argv(idx_dir, tmp_path / "c"), **AHEAD)
    assert overlap._ahead is not None
    with pytest.raises(DataError) as ahead:
        workflow.load(cfg(idx_dir, tmp_path / "c"))
    assert str(ahead.value).replace(str(tmp_path / "c"), "C") == str(serial.value).replace(str(tmp_path / "c0"), "C")


@pytest.mark.parametrize("line", [["sweep", "--data-dir", "X"], ["find-lr", "--data-dir"], ["find-lr", "--tfds-data-dir", "t"],
                                  ["find-lr", "--dataset", "cifar10", "--data-dir", "X"], []])
def test_no_read_ahead_where_the_command_line_names_no_idx_read(idx_dir, line):
    overlap.read_ahead([str(idx_dir) if x == "X" else x for x in line], **AHEAD)
    assert overlap._ahead is None


def test_serial_reads_nothing_ahead(idx_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LRJAX_SERIAL", "1")
    overlap.read_ahead(argv(idx_dir, tmp_path / "c"), **AHEAD)
    assert overlap._ahead is None and overlap.spans(lambda t: t) == {}


def test_the_cli_imports_no_jax_before_it_starts_the_read():
    # the read ahead overlaps JAX's import only if the CLI's own module (and lrjax's __init__) bring none
    probe = "import sys, lrjax, lrjax.cli\nprint(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().replace("'", '"')) == []


def test_lrjax_exports_every_public_name_lazily():
    import lrjax

    assert set(lrjax.__all__) == set(lrjax._EXPORTS)
    assert lrjax.find_lr is workflow.find_lr and lrjax.Config is Config
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lrjax.nope
