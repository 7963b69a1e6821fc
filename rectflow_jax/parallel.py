"""Device mesh, logical-axis sharding rules, multi-host start-up and batch placement.

The mesh has three named axes: 'data' (pure data parallelism), 'fsdp' (data
parallelism with parameters sharded) and 'tensor' (Megatron-style tensor parallelism).
Batches are split over ('data', 'fsdp'); parameters over whatever the logical-axis rules
say. 'tensor' shards what tensor parallelism shards, attention heads and the hidden
width of transformer feed-forwards, and the activations between those projections are
constrained to match (models.layers.constrain), so a head's q, k, v, its attention and the matching
rows of the output projection stay on one device and only the block's output is
all-reduced. Convolutions are not split over 'tensor': their channels mix in GroupNorm
and the next conv, so splitting them would all-gather at every layer.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import contextlib
import glob
import logging
import os

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rectflow_jax.configlib import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

log = logging.getLogger("rectflow")

# Logical axis -> mesh axis. Replicated by default. Weights: 'fsdp' shards the output
# side of every weight; 'tensor' the attention heads and feed-forward widths ('ff').
# Activations ('act_*', see `constrain`): the batch over the data axes, heads and
# feed-forward features over 'tensor'.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", None),
    ("mlp", "fsdp"),
    ("heads", ("fsdp", "tensor")),
    ("ff", ("fsdp", "tensor")),
    ("vocab", "fsdp"),
    ("norm", None),
    ("act_batch", ("data", "fsdp")),
    ("act_heads", "tensor"),
    ("act_ff", "tensor"),
)


def detected_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """The multi-host platform this process runs on, from its environment alone, or None.

    'slurm' (an srun step of several tasks), 'ompi' (mpirun), 'tpu' (a Cloud TPU VM:
    JAX finds the other workers through the metadata server; on a one-host slice it
    finds just this one). Nothing here touches the XLA backend, which must start after.
    """
    env = os.environ if environ is None else environ
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) > 1:
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "ompi"
    if env.get("TPU_WORKER_HOSTNAMES") or env.get("MEGASCALE_COORDINATOR_ADDRESS") or (
            environ is None and (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))):
        return "tpu"
    return None


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None, *,
                           environ: Mapping[str, str] | None = None) -> str | None:
    """jax.distributed.initialize whenever this is one of several processes; returns how it was found.

    Explicit flags (launch/local_multiprocess.sh, launch/slurm.sbatch) win; otherwise a
    SLURM step, an Open MPI job or a TPU VM is detected and JAX reads the coordinator
    and process ids from that platform. On one plain host nothing is started.
    """
    explicit = coordinator is not None or num_processes is not None
    how = "explicit" if explicit else detected_cluster(environ)
    if how is None or jax.distributed.is_initialized():
        return None
    # CPU processes need gloo for cross-process collectives; accelerators ignore it.
    # (Asking for the backend here would initialise it before distributed start-up.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        jax.distributed.initialize()
    log.info("jax.distributed started (%s): process %d of %d", how, jax.process_index(), jax.process_count())
    return how


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
    return Mesh(device_grid([sizes[a] for a in MESH_AXES], devices[:needed]), MESH_AXES)


def device_grid(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
    """Devices laid out for the interconnect: within a slice by its topology (ICI), and with
    several slices (TPU multislice) the data axis, the outermost, split across them (DCN)."""
    slices = sorted({getattr(d, "slice_index", 0) for d in devices})
    if len(slices) > 1:
        if shape[0] % len(slices):
            raise ConfigError(f"the data axis ({shape[0]}) must be a multiple of the {len(slices)} slices")
        ici = [shape[0] // len(slices), *shape[1:]]
        return mesh_utils.create_hybrid_device_mesh(ici, [len(slices)] + [1] * (len(shape) - 1), devices,
                                                    allow_split_physical_axes=True)
    try:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):  # a subset of a TPU topology, fake devices
        return np.asarray(devices).reshape(shape)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules):
    """While tracing: the logical rules and mesh that models.layers.constrain lays activations out by."""
    with nn.logical_axis_rules(rules), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        yield


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


def put(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """`value` laid out by `sharding`; an array already laid out so is returned as it is.

    A host value (the same on every process) for a sharding across processes goes up as
    each process's own shards: device_put would check the hosts agree by an all-gather of
    the whole array.
    """
    if isinstance(value, jax.Array) and value.sharding.is_equivalent_to(sharding, value.ndim):
        return value
    if sharding.is_fully_addressable or (isinstance(value, jax.Array) and not value.is_fully_addressable):
        return jax.device_put(value, sharding)  # on this host, or a reshard of a global array
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(value: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host value (the same on every process) as one array replicated over the whole mesh."""
    return put(np.asarray(value), replicated(mesh))


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
