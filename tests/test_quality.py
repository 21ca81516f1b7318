"""Scoring suggestions against a grid: a synthetic response with a known best rate, then real sweeps."""

from __future__ import annotations

import numpy as np
import optax
import pytest
from conftest import synthetic

from lrjax.models import mlp
from lrjax.quality import score_suggestions, summarise
from lrjax.range_test import find_lr
from lrjax.sweeps import sweep

BEST = 0.05


def response(lrs):
    """Accuracy peaks at BEST (0.9) and falls with the log-distance from it; rates above 2 diverge."""
    lrs = np.asarray(lrs)
    acc = 0.9 - 0.1 * (np.log10(lrs) - np.log10(BEST)) ** 2
    diverged = lrs > 2
    return np.where(diverged, np.nan, acc), diverged


def test_scores_against_the_known_best_rate():
    calls = []

    def train(lrs):
        calls.append(lrs)
        return response(lrs)

    suggestions = {"exact": BEST, "low": 1e-3, "too_high": 2.5, "none": None, "same": BEST}
    r = score_suggestions(suggestions, (1e-3, 3.0), train, grid_points=16)
    assert len(calls) == 1 and len(calls[0]) == 16 + 3  # one training call: the grid plus each distinct rate
    assert r["methods"]["same"] == r["methods"]["exact"]
    grid = np.geomspace(1e-3, 3.0, 16)
    assert r["best_grid_lr"] == pytest.approx(grid[np.argmin(np.abs(np.log(grid / BEST)))])
    best_acc = r["best_grid_accuracy"]
    assert best_acc == pytest.approx(response([r["best_grid_lr"]])[0][0])
    m = r["methods"]
    assert m["exact"]["fraction"] == pytest.approx(0.9 / best_acc) and m["exact"]["fraction"] >= 1.0
    assert m["low"]["fraction"] == pytest.approx(response([1e-3])[0][0] / best_acc) and m["low"]["fraction"] < 1
    assert m["too_high"] == {"lr": 2.5, "accuracy": 0.0, "fraction": 0.0, "diverged": True}
    assert m["none"]["lr"] is None and m["none"]["fraction"] == 0.0

    table = summarise([r, score_suggestions({"exact": BEST, "low": 0.5}, (1e-3, 3.0), train)],
                      methods=("exact", "low", "too_high"))
    assert table["exact"]["mean_fraction"] >= 1.0 and table["exact"]["mean_lr"] == pytest.approx(BEST)
    assert table["low"]["worst_fraction"] == pytest.approx(m["low"]["fraction"])
    assert table["too_high"]["diverged"] == 1


def test_loss_scored_cells_rank_the_lowest_loss_first():
    def train(lrs):  # a loss: 1 at BEST, rising with the log-distance; rates above 2 diverge
        acc, diverged = response(lrs)
        return 1.0 + (0.9 - acc), diverged

    r = score_suggestions({"exact": BEST, "low": 1e-3, "too_high": 2.5, "none": None}, (1e-3, 3.0), train,
                          grid_points=16, lower_is_better=True)
    m = r["methods"]
    assert r["best_grid_accuracy"] >= 1.0 and m["exact"]["fraction"] <= 1.0  # at or below the grid's best loss
    assert m["low"]["fraction"] > 1.0 and m["too_high"]["fraction"] == np.inf and m["none"]["fraction"] == np.inf
    table = summarise([r, score_suggestions({"exact": BEST, "low": 0.5}, (1e-3, 3.0), train, lower_is_better=True)],
                      methods=("exact", "low"))
    assert table["low"]["worst_fraction"] == pytest.approx(m["low"]["fraction"])  # the higher loss is the worse


def test_a_grid_that_never_trains_cannot_score():
    with pytest.raises(ValueError, match="nothing to score"):
        score_suggestions({"x": 0.1}, (1e-3, 1.0), lambda lrs: (np.zeros(len(lrs)), np.ones(len(lrs), bool)), 4)


@pytest.mark.slow
def test_real_sweep_scores_the_grids_best_rate_as_one():
    """With real training: a suggestion equal to the grid's best rate trains identically (same
    weights, same batches), so it scores exactly 1; the range test's own suggestions score sanely."""
    data = synthetic(n_train=256, valid=96, n_test=32, size=5, classes=3, noise=120)
    model_fn = lambda s: mlp(25, (12,), 3, seed=s)  # noqa: E731
    r = find_lr(model_fn(0), optax.sgd, data, batch_size=16, start_lr=1e-3, end_lr=30.0, num_steps=64, seed=0)

    def train(lrs):
        s = sweep(model_fn, optax.sgd, data, lrs, seeds=[0], epochs=2, batch_size=16)
        return s.best_val_accuracy[0], s.diverged[0]

    span = (float(r.lrs[0]), r.diverged_lr or float(r.lrs[-1]))
    first = score_suggestions(r.suggestions, span, train, grid_points=6)
    assert span[0] <= first["best_grid_lr"] <= span[1]
    assert all(0.0 <= m["fraction"] <= 1.5 for m in first["methods"].values())
    again = score_suggestions({"grid_best": first["best_grid_lr"]}, span, train, grid_points=6)
    assert again["methods"]["grid_best"]["fraction"] == pytest.approx(1.0, abs=1e-6)
