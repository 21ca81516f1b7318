"""The LR sweep equals members trained one by one; divergence is isolated; early stopping per member.

Each behaviour is checked with the members vmapped (accelerators' default) and looped (CPUs' default).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import optax
import pytest

from lrjax import sweeps
from lrjax.models import mlp
from lrjax.monitors import EarlyStopping
from lrjax.train import fit

from conftest import synthetic


@pytest.fixture(scope="module")
def data():
    return synthetic(n_train=256, valid=96, n_test=32, size=5, classes=3, noise=120)


def model_fn(seed):
    return mlp(25, (12,), 3, seed=seed)


def solo(data, lr, seed, epochs, patience=None):
    es = EarlyStopping(patience=patience if patience is not None else epochs, restore_best_weights=patience is not None)
    return fit(model_fn(seed), optax.sgd, data, lr=lr, epochs=epochs, batch_size=16, seed=seed, early_stopping=es,
               progress=None)


def test_grid():
    np.testing.assert_allclose(sweeps.lr_grid((1e-3, 1.0), 4), [1e-3, 1e-2, 1e-1, 1.0])
    np.testing.assert_allclose(sweeps.lr_grid((0.3, 0.01, 0.1), 16), [0.01, 0.1, 0.3])


LOOPS = pytest.mark.parametrize("member_loop", ["vmap", "map"])


@LOOPS
@pytest.mark.slow
def test_sweep_equals_solo_runs(data, member_loop):
    lrs, seeds = [0.01, 0.05, 0.2], [3, 4]
    r = sweeps.sweep(model_fn, optax.sgd, data, lrs, seeds=seeds, epochs=3, batch_size=16, member_loop=member_loop)
    assert r.train_loss.shape == (3, 2, 3) and not r.diverged.any()
    for s, seed in enumerate(seeds):
        for j, lr in enumerate(lrs):
            f = solo(data, lr, seed, 3)
            np.testing.assert_allclose(r.train_loss[:, s, j], [h["loss"] for h in f.history], rtol=1e-4)
            np.testing.assert_allclose(r.val_loss[:, s, j], [h["val_loss"] for h in f.history], rtol=1e-4)
            np.testing.assert_allclose(r.val_accuracy[:, s, j], [h["val_accuracy"] for h in f.history], atol=1e-6)
            member = jax.tree.map(lambda a: a[s, j], r.states.params)
            for a, b in zip(jax.tree.leaves(member), jax.tree.leaves(f.state.params)):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@LOOPS
@pytest.mark.slow
def test_diverging_member_is_frozen_and_isolated(data, member_loop):
    lrs = [0.02, 0.1, 1e20]  # 1e20 overflows in the first steps
    r = sweeps.sweep(model_fn, optax.sgd, data, lrs, seeds=[7], epochs=3, batch_size=16, member_loop=member_loop)
    assert r.diverged.tolist() == [[False, False, True]]
    assert r.diverged_epoch[0, 2] == 1 and r.to_json()["members"][2]["diverged"]
    # the others never see it: their parameters stay finite and their curves equal their solo runs
    for j in (0, 1):
        assert all(np.isfinite(np.asarray(a[0, j])).all() for a in jax.tree.leaves(r.states.params))
    assert np.isnan(r.train_loss[1:, 0, 2]).all()
    # its validation accuracy counts only where its validation loss is finite (never here)
    assert np.isnan(r.val_accuracy[:, 0, 2]).all() and r.best_val_accuracy[0, 2] == 0
    for j in (0, 1):
        f = solo(data, lrs[j], 7, 3)
        np.testing.assert_allclose(r.val_loss[:, 0, j], [h["val_loss"] for h in f.history], rtol=1e-4)
    assert r.best_lr in lrs[:2]


@LOOPS
@pytest.mark.slow
def test_per_member_early_stopping_matches_solo(data, member_loop):
    lrs, patience, epochs = [0.05, 0.5, 2.0], 2, 12
    r = sweeps.sweep(model_fn, optax.sgd, data, lrs, seeds=[1], epochs=epochs, batch_size=16, patience=patience,
                     member_loop=member_loop)
    for j, lr in enumerate(lrs):
        f = solo(data, lr, 1, epochs, patience=patience)
        expected = len(f.history) if f.stopped_early else -1
        assert r.stopped_epoch[0, j] == expected, (lr, r.stopped_epoch[0, j], len(f.history))
        if f.stopped_early:  # a stopped member keeps its best state and records no more epochs
            assert np.isnan(r.val_loss[len(f.history):, 0, j]).all()
            member = jax.tree.map(lambda a: a[0, j], r.states.params)
            for a, b in zip(jax.tree.leaves(member), jax.tree.leaves(f.state.params)):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert (r.stopped_epoch >= 0).any(), "no member stopped: the test would not test anything"


@pytest.mark.slow
def test_min_delta_applies_to_every_member(data):
    # nothing improves by 100: every member stops `patience` epochs after its first
    r = sweeps.sweep(model_fn, optax.sgd, data, [0.01, 0.1], seeds=[0], epochs=4, batch_size=16, patience=1,
                     min_delta=100.0)
    assert r.stopped_epoch.tolist() == [[2, 2]]


@pytest.mark.slow
def test_no_recompile_for_a_new_grid(data, compiles):
    sweeps.sweep(model_fn, optax.sgd, data, [0.01, 0.1], seeds=[0], epochs=1, batch_size=16)
    first = compiles.count("sweep_chunk")
    sweeps.sweep(model_fn, optax.sgd, data, [0.03, 0.3], seeds=[0], epochs=2, batch_size=16)
    assert compiles.count("sweep_chunk") == first
    sweeps.sweep(model_fn, optax.sgd, data, [0.01, 0.03, 0.1, 0.3, 1.0], seeds=[0], epochs=1, batch_size=16)
    assert compiles.count("sweep_chunk") == first + 1  # five members, a shape no other test uses: counted


@pytest.mark.slow
def test_outputs(tmp_path, data):
    r = sweeps.sweep(model_fn, optax.sgd, data, [0.01, 0.1], seeds=[0, 1], epochs=2, batch_size=16)
    r.suggestions = {"valley": 0.05}
    r.save(tmp_path)
    j = json.loads((tmp_path / "sweep.json").read_text())
    assert j["best_lr"] == r.best_lr and len(j["members"]) == 4 and j["seeds"] == [0, 1]
    assert len((tmp_path / "sweep.csv").read_text().splitlines()) == 1 + 2 * 4
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_every_member_diverged_has_no_best_rate(tmp_path, data):
    r = sweeps.sweep(model_fn, optax.sgd, data, [1e20, 1e30], seeds=[0], epochs=2, batch_size=16)
    assert r.diverged.all() and r.best_index is None and r.best_lr is None
    r.save(tmp_path)  # the outputs still say what happened
    j = json.loads((tmp_path / "sweep.json").read_text())
    assert j["best_lr"] is None and j["best_val_accuracy"] is None and all(m["diverged"] for m in j["members"])
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_run_names_are_distinct_and_short():
    assert sweeps.run_names([0.01, 0.0316227766, 0.1]) == ["0.01", "0.03162", "0.1"]
    assert sweeps.run_names([0.0100001, 0.0100004]) == ["0.0100001", "0.0100004"]  # 4 digits would merge them
    assert len(set(sweeps.run_names([0.5, 0.5]))) == 2


def test_close_rates_get_one_tensorboard_run_each(tmp_path, data):
    r = sweeps.sweep(model_fn, optax.sgd, data, [0.0100001, 0.0100004], seeds=[0], epochs=1, batch_size=16)
    sweeps.write_sweep_events(r, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr_0.0100001_seed_0", "lr_0.0100004_seed_0"]
