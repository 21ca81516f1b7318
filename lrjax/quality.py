"""How good is a range-test suggestion? Its rate's accuracy against the best rate of a log grid.

`score_suggestions` trains, in one call of `train` (in practice one `lrjax.sweep`), a log grid over the
range test's span plus every suggested rate as an extra member, and scores each method by its
accuracy as a fraction of the best grid rate's (or its loss, for loss-scored tasks). `summarise` turns per-seed records into the table
(mean and worst fraction, divergences) that chose lrjax's default method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from lrjax.suggest import METHODS

# train(lrs) -> (accuracy per rate, diverged per rate); a diverged member's accuracy may be anything.
TrainFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def score_suggestions(suggestions: Mapping[str, float | None], span: tuple[float, float], train: TrainFn,
                      grid_points: int = 16, lower_is_better: bool = False) -> dict:
    """One record: the grid, its best rate and score, every grid rate's score, and per method its rate,
    score, fraction of the best grid score and whether it diverged. Methods that suggest the same rate are
    trained once. `train(lrs)` gives an accuracy per rate (a diverged member and a method without a rate
    score 0), or with `lower_is_better` a loss (inf), whose fraction is then >= 1 where the grid wins."""
    grid = np.geomspace(span[0], span[1], grid_points)
    suggested = {m: float(v) for m, v in suggestions.items() if v is not None}
    rates = list(dict.fromkeys(suggested.values()))  # methods that agree on a rate share one member
    score, diverged = (np.asarray(a, np.float64) for a in train(np.concatenate([grid, rates])))
    diverged = diverged.astype(bool)
    worst = np.inf if lower_is_better else 0.0
    score = np.where(diverged | ~np.isfinite(score), worst, score)
    best = int(np.argmin(score[:grid_points]) if lower_is_better else np.argmax(score[:grid_points]))
    best_score = float(score[best])
    if not (np.isfinite(best_score) and best_score > 0):
        raise ValueError("no rate of the grid trained to a positive finite score: nothing to score against")
    record = {"span": [float(span[0]), float(span[1])], "best_grid_lr": float(grid[best]),
              "best_grid_accuracy": best_score, "grid": grid.tolist(), "lower_is_better": lower_is_better,
              "grid_accuracy": [float(v) for v in score[:grid_points]], "methods": {}}
    for method, lr in suggested.items():
        j = grid_points + rates.index(lr)
        record["methods"][method] = {"lr": lr, "accuracy": float(score[j]),
                                     "fraction": float(score[j]) / best_score, "diverged": bool(diverged[j])}
    for method in suggestions:
        record["methods"].setdefault(method, {"lr": None, "accuracy": None, "fraction": worst / best_score
                                              if lower_is_better else 0.0, "diverged": False})
    return record


def summarise(records: list[dict], methods=tuple(METHODS)) -> dict[str, dict]:
    """Per method over the records (seeds): mean and worst fraction (the highest for loss-scored records),
    divergences, geometric-mean lr."""
    table = {}
    for m in methods:
        entries = [r["methods"][m] for r in records if m in r["methods"]]
        if not entries:
            continue
        lower = bool(records[0].get("lower_is_better", False))
        fractions = [e["fraction"] for e in entries]
        lrs = [np.log(e["lr"]) for e in entries if e["lr"]]
        table[m] = {"mean_fraction": float(np.mean(fractions)),
                    "worst_fraction": float(np.max(fractions) if lower else np.min(fractions)),
                    "diverged": int(sum(e["diverged"] for e in entries)),
                    "mean_lr": float(np.exp(np.mean(lrs))) if lrs else float("nan")}
    return table
