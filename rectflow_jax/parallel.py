"""Device mesh, logical-axis sharding rules, multi-host start-up and batch placement.

The mesh has three named axes: 'data' (pure data parallelism), 'fsdp' (data
parallelism with parameters sharded) and 'tensor' (model parallelism). Batches are
split over ('data', 'fsdp'); parameters over whatever the logical-axis rules say.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rectflow_jax.configlib import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis. Replicated by default; 'fsdp' shards the output side of
# every weight, 'tensor' the attention heads and MLP widths.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", None),
    ("mlp", ("fsdp", "tensor")),
    ("heads", ("fsdp", "tensor")),
    ("vocab", "fsdp"),
    ("norm", None),
)


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """jax.distributed.initialize when running as one of several processes.

    On TPU pods and SLURM clusters all three may be None: JAX discovers them.
    """
    if coordinator is None and num_processes is None:
        return
    # CPU processes need gloo for cross-process collectives; accelerators ignore it.
    # (Asking for the backend here would initialise it before distributed start-up.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)


def make_mesh(mesh_config: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Mesh over all devices; one axis size may be -1 (all remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {axis: int((mesh_config or {}).get(axis, -1 if axis == "data" else 1)) for axis in MESH_AXES}
    unknown = set(mesh_config or {}) - set(MESH_AXES)
    if unknown:
        raise ConfigError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got {free}")
    if free:
        if len(devices) % fixed:
            raise ConfigError(f"{len(devices)} devices cannot be split by fixed mesh axes of product {fixed}")
        sizes[free[0]] = len(devices) // fixed
    needed = int(np.prod(list(sizes.values())))
    if needed > len(devices) or (needed < len(devices) and jax.process_count() > 1):
        raise ConfigError(f"mesh {sizes} needs {needed} devices, have {len(devices)}")
    # A fully specified smaller mesh on one host uses the first devices (e.g. data=1 to debug).
    grid = np.asarray(devices[:needed]).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def logical_rules(overrides: Mapping[str, Any] | None = None) -> tuple[tuple[str, Any], ...]:
    rules = dict(DEFAULT_RULES)
    rules.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in (overrides or {}).items()})
    return tuple(rules.items())


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops mesh axes that do not divide a dimension (small layers stay replicated)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        names = tuple(a for a in names if mesh.shape[a] > 1)
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        fitted.append(names if names and dim % size == 0 else None)
    return P(*fitted)


def param_shardings(abstract_boxed: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for a boxed (nn.Partitioned) abstract tree, e.g. jax.eval_shape(init)."""
    logical = nn.get_partition_spec(abstract_boxed)
    mesh_specs = nn.logical_to_mesh(logical, rules)
    shapes = nn.unbox(abstract_boxed)
    return jax.tree_util.tree_map(
        lambda spec, leaf: NamedSharding(mesh, _fit_spec(spec, leaf.shape, mesh)),
        mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into one global array per key."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def check_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """Per-process batch size, after checking the global batch divides over the mesh."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch_size % shards:
        raise ConfigError(f"batch size {global_batch_size} is not divisible by the {shards} data shards of the mesh")
    if global_batch_size % jax.process_count():
        raise ConfigError(f"batch size {global_batch_size} is not divisible by {jax.process_count()} processes")
    return global_batch_size // jax.process_count()
