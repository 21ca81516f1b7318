"""Where parameters and optimizer state live on a mesh: one table of logical-axis rules.

Models name the dimensions of their parameters with logical names (`nnx.with_partitioning(init,
("embed", "mlp"))`, kept as the Variable's `out_sharding` metadata); `RULES` maps each name to a mesh
axis, as MaxText's `logical_axis_rules` and flax's `nnx.logical_axis_rules` do. A rule applies where the
mesh has that axis (size > 1) and the axis divides the dimension; otherwise the dimension is replicated,
so one table fits every mesh. A parameter without names (any user's model) gets the default: its
largest dimension that the `fsdp` axis divides is split over `fsdp` when it has at least `LARGE`
elements; smaller ones, and ones nothing divides, stay replicated. Optax's state mirrors the
parameters' Variables (same metadata), so it follows them; scalars (counts, rates) are replicated.
Imports nothing of lrjax but `mesh`; no compiled programs live here.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lrjax import mesh as mesh_lib
from lrjax.errors import ConfigError

# logical name -> mesh axis (None: replicated). FSDP splits the model dimension; tensor parallelism the
# MLP's hidden units, the attention heads and the vocabulary (Megatron's split, MaxText's defaults).
RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("conv", None),
    ("channels", "tensor"),
)
LARGE = 4096  # elements: an unannotated parameter smaller than this stays replicated
PARAMETER_AXES = ("fsdp", "tensor")


def parse_rules(spec: str | None) -> tuple[tuple[str, str | None], ...] | None:
    """--sharding-rules 'embed=fsdp,mlp=tensor,heads=none' -> a rules table (None/'' -> None: `RULES`).
    The names given replace those rules; the others of `RULES` stay."""
    if spec is None or not spec.strip():
        return None
    given = {}
    for part in spec.split(","):
        name, eq, axis = part.partition("=")
        name, axis = name.strip(), axis.strip()
        if not eq or not name or axis not in (*mesh_lib.AXES, "none", ""):
            raise ConfigError(f"--sharding-rules {spec!r}: each rule is NAME=AXIS with AXIS one of "
                              f"{', '.join(mesh_lib.AXES)} or none, got {part.strip()!r}")
        given[name] = None if axis in ("none", "") else axis
    return tuple((n, given.pop(n, a)) for n, a in RULES) + tuple(given.items())


def is_sharded(mesh: jax.sharding.Mesh | None = None) -> bool:
    """Whether `mesh` (default: the ambient one) has a parameter axis (`fsdp`, `tensor`) of size > 1."""
    return any(mesh_lib.axis_size(a, mesh) > 1 for a in PARAMETER_AXES)


def logical_spec(names, shape, mesh, rules=None) -> P:
    """The PartitionSpec of a parameter of `shape` whose dimensions have logical `names`."""
    table, used, spec = dict(rules or RULES), set(), []
    for name, dim in zip(names, shape):
        axis = table.get(name) if name is not None else None
        size = mesh_lib.axis_size(axis, mesh) if axis is not None else 1
        ok = axis is not None and axis not in used and size > 1 and dim % size == 0
        spec.append(axis if ok else None)
        used |= {axis} if ok else set()
    return P(*spec)


def default_spec(shape, mesh) -> P:
    """An unannotated parameter: its largest dimension `fsdp` divides over `fsdp`, if it is large."""
    n = mesh_lib.axis_size("fsdp", mesh)
    if n <= 1 or math.prod(shape) < LARGE:
        return P()
    fits = [i for i in sorted(range(len(shape)), key=lambda i: -shape[i]) if shape[i] % n == 0]
    return P(*[("fsdp" if i == fits[0] else None) for i in range(len(shape))]) if fits else P()


def partition_specs(tree, mesh, rules=None):
    """A PartitionSpec for every array leaf of `tree` (params, optimizer state, a whole TrainState)."""
    is_var = lambda v: isinstance(v, nnx.Variable)  # noqa: E731
    specs = []
    for leaf in jax.tree.leaves(tree, is_leaf=is_var):
        value = leaf.get_value() if is_var(leaf) else leaf
        shape = np.shape(value)
        names = leaf.get_metadata().get("out_sharding") if is_var(leaf) else None
        if not shape or jax.dtypes.issubdtype(getattr(value, "dtype", np.float32), jax.dtypes.prng_key):
            specs.append(P())
        elif names is not None and len(names) == len(shape):
            specs.append(logical_spec(names, shape, mesh, rules))
        else:
            specs.append(default_spec(shape, mesh))
    return jax.tree.unflatten(jax.tree.structure(tree), specs)


def shardings(tree, mesh, rules=None):
    """`partition_specs` as NamedShardings of `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), partition_specs(tree, mesh, rules))


def place(tree, mesh, rules=None):
    """`tree` (host or device arrays) on `mesh`, each leaf sharded by the rules (replicated on a mesh
    without parameter axes). With several processes each passes identical host values."""
    if not is_sharded(mesh):
        return mesh_lib.replicate(tree, mesh)
    targets = shardings(tree, mesh, rules)
    if jax.process_count() == 1:
        return jax.device_put(tree, targets)

    def assemble(a, sharding):
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(assemble, tree, targets)


def constrain(tree, rules=None):
    """Inside a compiled program under a mesh with parameter axes: `tree` kept where the rules put it
    (so a step's new parameters and optimizer state leave sharded as they came)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not is_sharded(mesh):
        return tree
    return jax.lax.with_sharding_constraint(tree, partition_specs(tree, mesh, rules))


def bytes_per_device(tree) -> int:
    """The largest device's bytes of `tree`'s arrays (this process's devices)."""
    per_device: dict = {}
    for a in jax.tree.leaves(tree):
        for shard in getattr(a, "addressable_shards", ()):
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values(), default=0)
