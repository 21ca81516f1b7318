"""Constant rate vs one-cycle and cosine schedules set from the range test, on Fashion-MNIST.

    python experiments/schedule_quality.py --data-dir ../shared/data/fashion_mnist --seeds 3 --epochs 20

Per seed: the seed's range test (MLP 784-300-100-10, SGD, batch 32, 1e-3 x1.005 for one epoch);
then, each from the same initial weights and batch order, training for `--epochs` epochs (no early
stopping) at the constant suggested rate (today's `lrjax run`) and with each schedule peaking at
the suggestion times each factor. Reported: test accuracy of the best-validation-loss weights
(as `lrjax run` reports it), and the epochs and wall time until the validation accuracy first
reached `--target`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import optax

import lrjax

VARIANTS = [("constant", 1.0), ("onecycle", 1.0), ("onecycle", 2.0), ("cosine", 1.0), ("cosine", 2.0)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--target", type=float, default=0.89)
    p.add_argument("--json", default="experiments/results/schedule_quality_fashion_mnist.json")
    a = p.parse_args()
    data = lrjax.load_dataset("fashion_mnist", a.data_dir)
    records = []
    for seed in range(a.seeds):
        r = lrjax.find_lr(lrjax.mlp(data.in_features, seed=seed), optax.sgd, data, seed=seed)
        for schedule, factor in VARIANTS:
            t0 = time.perf_counter()
            times = []
            f = lrjax.fit(lrjax.mlp(data.in_features, seed=seed), optax.sgd, data, lr=r.suggestion * factor,
                          epochs=a.epochs, seed=seed, schedule=schedule, progress=None,
                          early_stopping=lrjax.EarlyStopping(patience=a.epochs),
                          callbacks=[_Clock(times)])
            wall = time.perf_counter() - t0
            reached = next((i for i, h in enumerate(f.history) if h["val_accuracy"] >= a.target), None)
            rec = {"seed": seed, "schedule": schedule, "factor": factor, "lr": r.suggestion * factor,
                   "test_accuracy": f.evaluate(data.x_test, data.y_test)["accuracy"],
                   "best_val_accuracy": max(h["val_accuracy"] for h in f.history), "wall_s": wall,
                   "epochs_to_target": None if reached is None else reached + 1,
                   "seconds_to_target": None if reached is None else times[reached]}
            records.append(rec)
            print(json.dumps(rec), flush=True)
    table = {}
    for schedule, factor in VARIANTS:
        rs = [r for r in records if (r["schedule"], r["factor"]) == (schedule, factor)]
        hit = [r for r in rs if r["epochs_to_target"] is not None]
        table[f"{schedule} x{factor:g}"] = {
            "test_accuracy_mean": statistics.mean(r["test_accuracy"] for r in rs),
            "test_accuracy_min": min(r["test_accuracy"] for r in rs),
            "reached": f"{len(hit)}/{len(rs)}",
            "epochs_to_target_mean": statistics.mean(r["epochs_to_target"] for r in hit) if hit else None,
            "seconds_to_target_mean": statistics.mean(r["seconds_to_target"] for r in hit) if hit else None}
    print(f"\n| schedule (peak = suggestion x) | test acc mean | min | reached {a.target:.0%} val acc | epochs | s |")
    print("|---|---|---|---|---|---|")
    for name, t in table.items():
        e, s = t["epochs_to_target_mean"], t["seconds_to_target_mean"]
        print(f"| {name} | {t['test_accuracy_mean']:.4f} | {t['test_accuracy_min']:.4f} | {t['reached']} | "
              f"{'-' if e is None else f'{e:.1f}'} | {'-' if s is None else f'{s:.1f}'} |")
    Path(a.json).write_text(json.dumps({"epochs": a.epochs, "seeds": a.seeds, "target": a.target,
                                        "records": records, "table": table}, indent=1))
    return 0


class _Clock(lrjax.callbacks.Callback):
    """Seconds since training began, at each evaluation."""

    def __init__(self, out: list):
        self.out = out

    def on_train_begin(self, logs=None):
        self.t0 = time.perf_counter()
        self.out.clear()

    def on_epoch_end(self, epoch, logs=None):
        self.out.append(time.perf_counter() - self.t0)


if __name__ == "__main__":
    sys.exit(main())
