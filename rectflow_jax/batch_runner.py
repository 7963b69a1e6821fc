"""One driver for batched inference: pairs, triplets, samples, evaluation and text-to-image go through it.

`BatchRunner(fn, chunk, mesh=)` runs `fn(consts, *rows)` in chunks of one fixed global
size, the rows (pytrees of arrays, rows along the first axis) split over the mesh's batch
axes (parallel.BATCH_AXES: 'data' x 'fsdp'), and every leaf of fn's output has its rows
on the first axis too. The ragged tail is padded to the chunk size, so a run compiles
once per input shape and never for its last chunk. `consts` (params, a negative prompt's
ids) are placed once by `place`: replicated, or by the shardings given (params sharded
by the logical rules); an array already on the mesh is kept as it is, not re-uploaded.

Several processes (the default mesh is every device of every process):
  - every process of the mesh calls the runner with the same fn and chunk, in the same
    order, with ITS OWN rows: process p holds a fixed block of each chunk (chunk /
    process_count rows for a mesh laid out by processes, parallel.make_mesh), assembled
    with jax.make_array_from_process_local_data;
  - the processes may hold different numbers of rows: they agree on the number of
    chunks by a tiny all-gather of their counts, and pad what they lack;
  - each gets back host numpy of its own rows only, in order, padding dropped (read
    from its addressable shards): the runner itself gathers nothing across hosts.
  `local_rows` splits rows every process computed alike (x0 from a seed) into this
  process's block, `gather` joins the blocks' outputs on every process, and `full` is
  the two around a call: every process passes all rows and gets all outputs.
A mesh of this process's devices alone (`local_mesh`) runs each process on its own, for
work the processes split by themselves (text_eval's shards); a mesh must span either
one process or all of them.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rectflow_jax import parallel


def default_mesh() -> Mesh:
    """Every device of every process, rows split over all of them."""
    return parallel.make_mesh({"data": -1})


def local_mesh() -> Mesh:
    """This process's devices alone: for work each process does independently of the others."""
    return parallel.make_mesh(devices=jax.local_devices())


def place(consts: Any, mesh: Mesh, shardings: Any = None) -> Any:
    """Constants on `mesh`, put once: by `shardings` (one Sharding, or a tree like `consts`),
    else replicated. A jax.Array already laid out so (without shardings: anywhere on this
    mesh, e.g. params restored sharded) is returned as it is, with no transfer."""
    if shardings is None:
        return jax.tree_util.tree_map(lambda value: value if _on_mesh(value, mesh) else
                                      parallel.put(value, parallel.replicated(mesh)), consts)
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda value: parallel.put(value, shardings), consts)
    return jax.tree_util.tree_map(parallel.put, consts, shardings)


def _on_mesh(value: Any, mesh: Mesh) -> bool:
    if not isinstance(value, jax.Array):
        return False
    sharding = value.sharding
    return getattr(sharding, "mesh", None) == mesh or (mesh.size == 1 and sharding.device_set == set(mesh.devices.flat))


def row_blocks(rows_of_process: dict[int, list[tuple[int, int]]], chunk: int) -> dict[int, tuple[int, int]]:
    """process -> its (start, stop) of a chunk's rows, from the row ranges of its devices.

    A process's devices must hold one contiguous block; processes hold the same block
    (replicas, e.g. a 'tensor' axis across hosts) or disjoint ones that tile the chunk.
    """
    blocks = {}
    for process, ranges in rows_of_process.items():
        start, stop = min(r[0] for r in ranges), max(r[1] for r in ranges)
        covered = np.zeros(stop - start, bool)
        for a, b in ranges:
            covered[a - start:b - start] = True
        if not covered.all():
            raise ValueError(f"process {process} holds rows of a chunk that are not contiguous: {sorted(ranges)}")
        blocks[process] = (start, stop)
    edges = sorted(set(blocks.values()))
    if edges[0][0] != 0 or edges[-1][1] != chunk or any(a[1] != b[0] for a, b in zip(edges, edges[1:])):
        raise ValueError(f"the processes' row blocks {edges} do not tile a chunk of {chunk} rows")
    return blocks


class BatchRunner:
    """`fn(consts, *rows)` jitted once over `mesh`, run chunk by chunk (see the module docstring)."""

    def __init__(self, fn: Callable, chunk_size: int, *, mesh: Mesh | None = None):
        self.mesh = mesh or default_mesh()
        axes = tuple(a for a in parallel.BATCH_AXES if a in self.mesh.axis_names)
        if not axes:
            raise ValueError(f"the mesh has none of the batch axes {parallel.BATCH_AXES}: {self.mesh.axis_names}")
        shards = math.prod(self.mesh.shape[a] for a in axes)
        # Equal rows per row shard; at least one row each.
        self.chunk = max(shards, int(chunk_size) - int(chunk_size) % shards)
        self.rows = NamedSharding(self.mesh, P(axes))
        self.replicated = parallel.replicated(self.mesh)
        self.fn = jax.jit(fn, out_shardings=self.rows)
        processes = {d.process_index for d in self.mesh.devices.flat}
        if jax.process_index() not in processes or 1 < len(processes) < jax.process_count():
            raise ValueError(f"a BatchRunner mesh spans this process alone or all {jax.process_count()} processes; "
                             f"this one spans processes {sorted(processes)}")
        self.multi_process = len(processes) > 1
        ranges: dict[int, list[tuple[int, int]]] = {}
        for device, index in self.rows.devices_indices_map((self.chunk,)).items():
            ranges.setdefault(device.process_index, []).append(_bounds(index[0], self.chunk))
        self._blocks = row_blocks(ranges, self.chunk)
        self.block = self._blocks[jax.process_index()]   # this process's rows of each chunk
        self.local_chunk = self.block[1] - self.block[0]
        # One process per distinct block answers for it when blocks are gathered.
        self._groups = sorted(set(self._blocks.values()))
        self._speakers = [min(p for p, b in self._blocks.items() if b == block) for block in self._groups]

    def place(self, consts: Any, shardings: Any = None) -> Any:
        """`place(consts, self.mesh, shardings)`: constants on the runner's mesh, once."""
        return place(consts, self.mesh, shardings)

    def __call__(self, consts: Any, *rows: Any) -> Any:
        """fn over this process's rows (each a pytree of arrays of one leading length), as host numpy.

        Every process of the mesh calls it together (see the module docstring).
        """
        consts = self.place(consts)  # a no-op for what is placed already; small host values go up once a call
        leaves = jax.tree_util.tree_leaves(rows)
        if not leaves:
            raise ValueError("BatchRunner needs at least one row array")
        total = len(leaves[0])
        if any(len(leaf) != total for leaf in leaves):
            raise ValueError(f"row arrays disagree in length: {sorted({len(leaf) for leaf in leaves})}")
        needed = -(-total // self.local_chunk)
        if self.multi_process:  # the processes run the same number of chunks, padding what they lack
            from jax.experimental import multihost_utils

            needed = int(np.max(multihost_utils.process_allgather(np.int64(needed))))
        if needed == 0:
            raise ValueError("BatchRunner got no rows (on any process)")
        outputs, pending = [], None
        for start in range(0, needed * self.local_chunk, self.local_chunk):
            stop = min(start + self.local_chunk, total)
            local = jax.tree_util.tree_map(lambda a: _pad(np.asarray(a[start:stop]), self.local_chunk), rows)
            result = self.fn(consts, *jax.tree_util.tree_map(self._global, local))
            if pending is not None:  # fetch the previous chunk while this one runs
                outputs.append(self._local(*pending))
            pending = result, max(0, stop - start)
        outputs.append(self._local(*pending))
        return jax.tree_util.tree_map(lambda *parts: np.concatenate(parts), *outputs)

    def local_rows(self, rows: Any) -> Any:
        """This process's block of rows that every process holds alike (contiguous, in process order)."""
        sl = self._block_slice(len(jax.tree_util.tree_leaves(rows)[0]))
        return jax.tree_util.tree_map(lambda a: a[sl], rows)

    def gather(self, outputs: Any, total: int) -> Any:
        """Every block's outputs (of `local_rows` of `total` rows), joined in order on every process."""
        if len(self._groups) == 1:
            return outputs
        from jax.experimental import multihost_utils

        size = -(-total // len(self._groups))
        stacked = multihost_utils.process_allgather(jax.tree_util.tree_map(lambda a: _pad(a, size), outputs))
        return jax.tree_util.tree_map(
            lambda a: np.concatenate([a[p] for p in self._speakers])[:total], stacked)

    def full(self, consts: Any, *rows: Any) -> Any:
        """fn over all rows, which every process passes alike; all outputs on every process."""
        total = len(jax.tree_util.tree_leaves(rows)[0])
        return self.gather(self(consts, *self.local_rows(rows)), total)

    def _block_slice(self, total: int) -> slice:
        group = self._groups.index(self.block)
        size = -(-total // len(self._groups))
        return slice(min(group * size, total), min((group + 1) * size, total))

    def _global(self, local: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(self.rows, local, (self.chunk, *local.shape[1:]))

    def _local(self, result: Any, keep: int) -> Any:
        """This process's rows of a chunk's outputs (its addressable shards, replicas once), host numpy."""
        def rows_of(array: jax.Array) -> np.ndarray:
            if array.shape[:1] != (self.chunk,):
                raise ValueError(f"fn's outputs must have a chunk's {self.chunk} rows on their first axis; one has "
                                 f"shape {array.shape}")
            shards = {_bounds(s.index[0], self.chunk): s.data for s in array.addressable_shards}
            parts = jax.device_get([shards[b] for b in sorted(shards)])
            return np.concatenate(parts)[:keep]

        return jax.tree_util.tree_map(rows_of, result)


def _bounds(index: slice, size: int) -> tuple[int, int]:
    start, stop, _ = index.indices(size)
    return start, stop


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    """Pads the first axis to `size` by repeating the last row, or zeros if there is none
    (padding rows are dropped after)."""
    array = np.asarray(array)
    missing = size - len(array)
    if missing <= 0:
        return array
    if not len(array):
        return np.zeros((size, *array.shape[1:]), array.dtype)
    return np.concatenate([array, np.repeat(array[-1:], missing, axis=0)])
