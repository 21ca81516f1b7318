"""The training loop's callbacks, step cadences and schedules: hooks and their arguments, stopping from
a callback, per-step hooks, mid-epoch checkpoints that resume bit-identically, evaluation every N steps,
optax schedules, gradient accumulation, weight decay and plateau reduction."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import lrjax
from lrjax.callbacks import Callback, EarlyStopping
from lrjax.optimizers import Recipe
from lrjax.train import fit

from conftest import strip_times, synthetic

SPE = 19  # 300 training examples at batch 16


@pytest.fixture(scope="module")
def data():
    return synthetic(n_train=300, valid=64, n_test=64, size=6, classes=3, noise=90)


def run(data, optimizer=optax.sgd, **kw):
    kw.setdefault("batch_size", 16)
    kw.setdefault("progress", None)
    kw.setdefault("lr", 0.05)
    return fit(lrjax.mlp(36, (12,), 3, seed=0), optimizer, data, **kw)


def bits(tree):
    return [np.asarray(a).tobytes() for a in jax.tree.leaves(tree)]


class Record(Callback):
    every_n_steps = 5

    def __init__(self):
        self.calls = []

    def on_train_begin(self, logs=None):
        self.calls.append(("begin",))

    def on_train_batch_end(self, step, logs=None):
        self.calls.append(("batch", step, dict(logs)))

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(("epoch", epoch, dict(logs)))

    def on_train_end(self, logs=None):
        self.calls.append(("end",))


def test_hooks_in_order_with_lrjax_epochs_and_the_epoch_metrics(data):
    rec = Record()
    f = run(data, epochs=3, callbacks=[rec])
    kinds = [c[0] for c in rec.calls]
    assert kinds[0] == "begin" and kinds[-1] == "end" and kinds.count("epoch") == 3
    assert [c[1] for c in rec.calls if c[0] == "epoch"] == [1, 2, 3]
    assert [c[2] for c in rec.calls if c[0] == "epoch"] == f.history  # logs are the history rows
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr"} <= set(f.history[0])
    batches = [c for c in rec.calls if c[0] == "batch"]
    assert [c[1] for c in batches] == list(range(5, 3 * SPE + 1, 5))  # every 5 global steps
    assert set(batches[0][2]) == {"batch_loss", "batch_accuracy", "batch_learning_rate"}
    assert all(abs(c[2]["batch_learning_rate"] - 0.05) < 1e-7 for c in batches)


def test_a_callback_stops_training_at_once_and_a_reused_one_starts_fresh(data):
    class StopAt2(Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 2:
                self.trainer.stop_training = True

    f = run(data, epochs=10, callbacks=[StopAt2()])
    assert f.epochs_run == 2 and f.interrupted is None
    es = EarlyStopping(patience=1, min_delta=100.0)  # nothing improves by 100: stops after 2 evaluations
    assert run(data, epochs=10, early_stopping=es).epochs_run == 2
    assert run(data, epochs=10, early_stopping=es).epochs_run == 2  # Keras: reset on train begin


def test_evaluation_every_n_steps_is_a_history_row_and_a_unit_of_patience(data):
    f = run(data, epochs=2, eval_every_steps=7, early_stopping=EarlyStopping(patience=100))
    # 38 steps: evaluations at 7, 14, ..., 35 and at the end
    assert [h["step"] for h in f.history] == [7, 14, 21, 28, 35, 38]
    assert [h["epoch"] for h in f.history] == [1, 1, 2, 2, 2, 2]  # epoch 1 is steps 1..19
    stopped = run(data, epochs=20, eval_every_steps=7, early_stopping=EarlyStopping(patience=2, min_delta=100.0))
    assert len(stopped.history) == 3 and stopped.history[-1]["step"] == 21


@pytest.mark.slow
def test_mid_epoch_checkpoints_resume_bit_identically(tmp_path, data):
    from lrjax.checkpoint import Checkpointer

    kw = dict(epochs=3, checkpoint_every_steps=5, early_stopping=EarlyStopping(patience=100))
    a = run(data, workdir=tmp_path / "a", **kw)

    class StopAt(Callback):  # a preemption at step 25 (mid epoch 2), after that chunk's checkpoint
        every_n_steps = 25

        def on_train_batch_end(self, step, logs=None):
            self.trainer.stop_training = True

    b1 = run(data, workdir=tmp_path / "b", callbacks=[StopAt()], **kw)
    assert len(b1.history) == 1
    ckpt = Checkpointer(tmp_path / "b" / "checkpoints")
    try:
        assert ckpt.latest_step() == 25  # Orbax steps are global steps
    finally:
        ckpt.close()
    b = run(data, workdir=tmp_path / "b", **kw)
    assert b.resumed_from == 25
    assert strip_times(a.history) == strip_times(b.history)
    assert bits((a.state.params, a.state.opt_state)) == bits((b.state.params, b.state.opt_state))


def test_tensorboard_batch_scalars(tmp_path, data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    f = run(data, epochs=2, workdir=tmp_path, log_every_steps=4, schedule="onecycle", lr=0.2)
    ea = EventAccumulator(str(f.run_dir / "train"), size_guidance={"scalars": 0})
    ea.Reload()
    rates = sorted(ea.Scalars("batch_learning_rate"), key=lambda e: e.step)
    assert [e.step for e in rates] == list(range(4, 2 * SPE + 1, 4))
    assert len(ea.Scalars("batch_loss")) == len(rates) and len(ea.Scalars("loss")) == 2


@pytest.mark.parametrize("name", ["onecycle", "cosine", "warmup_cosine"])
def test_schedules_are_optax_and_peak_at_lr(data, name):
    rec = Record()
    rec.every_n_steps = 1
    run(data, epochs=2, lr=0.2, schedule=name, callbacks=[rec])
    rates = np.array([c[2]["batch_learning_rate"] for c in rec.calls if c[0] == "batch"])
    expected = {"onecycle": optax.cosine_onecycle_schedule(2 * SPE, 0.2),
                "cosine": optax.cosine_decay_schedule(0.2, 2 * SPE),
                "warmup_cosine": optax.warmup_cosine_decay_schedule(0.0, 0.2, 1, 2 * SPE)}[name]
    np.testing.assert_allclose(rates, [float(expected(i)) for i in range(2 * SPE)], rtol=1e-5, atol=1e-8)
    assert abs(rates.max() - 0.2) < 0.02


@pytest.mark.slow
def test_a_schedule_continues_exactly_after_a_resume(tmp_path, data):
    kw = dict(epochs=4, schedule="onecycle", lr=0.2, early_stopping=EarlyStopping(patience=100))
    a = run(data, workdir=tmp_path / "a", **kw)
    run(data, workdir=tmp_path / "b", stop_after=2, **kw)
    b = run(data, workdir=tmp_path / "b", **kw)
    assert strip_times(a.history) == strip_times(b.history) and b.resumed_from == 2


@pytest.mark.slow
def test_gradient_accumulation_updates_once_per_k_batches(data):
    rec = Record()
    rec.every_n_steps = 1
    f = run(data, Recipe(optax.sgd, grad_accum_steps=2), epochs=1, lr=0.2, schedule="cosine", callbacks=[rec])
    rates = [c[2]["batch_learning_rate"] for c in rec.calls if c[0] == "batch"]
    assert rates[0] == rates[1] and rates[2] == rates[3] and rates[1] > rates[2]  # one rate per optimizer step
    assert np.isfinite(f.history[0]["loss"])
    r = lrjax.find_lr(lrjax.mlp(36, (12,), 3), Recipe(optax.sgd, grad_accum_steps=2), data, batch_size=16,
                      num_steps=9, end_lr=1.0)
    assert len(r.lrs) == 9 and r.num_steps == 9  # optimizer steps, each over 2 micro-batches


def test_weight_decay_shrinks_the_weights(data):
    plain = run(data, epochs=2, lr=0.01)
    decayed = run(data, Recipe(optax.sgd, weight_decay=1.0), epochs=2, lr=0.01)
    norm = lambda f: sum(float(np.sum(np.asarray(a) ** 2)) for a in jax.tree.leaves(f.state.params))  # noqa
    assert norm(decayed) < 0.9 * norm(plain)


def test_plateau_reduces_the_rate_when_the_loss_stops_improving(data):
    rec = Record()
    rec.every_n_steps = SPE
    run(data, Recipe(optax.sgd, plateau=(1, 0.5, SPE)), epochs=6, lr=1e-9, callbacks=[rec])  # no progress
    rates = [c[2]["batch_learning_rate"] for c in rec.calls if c[0] == "batch"]
    assert rates[0] == pytest.approx(1e-9) and rates[-1] < 0.5e-9
