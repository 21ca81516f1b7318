"""Run by tests/test_scale.py in a subprocess: trains on tiny data with whatever devices/processes the
environment gives (XLA_FLAGS / JAX_NUM_CPU_DEVICES set before JAX starts), prints a JSON summary."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from conftest import synthetic, synthetic_arrays  # noqa: E402
from lrjax import sources, steps  # noqa: E402
from lrjax import mesh as mesh_lib  # noqa: E402
from lrjax.models import mlp  # noqa: E402
from lrjax.monitors import EarlyStopping  # noqa: E402
from lrjax.range_test import find_lr  # noqa: E402
from lrjax.sweeps import sweep  # noqa: E402
from lrjax.train import fit  # noqa: E402


class StatefulNet(nnx.Module):
    """BatchNorm statistics and a Dropout RNG stream: model state that must checkpoint and resume."""

    def __init__(self, rngs):
        self.dense = nnx.Linear(36, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.out = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(jax.nn.relu(self.bn(self.dense(x.reshape(x.shape[0], -1))))))


def main():
    job, workdir = sys.argv[1], sys.argv[2]
    job, _, count = job.partition(":")  # find_lr:3 -> 3 seeds, sweep:3 -> 3 rates (default 4)
    count = int(count or 4)
    coordinator, num_processes, process_id = (sys.argv[3:6] + [None] * 3)[:3]
    if coordinator:
        mesh_lib.initialize_distributed(coordinator, int(num_processes), int(process_id))
    data = synthetic(n_train=512, valid=128, n_test=64, size=6, classes=4, noise=120)
    model_fn = lambda s: mlp(36, (16,), 4, seed=s)  # noqa: E731
    out = {"devices": jax.device_count(), "processes": jax.process_count()}
    if job == "fit_signal":  # SIGTERM reaches process 1 only, during epoch 2 (as a preemption might)
        class SignalAt2(EarlyStopping):
            def update(self, epoch, metrics):
                if epoch == 2 and jax.process_index() == jax.process_count() - 1:
                    os.kill(os.getpid(), signal.SIGTERM)
                return super().update(epoch, metrics)

        r = fit(model_fn(3), optax.sgd, data, lr=0.05, epochs=5, batch_size=16, seed=3,
                early_stopping=SignalAt2(patience=5), workdir=workdir, progress=None)
        out.update(interrupted=r.interrupted, epochs_run=r.epochs_run)
    elif job == "fit_state":  # fit_state:K stops after epoch K (a preemption); fit_state:0 runs through
        r = fit(StatefulNet(nnx.Rngs(3)), optax.sgd, data, lr=0.05, epochs=3, batch_size=16, seed=3,
                early_stopping=EarlyStopping(patience=3), workdir=workdir, progress=None, stop_after=count or None)
        out["history"] = [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in r.history]
        out["test"] = r.evaluate(data.x_test, data.y_test)
        out["resumed_from"] = r.resumed_from
    elif job == "fit":
        _inject_read_fault(Path(workdir) / "checkpoints")
        r = fit(model_fn(3), optax.sgd, data, lr=0.05, epochs=3, batch_size=16, seed=3,
                early_stopping=EarlyStopping(patience=3), workdir=workdir, progress=None)
        out["history"] = [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in r.history]
        out["test"] = r.evaluate(data.x_test, data.y_test)
        out["checkpoints"] = sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())
        out["resumed_from"] = r.resumed_from
        print(f"RESUMED {r.resumed_from}", flush=True)  # every process: they must agree
    elif job == "fit_fsdp":  # parameters and optimizer state sharded over fsdp=2 (each process: half)
        r = fit(model_fn(3), optax.sgd, data, lr=0.05, epochs=3, batch_size=16, seed=3, mesh=mesh_lib.make_mesh("fsdp=2"),
                early_stopping=EarlyStopping(patience=3), workdir=workdir, progress=None)
        out["history"] = [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in r.history]
        out["test"] = r.evaluate(data.x_test, data.y_test)
        kernel = r.state.params["hidden"][0]["kernel"].get_value()
        print("LOCAL " + json.dumps({"kernel": list(kernel.shape), "shards": [list(s.data.shape) for s in
                                                                               kernel.addressable_shards]}), flush=True)
    elif job == "fit_stream":  # the streamed path: each process reads its rows of every global batch
        splits = sources.array_splits(*synthetic_arrays(n_train=512, valid=128, n_test=64, size=6, classes=4,
                                                        noise=120), valid_size=128, name="synthetic")
        r = fit(model_fn(3), optax.sgd, splits, lr=0.05, epochs=3, batch_size=16, seed=3, stream_chunk_steps=8,
                stream_workers=0, early_stopping=EarlyStopping(patience=3), workdir=workdir, progress=None)
        out["history"] = [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in r.history]
        out["test"] = r.evaluate(data.x_test, data.y_test)
        out["checkpoints"] = sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())
        # A user's iterable of the same batches, each process yielding its own rows of every batch
        # (as a Grain loader sharded by JAX process would): the same run again.
        rows = slice(jax.process_index() * 16 // jax.process_count(), (jax.process_index() + 1) * 16 // jax.process_count())
        own = [(data.x_train[i[rows]], data.y_train[i[rows]])
               for e in (1, 2, 3) for i in steps.epoch_batches(3, e, len(data.x_train), 16)[0]]
        r = fit(model_fn(3), optax.sgd, own, valid=(data.x_valid, data.y_valid), steps_per_epoch=len(own) // 3,
                lr=0.05, epochs=3, seed=3, stream_chunk_steps=8, early_stopping=EarlyStopping(patience=3),
                progress=None)
        out["iterable"] = {"history": [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in r.history],
                           "test": r.evaluate(data.x_test, data.y_test)}
    elif job == "find_lr":
        r = find_lr(model_fn(0), optax.sgd, data, batch_size=16, start_lr=1e-3, end_lr=30.0, num_steps=96,
                    num_seeds=count, seed=1, chunk_steps=48, init_fn=model_fn, mesh=mesh_lib.make_mesh(workdir))
        out["per_seed_losses"] = np.asarray(r.per_seed_losses).tolist()
    elif job == "sweep":
        r = sweep(model_fn, optax.sgd, data, [0.01, 0.03, 0.1, 0.3, 1.0][:count], seeds=[2], epochs=2, batch_size=16,
                  mesh=mesh_lib.make_mesh(workdir))
        out["val_loss"] = np.asarray(r.val_loss).tolist()
    if jax.process_index() == 0:
        print("RESULT " + json.dumps(out))


def _inject_read_fault(checkpoints: Path) -> None:
    """$LRJAX_TEST_READ_FAULT=damaged|eio: on the last process only, the newest checkpoint's meta
    reads as damaged, or fails with an I/O error that persists, as one host of a job might see it."""
    fault = os.environ.get("LRJAX_TEST_READ_FAULT")
    if not fault or jax.process_index() != jax.process_count() - 1 or not checkpoints.is_dir():
        return
    import errno

    newest = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    target = checkpoints.absolute() / str(newest) / "meta" / "metadata"
    original = Path.read_text

    def read_text(self, *args, **kwargs):
        if self.absolute() == target:
            if fault == "damaged":
                return "{not json"
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(self))
        return original(self, *args, **kwargs)

    Path.read_text = read_text


if __name__ == "__main__":
    main()
