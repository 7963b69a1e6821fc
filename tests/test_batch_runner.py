"""The one batched-inference driver: fixed chunks over the devices, a padded tail, one compilation."""

import jax
import jax.numpy as jnp
import numpy as np

from rectflow_jax.batch_runner import BatchRunner


def test_ragged_rows_compile_once_and_come_back_trimmed_in_order():
    traces = []

    def fn(consts, x, cond):
        traces.append(1)  # runs once per trace
        return {"y": consts["scale"] * x + cond["label"][:, None], "sum": jnp.sum(x, axis=1)}

    devices = jax.local_device_count()
    runner = BatchRunner(fn, 3 * devices + 1)  # rounded down to whole rows per device
    assert runner.chunk == 3 * devices and len(runner.rows.device_set) == devices
    x = np.arange(7 * devices * 2, dtype=np.float32).reshape(7 * devices, 2)
    labels = np.arange(7 * devices, dtype=np.int32)
    out = runner(runner.place({"scale": np.float32(2.0)}), x, {"label": labels})  # 3 chunks, the last padded
    np.testing.assert_array_equal(out["y"], 2.0 * x + labels[:, None])
    np.testing.assert_array_equal(out["sum"], x.sum(axis=1))
    assert len(traces) == 1

