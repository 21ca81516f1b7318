"""The checkpoint + TensorBoard overhead of an epoch: this checkout's `lrjax.fit` against the fit
loop of an earlier revision, measured side by side in one process (paired, alternating rounds).

    python experiments/ab_fit_loop.py --data-dir ../shared/data/fashion_mnist [--rev e82de2b~1] [--rounds 8]

The default `--rev` is the last loop that wrote an epoch's TensorBoard events, checkpoint and
progress line before starting the next epoch; this checkout starts it first. Each round runs, for
each loop, an `--epochs` fit without and with a workdir; the overhead is the ratio of their mean
epoch-to-epoch intervals (the first interval left out) minus one, and the table shows its median
over rounds (the VM's slow spells make single rounds swing by tens of percent).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optax

import lrjax
from lrjax import train as current
from lrjax.models import mlp


def load_revision(rev: str, tmp: Path):
    """lrjax/train.py as of git revision `rev`, as a module beside this checkout's lrjax."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "-C", str(root), "show", f"{rev}:lrjax/train.py"], capture_output=True,
                            text=True, check=True).stdout
    path = tmp / "train_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("train_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="IDX folder of Fashion-MNIST")
    p.add_argument("--rev", default="e82de2b~1", help="git revision of the loop to compare with")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--epochs", type=int, default=8)
    a = p.parse_args()
    lrjax.use_cpu_cores()  # as the CLI does
    data = lrjax.load_dataset("fashion_mnist", a.data_dir)
    tmp = Path(tempfile.mkdtemp(prefix="lrjax-ab-"))
    loops = {f"fit loop at {a.rev}": load_revision(a.rev, tmp), "fit loop of this checkout": current}

    def interval(module, io: bool) -> float:
        shutil.rmtree(tmp / "wd", ignore_errors=True)
        ends = []
        module.fit(mlp(data.in_features, seed=42), optax.sgd, data, lr=0.01, epochs=a.epochs,
                   workdir=tmp / "wd" if io else None, progress=lambda line: ends.append(time.perf_counter()))
        return float(np.mean(np.diff(ends)[1:]))

    try:
        for module in loops.values():  # warm-up: compiles, Orbax and TensorBoard imports
            interval(module, False), interval(module, True)
        overhead = {name: [] for name in loops}
        for _ in range(a.rounds):
            for name, module in loops.items():
                plain = interval(module, False)
                overhead[name].append(interval(module, True) / plain - 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"checkpoint + TensorBoard overhead of an epoch, {a.epochs}-epoch fits, {a.rounds} paired rounds")
    print(f"{'variant':40s} {'median':>8s}  rounds")
    for name, values in overhead.items():
        print(f"{name:40s} {100 * statistics.median(values):+7.1f}%  "
              + ", ".join(f"{100 * v:+.1f}" for v in values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
