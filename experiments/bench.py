"""lrjax benchmarks: every variant measured side by side in one run, median of repeats, ratio to baseline.

    python experiments/bench.py --data-dir ../shared/data/fashion_mnist [--repeats 3] [--json out.json]
    python experiments/bench.py --quick          # small sizes, synthetic data: a smoke test

Sections (ratio = baseline time / variant time, so > 1 means faster than the baseline row):
  range   the seed's range test (1,719 steps, batch 32): jitted step in a Python loop (baseline),
          an nnx.jit loop, a plain-pytree lax.scan (the machine's floor), lrjax's compiled program
  seeds   k = 1, 4, 16 range tests: k sequential lrjax runs (baseline) vs one program: vmapped on one
          device, and lrjax's default (on a CPU: the seeds looped over by every core)
  epoch   one training epoch + validation at batch 32 and 256: Python loop (baseline) vs lrjax
  sweep   16 learning rates x E epochs: 16 sequential trainings (baseline) vs one program: vmapped on
          one device, and lrjax's default (on a CPU: the rates looped over by every core)
  io      an epoch with checkpoints + TensorBoard vs without (the overhead of the side effects)
  run     the whole `lrjax run` workflow broken down by phase
  lm      the default Transformer's training epoch (d 128, 4 layers, 4 heads, context 128, batch 32,
          adamw) on a corpus of the stdlib's email, json and xml sources: lrjax's compiled chunks
          (fit's own `TextInput` feed and `steps.train_chunk`; baseline), the same step jitted in a
          Python loop, and PyTorch on 2 threads (experiments/peers/torch_lm.py, --torch-python), all
          on the same windows; --lm-steps shortens the epoch
  sharding the Transformer of the sharded-models acceptance (d 256, 2 layers, 4 heads, context 128,
          batch 32, adamw): ms a training step and the state bytes per device on data=N (baseline,
          replicated), fsdp=N and, with 8 devices or more, data=2,fsdp=2,tensor=2 (N = the devices,
          at most 8; alone on a CPU the section simulates 8 devices, whose times only show it runs:
          8 simulated devices share the machine's cores)
  process each subcommand as a user runs it: whole fresh processes timed from outside (find-lr,
          train/run --epochs 2, sweep --epochs 1 on 4 rates), next to `python -c "import jax,
          flax.nnx, optax"` (baseline; here the ratio is the variant's time over the baseline's)
          and `python -c "import lrjax.workflow"`, then each phase as the run's json reports it (start-up
          from the OS's process start, data, compile, steps, outputs). JAX's persistent compilation
          cache is on, as in the CLI: an untimed first round fills it, so these are repeat runs;
          a run with an empty cache is timed on its own (cold). Needs --data-dir. Beside find-lr:
          the same with LRJAX_SERIAL=1 (its phases one after another, lrjax.overlap off) and, given
          their interpreters, the seed article's range test in Keras and in PyTorch on one thread
          (experiments/peers/); then issue 27's bars as ratios, and find-lr's timeline (each phase's
          [start, end] since the process started, from lr_find.json). The range test's rows alone:

    python experiments/bench.py --sections process --process-set find-lr --data-dir ../shared/data/fashion_mnist \
        --keras-python /work/venv-tf/bin/python --torch-python /work/venv-torch/bin/python --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lrjax
from lrjax import mesh as mesh_lib
from lrjax import steps
from lrjax.cli import enable_compilation_cache
from lrjax.data import from_arrays
from lrjax.models import MLP, mlp

ROWS: list[dict] = []


def timed(fn, repeats: int, cold: bool = False, setup=None, own_seconds: bool = False) -> tuple[float, list[float]]:
    """Median wall time of `fn(*setup())`; `setup` (untimed) builds fresh inputs such as a model;
    `cold` empties JAX's in-memory compilation caches before each repeat (outside the timing), so
    every variant pays for all the compiling it does, as in a new process. With `own_seconds`, `fn`
    returns the seconds to count itself (a phase of what it runs, e.g. a training run's epochs)."""
    times = []
    for _ in range(repeats):
        args = setup() if setup else ()
        if cold:
            jax.clear_caches()
        t0 = time.perf_counter()
        out = fn(*args)
        times.append(float(out) if own_seconds else time.perf_counter() - t0)
    return statistics.median(times), times


def interleaved(section, variants: dict, repeats: int, show: bool = True, cold: bool = False,
                setup=None, own_seconds: bool = False, warmup: bool = True) -> dict[str, float]:
    """Every variant once (warm-up, unless `warmup` is False), then `repeats` rounds of all variants
    in turn, so that the VM's slow spells hit every variant alike; rows show medians, the first
    variant is the baseline. `cold`, `setup` and `own_seconds` as in `timed`."""
    for fn in variants.values() if warmup else ():
        fn(*(setup() if setup else ()))
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, 1, cold, setup, own_seconds)[0])
    medians = {name: statistics.median(t) for name, t in times.items()}
    if show:
        base = None
        for name, t in medians.items():
            row(section, name, t, base)
            base = base or t
    return medians


def row(section, variant, seconds, baseline=None, note="", part=False):
    """One line of the table; `part`: a share of the row above (no ratio of its own)."""
    ratio = (baseline / seconds) if baseline else None
    ROWS.append({"section": section, "variant": variant, "median_s": seconds, "ratio": ratio, "note": note})
    r = " " * 7 if part else f"{ratio:6.2f}x" if ratio else "  base "
    print(f"{section:7s} {variant:52s} {seconds:9.3f} s  {r}  {note}", flush=True)


# --------------------------------------------------------------------------------------------------
# Baselines: what a JAX user writes first
# --------------------------------------------------------------------------------------------------

@jax.jit
def _loop_step(state, batch, weights, lr):
    return steps.train_step(state.with_lr(lr), batch, weights)


def _loop_batches(data, batch_size, num_steps, seed):
    """(step, images, labels) of the baselines' Python loops: shuffled passes, gathered on the host."""
    rng = np.random.default_rng(seed)
    n = len(data.x_train)
    order = np.concatenate([rng.permutation(n) for _ in range(-(-num_steps * batch_size // n))])
    for i in range(num_steps):
        idx = order[i * batch_size:(i + 1) * batch_size]
        yield i, data.x_train[idx], data.y_train[idx]


def python_loop_range_test(data, model, batch_size, num_steps, start_lr, factor, seed=0):
    """A jitted train step called from Python per batch, the loss read back every step."""
    state = steps.init_state(model, optax.sgd, start_lr)
    ones = np.ones(batch_size, np.float32)
    losses = []
    for i, xb, yb in _loop_batches(data, batch_size, num_steps, seed):
        state, m = _loop_step(state, (xb, yb), ones, start_lr * factor ** i)
        losses.append(float(m["loss"]))
    return losses


def nnx_jit_range_test(data, model, batch_size, num_steps, start_lr, factor, seed=0):
    """The NNX-transform way: nnx.Optimizer + nnx.jit per step, Python loop (updates `model`)."""
    opt = nnx.Optimizer(model, optax.inject_hyperparams(optax.sgd)(learning_rate=start_lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y, lr):
        opt.opt_state.hyperparams["learning_rate"][...] = lr

        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    return [float(step(model, opt, xb, yb, start_lr * factor ** i))
            for i, xb, yb in _loop_batches(data, batch_size, num_steps, seed)]


def plain_scan_floor(data, batch_size, num_steps):
    """A hand-written plain-pytree MLP SGD step in lax.scan: the speed floor of this machine."""
    x = jnp.asarray(data.x_train.reshape(len(data.x_train), -1))
    y = jnp.asarray(data.y_train)
    sizes = [x.shape[1], 300, 100, 10]
    keys = jax.random.split(jax.random.key(0), 3)
    glorot = jax.nn.initializers.glorot_uniform()
    params = [(glorot(k, (a, b)), jnp.zeros(b)) for k, a, b in zip(keys, sizes, sizes[1:])]

    def loss_fn(p, xb, yb):
        h = xb
        for w, b in p[:-1]:
            h = jax.nn.relu(h @ w + b)
        return optax.softmax_cross_entropy_with_integer_labels(h @ p[-1][0] + p[-1][1], yb).mean()

    @jax.jit
    def run(params, idx, lrs):
        def body(p, il):
            i, lr = il
            loss, g = jax.value_and_grad(loss_fn)(p, x[i], y[i])
            return jax.tree.map(lambda a, b: a - lr * b, p, g), loss

        return jax.lax.scan(body, params, (idx, lrs))

    idx = jnp.asarray(np.random.default_rng(0).integers(0, len(x), (num_steps, batch_size)))
    lrs = jnp.full(num_steps, 0.01)
    return lambda: jax.block_until_ready(run(params, idx, lrs))


def matmul_peak(n: int = 2048) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t, _ = timed(lambda: f(a).block_until_ready(), 5)
    return 2 * n ** 3 / t / 1e9


def python_loop_epoch(data, batch_size, lr=0.01, model=None):
    state = steps.init_state(model if model is not None else mlp(data.in_features, seed=42), optax.sgd, lr)
    step = jax.jit(steps.train_step)
    evaluate = jax.jit(steps.eval_step)
    n = len(data.x_train)
    order = np.random.default_rng(0).permutation(n)
    losses = []
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        state, m = step(state, (data.x_train[idx], data.y_train[idx]), np.ones(len(idx), np.float32))
        losses.append(float(m["loss"]))
    total = 0.0
    for i in range(0, len(data.x_valid), 1000):
        xb, yb = data.x_valid[i:i + 1000], data.y_valid[i:i + 1000]
        total += float(evaluate(state, (xb, yb), np.ones(len(xb), np.float32))["loss"])
    return losses, total


# --------------------------------------------------------------------------------------------------

def bench_range(data, a):
    steps_n = -(-len(data.x_train) // 32)
    kw = dict(batch_size=32, num_steps=steps_n, start_lr=1e-3, factor=1.005)
    peak = matmul_peak()
    print(f"        (this machine's float32 matmul peak, 2048^3 matmul: {peak:.0f} GFLOP/s)")
    flops = 2 * 3 * 32 * (data.in_features * 300 + 300 * 100 + 100 * 10) * steps_n

    def model():  # every variant gets the same freshly built model, outside the timing
        return (mlp(data.in_features, seed=42),)

    def lrjax_run(m, **extra):
        return lrjax.find_lr(m, optax.sgd, data, stop_on_divergence=False, **kw, **extra)

    # Compile included: JAX's in-memory caches are emptied before every timed run, as in a new process.
    variants = {
        f"jitted step, Python loop ({steps_n} steps)": lambda m: python_loop_range_test(data, m, **kw),
        "nnx.jit step, Python loop": lambda m: nnx_jit_range_test(data, m, **kw),
        "lrjax find_lr": lrjax_run,
    }
    medians = interleaved("range", variants, a.repeats, show=False, cold=True, setup=model)
    names = list(medians)
    base = medians[names[0]]
    row("range", names[0], base, note="compile included (new process)")
    row("range", names[1], medians[names[1]], base, "compile included")
    row("range", "lrjax find_lr, compile included", medians[names[2]], base,
        f"{medians[names[1]] / medians[names[2]]:.2f}x the nnx.jit loop")
    # Compile times on their own, cold: the loop's one step vs lrjax's chunk program (as find_lr times it).
    loop_compile, chunk_compile = [], []
    for _ in range(a.repeats):
        jax.clear_caches()
        m, = model()
        state = steps.init_state(m, optax.sgd, 1e-3)
        batch = (data.x_train[:32], data.y_train[:32], np.ones(32, np.float32))
        t0 = time.perf_counter()
        _loop_step.lower(state, batch, 1e-3).compile()
        loop_compile.append(time.perf_counter() - t0)
        jax.clear_caches()
        chunk_compile.append(lrjax_run(*model()).compile_time_s)
    row("range", "compile: the jitted step (trace, lower, XLA)", statistics.median(loop_compile),
        note="part of the baseline's time")
    row("range", "compile: lrjax's chunk program (trace, lower, XLA)", statistics.median(chunk_compile),
        note="part of lrjax's compile-included time")
    pair = persistent_cache_run(lrjax_run, variants[names[0]], model, a.repeats)
    if pair is not None:
        row("range", "lrjax find_lr, programs from the persistent cache", pair[1], pair[0],
            "a repeat run of the CLI; ratio to the baseline re-measured alongside")
    # Already compiled: warm variants in interleaved rounds, next to this machine's floor.
    floor = plain_scan_floor(data, 32, steps_n)
    warm = interleaved("range", {
        "jitted step, Python loop, already compiled": lambda m: python_loop_range_test(data, m, **kw),
        "lrjax find_lr, already compiled": lrjax_run,
        "lrjax find_lr, one chunk (no progress)": lambda m: lrjax_run(m, chunk_steps=steps_n),
        "plain-pytree lax.scan floor (compiled, no NNX)": lambda m: floor(),
    }, a.repeats, show=False, setup=model)
    names = list(warm)
    row("range", names[0], warm[names[0]], base, "no compile")
    for name in names[1:]:
        t = warm[name]
        note = f"{flops / t / 1e9:.0f} GFLOP/s, {flops / t / 1e9 / peak:.0%} of peak"
        if "lrjax" in name:
            note += f", {t / warm[names[-1]]:.2f}x the floor's time"
        row("range", name, t, base, note)
    eager = lambda: MLP(data.in_features, (300, 100), 10, rngs=nnx.Rngs(42))  # noqa: E731
    interleaved("init", {"model init, eager NNX (new process)": eager,
                         "model init, lrjax.models.mlp (one program)": model},
                a.repeats, cold=True)


def persistent_cache_run(fn, baseline, setup, repeats: int) -> tuple[float, float] | None:
    """Medians of `baseline` (compile included) and of `fn` with empty in-memory caches but JAX's
    persistent compilation cache (as the CLI enables it) already holding its programs, in alternating
    rounds; None where this JAX cannot switch the cache on and off."""
    try:
        from jax._src import compilation_cache
    except ImportError:
        return None
    tmp = tempfile.mkdtemp(prefix="lrjax-bench-cache-")

    def cache(on: bool):
        enable_compilation_cache(tmp if on else None)  # the CLI's settings
        compilation_cache.reset_cache()

    base, cached = [], []
    try:
        cache(True)
        timed(fn, 1, cold=True, setup=setup)  # fills the cache
        for _ in range(repeats):
            cache(False)
            base.append(timed(baseline, 1, cold=True, setup=setup)[0])
            cache(True)
            cached.append(timed(fn, 1, cold=True, setup=setup)[0])
    finally:
        cache(False)
        shutil.rmtree(tmp, ignore_errors=True)
    return statistics.median(base), statistics.median(cached)


def bench_seeds(data, a):
    steps_n = -(-len(data.x_train) // 32)
    kw = dict(batch_size=32, num_steps=steps_n, start_lr=1e-3, factor=1.005, stop_on_divergence=False,
              init_fn=lambda s: mlp(data.in_features, seed=s))
    one_device = mesh_lib.make_mesh("auto", 1)
    for k in a.seeds:
        def sequential():
            for s in range(k):
                lrjax.find_lr(mlp(data.in_features, seed=s), optax.sgd, data, seed=s, mesh=one_device, **kw)

        variants = {f"k={k}: {k} sequential range tests": sequential}
        if k > 1:
            variants[f"k={k}: one program, vmap on 1 device"] = lambda: lrjax.find_lr(
                mlp(data.in_features, seed=0), optax.sgd, data, num_seeds=k, mesh=one_device, member_loop="vmap", **kw)
            mesh = mesh_lib.make_mesh("auto", k)
            variants[f"k={k}: one program, lrjax default: {mesh_lib.default_member_loop(mesh)} on "
                     f"{mesh.shape['members']} device(s)"] = lambda: lrjax.find_lr(
                mlp(data.in_features, seed=0), optax.sgd, data, num_seeds=k, mesh=mesh, **kw)
        interleaved("seeds", variants, max(1, a.repeats - 1))


def compiled_epoch(train, valid, batch_size: int):
    """`fit`'s programs for one epoch: the whole epoch as one `steps.train_chunk` over its host order
    (`steps.epoch_batches`), then `steps.evaluate`; a function of the state, waited for."""
    idx, w = (jnp.asarray(a) for a in steps.epoch_batches(0, 1, steps.num_examples(train), batch_size))
    spe = len(idx)

    def run(state):
        state, m = steps.train_chunk(state, train, idx, w, np.int32(spe), length=spe, masked=False,
                                     fetch=steps.gather_batch)
        jax.device_get((m, steps.evaluate(state, valid, batch_size=1000)))
        return state

    return run


def bench_epoch(data, a):
    train, valid = jax.tree.map(jnp.asarray, ((data.x_train, data.y_train), (data.x_valid, data.y_valid)))
    for bs in (32, 256):
        state = steps.init_state(mlp(data.in_features, seed=42), optax.sgd, 0.01)
        epoch = compiled_epoch(train, valid, bs)

        def lrjax_epoch():
            nonlocal state
            state = epoch(state)

        variants = {f"batch {bs}: jitted step, Python loop + eval": lambda bs=bs: python_loop_epoch(data, bs),
                    f"batch {bs}: lrjax compiled epoch + eval": lrjax_epoch}
        if bs == 32:
            floor = plain_scan_floor(data, bs, -(-len(data.x_train) // bs))
            variants["batch 32: plain-pytree lax.scan floor (steps only)"] = floor
        m = interleaved("epoch", variants, a.repeats, show=False)
        names = list(m)
        row("epoch", names[0], m[names[0]])
        row("epoch", names[1], m[names[1]], m[names[0]],
            f"{m[names[1]] / m[names[2]]:.2f}x the floor's time" if len(names) > 2 else "")
        if len(names) > 2:
            row("epoch", names[2], m[names[2]], m[names[0]])


def bench_io(data, a):
    """Whole fits with and without a workdir, at 1 epoch and at --io-epochs, in interleaved rounds.
    Per-epoch cost (a save and the TensorBoard writes of each epoch), two estimates: within each
    round, the mean interval between consecutive epochs' ends of the fit with a workdir over that of
    the fit without (a ratio per round cancels the VM's slow spells between rounds; the median over
    rounds is shown); and the difference of the two fit lengths, which also gives the fixed cost of
    a run (creating the checkpoint manager and writers, the final wait)."""
    long_, short = a.io_epochs, 1
    tmp = Path(tempfile.mkdtemp(prefix="lrjax-bench-"))
    epoch_means: dict = {False: [], True: []}

    epoch_means["steps"] = []

    def fit(epochs, io):  # io: False, True (the built-in callbacks), or "steps" (also --checkpoint-every-steps 300)
        if io:
            shutil.rmtree(tmp / "wd", ignore_errors=True)
        ends = []
        lrjax.fit(mlp(data.in_features, seed=42), optax.sgd, data, lr=0.01, epochs=epochs,
                  workdir=tmp / "wd" if io else None, progress=lambda line: ends.append(time.perf_counter()),
                  checkpoint_every_steps=300 if io == "steps" else None)
        if epochs > 1:
            epoch_means[io].append(float(np.mean(np.diff(ends))))

    try:  # interleaved rounds: a few-percent effect needs the VM's drift cancelled
        variants = {(e, io): (lambda e=e, io=io: fit(e, io)) for e in (short, long_) for io in (False, True)}
        variants[long_, "steps"] = lambda: fit(long_, "steps")
        m = interleaved("io", variants, a.repeats, show=False)
        row("io", f"fit {long_} epochs, no checkpoints/TensorBoard", m[long_, False])
        row("io", f"fit {long_} epochs, Orbax async + TensorBoard", m[long_, True], m[long_, False],
            f"overhead {100 * (m[long_, True] / m[long_, False] - 1):+.1f}%")
        row("io", f"fit {long_} epochs, the same + --checkpoint-every-steps 300", m[long_, "steps"], m[long_, False],
            f"overhead {100 * (m[long_, 'steps'] / m[long_, False] - 1):+.1f}%")
        ratios = [b / p for p, b in zip(epoch_means[False][1:], epoch_means[True][1:])]  # without warm-up
        plain = statistics.median(epoch_means[False][1:])
        row("io", "epoch to epoch inside the fits, with vs without", plain * statistics.median(ratios), plain,
            f"overhead {100 * (statistics.median(ratios) - 1):+.1f}% (median of {len(ratios)} rounds; "
            f"{', '.join(f'{100 * (r - 1):+.1f}' for r in ratios)})")
        plain = (m[long_, False] - m[short, False]) / (long_ - short)
        io = (m[long_, True] - m[short, True]) / (long_ - short)
        row("io", f"per epoch ({long_} vs {short} epochs), with vs without", io, plain,
            f"overhead {100 * (io / plain - 1):+.1f}% of an epoch's {plain:.3f}s")
        fixed = (m[short, True] - m[short, False]) - (io - plain) * short
        row("io", "fixed cost of a run with a workdir", fixed, note="manager, writers, final wait")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_sweep(data, a):
    lrs = np.geomspace(1e-3, 0.5, a.sweep_lrs)
    E = a.sweep_epochs
    one_device = mesh_lib.make_mesh("auto", 1)
    mesh = mesh_lib.make_mesh("auto", len(lrs))

    def train(lr):
        lrjax.fit(mlp(data.in_features, seed=42), optax.sgd, data, lr=float(lr), epochs=E, progress=None,
                  mesh=one_device)

    def together(mesh, loop=None):
        return lambda: lrjax.sweep(lambda s: mlp(data.in_features, seed=s), optax.sgd, data, lrs, seeds=[42],
                                   epochs=E, mesh=mesh, member_loop=loop)

    medians = interleaved("sweep", {
        f"{len(lrs)} rates x {E} epochs: sequential trainings": lambda: [train(lr) for lr in lrs],
        f"{len(lrs)} rates x {E} epochs: one training": lambda: train(0.1),
        f"{len(lrs)} rates: one program, vmap on 1 device": together(one_device, "vmap"),
        f"{len(lrs)} rates: one program, lrjax default: {mesh_lib.default_member_loop(mesh)} on "
        f"{mesh.shape['members']} device(s)": together(mesh),
    }, max(1, a.repeats - 1), show=False)
    names = list(medians)
    base, one = medians[names[0]], medians[names[1]]
    row("sweep", names[0], base)
    for name in names[2:]:
        row("sweep", name, medians[name], base, f"{medians[name] / one:.1f}x the time of one training")


def bench_cnn(data, a):
    """The CNN (BatchNorm + Dropout, `lrjax.cnn`): a training epoch + validation and a range test,
    lrjax's compiled programs vs a jitted step called from Python, at batch 32 and 128, already
    compiled. On a subset (`--cnn-train`, default 11,000 images: a fifth of an epoch) to keep it short."""
    sub = data.take(a.cnn_train, 1000, 1000)
    train, valid = jax.tree.map(jnp.asarray, ((sub.x_train, sub.y_train), (sub.x_valid, sub.y_valid)))
    for bs in (32, 128):
        state = steps.init_state(lrjax.cnn(seed=42), optax.sgd, 0.01)
        num_steps = -(-len(sub.x_train) // bs)
        epoch = compiled_epoch(train, valid, bs)

        def lrjax_epoch():
            nonlocal state
            state = epoch(state)

        kw = dict(batch_size=bs, num_steps=num_steps, start_lr=1e-3, factor=1.005)
        interleaved("cnn", {
            f"batch {bs}: epoch, jitted step, Python loop + eval": lambda bs=bs: python_loop_epoch(
                sub, bs, model=lrjax.cnn(seed=42)),
            f"batch {bs}: epoch, lrjax compiled epoch + eval": lrjax_epoch}, a.repeats)
        interleaved("cnn", {
            f"batch {bs}: range test, jitted step, Python loop": lambda: python_loop_range_test(
                sub, lrjax.cnn(seed=0), **kw),
            f"batch {bs}: range test, lrjax find_lr": lambda: lrjax.find_lr(lrjax.cnn(seed=0), optax.sgd, sub, **kw),
        }, a.repeats)


def bench_input(data, a):
    """Streamed (`--input stream`: Grain over (a) the TFDS ArrayRecord preparation, PNG-decoded on the
    host, and (b) a uint8 .npy memmap) vs resident, in one process: the MLP's range test (one epoch,
    batch 32) and a training epoch at batch 32 and 256, and the CNN's training epoch on `--cnn-train`
    images. Each row is the compute phase only: `find_lr`'s wall time less its compile (median of
    `--repeats` interleaved rounds after a warm-up); for training, the median epoch (steps, input,
    validation) from the third on of `--input-epochs`-epoch runs (the steady cost of a long run),
    then each run's first epoch, which holds the pipeline's start-up (Grain's worker processes).
    Needs --data-dir (the TFDS preparation is made once in a temporary folder from the IDX files)."""
    from lrjax import sources, tfds_source
    from lrjax.idx import read_idx_folder

    if not a.data_dir:
        print("input   (skipped: needs --data-dir)")
        return
    tmp = Path(tempfile.mkdtemp(prefix="lrjax-bench-input-"))
    try:
        raw = read_idx_folder(a.data_dir, "fashion_mnist")
        for key in ("train_images", "train_labels", "test_images", "test_labels"):
            np.save(tmp / f"{key}.npy", raw[key])
        mm = {k: np.load(tmp / f"{k}.npy", mmap_mode="r") for k in raw}
        memmap = sources.array_splits(mm["train_images"], mm["train_labels"], mm["test_images"], mm["test_labels"],
                                      name="fashion_mnist")
        tfds_source.ensure_prepared("fashion_mnist", str(tmp / "tfds"), idx_dir=a.data_dir, progress=False)
        tfds = sources.tfds_splits("fashion_mnist", str(tmp / "tfds"))
        paths = {"resident": data, "stream, memmap": memmap, "stream, TFDS": tfds}

        def compare(label, measure, warmup=True):
            return interleaved("input", {f"{label}, {name}": functools.partial(measure, name, d)
                                         for name, d in paths.items()}, a.repeats, own_seconds=True, warmup=warmup)

        def range_test(name, d):
            r = lrjax.find_lr(mlp(784, seed=0), optax.sgd, d, batch_size=32, seed=0, start_lr=1e-3, factor=1.005,
                              stop_on_divergence=False)
            return r.wall_time_s - r.compile_time_s

        first = {}  # (label, path) -> each run's first epoch (the pipeline's start-up and warm-up in it)

        def epochs(label, model_fn, bs):
            def measure(name, d):  # a run's steady epochs (from the third on): what a long run pays per epoch
                r = lrjax.fit(model_fn(), optax.sgd, d, lr=0.01, epochs=a.input_epochs, batch_size=bs, seed=0,
                              progress=None)
                times = [h["epoch_time_s"] for h in r.history]
                first.setdefault((label, name), []).append(times[0])
                return statistics.median(times[2:])

            compare(label, measure, warmup=False)
            base = None
            for name in paths:
                seconds = statistics.median(first[label, name])
                row("input", f"  its first epoch, {name}", seconds, base, note="start-up and warm-up")
                base = base or seconds

        compare("MLP range test, batch 32", range_test)
        for bs in (32, 256):
            epochs(f"MLP epoch + validation, batch {bs}", lambda: mlp(784, seed=42), bs)
        n = a.cnn_train  # the first n training images of every path, the same validation set
        paths = {"resident": data.take(n, len(data.x_valid), len(data.x_test)),
                 **{name: dataclasses.replace(d, train=dataclasses.replace(d.train, keys=d.train.keys[:n]))
                    for name, d in (("stream, memmap", memmap), ("stream, TFDS", tfds))}}
        epochs(f"CNN epoch + validation ({n} images), batch 32", lambda: lrjax.cnn(seed=42), 32)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_run(data_dir, a):
    """`lrjax run` end to end (`workflow.run_job`, as the CLI calls it), its wall time by phase as
    metrics.json's `phases_s` reports it; one run, with JAX's in-memory caches emptied first."""
    tmp = Path(tempfile.mkdtemp(prefix="lrjax-bench-run-"))
    try:
        jax.clear_caches()  # compile times as a fresh `lrjax run` sees them
        cfg = lrjax.Config(workdir=str(tmp), data_dir=data_dir, epochs=a.run_epochs, progress=False)
        from lrjax import workflow

        metrics = workflow.run_job(cfg)
        total = metrics["wall_time_s"]
        for name, sec in metrics["phases_s"].items():
            row("run", f"{name.replace('_', ' ')} ({a.run_epochs} epochs)", sec,
                note=f"{100 * sec / total:.0f}% of {total:.1f}s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


PROCESS_BASELINE = "import jax, flax.nnx, optax"
LRJAX_MAIN = "import sys; from lrjax.cli import main; sys.exit(main())"  # what the `lrjax` script runs
PEERS = Path(__file__).resolve().parent / "peers"
# issue 27's bars, in one run: lrjax find-lr at least this many times faster than each peer, and at
# most this many times the bare import
PEER_BARS = {"Keras (tensorflow-cpu), the seed article's callback": 3.0, "PyTorch, one thread": 1.5}
BARE_BAR = 2.2
TIMELINES: dict[str, dict] = {}  # lrjax find-lr's timeline_s of its median run, per variant
LOAD: dict[str, str] = {}  # /proc/loadavg before and after the process section (a shared machine)


def process_commands(data_dir: str, work: Path, a) -> dict[str, tuple[list[str], str | None, dict]]:
    """Each variant of the process section: its argv, the json (in its workdir) holding its phases,
    and the environment it adds. `--process-set find-lr` keeps the range test's variants only."""
    py = sys.executable

    def lrjax_cmd(name, *flags):
        return [py, "-c", LRJAX_MAIN, name, "--workdir", str(work / name), "--data-dir", data_dir, *flags]

    def peer(python, script, name):
        return [python, str(PEERS / script), "--data-dir", data_dir, "--workdir", str(work / name)]

    out = {
        f'python -c "{PROCESS_BASELINE}"': ([py, "-c", PROCESS_BASELINE], None, {}),
        # lrjax's own import is lazy (PEP 562): what the CLI's jobs load
        'python -c "import lrjax.workflow"': ([py, "-c", "import lrjax.workflow"], None, {}),
        "lrjax find-lr": (lrjax_cmd("find-lr"), "lr_find.json", {}),
        # the same with its phases one after another (lrjax.overlap off): what the overlap gains
        "lrjax find-lr, LRJAX_SERIAL=1": ([*lrjax_cmd("find-lr"), "--workdir", str(work / "find-lr-serial")],
                                          "lr_find.json", {"LRJAX_SERIAL": "1"}),
    }
    if a.keras_python:
        out["Keras (tensorflow-cpu), the seed article's callback"] = (
            peer(a.keras_python, "keras_range_test.py", "keras"), None, {})
    if a.torch_python:
        out["PyTorch, one thread"] = (peer(a.torch_python, "torch_range_test.py", "torch"), None, {})
    if a.process_set == "all":
        out.update({
            "lrjax train --lr 0.05 --epochs 2": (lrjax_cmd("train", "--lr", "0.05", "--epochs", "2"), "metrics.json", {}),
            "lrjax run --epochs 2": (lrjax_cmd("run", "--epochs", "2"), "metrics.json", {}),
            "lrjax sweep --epochs 1 --num-lrs 4": (lrjax_cmd("sweep", "--epochs", "1", "--num-lrs", "4"), None, {}),
        })
    return out


def _workdir(argv: list[str]) -> Path | None:
    """The last --workdir of `argv` (as argparse reads it), or None."""
    i = max((i for i, x in enumerate(argv) if x == "--workdir"), default=None)
    return None if i is None else Path(argv[i + 1])


def run_process(argv: list[str], workdir: Path | None, cache_dir: Path, env: dict | None = None) -> float:
    """Wall time of one fresh process, from before its start to after its exit (its workdir emptied
    first: a workdir with checkpoints would resume instead of train)."""
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)
    # the lrjax this process imported, whatever the current folder holds (`python -c` looks there first)
    root = str(Path(lrjax.__file__).resolve().parents[1])
    env = {**os.environ, "LRJAX_CACHE_DIR": str(cache_dir),
           "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]), **(env or {})}
    cache_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    out = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=cache_dir)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[3:] or argv)} exited {out.returncode}: {out.stderr[-2000:]}")
    return seconds


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def bench_process(data_dir: str, a):
    tmp = Path(tempfile.mkdtemp(prefix="lrjax-bench-process-"))
    work, cache = tmp / "work", tmp / "cache"
    commands = process_commands(data_dir, work, a)
    times: dict[str, list[float]] = {name: [] for name in commands}
    phases: dict[str, dict[str, list[float]]] = {name: {} for name in commands}
    timelines: dict[str, list[dict]] = {name: [] for name in commands}
    cold = []
    LOAD["before"] = _loadavg()
    print(f"load average before: {LOAD['before']} (the machine may be shared: ratios, not absolute times)")
    try:
        for r in range(a.repeats + 1):  # round 0: warm-up, fills the compilation cache and the page cache
            for name, (argv, report, env) in commands.items():
                wd = _workdir(argv)
                t = run_process(argv, wd, cache, env)
                if r == 0:
                    continue
                times[name].append(t)
                if report:
                    j = json.loads((wd / report).read_text())
                    got = {"start-up (process start to lrjax imported)": j.get("startup_s"), **j.get("phases_s", {})}
                    for phase, sec in got.items():
                        if sec is not None:
                            phases[name].setdefault(phase, []).append(sec)
                    timelines[name].append(j.get("timeline_s"))
                if name == "lrjax find-lr" and a.process_set == "all":  # and with an empty compilation cache
                    cold.append(run_process(argv, wd, tmp / f"cold-{r}"))
        first = next(iter(commands))
        base = statistics.median(times[first])
        for name, t in times.items():
            med = statistics.median(t)
            row("process", name, med, None if name == first else base,
                f"{med / base:.2f}x the baseline's time; runs {', '.join(f'{x:.2f}' for x in t)}")
            for phase, secs in phases[name].items():
                row("process", f"  {phase.replace('_', ' ')}", statistics.median(secs),
                    note=f"{100 * statistics.median(secs) / med:.0f}% of the process", part=True)
            if phases[name] and not name.startswith("lrjax find-lr"):  # find-lr's phases overlap: see its timeline
                accounted = [sum(p[i] for p in phases[name].values()) for i in range(len(t))]
                rest = statistics.median([x - acc for x, acc in zip(t, accounted)])
                row("process", "  rest (CLI set-up after import, exit)", rest,
                    note=f"{100 * rest / med:.0f}% of the process", part=True)
            if any(timelines[name]):  # the median run's timeline
                TIMELINES[name] = timelines[name][sorted(range(len(t)), key=t.__getitem__)[len(t) // 2]]
        if cold:
            med = statistics.median(cold)
            row("process", "lrjax find-lr, empty compilation cache (cold)", med, base,
                f"{med / base:.2f}x the baseline's time; runs {', '.join(f'{x:.2f}' for x in cold)}")
        LOAD["after"] = _loadavg()
        print(f"load average after: {LOAD['after']}")
        lrjax_s = statistics.median(times["lrjax find-lr"])
        bars = [(f"{peer} / lrjax find-lr", statistics.median(times[peer]) / lrjax_s, ">=", bar)
                for peer, bar in PEER_BARS.items() if peer in times]
        bars.append(("lrjax find-lr / bare import", lrjax_s / base, "<=", BARE_BAR))
        serial_s = statistics.median(times["lrjax find-lr, LRJAX_SERIAL=1"])
        print(f"overlap: find-lr serial / overlapped {serial_s / lrjax_s:.2f}")
        for label, ratio, op, bar in bars:
            met = ratio >= bar if op == ">=" else ratio <= bar
            print(f"bar: {label} {ratio:.2f} ({op} {bar}: {'met' if met else 'NOT met'})")
            ROWS.append({"section": "process-bars", "variant": label, "ratio": ratio, "bar": f"{op} {bar}", "met": met})
        for name, spans in TIMELINES.items():
            print(f"timeline of {name} (median run; seconds since the process started):")
            print_timeline(spans)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_lm(a):
    """The `lm` section (module docstring): seconds of one epoch's training steps, each variant."""
    import sysconfig

    from lrjax import models, tasks, text

    tmp = Path(tempfile.mkdtemp(prefix="lrjax-bench-lm-"))
    try:
        lib = Path(sysconfig.get_paths()["stdlib"])
        for name in ("email", "json", "xml"):
            shutil.copytree(lib / name, tmp / "corpus" / name, ignore=shutil.ignore_patterns("__pycache__"))
        corpus = text.load_corpus(tmp / "corpus", 128, tmp / "cache")
        mesh = mesh_lib.make_mesh("auto")
        inp = text.TextInput(corpus, 32, mesh)
        spe = min(inp.steps_per_epoch, a.lm_steps or inp.steps_per_epoch)
        adamw = functools.partial(optax.adamw, weight_decay=0.1)
        state0 = steps.init_state(models.transformer(256, 128), adamw, 1e-3, loss_fn=tasks.next_token)
        feed = inp.train_feed(0, spe, spe)
        feed.steps_per_epoch = spe
        program = steps.train_chunk.lower(state0, feed.context, *feed.zeros(), np.int32(spe), length=spe,
                                          masked=False, fetch=feed.fetch).compile()
        starts, w = (a[:spe] for a in text.epoch_starts(0, 1, inp.num_train, inp.length, inp.num_examples, 32))
        train = np.asarray(corpus.split("train"))
        windows = train[starts[..., None] + np.arange(inp.length)].astype(np.int32)  # [steps, B, 129]
        print(f"lm: {corpus.describe()}; timing {spe} steps")

        def lrjax_epoch():
            state, m = feed(program, state0, 0, spe)
            return float(m["loss"][-1])

        step = jax.jit(steps.train_step)

        def loop_epoch():
            state = state0
            for i in range(spe):
                state, m = step(state, {"tokens": windows[i]}, w[i])
            return float(m["loss"])

        np.save(tmp / "windows.npy", windows)
        torch_s = []

        def torch_epoch():
            out = subprocess.run([a.torch_python, str(PEERS / "torch_lm.py"), "--windows", str(tmp / "windows.npy"),
                                  "--repeats", "1"], capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"torch_lm.py exited {out.returncode}: {out.stderr[-2000:]}")
            j = json.loads(out.stdout.strip().splitlines()[-1])
            torch_s.append(j["epoch_s"][0])
            print(f"lm: torch {j['torch']}: loss {j['first_loss']:.3f} -> {j['last_loss']:.3f}", flush=True)

        variants = {"lrjax compiled chunks (fit's feed)": lrjax_epoch,
                    "same step jitted, Python loop": loop_epoch}
        print(f"lm: loss after the epoch: lrjax {lrjax_epoch():.4f}, Python loop {loop_epoch():.4f}")
        m = {}
        for name, fn in variants.items():
            m[name] = timed(fn, a.repeats)[0]
        if a.torch_python:
            for _ in range(a.repeats):
                torch_epoch()  # each process: a warm-up epoch, then one timed epoch
            m["PyTorch 2 threads, scaled_dot_product_attention (timed epoch)"] = statistics.median(torch_s)
        base = None
        for name, t in m.items():
            row("lm", f"{name}, {spe} steps", t, base, f"{t / spe * 1000:.0f} ms a step")
            base = base or t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_sharding(a):
    """The `sharding` section (module docstring): training steps on each mesh, the same batches."""
    from lrjax import models, sharding, tasks

    n = min(8, jax.device_count())
    meshes = [f"data={n}", f"fsdp={n}"] + (["data=2,fsdp=2,tensor=2"] if n >= 8 else [])
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 256, (32, 129)).astype(np.int32)}
    w = np.ones(32, np.float32)
    adamw = functools.partial(optax.adamw, weight_decay=0.1)
    k = a.sharding_steps
    base = None
    for spec in meshes:
        mesh = mesh_lib.make_mesh(spec)
        model = models.transformer(256, 128, 256, 2, 4)
        state = steps.init_state(model, adamw, 1e-3, loss_fn=tasks.next_token, mesh=mesh)
        with jax.set_mesh(mesh):
            step = jax.jit(lambda s, b, w: steps.train_step(s, *steps.fed_batch(b, w)))
            state, m = step(state, batch, w)  # compile and warm up
            jax.block_until_ready(m)

            def run(state=state):
                for _ in range(k):
                    state, m = step(state, batch, w)
                jax.block_until_ready(m)

            t = timed(run, a.repeats)[0]
        held = sharding.bytes_per_device((state.params, state.opt_state))
        row("sharding", f"{spec}, {k} steps", t, base, f"{t / k * 1000:.0f} ms a step, state {held:,} bytes a device")
        base = base or t


def print_timeline(spans: dict[str, list], width: int = 60) -> None:
    """Each phase as [start, end] and a bar on one shared scale, so overlapping phases show."""
    spans = {k: v for k, v in spans.items() if v and None not in v}
    if not spans:
        return
    end = max(e for _, e in spans.values())
    for name, (s0, s1) in spans.items():
        a, b = round(width * s0 / end), max(round(width * s1 / end), round(width * s0 / end) + 1)
        print(f"  {name:20s} {s0:6.2f} - {s1:6.2f}  |{' ' * a}{'#' * (b - a)}{' ' * (width - b)}|")


def synthetic(n=6000):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 28, 28), np.uint8)
    y = (x[:, 14, 14] // 26).clip(0, 9).astype(np.uint8)
    return from_arrays("synthetic", x, y, x[:1000], y[:1000], valid_size=1000)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="IDX folder of Fashion-MNIST (default: synthetic data)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sections", default="range,seeds,epoch,sweep,io,run")
    p.add_argument("--seeds", default="1,4,16", help="k values of the seeds section")
    p.add_argument("--sweep-lrs", type=int, default=16)
    p.add_argument("--sweep-epochs", type=int, default=2)
    p.add_argument("--run-epochs", type=int, default=5)
    p.add_argument("--io-epochs", type=int, default=8)
    p.add_argument("--cnn-train", type=int, default=11000, help="training images of the cnn section")
    p.add_argument("--input-epochs", type=int, default=4, help="epochs of each run of the input section (its "
                   "rows: the median epoch from the third on)")
    p.add_argument("--quick", action="store_true", help="small synthetic sizes, one repeat")
    p.add_argument("--process-set", choices=("all", "find-lr"), default="all",
                   help="process section: every subcommand, or the range test's variants only (with the peers)")
    p.add_argument("--keras-python", default=os.environ.get("LRJAX_KERAS_PYTHON"),
                   help="process section: an interpreter with tensorflow-cpu for the Keras peer (.[peers-keras]; "
                        "default $LRJAX_KERAS_PYTHON, else no Keras row)")
    p.add_argument("--torch-python", default=os.environ.get("LRJAX_TORCH_PYTHON"),
                   help="process section: an interpreter with torch for the PyTorch peer (.[peers-torch]; "
                        "default $LRJAX_TORCH_PYTHON, else no PyTorch row)")
    p.add_argument("--lm-steps", type=int, default=None, help="lm section: steps to time (default: the epoch)")
    p.add_argument("--sharding-steps", type=int, default=5, help="sharding section: steps timed on each mesh")
    p.add_argument("--json", default=None, help="also write the table here")
    a = p.parse_args()
    if a.data_dir:  # absolute: the process section's children run in another folder
        a.data_dir = str(Path(a.data_dir).resolve())
    sections = a.sections.split(",")
    if "process" in sections:  # fresh processes, before this one loads data or starts JAX
        if not a.data_dir:
            p.error("--sections process needs --data-dir (the subcommands read the IDX files)")
        print(f"lrjax bench, process: python {platform.python_version()}, {cpu_name()} x{os.cpu_count()}, "
              f"repeats {a.repeats} (+1 warm-up round)")
        bench_process(a.data_dir, a)
        write_json(a.json, None)
        if sections == ["process"]:
            return 0
    if sections == ["sharding"] and "device_count" not in os.environ.get("XLA_FLAGS", ""):
        # 8 simulated CPU devices (read when the backend starts; no effect on a GPU's devices)
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    lrjax.use_cpu_cores()  # before JAX starts, as the CLI does: each CPU core a device for members
    if sections in (["lm"], ["sharding"]):  # no image data needed
        dev = jax.devices()[0]
        print(f"lrjax bench, {sections[0]}: {dev.platform} x{jax.device_count()}, jax {jax.__version__}, {cpu_name()} "
              f"x{os.cpu_count()}, repeats {a.repeats}")
        (bench_lm if sections == ["lm"] else bench_sharding)(a)
        write_json(a.json, dev)
        return 0
    a.seeds = [int(k) for k in a.seeds.split(",")]
    if a.quick:
        a.repeats, a.seeds, a.sweep_lrs, a.sweep_epochs, a.run_epochs, a.io_epochs = 1, [1, 4], 4, 1, 1, 2
    data = lrjax.load_dataset("fashion_mnist", a.data_dir) if a.data_dir else synthetic()
    python_loop_range_test(data, mlp(data.in_features), 32, 4, 1e-3, 1.005)  # JAX start-up, untimed
    dev = jax.devices()[0]
    print(f"lrjax bench: {dev.platform} {dev.device_kind} x{jax.device_count()}, jax {jax.__version__}, "
          f"python {platform.python_version()}, train {len(data.x_train)} images, batch 32 (and 256), "
          f"repeats {a.repeats}")
    print(f"{'section':7s} {'variant':52s} {'median':>11s}  {'ratio':>7s}")
    for name, fn in (("range", bench_range), ("seeds", bench_seeds), ("epoch", bench_epoch),
                     ("sweep", bench_sweep), ("io", bench_io), ("cnn", bench_cnn),
                     ("input", bench_input)):
        if name in sections:
            fn(data, a)
            write_json(a.json, dev)  # after each section: a run cut short keeps what it measured
    if "run" in sections and a.data_dir:
        bench_run(a.data_dir, a)
    write_json(a.json, dev)
    return 0


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def write_json(path: str | None, dev) -> None:
    if path:
        Path(path).write_text(json.dumps({"device": str(dev) if dev else "cpu", "cpu": cpu_name(),
                                          "cpu_count": os.cpu_count(), "platform": dev.platform if dev else "cpu",
                                          "jax": jax.__version__, "rows": ROWS,
                                          **({"timelines_s": TIMELINES} if TIMELINES else {}),
                                          **({"load_average": LOAD} if LOAD else {})}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
