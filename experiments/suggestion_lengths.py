"""Is the default suggestion the same at the range test's default length and at 5x? Per cell and seed: find_lr
at 1x and 5x its default num_steps; every rule's rate, the verified pick, and the range test's and the
whole find_lr's seconds (a shared 2-core CPU: compare the two columns, not absolute times).

    nice -n 19 python experiments/suggestion_lengths.py --cells mlp-sgd,mlp-adam,lm --seeds 0 1 \
        --out experiments/results/suggestion_lengths.json
"""
import argparse, json, time
from pathlib import Path

import numpy as np
import optax

import lrjax
from lrjax import optimizers


def cell(name, data_dir):
    if name == "lm":
        from charlm import CharLM, lm_loss, text_data
        return text_data(64), optax.adamw, (lambda s: CharLM(64, seed=s)), lm_loss
    data = lrjax.load_dataset("fashion_mnist", data_dir)
    return (data, optimizers.get(name.split("-")[1]),
            (lambda s: lrjax.mlp(data.in_features, (300, 100), data.num_classes, seed=s)), lrjax.tasks.classification)


p = argparse.ArgumentParser()
p.add_argument("--cells", default="mlp-sgd,mlp-adam,lm")
p.add_argument("--seeds", type=int, nargs="+", default=[0])
p.add_argument("--mults", type=int, nargs="+", default=[1, 5])
p.add_argument("--data-dir", default="../shared/data/fashion_mnist")
p.add_argument("--out", required=True)
a = p.parse_args()
out = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else []
for name in a.cells.split(","):
    data, opt, model_fn, loss_fn = cell(name, a.data_dir)
    per_epoch = -(-len(data.x_train) // 32)
    for seed in a.seeds:
        for mult in a.mults:
            t = time.perf_counter()
            r = lrjax.find_lr(model_fn(seed), opt, data, batch_size=32, seed=seed, loss_fn=loss_fn,
                              num_steps=per_epoch * mult)
            total = time.perf_counter() - t
            v = r.verification
            rec = {"cell": name, "seed": seed, "mult": mult, "num_steps": r.num_steps, "points": len(r.lrs),
                   "suggestion": r.suggestion, "suggestions": r.suggestions,
                   "verification": v.to_json() if v else None, "range_test_s": r.wall_time_s,
                   "verification_s": v.seconds if v else 0.0, "find_lr_s": total, "notes": r.notes}
            out = [o for o in out if (o["cell"], o["seed"], o["mult"]) != (name, seed, mult)] + [rec]
            Path(a.out).write_text(json.dumps(out, indent=1))
            print(f"{name} seed {seed} x{mult}: verified {r.suggestion:.3g} (turn {r.suggestions['turn']:.3g}, "
                  f"lagsafe {r.suggestions['lagsafe']:.3g}); val losses "
                  f"{[round(x, 4) if x else None for x in v.val_losses] if v else None}; "
                  f"range test {r.wall_time_s:.1f}s, stage {rec['verification_s']:.1f}s, total {total:.1f}s", flush=True)
