"""The streamed input pipeline's own speed (lrjax.stream), without a model, and how staging chunks on the
device overlaps a model's chunk program.

    python experiments/bench_stream.py --data-dir ../shared/data/fashion_mnist [--json out.json]

pipeline  examples/s of one training epoch (55,000 examples, shuffled, chunks of ~8k examples) from
          (a) the TFDS ArrayRecord preparation of Fashion-MNIST (PNG-decoded on the host) and (b) a uint8
          .npy memmap of the same images, at batch 32 and 256, with 0, 1 and 2 worker processes; each
          in a fresh process, so its start-up (spawning workers) and peak RSS (its own, and its
          largest worker's) are its own. Examples/s count from the first chunk on; start-up apart.
overlap   one epoch of an MLP's chunk program (a scan of SGD steps over the chunk) fed by the stream:
          staging each chunk after the previous one finished (serial), staging chunk i+1 right after
          dispatching chunk i (dispatch-ahead), and DevicePrefetch's background thread; each variant
          times an epoch's worth of chunks after 3 untimed ones (worker start-up, filled buffers).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXAMPLES_PER_CHUNK = 8192


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def prepare(data_dir: Path, work: Path) -> tuple[Path, Path]:
    """The TFDS ArrayRecord preparation (made from the IDX files) and a uint8 .npy of the train images."""
    from lrjax.idx import read_idx_folder
    from lrjax.tfds_source import load_tfds_arrays

    tfds_dir = work / "tfds"
    if not (tfds_dir / "fashion_mnist").exists():
        load_tfds_arrays("fashion_mnist", str(tfds_dir), idx_dir=data_dir, progress=False)
    npy = work / "train_images.npy"
    if not npy.exists():
        arrays = read_idx_folder(data_dir, "fashion_mnist")
        np.save(npy, arrays["train_images"])
        np.save(work / "train_labels.npy", arrays["train_labels"])
        np.save(work / "test_images.npy", arrays["test_images"])
        np.save(work / "test_labels.npy", arrays["test_labels"])
    return tfds_dir, npy


def open_splits(source: str, work: Path):
    from lrjax import sources

    if source == "tfds":
        return sources.tfds_splits("fashion_mnist", work / "tfds")
    load = lambda name: np.load(work / f"{name}.npy", mmap_mode="r")  # noqa: E731
    return sources.array_splits(load("train_images"), load("train_labels"), load("test_images"),
                               load("test_labels"), name="memmap")


def one_pipeline(source: str, batch: int, workers: int, threads: int, work: Path) -> dict:
    """Runs in its own process: one shuffled epoch through the pipeline, nothing else."""
    from lrjax import stream

    t0 = time.perf_counter()
    splits = open_splits(source, work)
    s = stream.Stream(splits.train, batch, chunk_steps=max(1, EXAMPLES_PER_CHUNK // batch), seed=0, epochs=1,
                      workers=workers, threads=threads)
    chunks = iter(s)
    first = next(chunks)
    t1 = time.perf_counter()
    examples = int(first["w"].sum())
    checksum = int(first["x"][:, :, 0, 0].sum())
    for chunk in chunks:
        examples += int(chunk["w"].sum())
        checksum += int(chunk["x"][:, :, 0, 0].sum())  # touch the data
    t2 = time.perf_counter()
    s.close()
    first_examples = int(first["w"].sum())
    return {"source": source, "batch": batch, "workers": workers, "threads": threads, "examples": examples,
            "startup_s": t1 - t0, "epoch_s": t2 - t0,
            "examples_per_s": (examples - first_examples) / (t2 - t1),
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def bench_pipeline(work: Path, batches, workers_list, threads_list) -> list[dict]:
    rows = []
    for source in ("tfds", "memmap"):
        for batch in batches:
            for workers in workers_list:
                for threads in threads_list:
                    out = subprocess.run([sys.executable, __file__, "--one", source, str(batch), str(workers),
                                          str(threads), "--work", str(work)], capture_output=True, text=True)
                    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
                    if out.returncode or not line:
                        print(out.stderr[-2000:], file=sys.stderr)
                        raise SystemExit(f"pipeline run {source} {batch} {workers} failed")
                    r = json.loads(line[-1][7:])
                    rows.append(r)
                    print(f"pipeline {source:6s} batch {batch:3d} workers {workers} threads {threads}: "
                          f"{r['examples_per_s']:9,.0f} examples/s   start-up {r['startup_s']:5.2f} s   "
                          f"epoch {r['epoch_s']:5.2f} s   peak RSS {r['rss_mb']:4.0f} MB"
                          f" (largest worker {r['worker_rss_mb']:.0f} MB)", flush=True)
    return rows


def bench_overlap(work: Path, batch: int, workers: int, source: str, repeats: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from lrjax import stream

    splits = open_splits(source, work)
    k = max(1, EXAMPLES_PER_CHUNK // batch)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))  # as lrjax.mesh
    sharding = stream.chunk_sharding(mesh)
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(0, 0.05, (784, 128)), jnp.float32), "b1": jnp.zeros(128),
              "w2": jnp.asarray(rng.normal(0, 0.05, (128, 10)), jnp.float32), "b2": jnp.zeros(10)}

    def loss(p, x, y, w):
        h = jax.nn.relu(stream.to_float(x).reshape(x.shape[0], -1) @ p["w1"] + p["b1"])
        logp = jax.nn.log_softmax(h @ p["w2"] + p["b2"])
        return -jnp.sum(jnp.take_along_axis(logp, y[:, None], 1)[:, 0] * w) / jnp.maximum(w.sum(), 1)

    @jax.jit
    def run_chunk(p, chunk):
        def body(p, b):
            x, y, w, active = b
            g = jax.grad(loss)(p, x, y, w)
            return jax.tree.map(lambda a, ga: a - 0.01 * ga * active, p, g), None
        return jax.lax.scan(body, p, (chunk["x"], chunk["y"], chunk["w"], chunk["active"]))[0]

    def serial(chunks, n):
        p = params
        for _ in range(n):
            p = run_chunk(p, stream.to_device(next(chunks), sharding))
            jax.block_until_ready(p)  # host work between chunks (metrics, callbacks) waits for the result
        return p

    def dispatch_ahead(chunks, n):
        p, staged = params, stream.to_device(next(chunks), sharding)
        for i in range(n):
            p = run_chunk(p, staged)
            if i + 1 < n:
                staged = stream.to_device(next(chunks), sharding)  # while the device computes
            jax.block_until_ready(p)
        return p

    def threaded(prefetch, n):
        p = params
        for _ in range(n):
            p = run_chunk(p, next(prefetch))
            jax.block_until_ready(p)
        return p

    def compute_only(_, n):  # the same program on chunks already on the device: the floor
        p = params
        for i in range(n):
            p = run_chunk(p, resident[i % len(resident)])
            jax.block_until_ready(p)
        return p

    def make():
        return stream.Stream(splits.train, batch, chunk_steps=k, seed=0, workers=workers)  # endless

    first = make()
    resident = [stream.to_device(c, sharding) for c in first.epoch()]
    first.close()
    jax.block_until_ready(run_chunk(params, resident[0]))  # compile outside the timings
    variants = {"compute only (chunks already on device)": (compute_only, lambda: None),
                "serial": (serial, make), "dispatch-ahead": (dispatch_ahead, make),
                "DevicePrefetch thread": (threaded, lambda: stream.DevicePrefetch(make(), sharding, size=2))}
    n = first.plan.chunks_per_epoch
    warm = 3  # untimed: worker start-up and whatever the buffers filled meanwhile
    times = {name: [] for name in variants}
    for _ in range(repeats):  # interleaved, so drifting machine load hits every variant alike
        for name, (fn, open_chunks) in variants.items():
            chunks = open_chunks()
            fn(chunks, warm)
            t = time.perf_counter()
            fn(chunks, n)
            times[name].append(time.perf_counter() - t)
            if chunks is not None:
                chunks.close()
    rows = []
    for name, ts in times.items():
        med = float(np.median(ts))
        rows.append({"source": source, "batch": batch, "workers": workers, "variant": name, "epoch_s": med,
                     "times": ts})
        print(f"overlap {source:6s} batch {batch:3d} workers {workers}: {name:42s} {med:6.2f} s an epoch "
              f"({55000 / med:8,.0f} examples/s)", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "fashion_mnist"))
    p.add_argument("--work", default=None, help="folder for the TFDS preparation and the memmap (kept)")
    p.add_argument("--sections", default="pipeline,overlap")
    p.add_argument("--batches", default="32,256")
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--threads", default="1")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--one", nargs=4, metavar=("SOURCE", "BATCH", "WORKERS", "THREADS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    work = Path(a.work or Path(tempfile.gettempdir()) / "lrjax_bench_stream")
    if a.one:
        source, batch, workers, threads = a.one
        print("RESULT " + json.dumps(one_pipeline(source, int(batch), int(workers), int(threads), work)))
        return
    work.mkdir(parents=True, exist_ok=True)
    prepare(Path(a.data_dir), work)
    out = {"cpu": cpu_name(), "cores": len(__import__("os").sched_getaffinity(0))}
    print(f"{out['cpu']}, {out['cores']} cores", flush=True)
    if "pipeline" in a.sections:
        out["pipeline"] = bench_pipeline(work, [int(b) for b in a.batches.split(",")],
                                         [int(w) for w in a.workers.split(",")],
                                         [int(t) for t in a.threads.split(",")])
    if "overlap" in a.sections:
        out["overlap"] = [r for source in ("memmap", "tfds") for workers in (0, 1)
                          for r in bench_overlap(work, 256, workers, source, a.repeats)]
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
