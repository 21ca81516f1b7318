"""Devices, meshes, shardings and `jax.distributed` start-up. Nothing else of lrjax is imported here.

One code path for 1..N devices: programs run under `jax.set_mesh(mesh)` with a `data` axis (and
optionally a `members` axis for sweeps and multi-seed range tests, and `fsdp` and `tensor` axes for
models larger than one device). Inside the compiled programs each batch is constrained to be split
along `data` x `fsdp` (`BATCH_AXES`), so every device gathers and computes only its slice of the batch
and XLA inserts the gradient all-reduce. Parameters and optimizer state are placed by
`lrjax.sharding` (replicated on a mesh of `data` alone; sharded over `fsdp` and `tensor`).

On a CPU, XLA runs this model's small steps on one core. `use_cpu_cores()` makes every core a JAX
device, and the 'auto' mesh then puts the independent members of a program (range-test seeds, sweep
rates) on the cores along `members`, while one model stays on one device (splitting a batch-32 step
over the two cores of one process measured 3x slower than one core).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lrjax.errors import ConfigError

AXES = ("members", "data", "fsdp", "tensor")  # the mesh axes lrjax knows, in mesh order
BATCH_AXES = ("data", "fsdp")  # a batch is split over both: FSDP is data parallelism with sharded state
_cores_as_devices = False  # set by use_cpu_cores(): the CPU devices are this machine's cores


def use_cpu_cores() -> int:
    """Makes each CPU core a JAX device; call before JAX runs anything (the CLI does). Returns the
    number of devices made, 0 where it did nothing: JAX already started, or the user chose the count
    ($JAX_NUM_CPU_DEVICES, --xla_force_host_platform_device_count)."""
    global _cores_as_devices
    if "JAX_NUM_CPU_DEVICES" in os.environ or "device_count" in os.environ.get("XLA_FLAGS", ""):
        return 0
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backends already initialised: keep what there is
        return 0
    _cores_as_devices = n > 1
    return n


def parse_mesh_shape(spec: str, num_devices: int) -> dict[str, int]:
    """'auto' -> all devices on `data`; '4' -> 4 on `data`; 'members=2,data=4' -> both axes;
    'data=2,fsdp=2,tensor=2' -> also the parameter axes (`fsdp`, `tensor` appear only when named)."""
    spec = spec.strip()
    if spec == "auto":
        return {"data": num_devices}
    try:
        pairs = [("data", spec)] if "=" not in spec else [part.split("=") for part in spec.split(",")]
        names = [name.strip() for name, _ in pairs]
        axes = {name: int(size) for name, (_, size) in zip(names, pairs)}
    except ValueError:
        raise ConfigError(f"--mesh-shape {spec!r} is not 'auto', an integer or 'members=M,data=D' "
                          "(axes: members, data, fsdp, tensor)") from None
    unknown = set(axes) - set(AXES)
    if unknown:
        raise ConfigError(f"--mesh-shape: unknown axis {sorted(unknown)}; use {', '.join(AXES)}")
    if len(axes) < len(names):
        raise ConfigError(f"--mesh-shape {spec!r} names an axis twice")
    if any(size < 1 for size in axes.values()):
        raise ConfigError(f"--mesh-shape {spec!r}: axis sizes must be positive")
    return {"members": axes.get("members", 1), "data": axes.get("data", 1),
            **{name: axes[name] for name in ("fsdp", "tensor") if name in axes}}


def make_mesh(spec: str = "auto", members: int = 1) -> jax.sharding.Mesh:
    """A mesh over the available devices (all processes') with a `data` axis, from a --mesh-shape spec.

    'auto' puts every device on `data`, except where `use_cpu_cores()` made the CPU cores devices:
    there a program of `members` independent models spreads them over up to `members` cores (the
    range test and the sweep pad their members to whole blocks) and a single model runs on one core.
    """
    n = jax.device_count()
    if spec.strip() == "auto" and _cores_as_devices and jax.process_count() == 1 and jax.default_backend() == "cpu":
        d = max(1, min(members, n))
        return jax.make_mesh((d, 1), ("members", "data"), axis_types=(AxisType.Auto,) * 2,
                             devices=jax.devices()[:d])
    axes = parse_mesh_shape(spec, n)
    size = int(np.prod(list(axes.values())))
    devices = None
    if size != n:
        if not (_cores_as_devices and jax.process_count() == 1 and size < n):
            raise ConfigError(f"--mesh-shape {spec!r} needs {size} devices but {n} are available")
        devices = jax.devices()[:size]  # the cores were made devices by lrjax, not chosen: use some of them
    # Auto axes: the programs state where the batch is split (with_sharding_constraint) and XLA
    # propagates the rest; explicit-sharding mode would make every constraint an assertion.
    return jax.make_mesh(tuple(axes.values()), tuple(axes), axis_types=(AxisType.Auto,) * len(axes),
                         devices=devices)


def data_axis_size(mesh: jax.sharding.Mesh | None = None) -> int:
    """How many ways a batch is split: the sizes of `data` and `fsdp` multiplied."""
    return axis_size("data", mesh) * axis_size("fsdp", mesh)


def batch_axes(mesh: jax.sharding.Mesh | None = None) -> tuple[str, ...]:
    """The axes of `mesh` (default: the ambient one) a batch is split over, in mesh order."""
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    return tuple(a for a in BATCH_AXES if a in (mesh.axis_names or ()))


def axis_size(name: str, mesh: jax.sharding.Mesh | None = None) -> int:
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    return dict(zip(mesh.axis_names, mesh.axis_sizes)).get(name, 1) if mesh.axis_names else 1


def padded_members(count: int, mesh: jax.sharding.Mesh) -> int:
    """`count` members rounded up to whole blocks of the mesh's `members` axis: the range test and the
    sweep fill the rest with members that never run."""
    return count + (-count) % axis_size("members", mesh)


def spread_members(tree, axis: int = 0):
    """Under an ambient mesh with a `members` axis, splits dimension `axis` of every leaf (seeds of a
    range test, rates of a sweep) across it; other dimensions stay replicated."""
    if axis_size("members") <= 1:
        return tree
    spec = P(*([None] * axis + ["members"]))
    return jax.tree.map(lambda a: jax.device_put(a, spec), tree)


def default_member_loop(mesh: jax.sharding.Mesh | None = None) -> str:
    """How a device goes through its members: 'vmap' (all at once) on accelerators, 'map' (one after
    another) on CPUs, where vmapping 16 members measured 0.94-1.03x the speed of running them one by
    one while looping lets a diverged member skip its steps (docs/measurements.md)."""
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return "map" if platform == "cpu" else "vmap"


def map_members(fn, members, *shared, loop: str = "vmap"):
    """`fn(member, *shared)` for every slice along the leading axis of the pytree `members` (inside a
    trace); `shared` are the same for every member (data, rates).

    'vmap' runs all members at once; 'map' runs them one after another on each device of the ambient
    mesh's `members` axis (every device loops over its own block, concurrently with the others).
    """
    if loop == "vmap":
        return jax.vmap(fn, in_axes=(0,) + (None,) * len(shared))(members, *shared)
    if loop != "map":
        raise ValueError(f"member loop {loop!r} is not 'vmap' or 'map'")

    def loop_block(block, *shared):
        return jax.lax.map(lambda m: fn(m, *shared), block)

    if axis_size("members") <= 1:
        return loop_block(members, *shared)
    # shard_map, not a vmap over devices: each member's lax.cond stays a real branch.
    return jax.shard_map(loop_block, in_specs=(P("members"),) + (P(),) * len(shared), out_specs=P("members"),
                         axis_names={"members"}, check_vma=False)(members, *shared)


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> None:
    d = data_axis_size(mesh)
    if batch_size % d:
        raise ConfigError(f"batch size {batch_size} is not divisible by the {d} devices of the mesh's data x fsdp axes "
                          "(--batch-size, --mesh-shape)")


def shard_batch(x: jax.Array) -> jax.Array:
    """Inside a compiled program: split the leading (batch) axis over the ambient mesh's `data` x `fsdp`."""
    if data_axis_size() <= 1:
        return x
    return jax.lax.with_sharding_constraint(x, P(batch_axes()))


def replicate(tree, mesh: jax.sharding.Mesh):
    """Places a pytree (numpy or jax arrays) fully replicated on every device of `mesh`.

    With several processes each process passes identical host values (data and init derive from
    the seed), so the global array is assembled from process-local copies without communication.
    """
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def assemble(a):
        if jax.dtypes.issubdtype(getattr(a, "dtype", np.float32), jax.dtypes.prng_key):
            # RNG keys (a Dropout stream's, say) travel as their raw data
            data = jax.make_array_from_process_local_data(sharding, np.asarray(jax.random.key_data(a)))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
        return jax.make_array_from_process_local_data(sharding, np.asarray(a))

    return jax.tree.map(assemble, tree)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Starts `jax.distributed` for multi-host jobs; returns whether it did.

    Flags win; then $JAX_COORDINATOR_ADDRESS with $JAX_NUM_PROCESSES and $JAX_PROCESS_ID; otherwise
    JAX's own cluster auto-detection (SLURM with several tasks, Open MPI, ...) is used when such an
    environment is present, and a single process starts nothing.
    """
    env = os.environ
    # Any setting given by hand asks for a multi-process job: a missing piece is an error, never a
    # silent single-process run (each process would then run the whole job into the same workdir).
    explicit = (any(v is not None for v in (coordinator_address, num_processes, process_id))
                or "JAX_COORDINATOR_ADDRESS" in env)
    cluster = int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    if not explicit and not cluster:
        return False
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if address is not None and not address.rpartition(":")[2].isdigit():
        raise ConfigError(f"the coordinator address {address!r} needs a port: host:port "
                          "(--coordinator-address / $JAX_COORDINATOR_ADDRESS)")
    if "JAX_COORDINATOR_ADDRESS" in env and num_processes is None and "JAX_NUM_PROCESSES" in env:
        num_processes = int(env["JAX_NUM_PROCESSES"])
        if process_id is None and "JAX_PROCESS_ID" not in env and num_processes > 1:
            raise ConfigError(f"$JAX_NUM_PROCESSES is {num_processes} but this process has no id: set "
                              "$JAX_PROCESS_ID (or --process-id) in each process")
        process_id = process_id if process_id is not None else int(env.get("JAX_PROCESS_ID", "0"))
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
