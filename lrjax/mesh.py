"""Devices, meshes, shardings and `jax.distributed` start-up. Nothing else of lrjax is imported here.

One code path for 1..N devices: programs run under `jax.set_mesh(mesh)` with a `data` axis (and
optionally a `members` axis for sweeps and multi-seed range tests). Data and parameters are
replicated; inside the compiled programs each batch is constrained to be split along `data`, so every
device gathers and computes only its slice of the batch and XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lrjax.errors import ConfigError


def parse_mesh_shape(spec: str, num_devices: int) -> dict[str, int]:
    """'auto' -> all devices on `data`; '4' -> 4 on `data`; 'members=2,data=4' -> both axes."""
    spec = spec.strip()
    if spec == "auto":
        return {"data": num_devices}
    try:
        if "=" not in spec:
            return {"data": int(spec)}
        axes = {}
        for part in spec.split(","):
            name, size = part.split("=")
            axes[name.strip()] = int(size)
    except ValueError:
        raise ConfigError(f"--mesh-shape {spec!r} is not 'auto', an integer or 'members=M,data=D'") from None
    unknown = set(axes) - {"members", "data"}
    if unknown:
        raise ConfigError(f"--mesh-shape: unknown axis {sorted(unknown)}; use members and data")
    return {"members": axes.get("members", 1), "data": axes.get("data", 1)}


def make_mesh(spec: str = "auto") -> jax.sharding.Mesh:
    """A mesh over the available devices (all processes') with a `data` axis, from a --mesh-shape spec."""
    n = jax.device_count()
    axes = parse_mesh_shape(spec, n)
    size = int(np.prod(list(axes.values())))
    if size != n:
        raise ConfigError(f"--mesh-shape {spec!r} needs {size} devices but {n} are available")
    # Auto axes: the programs state where the batch is split (with_sharding_constraint) and XLA
    # propagates the rest; explicit-sharding mode would make every constraint an assertion.
    return jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=(AxisType.Auto,) * len(axes))


def data_axis_size(mesh: jax.sharding.Mesh | None = None) -> int:
    return axis_size("data", mesh)


def axis_size(name: str, mesh: jax.sharding.Mesh | None = None) -> int:
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    return dict(zip(mesh.axis_names, mesh.axis_sizes)).get(name, 1) if mesh.axis_names else 1


def spread_members(tree, axis: int = 0):
    """Under an ambient mesh with a `members` axis, splits dimension `axis` of every leaf (seeds of a
    range test, rates of a sweep) across it; other dimensions stay replicated."""
    if axis_size("members") <= 1:
        return tree
    spec = P(*([None] * axis + ["members"]))
    return jax.tree.map(lambda a: jax.device_put(a, spec), tree)


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> None:
    d = data_axis_size(mesh)
    if batch_size % d:
        raise ConfigError(f"--batch-size {batch_size} must divide by the {d} devices of the data axis")


def shard_batch(x: jax.Array) -> jax.Array:
    """Inside a compiled program: split the leading (batch) axis over the ambient mesh's `data` axis."""
    if data_axis_size() <= 1:
        return x
    return jax.lax.with_sharding_constraint(x, P("data"))


def replicate(tree, mesh: jax.sharding.Mesh):
    """Places a pytree (numpy or jax arrays) fully replicated on every device of `mesh`.

    With several processes each process passes identical host values (data and init derive from
    the seed), so the global array is assembled from process-local copies without communication.
    """
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree)


def replicate_data(data, mesh: jax.sharding.Mesh):
    """(x_train, y_train, x_valid, y_valid) of a dataset, replicated on every device of `mesh`."""
    return replicate(tuple(np.asarray(a) for a in (data.x_train, data.y_train, data.x_valid, data.y_valid)),
                     mesh)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Starts `jax.distributed` for multi-host jobs; returns whether it did.

    Flags win; then $JAX_COORDINATOR_ADDRESS with $JAX_NUM_PROCESSES and $JAX_PROCESS_ID; otherwise
    JAX's own cluster auto-detection (SLURM with several tasks, Open MPI, ...) is used when such an
    environment is present, and a single process starts nothing.
    """
    explicit = coordinator_address is not None or num_processes is not None
    env = os.environ
    cluster = ("JAX_COORDINATOR_ADDRESS" in env or int(env.get("SLURM_NTASKS", "1")) > 1
               or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
    if not explicit and not cluster:
        return False
    if "JAX_COORDINATOR_ADDRESS" in env and num_processes is None and "JAX_NUM_PROCESSES" in env:
        num_processes, process_id = int(env["JAX_NUM_PROCESSES"]), int(env.get("JAX_PROCESS_ID", "0"))
    # Cross-process collectives of the CPU backend (no effect on GPU/TPU computations).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    except ValueError as e:  # no cluster detected after all: single process
        if explicit:
            raise ConfigError(f"jax.distributed.initialize failed: {e}") from None
        return False
    return True


def to_host(tree):
    """Device arrays -> numpy, gathering across processes where an array spans several hosts."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), tree)
