"""One driver for batched inference: pairs, triplets, samples and text-to-image go through it.

`BatchRunner(fn, chunk)` runs `fn(consts, *rows)` over host arrays in chunks of one fixed
size split across this host's devices (data parallel, rows along the first axis). The
ragged tail is padded to the chunk size, so a run compiles once per input shape and
never for its last chunk, and the outputs come back as host numpy with the padding
dropped. `consts` (params, a negative prompt's ids) are placed replicated once by `place`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def local_mesh() -> Mesh:
    return Mesh(np.asarray(jax.local_devices()), ("data",))


class BatchRunner:
    def __init__(self, fn: Callable, chunk_size: int, *, mesh: Mesh | None = None):
        self.mesh = mesh or local_mesh()
        devices = self.mesh.size
        # Equal rows per device; at least one row each.
        self.chunk = max(devices, int(chunk_size) - int(chunk_size) % devices)
        self.rows = NamedSharding(self.mesh, P(self.mesh.axis_names))
        self.replicated = NamedSharding(self.mesh, P())
        self.fn = jax.jit(fn)

    def place(self, consts: Any) -> Any:
        """Puts constants (params) on every device of the runner's mesh, once."""
        return jax.device_put(consts, self.replicated)

    def __call__(self, consts: Any, *rows: Any) -> Any:
        """fn over all rows (each a pytree of arrays with the same leading length), as host numpy."""
        leaves = jax.tree_util.tree_leaves(rows)
        if not leaves:
            raise ValueError("BatchRunner needs at least one row array")
        total = len(leaves[0])
        if any(len(leaf) != total for leaf in leaves):
            raise ValueError(f"row arrays disagree in length: {sorted({len(leaf) for leaf in leaves})}")
        outputs = []
        for start in range(0, total, self.chunk):
            stop = min(start + self.chunk, total)
            chunk = jax.tree_util.tree_map(lambda a: _pad(np.asarray(a[start:stop]), self.chunk), rows)
            result = self.fn(consts, *jax.device_put(chunk, self.rows))
            outputs.append(jax.tree_util.tree_map(lambda a: np.asarray(a)[: stop - start], result))
        return jax.tree_util.tree_map(lambda *parts: np.concatenate(parts), *outputs)


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    """Pads the first axis to `size` by repeating the last row (padding rows are dropped after)."""
    missing = size - len(array)
    if missing <= 0:
        return array
    return np.concatenate([array, np.repeat(array[-1:], missing, axis=0)])
