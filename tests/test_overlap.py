"""lrjax.overlap: background work hands back its value or its error; the PNG child writes the same
file the serial code does, atomically, and reports a write fault as the serial code raises it."""

import errno
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from lrjax import overlap

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def curve():
    lrs = 1e-3 * 1.05 ** np.arange(120)
    losses = 2.3 - np.log(lrs / 1e-3) / 4 + np.where(lrs > 0.1, (lrs - 0.1) * 40, 0)
    return SimpleNamespace(lrs=lrs, losses=losses, smoothed=losses, num_seeds=1,
                           suggestions={"valley": 0.02, "seed": 0.05}, method="seed", diverged_lr=0.3,
                           val_steps=np.array([], np.int64), val_losses=np.array([]), optimizer="sgd",
                           batch_size=32)


def test_background_returns_the_value_from_another_thread(monkeypatch):
    monkeypatch.delenv("LRJAX_SERIAL", raising=False)
    started = threading.Event()
    go = threading.Event()

    def work(x):
        started.set()
        assert go.wait(10), "the caller never let the background call finish"
        return x * 2, threading.current_thread()

    task = overlap.Background(work, 21)
    assert started.wait(10)  # it runs while the caller goes on: the caller still holds `go`
    assert not task.done()
    go.set()
    value, thread = task.result()
    assert value == 42 and thread is not threading.main_thread()


def test_background_raises_its_error_in_the_caller(monkeypatch):
    monkeypatch.delenv("LRJAX_SERIAL", raising=False)

    def fail():
        raise ValueError("bad IDX header")

    task = overlap.Background(fail)
    with pytest.raises(ValueError, match="bad IDX header"):
        task.result()


def test_serial_runs_at_once_in_the_caller(monkeypatch):
    monkeypatch.setenv("LRJAX_SERIAL", "1")
    calls = []
    task = overlap.Background(lambda: calls.append(threading.current_thread()) or "done")
    assert calls == [threading.current_thread()]  # before result() is asked for
    assert task.done() and task.result() == "done"
    assert overlap.PngChild()._proc is None


@pytest.mark.parametrize("serial", ["0", "1"])
def test_png_child_writes_the_png_atomically(tmp_path, monkeypatch, serial):
    monkeypatch.setenv("LRJAX_SERIAL", serial)
    path = tmp_path / "lr_find.png"
    with overlap.PngChild() as png:
        png.draw(curve(), path)
        png.wait()
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["lr_find.png"]  # no temporary file left behind


def test_png_child_raises_the_serial_codes_os_error(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("not a folder")
    path = tmp_path / "a_file" / "lr_find.png"
    errors = {}
    for serial in ("1", "0"):
        monkeypatch.setenv("LRJAX_SERIAL", serial)
        with overlap.PngChild() as png, pytest.raises(OSError) as info:
            png.draw(curve(), path)
            png.wait()
        errors[serial] = (info.value.errno, info.value.filename)
    assert errors["0"] == errors["1"]
    assert errors["0"][0] in (errno.EEXIST, errno.ENOTDIR)


def test_png_child_closed_without_a_curve_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("LRJAX_SERIAL", raising=False)
    png = overlap.PngChild()
    png.close()
    assert png._proc.returncode == 0
    assert list(tmp_path.iterdir()) == []


def test_png_child_imports_no_jax():
    # the child's imports and warm-up with the lrjax package stood in for: plots and what it needs,
    # JAX never (the package's own import would bring JAX, seconds of the core the parent is working on)
    import subprocess
    import sys
    from pathlib import Path

    check = overlap._CHILD_IMPORTS + overlap._CHILD_WARM + "\nassert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)\n"
    out = subprocess.run([sys.executable, "-c", check, str(Path(overlap.__file__).parent)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
