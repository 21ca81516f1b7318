"""Range-test curves of the char-level LM stand-in (experiments/charlm.py) at 1x and 5x the default length,
and a grid of constant rates trained for 2 epochs (validation loss), to design a length-stable suggestion.

    nice -n 19 python experiments/lm_curves.py --out experiments/results/lm_curves.json --seeds 0 1
"""
import argparse, json, time
from pathlib import Path

import numpy as np
import optax

import lrjax
from charlm import CharLM, lm_loss, text_data

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--seeds", type=int, nargs="+", default=[0])
p.add_argument("--grid", type=float, nargs="+", default=[2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2])
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--skip-grid", action="store_true")
a = p.parse_args()
data = text_data(64)
out = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {"curves": [], "grid": []}
for seed in a.seeds:
    for mult in (1, 5):
        t = time.perf_counter()
        r = lrjax.find_lr(CharLM(64, seed=seed), optax.adamw, data, batch_size=32, loss_fn=lm_loss, seed=seed,
                          num_steps=188 * mult)
        out["curves"].append({"seed": seed, "mult": mult, "lrs": r.lrs.tolist(), "losses": r.losses.tolist(),
                              "suggestions": r.suggestions, "seconds": time.perf_counter() - t})
        print(seed, mult, r.suggestions, flush=True)
        Path(a.out).write_text(json.dumps(out))
    if not a.skip_grid:
        t = time.perf_counter()
        s = lrjax.sweep(lambda s: CharLM(64, seed=s), optax.adamw, data, a.grid, seeds=[seed], epochs=a.epochs,
                        batch_size=32, loss_fn=lm_loss)
        vl = np.nanmin(s.metrics["val_loss"][:, 0], axis=0)
        out["grid"].append({"seed": seed, "lrs": list(a.grid), "best_val_loss": vl.tolist(),
                            "val_loss": s.metrics["val_loss"][:, 0].tolist(), "seconds": time.perf_counter() - t})
        print(seed, "grid", dict(zip(a.grid, np.round(vl, 4))), flush=True)
        Path(a.out).write_text(json.dumps(out))
