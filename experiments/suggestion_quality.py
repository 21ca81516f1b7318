"""How good is each range-test suggestion? Scored against a grid of rates trained in one sweep.

    python experiments/suggestion_quality.py --data-dir ../shared/data/fashion_mnist --seeds 5 --epochs 10
    python experiments/suggestion_quality.py --mnist-dir DIR --tfds kmnist ...   # more datasets

For each dataset and seed: run the range test (the seed settings: SGD from 1e-3, x1.005 per batch of
32, one epoch); take every suggestion method's rate; train, in ONE sweep, a 16-point log grid over the
range test's span (first rate to the divergence point) plus the suggested rates as extra members,
all from the same initial weights and batch order. Report per method the mean and worst validation
accuracy at its rate as a fraction of the best grid rate's, and how often it diverged.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import optax

import lrjax
from lrjax.models import mlp
from lrjax.quality import score_suggestions, summarise


def score_dataset(data, seeds, epochs, grid_points=16, log=print):
    """Per seed: the range test's suggestions scored against the best rate of a grid over its span."""
    records = []
    for seed in seeds:
        t0 = time.perf_counter()
        model_fn = lambda s: mlp(data.in_features, (300, 100), data.num_classes, seed=s)  # noqa: E731
        r = lrjax.find_lr(model_fn(seed), optax.sgd, data, batch_size=32, start_lr=1e-3, factor=1.005, seed=seed)

        def train(lrs, model_fn=model_fn, seed=seed):  # one sweep: same weights and batch order for all
            s = lrjax.sweep(model_fn, optax.sgd, data, lrs, seeds=[seed], epochs=epochs, batch_size=32)
            return s.best_val_accuracy[0], s.diverged[0]

        rec = {"seed": seed, **score_suggestions(r.suggestions, (float(r.lrs[0]), r.diverged_lr or float(r.lrs[-1])),
                                                 train, grid_points)}
        records.append(rec)
        log(f"  seed {seed}: best grid lr {rec['best_grid_lr']:.3g} (val acc {rec['best_grid_accuracy']:.4f}); "
            + ", ".join(f"{m} {v['lr']:.3g}->{v['fraction']:.4f}" for m, v in rec["methods"].items() if v["lr"])
            + f"  [{time.perf_counter() - t0:.0f}s]")
    return records


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder")
    p.add_argument("--mnist-dir", default=None, help="MNIST IDX folder, if you have one")
    p.add_argument("--tfds", default="", help="comma-separated prepared TFDS datasets to include")
    p.add_argument("--tfds-data-dir", default=None)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--json", default="suggestion_quality.json")
    a = p.parse_args()
    lrjax.use_cpu_cores()  # before JAX starts: the sweep's members run on every CPU core
    sets = []
    if a.data_dir:
        sets.append(("fashion_mnist", lambda: lrjax.load_dataset("fashion_mnist", a.data_dir)))
    if a.mnist_dir:
        sets.append(("mnist", lambda: lrjax.load_dataset("mnist", a.mnist_dir)))
    for name in filter(None, a.tfds.split(",")):
        sets.append((name, lambda n=name: lrjax.load_dataset(n, tfds_data_dir=a.tfds_data_dir)))
    if not sets:
        p.error("give at least one dataset (--data-dir, --mnist-dir or --tfds)")
    out = {"epochs": a.epochs, "seeds": a.seeds, "datasets": {}}
    for name, load in sets:
        print(f"{name}: range test + sweep of 16 grid rates and the suggestions, {a.epochs} epochs, "
              f"{a.seeds} seeds", flush=True)
        records = score_dataset(load(), list(range(a.seeds)), a.epochs)
        table = summarise(records)
        out["datasets"][name] = {"records": records, "table": table}
        print(f"\n{name}: validation accuracy at the suggested rate / at the best grid rate "
              f"({a.seeds} seeds, {a.epochs} epochs)")
        print("| method | mean lr | mean | worst | diverged |\n|---|---|---|---|---|")
        for m, t in table.items():
            print(f"| {m} | {t['mean_lr']:.3g} | {t['mean_fraction']:.4f} | {t['worst_fraction']:.4f} | "
                  f"{t['diverged']}/{a.seeds} |")
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"\nwritten {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
