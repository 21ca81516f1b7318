"""Where the default Transformer's training step spends its time on the CPU (the `lm` bench's profile).

    python experiments/lm_profile.py [--cores]   # --cores: lrjax.use_cpu_cores() first, as the CLI does
    python experiments/lm_profile.py --xla-flags # the train step under XLA's CPU library flags, fresh processes

Batch 32, context 128, d 128, 4 layers, 4 heads, adamw; each row the median of 10 calls of one jitted
program (after a warm-up): the forward loss, the loss and its gradient, the whole `steps.train_step`,
with the CPU attention lrjax uses (two einsums and a masked softmax) and with
`jax.nn.dot_product_attention(is_causal=True)`; and, where several devices exist, the train step with
the batch split over them (what fit runs after `use_cpu_cores`).
"""

from __future__ import annotations

import functools
import statistics
import sys
import time

import numpy as np


# XLA:CPU's library paths for dots and fusions (jax 0.10's flag names; XNNPACK is on by default).
FLAG_SETS = ("", "--xla_cpu_use_xnnpack=false", "--xla_cpu_use_onednn=true",
             "--xla_cpu_experimental_xnn_fusion_type=dot", "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
             "--xla_cpu_experimental_onednn_fusion_type=dot", "--xla_cpu_experimental_ynn_fusion_type=dot",
             "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY", "")


def inputs():
    """The profile's batch (32 windows of 128 + 1 random bytes), its weights and the optimizer (adamw, wd 0.1)."""
    import optax

    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 256, (32, 129)).astype(np.int32)}
    return batch, np.ones(32, np.float32), functools.partial(optax.adamw, weight_decay=0.1)


def median_ms(fn, *args, calls: int = 10) -> float:
    """The median of `calls` calls of `fn(*args)` (after a warm-up), in milliseconds."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def one_step() -> None:
    """The default Transformer's train step (median of 6 calls), in this process's XLA_FLAGS."""
    import os

    import jax

    from lrjax import models, steps, tasks

    batch, w, adamw = inputs()
    state = steps.init_state(models.transformer(256, 128), adamw, 1e-3, loss_fn=tasks.next_token)
    step = jax.jit(steps.train_step)
    _, m = step(state, batch, w)
    ms = median_ms(step, state, batch, w, calls=6)
    print(f"{os.environ.get('XLA_FLAGS') or '(defaults)':75s} train step {ms:6.1f} ms  loss {float(m['loss']):.6f}",
          flush=True)


def flag_sets() -> int:
    import os
    import subprocess

    for flags in FLAG_SETS:
        subprocess.run([sys.executable, __file__, "--one-step"], env={**os.environ, "XLA_FLAGS": flags}, check=True)
    return 0


def main() -> int:
    if "--one-step" in sys.argv:
        one_step()
        return 0
    if "--xla-flags" in sys.argv:
        return flag_sets()
    import lrjax

    if "--cores" in sys.argv:
        lrjax.use_cpu_cores()
    import jax

    from lrjax import mesh as mesh_lib
    from lrjax import models, steps, tasks

    batch, w, adamw = inputs()

    own = models.causal_attention
    print(f"jax {jax.__version__}, {jax.device_count()} devices")
    for name, attention in (("einsum attention (lrjax's CPU path)", own),
                            ("jax.nn.dot_product_attention", lambda q, k, v: jax.nn.dot_product_attention(
                                q, k, v, is_causal=True))):
        models.causal_attention = attention
        state = steps.init_state(models.transformer(256, 128), adamw, 1e-3, loss_fn=tasks.next_token)
        from flax import nnx

        def loss(params):
            model = nnx.merge(state.graphdef, params, state.rest)
            return tasks.next_token(model, batch)[0].mean()

        fwd = median_ms(jax.jit(loss), state.params)
        grad = median_ms(jax.jit(jax.value_and_grad(loss)), state.params)
        step = median_ms(jax.jit(steps.train_step), state, batch, w)
        print(f"{name:40s} forward {fwd:6.1f} ms  forward+backward {grad:6.1f} ms  train step {step:6.1f} ms "
              f"(optimizer and the rest {step - grad:5.1f} ms)", flush=True)
        if jax.device_count() > 1:
            mesh = mesh_lib.make_mesh("auto")
            sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
            split = jax.device_put((batch, w), sharding)
            state_r = mesh_lib.replicate(state, mesh)
            print(f"{'':40s} train step, batch split over {jax.device_count()} devices "
                  f"{median_ms(jax.jit(steps.train_step), state_r, *split):6.1f} ms", flush=True)
    models.causal_attention = own
    return 0


if __name__ == "__main__":
    sys.exit(main())
