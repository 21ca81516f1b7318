"""The trainer: early stopping with best weights, bit-identical resume (in process, through `train_job`
and across a real SIGTERM), TensorBoard events, divergence, and an end-to-end `lrjax run` on real data."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lrjax
from lrjax import workflow
from lrjax.checkpoint import Checkpointer
from lrjax.data import from_arrays
from lrjax.errors import TrainingDiverged
from lrjax.idx import FILES, write_idx_gz
from lrjax.monitors import EarlyStopping
from lrjax.train import fit

from conftest import strip_times

LR = 0.05
HIDDEN = (32,)


def noisy_data(n_train=200, valid=100, n_test=100, size=8, classes=4, seed=0, noise=120.0, flip=0.3):
    """Prototype images under heavy noise with 30% random labels: the validation loss of a small MLP
    improves for a dozen epochs and then rises, so early stopping has something to do."""
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, (classes, size, size))

    def make(n):
        labels = rng.integers(0, classes, n)
        x = np.clip(protos[labels] + rng.normal(0, noise, (n, size, size)), 0, 255).astype(np.uint8)
        labels = np.where(rng.random(n) < flip, rng.integers(0, classes, n), labels)
        return x, labels.astype(np.uint8)

    (xtr, ytr), (xte, yte) = make(n_train + valid), make(n_test)
    return from_arrays("noisy", xtr, ytr, xte, yte, valid_size=valid)


@pytest.fixture(scope="module")
def data():
    return noisy_data()


def model(data, seed=0):
    return lrjax.mlp(data.in_features, HIDDEN, data.num_classes, seed=seed)


def run(data, optimizer=optax.sgd, lr=LR, **kw):
    kw.setdefault("batch_size", 16)
    kw.setdefault("progress", None)
    return fit(model(data), optimizer, data, lr=lr, **kw)


def bits(tree) -> list[tuple]:
    return [(str(a.dtype), a.shape, np.asarray(a).tobytes()) for a in jax.tree.leaves(tree)]


def latest_checkpoint(workdir: Path, like):
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        return ckpt.restore(like)
    finally:
        ckpt.close()


def like_tree(result):
    s = result.state
    return {"params": s.params, "rest": s.rest, "opt_state": s.opt_state, "step": s.step, "best_params": s.params,
            "best_rest": s.rest}


# ---------------------------------------------------------------------------------------------
# Early stopping and best weights
# ---------------------------------------------------------------------------------------------

def test_early_stopping_restores_best_weights(data):
    result = run(data, epochs=60, early_stopping=EarlyStopping(patience=3))
    assert result.stopped_early and result.epochs_run < 60
    assert result.epochs_run == result.best_epoch + 3  # Keras: stop after `patience` epochs without improvement
    val_losses = [h["val_loss"] for h in result.history]
    assert [h["epoch"] for h in result.history] == list(range(1, result.epochs_run + 1))
    best = result.history[result.best_epoch - 1]
    assert best["val_loss"] == min(val_losses) == result.best_val_loss
    assert result.history[-1]["val_loss"] > best["val_loss"]
    # the returned state holds the best epoch's weights: re-evaluating them gives that epoch's val_loss
    again = result.evaluate(data.x_valid, data.y_valid)
    assert again["loss"] == pytest.approx(best["val_loss"], rel=1e-6, abs=1e-7)
    assert again["accuracy"] == pytest.approx(best["val_accuracy"], abs=1e-7)

    last = run(data, epochs=60, early_stopping=EarlyStopping(patience=3, restore_best_weights=False))
    assert strip_times(last.history) == strip_times(result.history)  # deterministic
    again = last.evaluate(data.x_valid, data.y_valid)
    assert again["loss"] == pytest.approx(last.history[-1]["val_loss"], rel=1e-6, abs=1e-7)
    assert again["loss"] > best["val_loss"]


def test_min_delta_and_monitor_accuracy(data):
    es = EarlyStopping(monitor="val_accuracy", patience=2, min_delta=0.5)  # nothing can improve by 0.5
    result = run(data, epochs=20, early_stopping=es)
    assert es.mode == "max" and result.best_epoch == 1 and result.epochs_run == 3 and result.stopped_early
    # best_val_loss is the best epoch's validation loss, whatever the monitor
    assert result.best_val_loss == result.history[0]["val_loss"] != es.best


def test_fit_leaves_the_model_untouched(data):
    m = model(data)
    before = bits(jax.tree.map(jnp.copy, nnx.state(m)))
    fit(m, optax.sgd, data, lr=LR, epochs=2, batch_size=16, progress=None)
    assert bits(nnx.state(m)) == before


# ---------------------------------------------------------------------------------------------
# Resume equivalence
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("epochs,k", [(12, 5), (60, 9)])  # the second stops early after the resume
@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path, data, epochs, k):
    es_a = EarlyStopping(patience=3)
    a = run(data, epochs=epochs, early_stopping=es_a, workdir=tmp_path / "a")
    assert a.resumed_from is None

    b1 = run(data, epochs=epochs, early_stopping=EarlyStopping(patience=3), workdir=tmp_path / "b", stop_after=k)
    assert b1.epochs_run == k and not b1.stopped_early and b1.interrupted == "stop-after"
    es_b = EarlyStopping(patience=3)
    b = run(data, epochs=epochs, early_stopping=es_b, workdir=tmp_path / "b")
    assert b.resumed_from == k

    assert bits(b.state.params) == bits(a.state.params)  # best weights
    assert bits((b.state.opt_state, b.state.step)) == bits((a.state.opt_state, a.state.step))
    assert strip_times(b.history) == strip_times(a.history)
    assert es_b.state_dict() == es_a.state_dict()
    assert (b.best_epoch, b.best_val_loss, b.epochs_run, b.stopped_early) == \
           (a.best_epoch, a.best_val_loss, a.epochs_run, a.stopped_early)
    if epochs == 60:
        assert a.stopped_early and a.epochs_run > k
    # the newest checkpoints (last-epoch weights, optimizer state, best weights, meta) match too
    step_a, tree_a, meta_a = latest_checkpoint(tmp_path / "a", like_tree(a))
    step_b, tree_b, meta_b = latest_checkpoint(tmp_path / "b", like_tree(b))
    assert step_a == step_b == a.epochs_run
    assert bits(tree_a) == bits(tree_b)
    assert meta_a["early_stopping"] == meta_b["early_stopping"] == es_a.state_dict()
    assert strip_times(meta_a["history"]) == strip_times(meta_b["history"])
    # resuming a finished run trains nothing more
    c = run(data, epochs=epochs, early_stopping=EarlyStopping(patience=3), workdir=tmp_path / "b")
    assert strip_times(c.history) == strip_times(a.history) and bits(c.state.params) == bits(a.state.params)


def test_each_checkpoint_holds_its_own_history(tmp_path, data):
    """The save is asynchronous: a checkpoint's meta must not pick up records of later epochs."""
    run(data, epochs=15, workdir=tmp_path, keep_latest=15, early_stopping=EarlyStopping(patience=100))
    for step in range(1, 16):
        meta = json.loads((tmp_path / "checkpoints" / str(step) / "meta" / "metadata").read_text())
        assert meta["epoch"] == step
        assert [h["epoch"] for h in meta["history"]] == list(range(1, step + 1))


def _comparable(metrics: dict) -> dict:
    # `segments` records each start and resume (compared on its own below)
    out = {k: v for k, v in metrics.items() if k not in ("wall_time_s", "phases_s", "tensorboard", "segments")}
    out["history"] = strip_times(out["history"])
    return out


@pytest.mark.slow
def test_train_job_resume_matches_uninterrupted(tmp_path, data):
    def cfg(name):
        return lrjax.Config(workdir=str(tmp_path / name), dataset="noisy", epochs=40, patience=3,
                            hidden_sizes=HIDDEN, batch_size=16, lr=LR, seed=0, progress=False)

    a = workflow.train_job(cfg("a"), data=data)
    with pytest.raises(workflow.Interrupted, match="after epoch 4"):  # as a preemption: no metrics.json
        workflow.train_job(cfg("b"), data=data, stop_after=4)
    assert not (tmp_path / "b" / "metrics.json").exists()
    b = workflow.train_job(cfg("b"), data=data)
    file_a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    file_b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert _comparable(file_a) == _comparable(file_b) == _comparable(json.loads(json.dumps(a)))
    assert _comparable(b) == _comparable(a)
    assert [s["first_epoch"] for s in file_a["segments"]] == [1] and [s["first_epoch"] for s in file_b["segments"]] == [1, 5]
    assert file_a["stopped_early"] and file_a["epochs_run"] == file_a["best_epoch"] + 3 < 40
    assert file_a["best_val_loss"] == min(h["val_loss"] for h in file_a["history"])
    # the wall time by phase (the data came from the caller: no load)
    phases = file_a["phases_s"]
    assert set(phases) == {"training_compile", "training", "checkpoint_io", "tensorboard", "test_evaluation", "other"}
    assert all(v >= 0 for v in phases.values()) and phases["training"] > 0
    assert sum(phases.values()) == pytest.approx(file_a["wall_time_s"], rel=1e-9)
    # a changed run-defining setting is refused instead of mixing two experiments
    with pytest.raises(lrjax.ConfigError, match="batch_size"):
        workflow.train_job(cfg("b").replace(batch_size=8), data=data)


@pytest.mark.parametrize("change, match", [
    (dict(lr=LR * 2), "lr"),
    (dict(seed=7), "seed"),
    (dict(early_stopping=EarlyStopping(monitor="val_accuracy")), "monitor"),
    (dict(model=lambda data: lrjax.mlp(data.in_features, (16,), data.num_classes, seed=0)), "different model"),
])
def test_resuming_another_run_is_refused_and_moves_nothing(tmp_path, data, change, match):
    run(data, epochs=2, workdir=tmp_path)
    steps_before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    kw = {**dict(epochs=4, workdir=tmp_path, batch_size=16, progress=None, lr=LR), **change}
    m = kw.pop("model", model)(data)
    with pytest.raises(lrjax.LrjaxError, match=match):
        fit(m, optax.sgd, data, **kw)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == steps_before  # nothing set aside
    assert run(data, epochs=3, workdir=tmp_path).resumed_from == 2  # the original run still resumes


def test_a_meta_without_the_run_state_counts_as_unreadable(tmp_path, data, capfd):
    run(data, epochs=3, workdir=tmp_path, keep_latest=3)
    (tmp_path / "checkpoints" / "3" / "meta" / "metadata").write_text("{}")  # valid JSON, nothing in it
    resumed = run(data, epochs=4, workdir=tmp_path, keep_latest=3)
    assert resumed.resumed_from == 2 and (tmp_path / "checkpoints" / "unreadable-3").is_dir()
    assert "is unreadable (KeyError: \"meta lacks" in capfd.readouterr().err


def test_stop_after_counts_from_the_start_and_ends_with_the_run(tmp_path, data):
    a = run(data, epochs=6, workdir=tmp_path, stop_after=3, early_stopping=EarlyStopping(patience=100))
    assert a.epochs_run == 3 and a.interrupted == "stop-after"
    b = run(data, epochs=6, workdir=tmp_path, stop_after=2, early_stopping=EarlyStopping(patience=100))
    assert b.resumed_from == 3 and b.epochs_run == 3 and b.interrupted == "stop-after"  # no epoch trained
    c = run(data, epochs=6, workdir=tmp_path, stop_after=6, early_stopping=EarlyStopping(patience=100))
    assert c.epochs_run == 6 and c.interrupted is None  # the last epoch: nothing left to resume
    with pytest.raises(lrjax.ConfigError, match="stop-after"):
        run(data, epochs=6, workdir=tmp_path / "new", stop_after=0)


# ---------------------------------------------------------------------------------------------
# TensorBoard
# ---------------------------------------------------------------------------------------------

def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def check_events(run_dir: Path, history: list[dict]):
    n = len(history)
    train, valid = read_scalars(run_dir / "train"), read_scalars(run_dir / "validation")
    for scalars in (train, valid):
        assert {"loss", "accuracy"} <= set(scalars)
        for tag in ("loss", "accuracy"):
            assert [s for s, _ in scalars[tag]] == list(range(1, n + 1)), tag  # one point per epoch, no duplicates
    for key, scalars, tag in (("loss", train, "loss"), ("accuracy", train, "accuracy"),
                              ("val_loss", valid, "loss"), ("val_accuracy", valid, "accuracy")):
        assert [v for _, v in scalars[tag]] == pytest.approx([h[key] for h in history], rel=1e-6)


def test_tensorboard_events(tmp_path, data):
    result = run(data, epochs=4, workdir=tmp_path)
    assert result.run_dir.parent == tmp_path / "tensorboard" and result.run_dir.name.startswith("run_")
    check_events(result.run_dir, result.history)


def test_tensorboard_after_resume(tmp_path, data):
    run(data, epochs=6, workdir=tmp_path, stop_after=2)  # fast: the resume starts within the same second
    result = run(data, epochs=6, workdir=tmp_path)
    assert [p.name for p in (tmp_path / "tensorboard").iterdir()] == [result.run_dir.name]  # folder reused
    assert len(list((result.run_dir / "train").iterdir())) == 2  # one event file per attempt, none lost
    check_events(result.run_dir, result.history)


def test_tensorboard_drops_events_past_the_checkpoint(tmp_path, data):
    """Epochs logged after the last checkpoint (lost with a preemption) are purged on resume."""
    run(data, epochs=4, workdir=tmp_path, early_stopping=EarlyStopping(patience=100))
    shutil.rmtree(tmp_path / "checkpoints" / "4")  # as if killed after logging epoch 4, before its checkpoint
    result = run(data, epochs=5, workdir=tmp_path, early_stopping=EarlyStopping(patience=100))
    assert result.resumed_from == 3 and len(result.history) == 5
    check_events(result.run_dir, result.history)


# ---------------------------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------------------------

def test_huge_lr_raises_training_diverged(tmp_path, data):
    # (plain SGD at lr 1e4 does not overflow on this tiny MLP: the loss explodes, the ReLUs die and it
    # stays finite; 1e10 overflows to NaN in the first epoch)
    with pytest.raises(TrainingDiverged) as info:
        run(data, lr=1e10, epochs=5, workdir=tmp_path)
    message = str(info.value)
    assert re.search(r"non-finite in epoch \d+", message) and "lr 1e+10" in message
    assert "lower the learning rate" in message
    ckpt = Checkpointer(tmp_path / "checkpoints")
    steps = ckpt.all_steps()
    ckpt.close()
    epoch = int(re.search(r"epoch (\d+)", message).group(1))
    assert all(s < epoch for s in steps)  # nothing of the diverged epoch was saved


def exploding_sgd(learning_rate):
    """SGD whose updates become astronomically large from step 40 on (after 3 epochs of 13 steps)."""
    return optax.chain(optax.sgd(learning_rate),
                       optax.scale_by_schedule(lambda count: jnp.where(count >= 40, 1e30, 1.0)))


@pytest.mark.slow
def test_divergence_keeps_earlier_checkpoints_intact(tmp_path, data):
    with pytest.raises(TrainingDiverged, match=r"epoch 4 .*checkpoint"):
        run(data, optimizer=exploding_sgd, epochs=10, workdir=tmp_path)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    try:
        assert ckpt.all_steps() == [2, 3]
        for step in ckpt.all_steps():
            like = run(data, optimizer=exploding_sgd, epochs=1)  # a state of the right structure
            _, tree, meta = ckpt.restore(like_tree(like), step=step)
            assert meta["epoch"] == step and len(meta["history"]) == step
            assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(tree)
                       if jnp.issubdtype(leaf.dtype, jnp.floating))
            assert all(math.isfinite(h["loss"]) and math.isfinite(h["val_loss"]) for h in meta["history"])
    finally:
        ckpt.close()


# ---------------------------------------------------------------------------------------------
# The command line: a real SIGTERM, divergence, and the whole workflow on real data
# ---------------------------------------------------------------------------------------------

def lrjax_cmd() -> list[str]:
    script = Path(sys.executable).parent / "lrjax"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lrjax.cli"]


def cli_env(tmp: Path) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", LRJAX_CACHE_DIR=str(tmp / "cache"))
    env.pop("LRJAX_DATA_DIR", None)
    return env


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory) -> Path:
    """A tiny MNIST-format IDX folder: 5,600 train images (5,000 become validation) and 200 test."""
    folder = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(1)
    protos = rng.integers(0, 256, (10, 28, 28))

    def make(n):
        labels = rng.integers(0, 10, n)
        return np.clip(protos[labels] + rng.normal(0, 80, (n, 28, 28)), 0, 255).astype(np.uint8), labels

    (xtr, ytr), (xte, yte) = make(5600), make(200)
    for key, arr in (("train_images", xtr), ("train_labels", ytr), ("test_images", xte), ("test_labels", yte)):
        write_idx_gz(folder / FILES[key], arr.astype(np.uint8))
    return folder


def train_args(workdir: Path, idx_dir: Path, epochs: int) -> list[str]:
    return [*lrjax_cmd(), "train", "--workdir", str(workdir), "--data-dir", str(idx_dir), "--dataset", "mnist",
            "--lr", "0.05", "--epochs", str(epochs), "--hidden-sizes", "16", "--patience", "500"]


def step_numbers(checkpoints: Path) -> list[int]:
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.exists() else []


@pytest.mark.slow
def test_sigterm_then_resume_matches_uninterrupted(tmp_path, idx_dir):
    env = cli_env(tmp_path)
    work = tmp_path / "interrupted"
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen(train_args(work, idx_dir, 200), stdout=out, stderr=err, env=env)
        try:
            deadline = time.monotonic() + 90
            while not step_numbers(work / "checkpoints"):
                assert proc.poll() is None, (tmp_path / "err.txt").read_text()
                assert time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=120)  # a guard against a hang, not a timing bar
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = (tmp_path / "err.txt").read_text()
    assert rc == 143, stderr
    assert "Traceback" not in stderr
    assert "SIGTERM received" in stderr
    stopped = re.search(r"lrjax: stopped by SIGTERM after epoch (\d+); checkpoint saved", stderr)
    assert stopped, stderr
    last = step_numbers(work / "checkpoints")[-1]
    assert int(stopped.group(1)) == last < 200
    assert not (work / "metrics.json").exists()

    k = last + 2
    resumed = subprocess.Popen(train_args(work, idx_dir, k), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    fresh = subprocess.Popen(train_args(tmp_path / "fresh", idx_dir, k), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    (_, r_err), (_, f_err) = resumed.communicate(timeout=120), fresh.communicate(timeout=120)
    assert resumed.returncode == 0, r_err
    assert fresh.returncode == 0, f_err
    assert f"resuming {work} from epoch {last}" in r_err
    m_resumed = json.loads((work / "metrics.json").read_text())
    m_fresh = json.loads((tmp_path / "fresh" / "metrics.json").read_text())
    for key in ("test_accuracy", "test_loss", "best_val_loss", "best_epoch", "epochs_run"):
        assert m_resumed[key] == m_fresh[key], key
    assert m_fresh["epochs_run"] == k
    assert strip_times(m_resumed["history"]) == strip_times(m_fresh["history"])


@pytest.mark.slow
def test_cli_divergence_exits_nonzero_with_one_line(tmp_path, idx_dir):
    args = train_args(tmp_path / "w", idx_dir, 3)
    args[args.index("--lr") + 1] = "1e10"
    proc = subprocess.run(args, env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lrjax: error:")]
    assert len(errors) == 1 and "non-finite" in errors[0] and "lower the learning rate" in errors[0], proc.stderr


@pytest.mark.slow
def test_run_end_to_end_on_real_data(tmp_path, real_data_dir):
    work = tmp_path / "run"
    args = [*lrjax_cmd(), "run", "--workdir", str(work), "--data-dir", str(real_data_dir), "--epochs", "2",
            "--num-steps", "300", "--hidden-sizes", "32", "--no-progress"]
    proc = subprocess.run(args, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr

    metrics = json.loads((work / "metrics.json").read_text())
    for key in ("test_accuracy", "test_loss", "best_epoch", "best_val_loss", "epochs_run", "stopped_early",
                "lr", "seed", "wall_time_s"):
        assert key in metrics, key
    assert metrics["epochs_run"] == 2 and metrics["stopped_early"] is False and metrics["seed"] == 42
    assert metrics["best_epoch"] in (1, 2) and 0.5 < metrics["test_accuracy"] <= 1.0  # 10 classes: chance 0.1
    assert math.isfinite(metrics["test_loss"]) and metrics["wall_time_s"] > 0
    phases = metrics["phases_s"]  # where the wall time went, every step of the workflow
    assert set(phases) == {"data_load", "samples_png", "range_test_compile", "range_test",
                           "range_test_init_and_outputs", "training_compile", "training", "checkpoint_io",
                           "tensorboard", "test_evaluation", "other", "verification"}
    assert all(v >= 0 for v in phases.values())
    assert sum(phases.values()) == pytest.approx(metrics["wall_time_s"], rel=1e-9)

    lr_find = json.loads((work / "lr_find.json").read_text())
    assert lr_find["suggestion"] == pytest.approx(metrics["lr"]) and metrics["lr"] > 0
    csv_lines = (work / "lr_find.csv").read_text().splitlines()
    assert len(csv_lines) > 10
    for png in ("lr_find.png", "samples.png"):
        assert (work / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    runs = list((work / "tensorboard").glob("run_*"))
    assert len(runs) == 1
    train = read_scalars(runs[0] / "train")
    assert [s for s, _ in train["loss"]] == [1, 2]
    assert read_scalars(work / "tensorboard" / "lr_find")["loss"]
    assert step_numbers(work / "checkpoints") == [1, 2]


def test_epochs_and_new_rates_reuse_one_compiled_epoch(data, compiles):
    run(data, epochs=3)
    first = compiles.count("train_chunk")
    assert first <= 1  # 0 when an earlier test already compiled this shape
    run(data, epochs=4, lr=LR / 3)  # another rate and more epochs: the same program
    assert compiles.count("train_chunk") == first
    run(data, epochs=1, batch_size=24)  # a batch shape no other test uses: a new program, counted
    assert compiles.count("train_chunk") == first + 1


@pytest.mark.parametrize("epochs, patience, stops", [(4, 10, False), (40, 2, True)])  # limit; early stop
def test_next_epoch_runs_while_the_host_writes_and_nothing_extra_is_started(tmp_path, data, monkeypatch,
                                                                           epochs, patience, stops):
    from lrjax import steps

    started = {0}  # epochs whose data order was drawn, i.e. that were started (or compiled for)
    epoch_batches = steps.epoch_batches
    monkeypatch.setattr(steps, "epoch_batches", lambda seed, e, *a, **kw: started.add(int(e)) or epoch_batches(seed, e, *a, **kw))
    seen = []  # at each epoch's progress line (after its TensorBoard writes and checkpoint): the last started
    r = run(data, epochs=epochs, workdir=tmp_path, early_stopping=EarlyStopping(patience=patience),
            progress=lambda line: seen.append(max(started)))
    n = r.epochs_run
    assert r.stopped_early == stops == (n < epochs) and n >= 3
    # epoch e + 1 was already running while epoch e was written, except after the last epoch
    assert seen == [*range(2, n + 1), n] and max(started) == n


def test_epoch_times_leave_out_the_previous_epochs_writes_and_add_up(tmp_path, data, monkeypatch):
    save = Checkpointer.save

    def slow_save(self, *a, **kw):  # a slow filesystem: 0.3 s a save, far longer than a tiny epoch
        time.sleep(0.3)
        return save(self, *a, **kw)

    monkeypatch.setattr(Checkpointer, "save", slow_save)
    r = run(data, epochs=4, workdir=tmp_path)
    times = [h["epoch_time_s"] for h in r.history]
    assert max(times[1:]) < 0.25, times  # epoch e+1 ran during e's save, but the save is not its time
    # every epoch's time lies inside the training phase (the first epoch too), the save in checkpoint_s
    assert sum(times) <= r.timings["train_s"] and r.timings["checkpoint_s"] >= 4 * 0.3


def test_a_failure_to_start_the_next_epoch_keeps_the_finished_one(tmp_path, data, monkeypatch):
    from lrjax import steps

    epoch_batches = steps.epoch_batches

    def failing(seed, epoch, *args, **kwargs):
        if int(epoch) == 3:
            raise RuntimeError("device lost")
        return epoch_batches(seed, epoch, *args, **kwargs)

    monkeypatch.setattr(steps, "epoch_batches", failing)
    lines = []
    with pytest.raises(RuntimeError, match="device lost"):
        run(data, epochs=5, workdir=tmp_path, progress=lines.append)
    assert len(lines) == 2 and step_numbers(tmp_path / "checkpoints") == [1, 2]  # epoch 2: logged and saved
