"""`lrjax find-lr` beside its peers, as whole fresh processes timed from outside, in one run.

    python experiments/peers/compare.py --data-dir ../shared/data/fashion_mnist \
        --keras-python /work/venv-tf/bin/python --torch-python /work/venv-torch/bin/python --json out.json

Variants (each a new process, its workdir emptied first): the bare `import jax, flax.nnx, optax`,
`lrjax find-lr` (this checkout's lrjax, with this interpreter), the same with LRJAX_SERIAL=1 (its
phases one after another, as before lrjax.overlap), and the seed article's range test in Keras
(keras_range_test.py) and in PyTorch on one thread (torch_range_test.py), each with its own
interpreter (a peer whose interpreter is not given is left out). Round 0 warms up (page cache,
lrjax's compilation and IDX caches, in a scratch cache folder), then `--repeats` rounds run every
variant in turn, so that a load that comes and goes on a shared machine falls on all of them; the
table shows medians and the ratios the issue sets bars for. lrjax's own lr_find.json timeline
(each phase's [start, end] since its process started) is kept per run in the JSON.

The section `process` of experiments/bench.py is meant to fold this in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout whose lrjax is measured
PEERS = Path(__file__).resolve().parent
BARE = "import jax, flax.nnx, optax"
LRJAX_MAIN = "import sys; from lrjax.cli import main; sys.exit(main())"  # what the `lrjax` script runs
BARS = {"keras": 3.0, "torch": 1.5}  # lrjax at least this many times faster (issue 27)
BARE_BAR = 2.2  # lrjax at most this many times the bare import


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def variants(a, work: Path, cache: Path) -> dict[str, dict]:
    """name -> argv, extra environment, workdir (emptied before each run) and what it reports."""
    lrjax_env = {"LRJAX_CACHE_DIR": str(cache),
                 "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}

    def find_lr(name, **env):
        wd = work / name
        return {"argv": [a.lrjax_python, "-c", LRJAX_MAIN, "find-lr", "--data-dir", a.data_dir, "--workdir", str(wd),
                         "--no-progress"], "env": {**lrjax_env, **env}, "workdir": wd, "kind": "lrjax"}

    def peer(name, python, script):
        wd = work / name
        return {"argv": [python, str(PEERS / script), "--data-dir", a.data_dir, "--workdir", str(wd)],
                "env": {}, "workdir": wd, "kind": "peer"}

    out = {"bare": {"argv": [a.lrjax_python, "-c", BARE], "env": {}, "workdir": None, "kind": "bare"},
           "lrjax": find_lr("lrjax")}
    if a.serial:
        out["lrjax_serial"] = find_lr("lrjax_serial", LRJAX_SERIAL="1")
    if a.keras_python:
        out["keras"] = peer("keras", a.keras_python, "keras_range_test.py")
    if a.torch_python:
        out["torch"] = peer("torch", a.torch_python, "torch_range_test.py")
    return out


LABELS = {"bare": f'python -c "{BARE}"', "lrjax": "lrjax find-lr",
          "lrjax_serial": "lrjax find-lr, LRJAX_SERIAL=1", "keras": "Keras (tensorflow-cpu)",
          "torch": "PyTorch, 1 thread"}


def run_once(v: dict, cwd: Path) -> tuple[float, dict]:
    if v["workdir"] is not None:
        shutil.rmtree(v["workdir"], ignore_errors=True)
    env = {**os.environ, **v["env"]}
    t0 = time.perf_counter()
    out = subprocess.run(v["argv"], env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(v['argv'])} exited {out.returncode}: {out.stderr[-2000:]}")
    info = {}
    if v["kind"] == "lrjax":
        j = json.loads((v["workdir"] / "lr_find.json").read_text())
        info = {"suggestion": j["suggestion"], "timeline_s": j.get("timeline_s"), "phases_s": j["phases_s"],
                "startup_s": j.get("startup_s")}
    elif v["kind"] == "peer":
        m = re.search(r"suggested lr .*?: ([0-9.e+-]+);", out.stdout)
        w = re.search(r"wall time \(process start to now\): ([0-9.]+)s", out.stdout)
        info = {"suggestion": float(m[1]) if m else None, "own_wall_s": float(w[1]) if w else None,
                "phases": out.stdout.split("phases: ", 1)[-1].split("\n", 1)[0]}
    return seconds, info


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "fashion_mnist"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lrjax-python", default=sys.executable, help="the interpreter with lrjax's dependencies")
    p.add_argument("--keras-python", default=None, help="an interpreter with tensorflow-cpu (.[peers-keras])")
    p.add_argument("--torch-python", default=None, help="an interpreter with torch (.[peers-torch])")
    p.add_argument("--serial", action=argparse.BooleanOptionalAction, default=True,
                   help="also lrjax find-lr with LRJAX_SERIAL=1")
    p.add_argument("--json", default=None, help="write the table and every run here")
    a = p.parse_args()
    a.data_dir = str(Path(a.data_dir).resolve())
    tmp = Path(tempfile.mkdtemp(prefix="lrjax-peers-"))
    try:
        vs = variants(a, tmp / "work", tmp / "cache")
        runs = {name: [] for name in vs}
        print(f"peers: python {platform.python_version()}, {cpu_name()} x{os.cpu_count()}, "
              f"repeats {a.repeats} (+1 warm-up round), variants interleaved; machine shared with other jobs",
              flush=True)
        for r in range(a.repeats + 1):
            for name, v in vs.items():
                seconds, info = run_once(v, tmp)
                if r:
                    runs[name].append({"seconds": seconds, **info})
        med = {name: statistics.median(x["seconds"] for x in rs) for name, rs in runs.items()}
        rows = []
        for name, rs in runs.items():
            ratio = (f"lrjax {med[name] / med['lrjax']:.2f}x faster" if vs[name]["kind"] == "peer" else
                     f"{med[name] / med['bare']:.2f}x the bare import" if name != "bare" else "the bar's base")
            sugg = rs[0].get("suggestion")
            rows.append({"variant": LABELS[name], "median_s": med[name], "runs_s": [x["seconds"] for x in rs],
                         "ratio": ratio, "suggestion": sugg})
            times = ", ".join(f"{x['seconds']:.2f}" for x in rs)
            print(f"{LABELS[name]:42s} {med[name]:7.2f} s  {ratio:28s} runs {times}"
                  + (f"  suggestion {sugg:.4g}" if sugg else ""), flush=True)
        bars = {f"lrjax vs {k}": {"ratio": med[k] / med["lrjax"], "bar": bar, "met": med[k] / med["lrjax"] >= bar}
                for k, bar in BARS.items() if k in med}
        bars["lrjax / bare import"] = {"ratio": med["lrjax"] / med["bare"], "bar": BARE_BAR,
                                       "met": med["lrjax"] / med["bare"] <= BARE_BAR}
        print("bars: " + "; ".join(f"{k} {v['ratio']:.2f} ({'>=' if 'vs' in k else '<='} {v['bar']}: "
                                   f"{'met' if v['met'] else 'not met'})" for k, v in bars.items()))
        if a.json:
            Path(a.json).write_text(json.dumps({
                "machine": f"{cpu_name()} x{os.cpu_count()}", "python": platform.python_version(),
                "note": "fresh processes timed from outside; median of the repeats after one warm-up round; "
                        "variants interleaved; the machine was shared with other jobs (absolute times are noisy)",
                "commands": {LABELS[n]: v["argv"] for n, v in vs.items()}, "rows": rows, "bars": bars,
                "runs": runs}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
