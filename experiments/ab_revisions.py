"""One `lrjax` command at two git revisions, in fresh processes, alternating (paired rounds).

    python experiments/ab_revisions.py --rev c7cf29a --rounds 3 -- train --data-dir ../shared/data/fashion_mnist --lr 0.01 --epochs 3

Each revision is checked out once into a temporary worktree and imported from there
(PYTHONPATH); each round runs the command once per revision, alternating which goes first, with a
fresh --workdir. It prints each revision's median of the per-epoch times in metrics.json (history
`epoch_time_s`, the first epoch left out: compile) and of the whole process's wall time, and the
ratios this checkout / the revision. Compare only numbers of one run: the machine drifts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(tree: Path, command: list[str], workdir: Path) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lrjax.cli", *command, "--workdir", str(workdir), "--no-progress"],
                   env=env, check=True, capture_output=True, cwd=tree)
    wall = time.perf_counter() - t0
    history = json.loads((workdir / "metrics.json").read_text())["history"]
    epochs = [h["epoch_time_s"] for h in history[1:]] or [h["epoch_time_s"] for h in history]
    return statistics.median(epochs), wall


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", required=True, help="git revision to compare this checkout with")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the lrjax subcommand and its flags")
    a = p.parse_args()
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    # each revision runs from its own tree (so that its lrjax is the one imported): paths made absolute
    command = [str(Path(c).resolve()) if not c.startswith("-") and Path(c).exists() else c for c in command]
    tmp = Path(tempfile.mkdtemp(prefix="lrjax-ab-"))
    old = tmp / "rev"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old), a.rev], check=True)
    trees = {f"at {a.rev}": old, "this checkout": ROOT}
    times = {name: [] for name in trees}
    try:
        for r in range(a.rounds):
            order = list(trees.items()) if r % 2 == 0 else list(trees.items())[::-1]
            for name, tree in order:
                shutil.rmtree(tmp / "wd", ignore_errors=True)
                times[name].append(run(tree, command, tmp / "wd"))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"lrjax {' '.join(command)}: {a.rounds} paired rounds, fresh processes")
    print(f"{'variant':20s} {'epoch s (median)':>17s} {'process s (median)':>19s}")
    med = {n: (statistics.median(e for e, _ in v), statistics.median(w for _, w in v)) for n, v in times.items()}
    for name, (e, w) in med.items():
        print(f"{name:20s} {e:17.3f} {w:19.2f}")
    (e0, w0), (e1, w1) = med[f"at {a.rev}"], med["this checkout"]
    print(f"this checkout / {a.rev}: epoch {e1 / e0:.3f}x, process {w1 / w0:.3f}x")


if __name__ == "__main__":
    main()
