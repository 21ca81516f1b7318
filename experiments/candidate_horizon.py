"""Which rate wins a short candidate stage? Validation loss after M steps from the same initial weights,
for a grid of constant rates, on a random subset of M batches (one sweep per M), next to the grid's
score after the full training (lm_curves.py / suggestion_quality.py).

    nice -n 19 python experiments/candidate_horizon.py --cell lm --steps 47 94 --out /tmp/h.json
"""
import argparse, json, time, types
from pathlib import Path

import numpy as np
import optax

import lrjax
from lrjax import optimizers

p = argparse.ArgumentParser()
p.add_argument("--cell", default="lm")
p.add_argument("--steps", type=int, nargs="+", default=[47, 94])
p.add_argument("--seeds", type=int, nargs="+", default=[0])
p.add_argument("--grid", type=float, nargs="+", default=None)
p.add_argument("--valid", type=int, default=1000)
p.add_argument("--data-dir", default="../shared/data/fashion_mnist")
p.add_argument("--out", required=True)
a = p.parse_args()
if a.cell == "lm":
    from charlm import CharLM, lm_loss, text_data
    data, loss_fn, opt = text_data(64), lm_loss, optax.adamw
    model_fn = lambda s: CharLM(64, seed=s)
    grid = a.grid or [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2]
else:
    data = lrjax.load_dataset("fashion_mnist", a.data_dir)
    opt, loss_fn = optimizers.get(a.cell.split("-")[1]), lrjax.tasks.classification
    model_fn = lambda s: lrjax.mlp(data.in_features, (300, 100), data.num_classes, seed=s)
    grid = a.grid or list(np.geomspace(1e-4, 1e-2, 7) if "adam" in a.cell else np.geomspace(0.01, 0.64, 7))
out = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else []
for seed in a.seeds:
    for m in a.steps:
        rng = np.random.default_rng(seed)
        pick = rng.permutation(len(data.x_train))[: m * 32]
        nv = min(a.valid, len(data.x_valid))
        sub = types.SimpleNamespace(x_train=data.x_train[pick], y_train=data.y_train[pick], x_valid=data.x_valid[:nv],
                                    y_valid=data.y_valid[:nv], num_classes=data.num_classes)
        t = time.perf_counter()
        s = lrjax.sweep(model_fn, opt, sub, grid, seeds=[seed], epochs=1, batch_size=32, loss_fn=loss_fn)
        vl = s.metrics["val_loss"][0, 0]
        out.append({"cell": a.cell, "seed": seed, "steps": m, "lrs": list(map(float, grid)), "val_loss": vl.tolist(),
                    "seconds": time.perf_counter() - t})
        print(a.cell, seed, m, dict(zip(np.round(grid, 6), np.round(vl, 4))), f"{time.perf_counter() - t:.0f}s", flush=True)
        Path(a.out).write_text(json.dumps(out))
