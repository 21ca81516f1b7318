"""The range test on a tiny synthetic problem: rates, curve shape, divergence, seeds, compile counts."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import jax
import numpy as np
import optax
import pytest

from lrjax import suggest
from lrjax.models import mlp
from lrjax.range_test import RangeTestResult, _report, exponential_lrs, find_lr

from conftest import CompileCounter, synthetic


@pytest.fixture(scope="module")
def data():
    return synthetic(n_train=512, valid=128, n_test=64, size=6, classes=4)


def model_fn(seed, data_=None):
    return mlp(36, (16,), 4, seed=seed)


def run(data, **kw):
    kw.setdefault("batch_size", 16)
    kw.setdefault("chunk_steps", 64)
    return find_lr(model_fn(0), optax.sgd, data, init_fn=model_fn, **kw)


def test_rates_are_the_exponential_schedule():
    lrs = exponential_lrs(1e-3, 50, factor=1.005)
    np.testing.assert_allclose(lrs, 1e-3 * 1.005 ** np.arange(50), rtol=2e-6)
    lrs = exponential_lrs(1e-7, 100, end_lr=10.0)
    assert lrs[0] == pytest.approx(1e-7) and lrs[-1] == pytest.approx(10.0, rel=1e-5)
    with pytest.raises(ValueError):
        exponential_lrs(1e-3, 10, factor=1.1, end_lr=1.0)


def test_recorded_rates_and_curve_shape(data):
    # (this toy problem still trains at rates near 100 with some batch orders: the grid goes to 1e4)
    r = run(data, start_lr=1e-3, end_lr=1e4, num_steps=200)
    # the recorded rates are start * factor**i, exactly those the steps used
    factor = (1e4 / 1e-3) ** (1 / 199)
    np.testing.assert_allclose(r.lrs, 1e-3 * factor ** np.arange(len(r.lrs)), rtol=1e-5)
    # losses fall then rise: the smoothed minimum lies strictly inside, well below the start
    i = int(np.argmin(r.smoothed))
    assert 10 < i < len(r.smoothed) - 1
    assert r.smoothed[i] < 0.7 * r.smoothed[0]
    assert r.diverged_step is not None and r.diverged_lr == pytest.approx(r.lrs[-1] * factor, rel=1e-4)
    assert np.all(np.isfinite(r.losses)) and np.all(np.isfinite(r.smoothed))
    assert r.suggestion is not None and r.lrs[0] < r.suggestion < r.diverged_lr


def test_divergence_is_masked_and_stops_early(data):
    r = run(data, start_lr=1e-2, end_lr=1e6, num_steps=300)
    assert r.diverged_step is not None and r.diverged_step < 300
    assert len(r.lrs) == r.diverged_step == len(r.losses) == len(r.smoothed)
    assert np.all(np.isfinite(r.losses))
    # the losses before divergence stay below diverge_factor x best smoothed loss
    assert np.all(r.smoothed <= 4 * np.minimum.accumulate(r.smoothed) + 1e-6)


def test_no_divergence_keeps_every_step(data):
    r = run(data, start_lr=1e-4, factor=1.001, num_steps=100)
    assert r.diverged_step is None and len(r.lrs) == 100 and r.num_steps == 100


def test_default_is_one_epoch(data):
    r = run(data, start_lr=1e-4, factor=1.001)
    assert r.num_steps == -(-len(data.x_train) // 16)


@pytest.mark.parametrize("member_loop", ["vmap", "map"])  # accelerators' default, CPUs' default
@pytest.mark.slow
def test_seeds_together_equal_separate_runs(data, member_loop):
    kw = dict(start_lr=1e-3, end_lr=50.0, num_steps=120)
    together = run(data, num_seeds=3, seed=5, member_loop=member_loop, **kw)
    for s in range(3):
        alone = run(data, num_seeds=1, seed=5 + s, **kw)
        n = min(len(alone.losses), together.per_seed_losses.shape[1])
        np.testing.assert_allclose(together.per_seed_losses[s, :n], alone.losses[:n], rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(together.losses, together.per_seed_losses.mean(0), rtol=1e-6)
    lo, hi = together.band
    assert np.all(lo <= together.smoothed + 1e-6) and np.all(together.smoothed <= hi + 1e-6)


def test_other_rates_do_not_recompile(data, compiles):
    run(data, start_lr=1e-3, factor=1.01, num_steps=128)
    first = compiles.count("_run_chunk")
    r = run(data, start_lr=3e-4, factor=1.02, num_steps=128)
    r = run(data, start_lr=1e-5, end_lr=1.0, num_steps=128)
    assert compiles.count("_run_chunk") == first
    assert r.lrs[0] == pytest.approx(1e-5)
    run(data, start_lr=1e-3, factor=1.01, num_steps=94)  # a chunk shape no other test uses: counted
    assert compiles.count("_run_chunk") == first + 1


def test_model_is_not_changed(data):
    model = model_fn(0)
    before = jax.tree.map(np.asarray, jax.tree.leaves(model))
    find_lr(model, optax.sgd, data, batch_size=16, start_lr=1e-3, end_lr=10.0, num_steps=64)
    after = jax.tree.leaves(model)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


@pytest.mark.slow
def test_adam_works_as_well_as_sgd():
    data = synthetic(n_train=512, valid=128, n_test=64, size=6, classes=4, noise=150)  # not separable
    kw = dict(batch_size=16, start_lr=1e-6, end_lr=10.0, num_steps=200, seed=0)
    r = find_lr(model_fn(0), optax.sgd, data, **kw)
    a = find_lr(model_fn(0), optax.adam, data, **kw)
    assert a.optimizer == "adam"
    assert a.suggestion is not None and a.smoothed.min() < 0.7 * a.smoothed[0]
    # Adam's useful rates are far below SGD's: its curve turns earlier
    assert a.lrs[10 + np.argmin(a.smoothed[10:])] < r.lrs[10 + np.argmin(r.smoothed[10:])]


def test_validation_curve(data):
    r = run(data, start_lr=1e-3, end_lr=10.0, num_steps=100, eval_every=10)
    assert len(r.val_steps) >= 5 and np.all(r.val_steps % 10 == 0)
    assert np.all(np.isfinite(r.val_losses))


def test_outputs(tmp_path, data):
    r = run(data, start_lr=1e-3, end_lr=100.0, num_steps=150, num_seeds=2)
    r.save(tmp_path)
    j = json.loads((tmp_path / "lr_find.json").read_text())
    for key in ("lrs", "losses", "smoothed", "per_seed_losses", "suggestion", "suggestions", "diverged_step",
                "diverged_lr", "num_steps", "num_seeds", "optimizer", "batch_size", "wall_time_s",
                "compile_time_s"):
        assert key in j, key
    assert set(j["suggestions"]) == set(suggest.METHODS) | {suggest.DEFAULT_METHOD}
    v = j["verification"]  # what the default's verification stage measured
    assert len(v["candidates"]) == len(v["val_losses"]) == 6 and v["candidate"] in v["candidates"]
    assert 2 ** -0.5 <= v["picked"] / v["candidate"] <= 2 ** 0.5 and j["suggestion"] == v["picked"]
    assert v["anchor"] == j["suggestions"]["turn"] == v["candidates"][0]
    assert j["find_lr_time_s"] > j["wall_time_s"]
    assert j["suggestion"] == j["suggestions"][j["method"]]
    rows = (tmp_path / "lr_find.csv").read_text().splitlines()
    assert rows[0] == "step,lr,loss,smoothed,loss_seed0,loss_seed1" and len(rows) == len(j["lrs"]) + 1
    assert (tmp_path / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("bad, match", [
    (dict(method="vally"), "method must be one of"),
    (dict(num_steps=1), "num_steps must be >= 2"),
    (dict(end_lr=1e-4), "end_lr 0.0001 must exceed start_lr"),
    (dict(factor=0.99), "factor must be > 1"),
    (dict(beta=1.0), r"beta must be in \[0, 1\)"),
    (dict(chunk_steps=0), "chunk_steps must be positive"),
])
def test_bad_arguments_fail_before_running(data, bad, match):
    model = model_fn(0)
    with CompileCounter() as compiles, pytest.raises(ValueError, match=match):
        find_lr(model, optax.sgd, data, **{"batch_size": 16, "start_lr": 1e-3, "num_steps": 32, **bad})
    assert not any("Finished XLA compilation" in m for m in compiles.messages)


def test_a_one_step_epoch_asks_for_num_steps(data):
    with pytest.raises(ValueError, match="single step.*--num-steps"):
        run(data, batch_size=512, start_lr=1e-3)  # 512 examples: the default one epoch is one step


def test_training_arrays_alone_suffice_without_validation(data):
    r = run(SimpleNamespace(x_train=data.x_train, y_train=data.y_train), start_lr=1e-3, end_lr=10.0, num_steps=32)
    assert len(r.lrs) > 0 and len(r.val_steps) == 0


def test_progress_reports_each_chunk_with_the_mean_loss_over_seeds(data):
    infos = []
    r = run(data, start_lr=1e-3, end_lr=1.0, num_steps=128, chunk_steps=64, num_seeds=2, progress=infos.append)
    assert r.diverged_step is None
    assert [i["step"] for i in infos] == [64, 128] and not any(i["diverged"] for i in infos)
    for i in infos:
        assert i["lr"] == pytest.approx(r.lrs[i["step"] - 1], rel=1e-6)
        assert i["loss"] == pytest.approx(r.per_seed_losses[:, i["step"] - 1].mean(), rel=1e-5)


def curve_result(smoothed, diverged_step=None):
    n = len(smoothed)
    lrs = np.geomspace(1e-2, 1.0, n)  # 200 points: x3.1 over the smoothing's lag, under the warning's x4
    return RangeTestResult(lrs=lrs, losses=np.asarray(smoothed), smoothed=np.asarray(smoothed),
                           per_seed_losses=np.asarray(smoothed)[None], suggestions={}, suggestion=0.01,
                           method="seed", diverged_step=diverged_step, diverged_lr=None, num_steps=n, num_seeds=1,
                           optimizer="sgd", batch_size=32, seed=0, wall_time_s=0.0, compile_time_s=0.0)


def test_warnings_for_a_curve_that_never_fell_or_never_turned(data):
    t = np.linspace(0, 1, 200)
    assert curve_result(1 - 0.5 * np.sin(np.pi * t) + 3 * t ** 8, diverged_step=199).warnings == []  # falls, turns
    rising = curve_result(1 + t ** 2, diverged_step=199).warnings
    assert len(rising) == 1 and "--start-lr" in rising[0]
    still_falling = curve_result(2 - t).warnings
    assert len(still_falling) == 1 and "never turned back up" in still_falling[0]
    short = curve_result(1 + t[:12] ** 2, diverged_step=12).warnings
    assert len(short) == 1 and "only 12 points" in short[0]
    # a real flat test (rates far too low) gets the second warning, also in lr_find.json
    too_low = run(data, start_lr=1e-4, end_lr=1e-3, num_steps=100)
    assert too_low.diverged_step is None
    assert len(too_low.warnings) == 1 and "never turned back up" in too_low.warnings[0]
    assert too_low.to_json()["warnings"] == too_low.warnings
    # falls, turns, diverges; but 7 decades in 200 steps outrun the smoothing
    fast = run(data, start_lr=1e-3, end_lr=1e4, num_steps=200, method="lagsafe").warnings
    assert len(fast) == 1 and "over the smoothing's lag (~49 steps at --beta 0.98)" in fast[0]
    # the verified default reads the curve with a smoothing scaled to the test: the lag is not its concern
    verified = run(data, start_lr=1e-3, end_lr=1e4, num_steps=200)
    assert verified.verification is not None and verified.warnings == []


def test_warning_when_the_rate_outgrows_the_smoothing():
    t = np.linspace(0, 1, 200)
    shape = 1 - 0.5 * np.sin(np.pi * t) + 3 * t ** 8  # falls, turns
    slow = curve_result(shape, diverged_step=199)
    assert slow.warnings == []
    # the same curve over 6 decades: x30 within 49 steps
    fast = dataclasses.replace(slow, lrs=np.geomspace(1e-6, 1.0, 200))
    assert len(fast.warnings) == 1 and "grows x30 over the smoothing's lag" in fast.warnings[0]
    assert dataclasses.replace(fast, beta=0.8).warnings == []  # 4 steps of lag: x1.3
    assert dataclasses.replace(fast, verification=object()).warnings == []  # the stage picked the rate


def test_progress_skips_filler_and_diverged_seeds():
    # 3 seeds padded to 4 (the filler never runs); seed 1 diverged after step 1 of this chunk
    nan = np.nan
    loss = np.array([[1.0, 2.0, 3.0], [5.0, nan, nan], [3.0, 4.0, 5.0], [nan, nan, nan]], np.float32)
    infos = []
    done = _report(0, {"loss": loss, "diverged_step": np.array([-1, 1, -1, 0])}, infos.append,
                   np.geomspace(1e-3, 1.0, 10), 10, num_seeds=3)
    assert not done and infos[0]["step"] == 3 and infos[0]["loss"] == pytest.approx(4.0)  # mean of 3 and 5
