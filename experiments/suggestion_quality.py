"""How good is each range-test suggestion? Scored against a grid of rates trained in one sweep, per cell
of a matrix of models and optimizers.

    python experiments/suggestion_quality.py --data-dir ../shared/data/fashion_mnist --seeds 5
    python experiments/suggestion_quality.py --data-dir DIR --cells mlp-adam,cnn-adam --seeds 2 --first-seed 5
    python experiments/suggestion_quality.py --data-dir DIR --report     # the tables of --json

A cell is a model, an optimizer, a training set and a training length (`CELLS`): the seed's MLP on all
of Fashion-MNIST with sgd, momentum (0.9), adam and adamw for 5 epochs on a 12-point grid, and the
compact CNN (`lrjax.cnn`) with sgd and adam on a 6000-image subset for 3 epochs on an 8-point grid (one
CNN step costs ~40 MLP steps on a CPU). Validation is always the full 5000 images (a 1000-image split
has a standard error of ~1%, the size of the effects measured). For each cell and seed: run the range
test (the optimizer's default range, `lrjax.optimizers.range_defaults`, one epoch of batches of 32,
except where the cell says otherwise); take every suggestion method's rate (`lrjax.suggest.METHODS`,
plus the exploratory rules of `EXTRA`); train, in ONE sweep, a log grid over the range test's span
(first rate to the divergence point, or the last rate) plus the distinct suggested rates as extra
members, all from the same initial weights and batch order, for the same epochs (cells with `replicas`: a rate's
score is the mean over that many batch orders, the seed's first). Report per method the
mean and worst best-validation accuracy at its rate as a fraction of the best grid rate's, and how
often it diverged. The JSON keeps every grid rate's accuracy and a summary of each curve (its lag
growth, warnings); the curves themselves go to --curves. Records of a cell already in --json are kept
for the seeds not run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

import lrjax
from lrjax import optimizers, suggest, text
from lrjax.quality import score_suggestions, summarise
from lrjax.suggest import METHODS
from lrjax.workflow import train_size

# model, optimizer, training examples of the grid (None: all 55000), grid points, epochs, range-test
# overrides, and the range test's training examples ("range_train"; default: the grid's)
CELLS = {
    "mlp-sgd": dict(model="mlp", optimizer="sgd", train=11000, range_train=None, grid=10, epochs=4),
    "mlp-momentum": dict(model="mlp", optimizer="momentum", train=11000, range_train=None, grid=10, epochs=4),
    "mlp-adam": dict(model="mlp", optimizer="adam", train=11000, range_train=None, grid=10, epochs=4),
    "mlp-adamw": dict(model="mlp", optimizer="adamw", train=11000, range_train=None, grid=10, epochs=4),
    # SGD's default growth (x1.005) would reach only 2.5e-3 in the subset's 188 steps: the range is
    # given as start -> end instead, ending where SGD on this CNN diverges (~3). The CNN grids are 2x apart
    # around the best rates of round f's 6-point grids over the test's span (16-40x apart: too coarse to
    # resolve the best within 2x). Each CNN rate scores the mean of 3 replicas (`replicas`: the seed's weights,
    # 3 batch orders): one 3-epoch run's accuracy moves by ~1% between rates 1% apart (round h, seed 2 of
    # cnn-adam: 0.8524 at 2.02e-3, 0.8566 at 2e-3), more than the bars' margin, so one run cannot resolve the best
    "cnn-sgd": dict(model="cnn", optimizer="sgd", train=6000, grid=8, epochs=3, range=dict(end_lr=10.0),
                    grid_span=(2.5e-3, 0.32), replicas=3),
    "cnn-adam": dict(model="cnn", optimizer="adam", train=6000, grid=8, epochs=3, grid_span=(6.25e-5, 8e-3),
                     replicas=3),
    # issue 23's cells: a short-data cell (188 steps an epoch) and the char-level Transformer LM
    # (experiments/charlm.py, 5992 windows of 64 bytes, 188 steps an epoch), scored by validation loss
    "mlp-adam-short": dict(model="mlp", optimizer="adam", train=6000, grid=10, epochs=4),
    # the LM's grid is 2x apart around its best (lm_curves.py: 4e-3-8e-3), not over the test's 6 decades
    "lm": dict(model="charlm", optimizer="adamw", train=None, grid=8, epochs=2, metric="loss",
               grid_span=(2.5e-4, 3.2e-2)),
    # a regression cell (MSE, `lrjax.tasks.regression`): the MLP (392-300-100-392) draws the bottom half
    # of each Fashion-MNIST image from its top half
    "mlp-mse": dict(model="mlp-halves", optimizer="adam", train=11000, range_train=None, grid=10, epochs=4,
                    metric="loss"),
    # lrjax's own language model, `lrjax.models.transformer`, at a size whose grid trains in minutes on 2 CPU
    # cores (d 64, 2 layers, 2 heads, context 64: 188 steps an epoch) on the stdlib's email and json packages
    # as text (`lrjax.text`, the acceptance's corpus), adamw
    "lm-transformer": dict(model="transformer", optimizer="adamw", train=None, grid=8, epochs=2, metric="loss",
                           grid_span=(2.5e-4, 3.2e-2), size=dict(context=64, d_model=64, layers=2, heads=2)),
}

# The learning-rate-free optimizers beside the rules (`--lr-free`): the rate each trains at.
LR_FREE = {"prodigy": 1.0, "mechanize_adam": 1.0, "schedule_free_adamw": 2.5e-3}


def _gmean(r):
    """Exploratory: the geometric mean of valley and seed."""
    v, s = r.suggestions.get("valley"), r.suggestions.get("seed")
    return float(np.sqrt(v * s)) if v and s else None


EXTRA = {"gmean": _gmean}


def halves(data):
    """Regression data: the top half of each image (392 pixels) as x, its bottom half as y."""
    split = {}
    for name in ("train", "valid", "test"):
        x = getattr(data, f"x_{name}").reshape(-1, 28, 28)
        split[f"x_{name}"], split[f"y_{name}"] = x[:, :14].reshape(len(x), -1), x[:, 14:].reshape(len(x), -1)
    return dataclasses.replace(data, **split, class_names=())


def text_corpus(context: int = 128):
    """The stdlib's email and json packages as a `lrjax.text.Corpus` (copied to a temporary folder)."""
    root = Path(tempfile.mkdtemp(prefix="lrjax-quality-text-"))
    lib = Path(sysconfig.get_paths()["stdlib"])
    for pkg in ("email", "json"):
        shutil.copytree(lib / pkg, root / "corpus" / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return text.load_corpus(root / "corpus", context, root / "cache")


def model_fn_for(cell: dict, data):
    if cell["model"] == "transformer":
        size = {k: v for k, v in cell.get("size", {}).items() if k != "context"}
        return lambda s: lrjax.models.transformer(text.VOCAB, data.context, **size, seed=s)
    if cell["model"] == "mlp-halves":
        return lambda s: lrjax.mlp(data.in_features, (300, 100), data.y_train.shape[1], seed=s)
    if cell["model"] == "charlm":
        from charlm import CharLM

        return lambda s: CharLM(data.x_train.shape[1], seed=s)
    if cell["model"] == "mlp":
        return lambda s: lrjax.mlp(data.in_features, (300, 100), data.num_classes, seed=s)
    return lambda s: lrjax.cnn(data.x_train.shape[1:], data.num_classes, seed=s)


def task_of(cell: dict):
    if cell["model"] == "transformer":
        return lrjax.tasks.next_token
    if cell["model"] == "mlp-halves":
        return lrjax.tasks.regression
    if cell["model"] == "charlm":
        from charlm import lm_loss

        return lm_loss
    return lrjax.tasks.classification


def scores_of(record: dict, skip=()) -> dict:
    """{rate: (score, diverged)} of every grid rate and suggested rate (but the methods in `skip`) a seed's
    record trained."""
    known = {lr: (v, False) for lr, v in zip(record["grid"], record["grid_accuracy"])}
    known.update({v["lr"]: (v["accuracy"], v["diverged"]) for m, v in record["methods"].items()
                  if m not in skip and v["lr"]})
    return known


def known_score(known: dict, lr: float):
    """`known`'s (score, diverged) at rate `lr` (to 1e-9, relative), or None."""
    return next((v for rate, v in known.items() if np.isclose(rate, lr, rtol=1e-9)), None)


def defines(stored: dict | None, cell: dict) -> bool:
    """Whether a stored cell (JSON) has the definition `cell` (the training examples aside)."""
    return bool(stored) and all(stored.get(k) == json.loads(json.dumps(v)) for k, v in cell.items() if k != "train")


def rescored(old: dict, r, run, source: str) -> dict:
    """`old` (a seed's record) with the default method scored anew from range test `r`, against the
    grid `old` holds: every other suggestion of `r` must equal `old`'s (the same curve), so the grid and
    their scores stand; the default's new rate is trained alone (a sweep's members train independently),
    unless the grid or a method already scored it."""
    default = suggest.DEFAULT_METHOD
    for m, v in old["methods"].items():
        new = r.suggestions.get(m) if m in r.suggestions else EXTRA[m](r)
        if m != default and not (v["lr"] is None and new is None or v["lr"] and new and np.isclose(new, v["lr"], rtol=1e-6)):
            raise RuntimeError(f"seed {old['seed']}: {m} suggests {new} now and {v['lr']} in {source}: another "
                               "curve, so its grid does not apply; run the cell without --rescore")
    lr = float(r.suggestions[default])
    hit = known_score(scores_of(old, skip=(default,)), lr)
    if hit:
        score, diverged = hit
    else:
        scores, div = run(np.array([lr]))
        score, diverged = float(scores[0]), bool(div[0])
    worst = np.inf if old["lower_is_better"] else 0.0
    score = worst if diverged or not np.isfinite(score) else score
    rec = {**old, "methods": {**old["methods"], default: {"lr": lr, "accuracy": score, "fraction": score / old[
        "best_grid_accuracy"], "diverged": diverged}}}
    rec["rescored"] = {"grid_from": source, "previous": old["methods"][default]}
    return rec


def score_cell(cell: dict, data, seeds, log=print, done=lambda records, curves: None, range_data=None,
               length_mult: int = 1, lr_free: bool = False, old: dict | None = None, source: str = "",
               trained: dict | None = None) -> list[dict]:
    """Per seed: the range test's suggestions (on `range_data`, default `data`; `length_mult` x its default
    one-epoch length) scored against the best rate of a grid over its span trained on `data` (by validation
    accuracy, or loss for cells with metric "loss"); with `lr_free`, the learning-rate-free optimizers too;
    `done(records, curves)` after each seed. With `old` (seed -> record of `source`), only the default
    method is scored anew, against the old record's grid (`rescored`). `trained` (seed -> {rate: (score,
    diverged)}, `scores_of` of a record) holds rates already trained for the same seed, data and epochs: they are not
    trained again (a sweep's members train independently)."""
    opt = optimizers.get(cell["optimizer"])
    model_fn = model_fn_for(cell, data)
    loss_fn, by_loss = task_of(cell), cell.get("metric") == "loss"
    rdata = data if range_data is None else range_data
    records, curves = [], []
    for seed in seeds:
        t0 = time.perf_counter()
        steps = length_mult * (-(-train_size(rdata) // 32))
        r = lrjax.find_lr(model_fn(seed), opt, rdata, batch_size=32, seed=seed, loss_fn=loss_fn, num_steps=steps,
                          **cell.get("range", {}))
        find_s = time.perf_counter() - t0

        def run(lrs, optimizer=opt, seed=seed):
            known = (trained or {}).get(seed, {}) if optimizer is opt else {}
            found = [known_score(known, lr) for lr in lrs]
            todo = [lr for lr, f in zip(lrs, found) if f is None]
            if todo:  # replica k: the seed's initial weights, batch order seed + 1000 k (replica 0: the seed's own)
                orders = [seed + 1000 * k for k in range(cell.get("replicas", 1))]
                s = lrjax.sweep(lambda _order: model_fn(seed), optimizer, data, todo, seeds=orders,
                                epochs=cell["epochs"], batch_size=32, loss_fn=loss_fn)
                best = s.best("val_loss") if by_loss else s.best_val_accuracy
                new = iter(zip(best.mean(axis=0), s.diverged.any(axis=0)))
            found = [f if f is not None else next(new) for f in found]
            return np.array([f[0] for f in found]), np.array([f[1] for f in found])

        span = tuple(cell.get("grid_span", (float(r.lrs[0]), r.diverged_lr or float(r.lrs[-1]))))
        suggestions = {**r.suggestions, **{k: fn(r) for k, fn in EXTRA.items()}}
        scored = (rescored(old[seed], r, run, source) if old is not None else
                  {"seed": seed, **score_suggestions(suggestions, span, run, cell["grid"], lower_is_better=by_loss)})
        rec = {**scored,
               "curve": {"points": len(r.lrs), "first_lr": float(r.lrs[0]), "last_lr": float(r.lrs[-1]),
                         "diverged_lr": r.diverged_lr, "lag_growth": suggest.lag_growth(r.lrs, r.beta),
                         "warnings": r.warnings, "length_mult": length_mult},
               "verification": r.verification.to_json() if r.verification else None,
               "range_test_s": round(r.wall_time_s, 2), "find_lr_s": round(find_s, 2)}
        if lr_free:
            rec["lr_free"] = {}
            for name, rate in LR_FREE.items():
                score, diverged = run(np.array([rate]), optimizers.get(name))
                value = float(score[0]) if not diverged[0] and np.isfinite(score[0]) else (np.inf if by_loss else 0.0)
                rec["lr_free"][name] = {"lr": rate, "accuracy": value, "fraction": value / rec["best_grid_accuracy"]}
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        curves.append({"seed": seed, "lrs": [float(f"{v:.6g}") for v in r.lrs],
                       "losses": [round(float(v), 5) for v in r.losses]})
        records.append(rec)
        log(f"  seed {seed}: best grid lr {rec['best_grid_lr']:.3g} ({'val loss' if by_loss else 'val acc'} "
            f"{rec['best_grid_accuracy']:.4f}); "
            + ", ".join(f"{m} {v['lr']:.3g}->{v['fraction']:.4f}" for m, v in rec["methods"].items() if v["lr"])
            + "".join(f", {k} {v['fraction']:.4f}" for k, v in rec.get("lr_free", {}).items())
            + f"  [range test {rec['range_test_s']:.0f}s, find_lr {rec['find_lr_s']:.0f}s, all {rec['seconds']:.0f}s]",
            flush=True)
        done(records, curves)
    return records


def table_text(name: str, cell: dict, records: list[dict]) -> str:
    table = summarise(records, methods=tuple(records[0]["methods"]))
    best = [r["best_grid_lr"] for r in records]
    lag = [r["curve"]["lag_growth"] for r in records]
    by_loss = cell.get("metric") == "loss"
    what = "validation loss" if by_loss else "validation accuracy"
    lines = [f"{name}: {what} at the suggested rate / at the best grid rate ({len(records)} seeds, "
             f"{cell['epochs']} epochs, {cell['grid']}-point grid; best grid rates {min(best):.3g}-{max(best):.3g}; "
             f"rate growth over the smoothing's lag x{min(lag):.3g}-{max(lag):.3g})",
             "| method | mean lr | mean | worst | diverged |", "|---|---|---|---|---|"]
    for m, t in table.items():
        label = f"{m} (default)" if m == suggest.DEFAULT_METHOD else m
        lines.append(f"| {label} | {t['mean_lr']:.3g} | {t['mean_fraction']:.4f} | {t['worst_fraction']:.4f} | "
                     f"{t['diverged']}/{len(records)} |")
    for k in records[0].get("lr_free", {}):
        f = [r["lr_free"][k]["fraction"] for r in records if k in r.get("lr_free", {})]
        lines.append(f"| {k} (lr-free, {records[0]['lr_free'][k]['lr']:g}) | - | {np.mean(f):.4f} | "
                     f"{(max(f) if by_loss else min(f)):.4f} | - |")
    rt = [r["range_test_s"] for r in records if "range_test_s" in r]
    if rt:
        fl = [r["find_lr_s"] for r in records]
        lines.append(f"time: range test {np.mean(rt):.1f}s, whole find_lr {np.mean(fl):.1f}s (mean over seeds, x"
                     f"{np.mean(fl) / np.mean(rt):.2f}; a shared 2-core CPU)")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="Fashion-MNIST IDX folder")
    p.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated cells: {', '.join(CELLS)}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds first-seed .. first-seed + seeds - 1; a cell's records of other seeds in --json are kept")
    p.add_argument("--json", default="experiments/results/suggestion_quality_matrix.json")
    p.add_argument("--curves", default=None, help="where the range-test curves go (default: beside --json, "
                   "NAME_curves.json)")
    p.add_argument("--report", action="store_true", help="print the tables of --json and exit")
    p.add_argument("--length-mult", type=int, default=1, help="the range test runs this many epochs (cell NAME@Kx)")
    p.add_argument("--lr-free", action="store_true", help="also train the learning-rate-free optimizers")
    p.add_argument("--rescore", default=None, help="a record (JSON) of the same cells and seeds: rerun each range "
                   "test and score only the default method anew, against that record's grids (after a change of "
                   "the default; the other suggestions must come out as recorded)")
    p.add_argument("--reuse", default=None, help="a record (JSON) holding the same cells at the default length: "
                   "rates it trained for a seed (its grid, its suggestions) are not trained again (for --length-mult)")
    a = p.parse_args()
    path = Path(a.json)
    out = json.loads(path.read_text()) if path.exists() else {"cells": {}}
    if a.report:
        for name, c in out["cells"].items():
            print(table_text(name, c, c["records"]) + "\n")
        return 0
    cells = [c for c in a.cells.split(",") if c]
    unknown = [c for c in cells if c not in CELLS]
    suffix = f"@{a.length_mult}x" if a.length_mult != 1 else ""
    if unknown:
        p.error(f"unknown cells {unknown}; choose from {', '.join(CELLS)}")
    curves_path = Path(a.curves) if a.curves else path.with_name(path.stem + "_curves.json")
    all_curves = json.loads(curves_path.read_text()) if curves_path.exists() else {}
    lrjax.use_cpu_cores()  # before JAX starts: the sweep's members run on every CPU core
    full = (lrjax.load_dataset("fashion_mnist", a.data_dir)
            if any(CELLS[c]["model"] not in ("charlm", "transformer") for c in cells) else None)
    out["methods"] = list(METHODS)
    seeds = list(range(a.first_seed, a.first_seed + a.seeds))
    for base in cells:
        cell, name = CELLS[base], base + suffix
        if cell["model"] == "charlm":
            from charlm import text_data

            data = text_data(64)
        elif cell["model"] == "transformer":
            data = text_corpus(cell.get("size", {}).get("context", 128))
        elif cell["model"] == "mlp-halves":
            data = halves(full.take(cell["train"], len(full.x_valid)))
        else:
            data = full if cell["train"] is None else full.take(cell["train"], len(full.x_valid))
        print(f"{name}: {train_size(data)} training examples, range test + sweep of {cell['grid']} grid rates and the "
              f"suggestions, {cell['epochs']} epochs, seeds {seeds[0]}-{seeds[-1]}", flush=True)
        same = out["cells"].get(name, {})
        same = same if defines(same, cell) else {}
        kept = [r for r in same.get("records", []) if r["seed"] not in seeds]
        seconds = same.get("seconds", 0.0) if kept else 0.0
        t0 = time.perf_counter()

        def save(records, curves, name=name, cell=cell, data=data, t0=t0, kept=kept, seconds=seconds):
            records = sorted(kept + records, key=lambda r: r["seed"])  # after every seed: a stopped run keeps them
            out["cells"][name] = {**cell, "train": train_size(data), "seeds": len(records), "records": records,
                                  "table": summarise(records, methods=tuple(records[0]["methods"])),
                                  "seconds": round(seconds + time.perf_counter() - t0, 1)}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(out, indent=1))
            done = {c["seed"] for c in curves}
            all_curves[name] = sorted([c for c in all_curves.get(name, []) if c["seed"] not in done] + curves,
                                      key=lambda c: c["seed"])
            curves_path.write_text(json.dumps(all_curves))

        range_data = data if cell.get("range_train", cell["train"]) == cell["train"] or full is None else (
            full if cell["range_train"] is None else full.take(cell["range_train"], len(full.x_valid)))
        if cell["model"] == "mlp-halves" and range_data is full:
            range_data = halves(full)
        old = None
        if a.rescore:
            old = {r["seed"]: r for r in json.loads(Path(a.rescore).read_text())["cells"][name]["records"]}
        trained = None
        if a.reuse:  # the same cell at another length: its grid and rates trained for the same seeds
            other = json.loads(Path(a.reuse).read_text())["cells"].get(base)
            trained = {r["seed"]: scores_of(r) for r in other["records"]} if defines(other, cell) else None
            if trained is None:
                p.error(f"--reuse {a.reuse} holds no record of {base} as defined now")
        score_cell(cell, data, seeds, done=save, range_data=range_data, length_mult=a.length_mult, lr_free=a.lr_free,
                   old=old, source=a.rescore or "", trained=trained)
        c = out["cells"][name]
        print("\n" + table_text(name, c, c["records"]) + "\n", flush=True)
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
