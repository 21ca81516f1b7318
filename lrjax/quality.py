"""How good is a range-test suggestion? Its rate's accuracy against the best rate of a log grid.

`score_suggestions` trains, in one call of `train` (in practice one `lrjax.sweep`), a log grid over the
range test's span plus every suggested rate as an extra member, and scores each method by its
accuracy as a fraction of the best grid rate's. `summarise` turns per-seed records into the table
(mean and worst fraction, divergences) that chose lrjax's default method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from lrjax.suggest import METHODS

# train(lrs) -> (accuracy per rate, diverged per rate); a diverged member's accuracy may be anything.
TrainFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def score_suggestions(suggestions: Mapping[str, float | None], span: tuple[float, float], train: TrainFn,
                      grid_points: int = 16) -> dict:
    """One record: the grid, its best rate and accuracy, every grid rate's accuracy (0 where it diverged),
    and per method its rate, accuracy, fraction of the best grid accuracy and whether it diverged (a
    method without a rate scores 0). Methods that suggest the same rate are trained once."""
    grid = np.geomspace(span[0], span[1], grid_points)
    suggested = {m: float(v) for m, v in suggestions.items() if v is not None}
    rates = list(dict.fromkeys(suggested.values()))  # methods that agree on a rate share one member
    accuracy, diverged = (np.asarray(a) for a in train(np.concatenate([grid, rates])))
    accuracy = np.where(diverged, 0.0, np.nan_to_num(accuracy, nan=0.0))
    best = int(np.argmax(accuracy[:grid_points]))
    best_acc = float(accuracy[best])
    if best_acc <= 0:
        raise ValueError("no rate of the grid trained to a positive accuracy: nothing to score against")
    record = {"span": [float(span[0]), float(span[1])], "best_grid_lr": float(grid[best]),
              "best_grid_accuracy": best_acc, "grid": grid.tolist(),
              "grid_accuracy": accuracy[:grid_points].tolist(), "methods": {}}
    for method, lr in suggested.items():
        j = grid_points + rates.index(lr)
        record["methods"][method] = {"lr": lr, "accuracy": float(accuracy[j]),
                                     "fraction": float(accuracy[j]) / best_acc, "diverged": bool(diverged[j])}
    for method in suggestions:
        record["methods"].setdefault(method, {"lr": None, "accuracy": None, "fraction": 0.0, "diverged": False})
    return record


def summarise(records: list[dict], methods=tuple(METHODS)) -> dict[str, dict]:
    """Per method over the records (seeds): mean and worst fraction, divergences, geometric-mean lr."""
    table = {}
    for m in methods:
        entries = [r["methods"][m] for r in records if m in r["methods"]]
        if not entries:
            continue
        fractions = [e["fraction"] for e in entries]
        lrs = [np.log(e["lr"]) for e in entries if e["lr"]]
        table[m] = {"mean_fraction": float(np.mean(fractions)), "worst_fraction": float(np.min(fractions)),
                    "diverged": int(sum(e["diverged"] for e in entries)),
                    "mean_lr": float(np.exp(np.mean(lrs))) if lrs else float("nan")}
    return table
