"""What both peer range tests share, so that they differ only in the framework: the article's
settings, the IDX read, the suggestion rule, the outputs and the process clock.

Only numpy, matplotlib and the standard library (each peer's environment has those and its own
framework, never lrjax). The peers import this module from their own folder (a script's folder
is first on sys.path).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import time
from pathlib import Path

import numpy as np

# the seed article's range test: SGD from 1e-3, x1.005 after every batch of 32, one epoch, and the
# stop the issue adds: once the recorded loss exceeds 4x the best seen (or is not finite)
START_LR, BATCH, FACTOR, STOP = 1e-3, 32, 1.005, 4.0
VALID = 5000  # the article's validation set: the official train split's first 5,000 images


def process_age_s() -> float | None:
    """Seconds since the OS started this process (Linux's /proc/self/stat; None elsewhere), so the
    printed wall time includes the interpreter's start and every import."""
    try:
        stat = Path("/proc/self/stat").read_bytes()
        ticks = int(stat[stat.rindex(b")") + 2:].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def parser(doc: str, workdir: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data/fashion_mnist", type=Path,
                   help="folder of Fashion-MNIST's IDX .gz files")
    p.add_argument("--workdir", default=workdir, type=Path, help="where lr_find.json and lr_find.png go")
    p.add_argument("--seed", type=int, default=42)
    return p


def _read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=header)


def load_train(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The article's 55,000 training images (float32 in [0, 1], 28 x 28) and their int64 labels."""
    x = _read_idx(data_dir / "train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    y = _read_idx(data_dir / "train-labels-idx1-ubyte.gz", 8)
    return x[VALID:].astype(np.float32) / 255.0, y[VALID:].astype(np.int64)


def suggestions(rates: list[float], losses: list[float]) -> dict[str, float | None]:
    """The article reads a rate "a little below where the loss turns back up" off the plot; made
    precise as lrjax's `seed` rule, two thirds of the rate at the recorded curve's minimum
    (`two_thirds_of_turn`, the one printed). `minimum_over_10` is the other common reading."""
    finite = [(r, l) for r, l in zip(rates, losses) if math.isfinite(l)]
    if not finite:
        return {"turning_lr": None, "two_thirds_of_turn": None, "minimum_over_10": None}
    turn = min(finite, key=lambda rl: rl[1])[0]
    return {"turning_lr": turn, "two_thirds_of_turn": turn * 2 / 3, "minimum_over_10": turn / 10}


def save_outputs(workdir: Path, rates: list[float], losses: list[float], extra: dict) -> None:
    """lr_find.json ({rates, losses, ...extra}) and lr_find.png, the article's plot: loss against
    rate on a log axis, a dotted line at the lowest loss, y from 0 to the first loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "lr_find.json").write_text(json.dumps({"rates": rates, "losses": losses, **extra}, indent=1))
    finite = [l for l in losses if math.isfinite(l)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rates, losses)
    ax.set_xscale("log")
    if finite:
        ax.hlines(min(finite), min(rates), max(rates), linestyles="dotted")
        ax.set_ylim(0, finite[0])
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.grid(True)
    fig.tight_layout()
    fig.savefig(workdir / "lr_find.png", dpi=100)
    plt.close(fig)


def report(name: str, rates: list[float], losses: list[float], train_size: int, workdir: Path,
           phases: dict[str, float | None], framework: str) -> int:
    """Writes the outputs, prints the run, the suggestion, the phases and the process's wall time;
    returns the exit status (1 when no finite loss was recorded)."""
    t = time.perf_counter()
    sugg = suggestions(rates, losses)
    save_outputs(workdir, rates, losses, {"suggestions": sugg, "framework": framework})
    phases["outputs (json, matplotlib, png)"] = time.perf_counter() - t
    stopped = len(rates) < math.ceil(train_size / BATCH)
    print(f"{name} range test: {len(rates)} steps from lr {rates[0]:.3g} to {rates[-1]:.3g}"
          f"{' (stopped at 4x the best loss)' if stopped else ''}")
    if sugg["two_thirds_of_turn"] is None:
        print(f"{name} range test: no finite loss recorded, no suggestion")
        return 1
    print(f"suggested lr (2/3 of the rate at the minimum loss, {sugg['turning_lr']:.3g}): "
          f"{sugg['two_thirds_of_turn']:.4g}; minimum / 10: {sugg['minimum_over_10']:.4g}  -> {workdir / 'lr_find.png'}")
    print("phases: " + ", ".join(f"{k} {v:.2f}s" for k, v in phases.items() if v is not None))
    wall = process_age_s()
    print(f"wall time (process start to now): {wall:.2f}s" if wall is not None else "wall time: unknown")
    return 0
