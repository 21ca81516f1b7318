"""Run by tests/test_sharding.py in a subprocess with simulated CPU devices (XLA_FLAGS set before JAX
starts): trains or restores a small MLP with its state sharded over `fsdp`, prints a JSON summary."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from conftest import synthetic  # noqa: E402
from lrjax import sharding, steps  # noqa: E402
from lrjax import mesh as mesh_lib  # noqa: E402
from lrjax.checkpoint import Checkpointer  # noqa: E402
from lrjax.models import create_sharded, mlp  # noqa: E402
from lrjax.monitors import EarlyStopping  # noqa: E402
from lrjax.train import fit  # noqa: E402


def digest(tree) -> str:
    """The exact bytes of every array (gathered to the host), as one hash."""
    h = hashlib.sha256()
    for a in jax.tree.leaves(mesh_lib.to_host(tree)):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def spec(a) -> list:
    """The mesh axis of each dimension of `a` (None: not split)."""
    given = list(a.sharding.spec)
    return given + [None] * (a.ndim - len(given))


def main():
    job, workdir, shape = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    data = synthetic(n_train=512, valid=128, n_test=64, size=8, classes=4, noise=120)
    model = mlp(64, (64, 32), 4, seed=3)  # the first kernel (64 x 64) splits over fsdp=8, 4 and 2
    mesh = mesh_lib.make_mesh(shape)
    out = {"devices": jax.device_count()}
    if job == "create":  # the registry's models created sharded: their weights, each array's spec
        from flax import nnx

        from lrjax import models

        for name, make in (("mlp", lambda: models.mlp(784, (300, 100), 10, seed=2)),
                           ("cnn", lambda: models.cnn((28, 28, 1), 10, seed=1)),
                           ("transformer", lambda: models.transformer(256, 128, 256, 2, 4, seed=0))):
            made = nnx.state(create_sharded(make, mesh), nnx.Param)
            out[name] = {"same": digest(made) == digest(nnx.state(make(), nnx.Param)),
                         "specs": sorted({str(spec(a)) for a in jax.tree.leaves(made)}),
                         "bytes": sharding.bytes_per_device(made)}
        print("RESULT " + json.dumps(out))
        return
    if job == "find_lr":  # one seed's range test, its state sharded on the mesh
        from lrjax.range_test import find_lr

        r = find_lr(model, optax.adam, data, batch_size=16, start_lr=1e-4, end_lr=1.0, num_steps=60, mesh=mesh,
                    method="valley")
        print("RESULT " + json.dumps({**out, "losses": np.asarray(r.losses).tolist()}))
        return
    if job == "fit":  # fit:EPOCHS
        r = fit(model, optax.adam, data, lr=3e-3, epochs=int(sys.argv[4]), batch_size=16, seed=3, mesh=mesh,
                early_stopping=EarlyStopping(patience=9, restore_best_weights=False), workdir=workdir,
                tensorboard=False, progress=None)
        out.update(history=[{k: v for k, v in h.items() if k != "epoch_time_s"} for h in r.history],
                   test=r.evaluate(data.x_test, data.y_test), resumed_from=r.resumed_from, segments=r.segments,
                   digest=digest((r.state.params, r.state.opt_state)))
        state = r.state
    else:  # restore: the newest checkpoint into a state created on this mesh
        state = steps.init_state(model, optax.adam, 3e-3, mesh=mesh)
        ckpt = Checkpointer(workdir / "checkpoints")
        try:
            target = {"params": state.params, "rest": state.rest, "opt_state": state.opt_state, "step": state.step,
                      "best_params": state.params, "best_rest": state.rest}
            _, tree, _ = ckpt.restore(target)
        finally:
            ckpt.close()
        state = state.replace(params=tree["params"], opt_state=tree["opt_state"])
        out.update(digest=digest((state.params, state.opt_state)), best_digest=digest(tree["best_params"]),
                   best_spec=spec(jax.tree.leaves(tree["best_params"])[1]))
    kernel = jax.tree.leaves(state.params)[1]  # hidden[0].kernel (leaves sorted: bias, kernel)
    out.update(kernel_shape=list(kernel.shape), kernel_spec=spec(kernel),
               state_bytes_per_device=sharding.bytes_per_device((state.params, state.opt_state)))
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
