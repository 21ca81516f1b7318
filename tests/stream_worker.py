"""Run by tests/test_stream.py as each of 2 processes (one CPU device each, loopback coordinator): streams
the same tiny split, each process reading its rows of every batch, assembles global device arrays with
`lrjax.stream.to_device`, and (process 0) prints what the global arrays hold as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lrjax import mesh as mesh_lib  # noqa: E402
from lrjax import stream  # noqa: E402
from test_stream import make_splits  # noqa: E402


def main():
    coordinator, num_processes, process_id = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mesh_lib.initialize_distributed(coordinator, num_processes, process_id)
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    s = stream.Stream(make_splits().train, 32, chunk_steps=3, seed=2, epochs=1, workers=0)
    gather = jax.jit(lambda c: jax.tree.map(lambda a: a, c),
                     out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    local_rows, chunks = [], []
    for chunk in s:
        local_rows.append(chunk["x"].shape[1])
        staged = stream.to_device(chunk, stream.chunk_sharding(mesh))
        full = gather(staged)  # replicated: every process can read the whole global chunk
        chunks.append({k: np.asarray(v).tolist() for k, v in full.items() if k != "x"}
                      | {"ids": np.asarray(full["x"][..., 0, 0, 0]).tolist()})
    if jax.process_index() == 0:
        print("RESULT " + json.dumps({"processes": jax.process_count(), "local_rows": local_rows,
                                      "chunks": chunks}))


if __name__ == "__main__":
    main()
