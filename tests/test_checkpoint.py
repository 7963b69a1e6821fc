"""Checkpoints read while the run that writes them is still going (an evaluator, a test polling)."""

import threading

import jax
import numpy as np

from rectflow_jax import checkpoint


def test_reading_a_stage_while_it_saves_and_deletes_old_steps(tmp_path):
    """The writer keeps 2 steps, so every save deletes one that a reader may be listing or restoring."""
    writer = checkpoint.Checkpointer(tmp_path, save_every=1, keep=2)
    last_step = 100
    failures = []

    def save_all():
        try:
            for step in range(1, last_step + 1):
                writer.save(step, {"ema_params": {"w": np.full((4,), step, np.float32)}}, {"step": step})
            writer.wait()
        except Exception as err:  # surfaces in the main thread's assert
            failures.append(err)

    thread = threading.Thread(target=save_all)
    thread.start()
    abstract = {"w": jax.ShapeDtypeStruct((4,), np.float32)}
    seen = []
    while thread.is_alive():
        step = checkpoint.latest_step(tmp_path)
        if step is None:
            continue
        meta, meta_step = checkpoint.read_meta(tmp_path)
        assert meta["step"] == meta_step >= step
        w = np.asarray(checkpoint.restore_params(tmp_path, abstract)["w"])
        assert w[0] >= meta_step and np.all(w == w[0])
        seen.append(int(w[0]))
    thread.join()
    writer.close()
    assert not failures, failures
    assert seen == sorted(seen) and len(set(seen)) > 5, seen
    assert checkpoint.latest_step(tmp_path) == last_step
