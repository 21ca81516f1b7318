"""Faults a cluster job meets, injected: a disk that fills during a save (a real tmpfs where the test
can mount one, else an injected ENOSPC), a read-only workdir, an asynchronous save that raises, a
transient read error at resume, TensorBoard's writer failing, SIGKILL at random moments, SIGTERM and
a second Ctrl-C. Each ends in one line naming the path and cause, intact checkpoints, and a rerun
that resumes to the same result as an uninterrupted run."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from lrjax import cli, faults, tb
from lrjax.checkpoint import Checkpointer
from lrjax.errors import CheckpointError, WriteError
from lrjax.idx import FILES, write_idx_gz
from lrjax.models import mlp
from lrjax.monitors import EarlyStopping
from lrjax.train import fit

from conftest import strip_times, synthetic

ENOSPC_TEXT = os.strerror(errno.ENOSPC)


# ---------------------------------------------------------------------------------------------
# Fixtures: small filesystems (root only) and injected errors
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, ro=False) -> a folder on a fresh tmpfs of that size; skips where mount fails."""
    mounted = []

    def mount(size: str, ro: bool = False) -> Path:
        folder = tmp_path / f"fs{len(mounted)}"
        folder.mkdir()
        opts = f"size={size}" + (",ro" if ro else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def remount(folder: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)


@pytest.fixture
def fail_meta_save(monkeypatch):
    """fail(steps, error): the asynchronous write of those steps' meta raises `error` (as the disk
    would, in Orbax's background thread)."""

    original = ocp.JsonCheckpointHandler._save_fn

    def fail(steps, error):
        async def save_fn(self, x, directory):
            if isinstance(x, dict) and x.get("epoch", x.get("step")) in steps:
                raise error
            return await original(self, x, directory)

        monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", save_fn)

    return fail


@pytest.fixture(autouse=True)
def _no_retry_pauses(monkeypatch):
    monkeypatch.setattr(faults, "RETRY_DELAY_S", 0.0)


def tree(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {"w": jnp.asarray(rng.normal(size=(64, 64)).astype(np.float32)), "step": jnp.asarray(step)}


def meta(step: int) -> dict:
    return {"epoch": step, "history": [], "early_stopping": {}, "run_name": "r"}


def same(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def step_dirs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---------------------------------------------------------------------------------------------
# What an error means: the errno behind a library's wrapping
# ---------------------------------------------------------------------------------------------

def _chained(inner: BaseException, outer: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as e:
            raise outer from e
    except BaseException as e:
        return e


@pytest.mark.parametrize("error, cause, path", [
    (OSError(errno.ENOSPC, ENOSPC_TEXT, "/data/w/metrics.json"), "space", "/data/w/metrics.json"),
    (ValueError('RESOURCE_EXHAUSTED: Error writing "x" in OCDBT database at local file "/data/w/c/5.orbax-'
                'checkpoint-tmp/": Failed to write 711406 bytes to file 20: No space left on device '
                "[os_error_code='28']"), "space", "/data/w/c/5.orbax-checkpoint-tmp/"),
    (_chained(OSError(errno.EROFS, "Read-only file system", "/ro/w"), RuntimeError("save failed")),
     "read-only", "/ro/w"),
    (ExceptionGroup("writes", [KeyError("k"), PermissionError(errno.EACCES, "Permission denied", "/p")]),
     "permission denied", "/p"),
    (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), "quota", None),
])
def test_write_faults_are_recognised_through_wrappers(error, cause, path):
    line = faults.describe_os_error(error)
    assert line is not None and cause in line
    assert faults.is_write_fault(error)
    if path:
        assert path in line


def test_other_errors_are_not_faults():
    for error in (ValueError("structures do not match"), FileNotFoundError(errno.ENOENT, "gone", "/x"),
                  RuntimeError("boom")):
        assert faults.describe_os_error(error) is None and not faults.is_write_fault(error)


def test_retry_repeats_transient_errors_only():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return "read"

    assert faults.retry(flaky) == "read" and len(calls) == 3
    calls.clear()
    with pytest.raises(OSError):
        faults.retry(lambda: calls.append(1) or (_ for _ in ()).throw(OSError(errno.EIO, "x")), attempts=2)
    assert len(calls) == 2
    calls.clear()
    with pytest.raises(ValueError):
        faults.retry(lambda: calls.append(1) or (_ for _ in ()).throw(ValueError("damaged")))
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------
# Checkpoints: a save that fails, at once or in the background
# ---------------------------------------------------------------------------------------------

def test_disk_full_during_a_save_keeps_the_completed_checkpoints(tmpfs, capfd):
    fs = tmpfs("600k")
    directory = fs / "checkpoints"
    ckpt = Checkpointer(directory, keep_latest=100)
    with pytest.raises(WriteError) as info:
        for step in range(1, 100):
            ckpt.save(step, tree(step), meta(step), {"val_loss": 1.0 / step})
        ckpt.close()
    ckpt.close()  # closing again after the failure raises nothing more
    message = str(info.value)
    assert "space" in message and str(directory) in message
    done = [int(s) for s in step_dirs(directory) if s.isdigit()]
    assert done and max(done) < 99
    assert "Traceback" not in capfd.readouterr().err
    remount(fs, "20m")
    ckpt = Checkpointer(directory, keep_latest=100)  # removes the unfinished save's tmp folder (in background)
    try:
        for s in done:
            step, restored, _ = ckpt.restore(tree(0), step=s)
            assert same(restored, tree(s))
        ckpt.save(max(done) + 1, tree(0), meta(0), {"val_loss": 0.0})
    finally:
        ckpt.close()
    assert str(max(done) + 1) in step_dirs(directory)
    assert not [s for s in step_dirs(directory) if "tmp" in s]


@pytest.mark.parametrize("fail_at", [2, 3])  # 3: the last save, whose failure surfaces at close
def test_an_asynchronous_save_that_raises_surfaces_once_naming_the_step(tmp_path, fail_meta_save, capfd, fail_at):
    fail_meta_save({fail_at}, OSError(errno.ENOSPC, ENOSPC_TEXT))
    ckpt = Checkpointer(tmp_path / "ck", keep_latest=10)
    with pytest.raises(WriteError, match=f"checkpoint {fail_at} in {tmp_path / 'ck'}: no space") as info:
        for step in range(1, 4):
            ckpt.save(step, tree(step), meta(step), {"val_loss": 1.0})
        ckpt.close()
    ckpt.close()
    assert f"resume from checkpoint {fail_at - 1}" in str(info.value)
    assert "Traceback" not in capfd.readouterr().err
    ckpt = Checkpointer(tmp_path / "ck", keep_latest=10)
    try:
        assert ckpt.all_steps() == list(range(1, fail_at))
        assert same(ckpt.restore(tree(0))[1], tree(fail_at - 1))
    finally:
        ckpt.close()


def test_a_failed_save_that_is_no_write_fault_is_one_checkpoint_error(tmp_path, fail_meta_save):
    fail_meta_save({2}, RuntimeError("something odd\nsecond line"))
    ckpt = Checkpointer(tmp_path / "ck", keep_latest=10)
    with pytest.raises(CheckpointError, match="saving checkpoint 2 .* failed .RuntimeError: something odd.$"):
        ckpt.save(1, tree(1), meta(1), {"val_loss": 1.0})
        ckpt.save(2, tree(2), meta(2), {"val_loss": 1.0})
        ckpt.close()
    ckpt.close()


@pytest.mark.parametrize("debug", [False, True])
def test_orbax_thread_tracebacks_are_quiet_unless_debugging(tmp_path, fail_meta_save, caplog, monkeypatch, debug):
    if debug:
        monkeypatch.setenv("LRJAX_DEBUG", "1")
    fail_meta_save({1}, OSError(errno.ENOSPC, ENOSPC_TEXT))
    ckpt = Checkpointer(tmp_path / "ck")
    with pytest.raises(WriteError):
        ckpt.save(1, tree(1), meta(1), {"val_loss": 1.0})
        ckpt.close()
    logged = [r for r in caplog.records if r.exc_info and "orbax" in r.pathname]
    assert bool(logged) == debug


# ---------------------------------------------------------------------------------------------
# Reading at resume: a transient error is retried and never taken for damage
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def three_steps(tmp_path) -> Path:
    ckpt = Checkpointer(tmp_path / "ck", keep_latest=5)
    for step in (1, 2, 3):
        ckpt.save(step, tree(step), meta(step), {"val_loss": 1.0 / step})
    ckpt.close()
    return tmp_path / "ck"


def flaky_restores(monkeypatch, failures: int, error: Exception) -> list:
    """The first `failures` array restores raise `error`; returns the list of restore calls."""
    calls = []
    original = ocp.CheckpointManager.restore

    def restore(self, step, *args, **kwargs):
        composite = kwargs.get("args")
        if composite is not None and "state" in composite.keys():
            calls.append(step)
            if len(calls) <= failures:
                raise error
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
    return calls


EIO = ValueError("DATA_LOSS: Error reading \"d/abc\" in OCDBT database: Input/output error [os_error_code='5']")


def test_a_transient_read_error_is_retried(three_steps, monkeypatch, capfd):
    calls = flaky_restores(monkeypatch, 2, EIO)
    ckpt = Checkpointer(three_steps)
    try:
        step, restored, _ = ckpt.restore(tree(0))
    finally:
        ckpt.close()
    assert step == 3 and same(restored, tree(3)) and calls == [3, 3, 3]
    assert step_dirs(three_steps) == ["1", "2", "3"]
    assert "unreadable" not in capfd.readouterr().err


@pytest.mark.parametrize("error", [EIO, OSError(errno.ESTALE, os.strerror(errno.ESTALE), "/nfs/ck/3")])
def test_a_read_error_that_persists_is_reported_and_moves_nothing(three_steps, monkeypatch, error):
    calls = flaky_restores(monkeypatch, 1000, error)
    ckpt = Checkpointer(three_steps)
    try:
        with pytest.raises(CheckpointError, match=f"cannot read checkpoint {three_steps / '3'}: .*left in place"):
            ckpt.restore(tree(0))
    finally:
        ckpt.close()
    assert len(calls) == 4  # bounded: faults.retry's attempts, then reported
    assert step_dirs(three_steps) == ["1", "2", "3"]


def test_real_damage_is_still_moved_aside(three_steps, monkeypatch):
    flaky_restores(monkeypatch, 1, ValueError("Error reading: corrupted chunk"))
    ckpt = Checkpointer(three_steps)
    try:
        assert ckpt.restore(tree(0))[0] == 2
    finally:
        ckpt.close()
    assert step_dirs(three_steps) == ["1", "2", "unreadable-3"]


# ---------------------------------------------------------------------------------------------
# Training: disk full, read-only workdir, the one line of the command, TensorBoard
# ---------------------------------------------------------------------------------------------

def train(workdir, epochs=6, **kw):
    data = synthetic(n_train=256, valid=64, n_test=32, size=6, classes=4)
    return fit(mlp(36, (16,), 4, seed=1), optax.sgd, data, lr=0.05, epochs=epochs, batch_size=16, seed=2,
               early_stopping=EarlyStopping(patience=100), workdir=workdir, keep_latest=100, progress=None, **kw)


@pytest.mark.slow
def test_disk_full_during_training_then_resume_equals_an_uninterrupted_run(tmpfs, tmp_path, capfd):
    fs = tmpfs("400k")
    with pytest.raises(WriteError, match="space") as info:
        train(fs / "w", epochs=30)
    assert str(fs / "w") in str(info.value)
    done = sorted(int(s) for s in step_dirs(fs / "w" / "checkpoints") if s.isdigit())
    assert done and done[-1] < 30
    assert "Traceback" not in capfd.readouterr().err
    remount(fs, "50m")
    resumed = train(fs / "w", epochs=30)
    assert resumed.resumed_from == done[-1]
    assert strip_times(resumed.history) == strip_times(train(tmp_path / "fresh", epochs=30).history)


@pytest.mark.slow
def test_an_injected_disk_full_during_training_then_resume(tmp_path, fail_meta_save):
    fail_meta_save({3}, OSError(errno.ENOSPC, ENOSPC_TEXT))
    with pytest.raises(WriteError, match="checkpoint 3 .*space"):
        train(tmp_path / "w")
    fail_meta_save(set(), None)
    resumed = train(tmp_path / "w")
    assert resumed.resumed_from == 2
    assert strip_times(resumed.history) == strip_times(train(tmp_path / "fresh").history)


@pytest.fixture
def readonly(tmpfs, tmp_path, monkeypatch):
    """A read-only folder: a read-only tmpfs where one can be mounted, else an injected EROFS."""
    try:
        return tmpfs("1m", ro=True)
    except pytest.skip.Exception:
        folder = tmp_path / "ro"
        folder.mkdir()
        original = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if self.is_relative_to(folder):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
        return folder


def test_a_read_only_workdir_says_read_only_and_names_it(readonly):
    with pytest.raises(WriteError, match="read-only") as info:
        train(readonly / "w")
    assert str(readonly / "w") in str(info.value)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory) -> Path:
    """A tiny MNIST-format IDX folder: 5,100 train images (5,000 become validation) and 100 test."""
    folder = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(1)
    protos = rng.integers(0, 256, (10, 28, 28))

    def make(n):
        labels = rng.integers(0, 10, n)
        return np.clip(protos[labels] + rng.normal(0, 80, (n, 28, 28)), 0, 255).astype(np.uint8), labels

    (xtr, ytr), (xte, yte) = make(5100), make(100)
    for key, arr in (("train_images", xtr), ("train_labels", ytr), ("test_images", xte), ("test_labels", yte)):
        write_idx_gz(folder / FILES[key], arr.astype(np.uint8))
    return folder


def train_argv(workdir: Path, idx_dir: Path, epochs: int = 4, *extra: str) -> list[str]:
    return ["train", "--workdir", str(workdir), "--data-dir", str(idx_dir), "--dataset", "mnist", "--lr", "0.05",
            "--epochs", str(epochs), "--hidden-sizes", "16", "--patience", "500", "--no-progress",
            "--no-compilation-cache", *extra]


@pytest.mark.parametrize("debug", [False, True])
def test_the_command_prints_one_line_and_exits_1(tmp_path, idx_dir, fail_meta_save, capfd, debug):
    fail_meta_save({2}, OSError(errno.ENOSPC, ENOSPC_TEXT))
    rc = cli.main(train_argv(tmp_path / "w", idx_dir, 4, *(["--debug"] if debug else [])))
    err = capfd.readouterr().err
    assert rc == 1
    lines = [ln for ln in err.splitlines() if ln.startswith("lrjax: error:")]
    assert len(lines) == 1 and "space" in lines[0] and str(tmp_path / "w") in lines[0], err
    assert ("Traceback" in err) == debug
    os.environ.pop("LRJAX_DEBUG", None)  # --debug set it for this process


def test_the_command_on_a_read_only_workdir(readonly, idx_dir, capfd):
    rc = cli.main(train_argv(readonly / "w", idx_dir, 1))
    err = capfd.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"lrjax: error: cannot write {readonly / 'w'}")
    assert "read-only" in err.strip().splitlines()[-1]


def test_a_failing_tensorboard_write_is_one_error(tmp_path, monkeypatch, capfd):
    from tensorboardX import record_writer

    def write(self, data):
        raise OSError(errno.ENOSPC, ENOSPC_TEXT)

    writer = tb.Writer(tmp_path / "tb")
    monkeypatch.setattr(record_writer.RecordWriter, "write", write)
    with pytest.raises(WriteError) as error:
        writer.write_scalars(1, {"loss": 1.0})
    assert "space" in str(error.value) and str(tmp_path / "tb") in str(error.value)
    writer.write_scalars(2, {"loss": 1.0})  # the failed writer is closed: nothing more, no error
    writer.close()
    assert "Traceback" not in capfd.readouterr().err


def test_tensorboard_on_a_full_disk(tmpfs, capfd):
    fs = tmpfs("64k")
    writer = tb.Writer(fs / "tb")
    with open(fs / "filler", "wb") as f, pytest.raises(OSError):
        f.write(os.urandom(1 << 20))
    with pytest.raises(WriteError) as error:
        for i in range(10_000):
            writer.write_scalars(i, {"loss": 1.0})
        writer.close()
    assert "space" in str(error.value) and str(fs / "tb") in str(error.value)
    writer.close()  # closed with its failure: nothing more
    assert "Traceback" not in capfd.readouterr().err


# ---------------------------------------------------------------------------------------------
# Signals and kills
# ---------------------------------------------------------------------------------------------

def test_wait_ready_lets_a_signal_interrupt_while_the_device_computes():
    # A program sized to run ~1 s here (programs with host callbacks run inline on a CPU, so the
    # device is kept busy by arithmetic); an alarm after 0.05 s interrupts the wait for it.
    run = jax.jit(lambda x, n: jax.lax.fori_loop(0, n, lambda i, y: jnp.tanh(y @ x), x))
    x = jnp.full((256, 256), 1 / 256, jnp.float32)
    run(x, 2).block_until_ready()  # compiled
    t0 = time.perf_counter()
    run(x, 20).block_until_ready()
    n = int(20 * 1.0 / max(time.perf_counter() - t0, 1e-6)) + 1

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        y = run(x, n)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            faults.wait_ready(y)
        assert not y.is_ready()  # interrupted while the device still computed
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert faults.wait_ready(y) is y and y.is_ready()


def test_sigterm_mid_run_finishes_the_epoch_and_resumes_identically(tmp_path, capfd):
    class SignalAt2(EarlyStopping):
        def update(self, epoch, metrics):
            if epoch == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().update(epoch, metrics)

    data = synthetic(n_train=256, valid=64, n_test=32, size=6, classes=4)
    args = dict(lr=0.05, epochs=6, batch_size=16, seed=2, workdir=tmp_path / "w", keep_latest=100, progress=None)
    first = fit(mlp(36, (16,), 4, seed=1), optax.sgd, data, early_stopping=SignalAt2(patience=100), **args)
    assert first.interrupted == "SIGTERM" and first.epochs_run < 6
    assert capfd.readouterr().err.count("SIGTERM received") == 1  # reported once, by the loop
    resumed = fit(mlp(36, (16,), 4, seed=1), optax.sgd, data, early_stopping=EarlyStopping(patience=100), **args)
    assert resumed.resumed_from == first.epochs_run
    assert strip_times(resumed.history) == strip_times(train(tmp_path / "fresh").history)


def lrjax_cmd() -> list[str]:
    script = Path(sys.executable).parent / "lrjax"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lrjax.cli"]


def cli_env(tmp: Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", LRJAX_CACHE_DIR=str(tmp / "cache"))
    env.pop("LRJAX_DEBUG", None)
    return env


def checkpoint_steps(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


@pytest.mark.slow
def test_sigkill_at_five_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path, idx_dir):
    env = cli_env(tmp_path)
    argv = [*lrjax_cmd(), *train_argv(tmp_path / "killed", idx_dir, 8)]
    argv.remove("--no-compilation-cache")  # restarts load their programs: more kills land in training
    # the uninterrupted run meanwhile (most of a run here is waiting for saves and process starts)
    fresh = subprocess.Popen([*lrjax_cmd(), *train_argv(tmp_path / "fresh", idx_dir, 8)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rng = np.random.default_rng(0)
    kills = []
    for _ in range(5):
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        before = checkpoint_steps(tmp_path / "killed")
        deadline = time.monotonic() + 120
        while checkpoint_steps(tmp_path / "killed") == before and proc.poll() is None:  # training has started
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))  # a random moment of epochs and saves
        proc.kill()
        proc.communicate()
        kills.append(checkpoint_steps(tmp_path / "killed")[-1:])
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _, fresh_err = fresh.communicate(timeout=300)
    assert fresh.returncode == 0, fresh_err
    a = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    b = json.loads((tmp_path / "fresh" / "metrics.json").read_text())
    for key in ("test_accuracy", "test_loss", "best_val_loss", "best_epoch", "epochs_run"):
        assert a[key] == b[key], (key, kills)
    assert strip_times(a["history"]) == strip_times(b["history"])


@pytest.mark.slow
def test_a_second_ctrl_c_interrupts_and_leaves_intact_checkpoints(tmp_path, idx_dir):
    argv = [*lrjax_cmd(), *train_argv(tmp_path / "w", idx_dir, 100000)]
    proc = subprocess.Popen(argv, env=cli_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not checkpoint_steps(tmp_path / "w"):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "lrjax: interrupted" in err or "stopped by SIGINT" in err, err  # the second came after the epoch
    steps = checkpoint_steps(tmp_path / "w")
    ckpt = Checkpointer(tmp_path / "w" / "checkpoints")
    try:
        assert ckpt.latest_meta()["epoch"] == steps[-1]  # the newest complete checkpoint reads
    finally:
        ckpt.close()


# ---------------------------------------------------------------------------------------------
# Several processes: one decision for all
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_processes_agree_on_falling_back_and_on_refusing(tmp_path):
    """Process 1 alone finds the newest checkpoint damaged, then alone meets a lasting I/O error:
    both processes fall back to the same older step, then both refuse, moving nothing."""
    from test_scale import run_two_processes, run_worker

    run_worker(["fit", tmp_path / "mp"], devices=2)  # 3 epochs: checkpoints 1, 2, 3 (one process writes faster)
    outs = run_two_processes(tmp_path / "mp", extra_env={"LRJAX_TEST_READ_FAULT": "damaged"})
    assert [o[0].split("RESUMED ")[-1].split()[0] for o in outs] == ["2", "2"]
    assert "resuming from checkpoint" in outs[0][1] and "instead" in outs[0][1]
    assert (tmp_path / "mp" / "checkpoints" / "unreadable-3").is_dir()
    before = step_dirs(tmp_path / "mp" / "checkpoints")
    outs = run_two_processes(tmp_path / "mp", extra_env={"LRJAX_TEST_READ_FAULT": "eio"}, check=False, timeout=120)
    assert all("CheckpointError" in err for _, err in outs), [err[-500:] for _, err in outs]
    assert "input/output error; it was left in place" in outs[1][1]
    assert "another process could not read checkpoint" in outs[0][1]
    assert step_dirs(tmp_path / "mp" / "checkpoints") == before


def test_a_second_ctrl_c_inside_a_checkpoint_start_waits_for_it(tmp_path, monkeypatch):
    """Orbax starts a save's thread inside `save()`; a Ctrl-C raised inside `Thread.start` left it
    half-started, and closing the checkpointer then failed ("cannot join thread before it is
    started"). The interrupt is raised once `save()` has returned; the save completes and closes."""
    import threading

    from lrjax.loop import Signals

    ckpt = Checkpointer(tmp_path / "c")
    tree = {"w": jnp.arange(4.0)}
    real_start = threading.Thread.start

    def start(thread):
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, before the thread has started
        real_start(thread)

    with Signals() as signals:
        signals.received = "SIGINT"  # the first came earlier
        monkeypatch.setattr(threading.Thread, "start", start)
        with pytest.raises(KeyboardInterrupt):
            ckpt.save(1, tree, {"epoch": 1}, {"val_loss": 1.0})
        monkeypatch.setattr(threading.Thread, "start", real_start)
        ckpt.close()
    assert Checkpointer(tmp_path / "c").latest_meta() == {"epoch": 1}
    with Signals() as signals:  # outside such a section the second Ctrl-C still interrupts at once
        signals.received = "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)


def test_an_interrupt_lost_in_a_gc_callback_is_raised_again():
    """A second Ctrl-C can land inside a garbage-collector callback (JAX registers one), where Python
    prints "Exception ignored" and drops it: `Signals` keeps it and raises it between chunks."""
    import gc

    from lrjax.loop import Signals

    def callback(phase, info):
        if phase == "start":
            raise KeyboardInterrupt

    seen = []
    previous = sys.unraisablehook
    sys.unraisablehook = lambda u: seen.append(type(u.exc_value))
    try:
        with Signals() as signals:
            gc.callbacks.append(callback)
            try:
                gc.collect()
            finally:
                gc.callbacks.remove(callback)
            with pytest.raises(KeyboardInterrupt):
                signals.check()
            signals.check()  # raised once
            gc.callbacks.append(lambda phase, info: 1 / 0)  # other errors still reach the previous hook
            try:
                gc.collect()
            finally:
                gc.callbacks.pop()
    finally:
        sys.unraisablehook = previous
    assert seen and set(seen) == {ZeroDivisionError}  # (start and stop phases)
