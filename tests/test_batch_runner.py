"""The one batched-inference driver: fixed chunks over the mesh, a padded tail, one compilation, own rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rectflow_jax import batch_runner, parallel
from rectflow_jax.batch_runner import BatchRunner


def test_ragged_rows_compile_once_and_come_back_trimmed_in_order():
    traces = []

    def fn(consts, x, cond):
        traces.append(1)  # runs once per trace
        return {"y": consts["scale"] * x + cond["label"][:, None], "sum": jnp.sum(x, axis=1)}

    devices = jax.device_count()
    runner = BatchRunner(fn, 3 * devices + 1)  # rounded down to whole rows per device
    assert runner.chunk == 3 * devices and len(runner.rows.device_set) == devices
    x = np.arange(7 * devices * 2, dtype=np.float32).reshape(7 * devices, 2)
    labels = np.arange(7 * devices, dtype=np.int32)
    consts = runner.place({"scale": np.float32(2.0)})
    for n in (len(x), 5, 3 * devices):  # a padded last chunk, less than one chunk, whole chunks
        out = runner(consts, x[:n], {"label": labels[:n]})
        np.testing.assert_array_equal(out["y"], 2.0 * x[:n] + labels[:n, None])
        np.testing.assert_array_equal(out["sum"], x[:n].sum(axis=1))
    assert len(traces) == 1 and runner.fn._cache_size() == 1


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest fakes 8 CPUs)")
def test_outputs_are_this_process_rows_once_each_with_replicas_over_tensor():
    mesh = parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})  # each row shard held by 4 devices
    runner = BatchRunner(lambda consts, index: {"index": index, "twice": 2 * index}, 6, mesh=mesh)
    assert runner.local_chunk == runner.chunk == 6 and runner.block == (0, 6)
    index = np.arange(17, dtype=np.int32)
    out = runner(None, index)
    np.testing.assert_array_equal(out["index"], index)
    np.testing.assert_array_equal(out["twice"], 2 * index)
    # One process: its block is every row, and gathering the blocks changes nothing.
    np.testing.assert_array_equal(runner.local_rows(index), index)
    np.testing.assert_array_equal(runner.full(None, index)["index"], index)


def test_outputs_without_rows_first_are_refused():
    runner = BatchRunner(lambda consts, x: x.T, 4, mesh=parallel.make_mesh({"data": 1}))
    with pytest.raises(ValueError, match="rows on their first axis"):
        runner(None, np.zeros((4, 8), np.float32))


def test_row_blocks_of_several_processes():
    # 2 processes x 4 devices, rows over all 8: each process holds half of each chunk.
    ranges = {p: [(2 * d, 2 * d + 2) for d in range(4 * p, 4 * p + 4)] for p in (0, 1)}
    assert batch_runner.row_blocks(ranges, 16) == {0: (0, 8), 1: (8, 16)}
    # A 'tensor' axis across the processes: both hold the same rows.
    assert batch_runner.row_blocks({0: [(0, 4), (4, 8)], 1: [(0, 4), (4, 8)]}, 8) == {0: (0, 8), 1: (0, 8)}
    with pytest.raises(ValueError, match="not contiguous"):
        batch_runner.row_blocks({0: [(0, 2), (4, 6)], 1: [(2, 4), (6, 8)]}, 8)
    with pytest.raises(ValueError, match="do not tile"):
        batch_runner.row_blocks({0: [(0, 6)], 1: [(4, 8)]}, 8)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest fakes 8 CPUs)")
def test_place_keeps_arrays_on_the_mesh_and_puts_the_rest_once():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    sharded = jax.device_put(np.arange(32, dtype=np.float32).reshape(8, 4),
                             jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp")))
    runner = BatchRunner(lambda consts, x: x, 8, mesh=mesh)
    placed = runner.place({"w": sharded, "scale": np.float32(3.0), "elsewhere": jnp.ones(3)})
    assert placed["w"] is sharded  # already on the mesh: no transfer, the same buffers
    assert runner.place(placed["w"], sharded.sharding) is sharded
    assert placed["scale"].sharding == runner.replicated
    assert placed["elsewhere"].sharding == runner.replicated  # on one device: replicated over the mesh
    again = runner.place(placed)
    assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(placed)))
