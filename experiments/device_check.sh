#!/usr/bin/env bash
# experiments/device_check.sh: lrjax's benchmarks on a GPU machine, in one go, under 8 minutes.
#
# The GPU machines lent to this project have no package registry; they come with jax 0.11 (CUDA 13)
# on Python 3.12, flax, optax, orbax-checkpoint and tensorboard, but not tensorboardX, matplotlib
# (lr_find.png), tqdm or crc32c, and only the working tree travels (64 MiB in all). So this script
# uses the jax that is there, installs the carried wheels of whatever else is missing into a folder
# of its own (nothing installed is replaced), reads Fashion-MNIST from files carried with the tree,
# runs bench.py's range, seeds, epoch and sweep sections, then its process and sharding sections, and writes
# the JSON and the printed tables to $OUT.
#
# Prepare, on the development machine (both folders are .gitignored; ~24 MB + 30 MB):
#   pip download --python-version 3.12 --only-binary=:all: --no-deps -d experiments/wheels \
#       tensorboardX crc32c tqdm matplotlib contourpy cycler fonttools kiwisolver pyparsing pillow \
#       python-dateutil six packaging
#   mkdir -p experiments/device_data && cp -r ../shared/data/fashion_mnist experiments/device_data/
# Run, with the `run` tool (its carry parameter takes up to 8 ignored paths, 64 MiB with the tree):
#   command: bash experiments/device_check.sh      timeout_s: 560
#   carry:   ["experiments/wheels", "experiments/device_data"]
# Here: env.txt (GPU, versions), bench_gpu.{txt,json} (in-process sections), bench_gpu_process.
# {txt,json} (whole CLI processes), bench_gpu_sharding.{txt,json} (the sharded Transformer's step), goals.txt (the issue's three GPU goals, read off the JSON).
# Each JSON is rewritten after every section, so a section cut short by its timeout keeps the rest.
# A local smoke test of the script itself: PYTHON=.venv/bin/python BENCH_ARGS=--quick OUT=/tmp/dc bash ...

set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DATA=$PWD/experiments/device_data/fashion_mnist
WHEELS=$PWD/experiments/wheels
SITE=$(mktemp -d /tmp/lrjax-site-XXXX)
export LRJAX_CACHE_DIR=$(mktemp -d /tmp/lrjax-cache-XXXX)  # compiled programs of this run only
export TF_CPP_MIN_LOG_LEVEL=2
start=$SECONDS

{
  echo "date: $(date -u +%FT%TZ)  host: $(uname -nm)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  grep -m1 'model name' /proc/cpuinfo; echo "cpus: $(nproc)"
  "$PY" -c "import sys, jax, jaxlib; print('python', sys.version.split()[0], 'jax', jax.__version__, 'jaxlib', jaxlib.__version__); print(jax.devices())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
[ "$(uname -m)" = x86_64 ] || { echo "the carried wheels are for x86_64, this is $(uname -m)"; exit 1; }
[ -f "$DATA/train-images-idx3-ubyte.gz" ] || { echo "no data at $DATA: carry experiments/device_data"; exit 1; }

# module name -> wheel name prefix; only what this machine lacks is installed
missing=()
for pair in tensorboardX:tensorboardx crc32c:crc32c tqdm:tqdm matplotlib:matplotlib contourpy:contourpy \
            cycler:cycler fontTools:fonttools kiwisolver:kiwisolver pyparsing:pyparsing PIL:pillow \
            dateutil:python_dateutil six:six packaging:packaging; do
  module=${pair%%:*} wheel=${pair##*:}
  if ! "$PY" -c "import $module" 2>/dev/null; then
    found=$(ls "$WHEELS"/"$wheel"-*.whl 2>/dev/null | head -1)
    [ -n "$found" ] || { echo "no wheel for $module in $WHEELS: carry experiments/wheels"; exit 1; }
    missing+=("$found")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing into $SITE: ${missing[*]##*/}"
  "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "${missing[@]}" || exit 1
fi
export PYTHONPATH=$PWD:$SITE
"$PY" -c "import lrjax, tensorboardX, matplotlib, tqdm; print('lrjax', lrjax.__version__, 'from', lrjax.__file__)" \
  2>&1 | tee -a "$OUT/env.txt" || exit 1
echo "set-up: $((SECONDS - start)) s"

# In-process sections first (the GPU goals), then whole processes; each under its own limit.
timeout "${BENCH_TIMEOUT:-280}" "$PY" experiments/bench.py --data-dir "$DATA" --sections range,seeds,epoch,sweep \
  --repeats 3 ${BENCH_ARGS:-} --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt"
echo "in-process sections: exit ${PIPESTATUS[0]}, $((SECONDS - start)) s so far"
timeout "${PROCESS_TIMEOUT:-170}" "$PY" experiments/bench.py --data-dir "$DATA" --sections process --repeats 2 \
  --json "$OUT/bench_gpu_process.json" 2>&1 | tee "$OUT/bench_gpu_process.txt"
echo "process section: exit ${PIPESTATUS[0]}, $((SECONDS - start)) s so far"
# The sharded Transformer's step on data=N, fsdp=N (and data=2,fsdp=2,tensor=2 from 8 GPUs), N = the GPUs (<= 8)
timeout "${SHARDING_TIMEOUT:-45}" "$PY" experiments/bench.py --sections sharding --repeats 2 \
  --json "$OUT/bench_gpu_sharding.json" 2>&1 | tee "$OUT/bench_gpu_sharding.txt"
echo "sharding section: exit ${PIPESTATUS[0]}, $((SECONDS - start)) s in all"

"$PY" - "$OUT/bench_gpu.json" <<'EOF' 2>&1 | tee "$OUT/goals.txt"
"""The issue's GPU goals, read off the bench's rows (a row missing: its section did not finish)."""
import json, os, sys

if not os.path.exists(sys.argv[1]):
    sys.exit(f"no {sys.argv[1]}: the in-process sections did not finish a section (see bench_gpu.txt)")
rows = {(r["section"], r["variant"]): r for r in json.load(open(sys.argv[1]))["rows"]}

def find(section, start):
    return next((r for (s, v), r in rows.items() if s == section and v.startswith(start)), None)

loop, lrjax_run = find("range", "jitted step, Python loop, already compiled"), find("range", "lrjax find_lr, already compiled")
if loop and lrjax_run:
    x = loop["median_s"] / lrjax_run["median_s"]
    print(f"range test vs a jitted Python loop, after compile: {x:.1f}x (goal >= 5x): {'met' if x >= 5 else 'NOT met'}")
epoch = find("epoch", "batch 32: lrjax compiled epoch + eval")
if epoch:
    t = epoch["median_s"]
    print(f"epoch of 55k images at batch 32 + validation: {t:.3f} s (goal < 0.2 s): {'met' if t < 0.2 else 'NOT met'}")
one, sixteen = find("seeds", "k=1:"), find("seeds", "k=16: one program, vmap")
if one and sixteen:
    x = sixteen["median_s"] / one["median_s"]
    print(f"16 vmapped seeds vs one: {x:.2f}x the time (goal <= 1.5x): {'met' if x <= 1.5 else 'NOT met'}")
EOF
exit 0
