"""SIGTERM is a clean stop: save at the next step (or shard), exit 75, and a rerun finishes exactly.

`rectflow train` and `rectflow pairs` are sent SIGTERM while they work. Each exits with
preemption.PREEMPTED_EXIT_CODE having saved its work; rerunning the same command resumes,
and the final parameters (or pair shards) are bit for bit those of an uninterrupted run.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rectflow_jax import checkpoint, models, preemption, train
from rectflow_jax.data import datasets

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ["--config", str(ROOT / "configs" / "toy_2gmm.py"), "--quiet", "--config.train.batch_size=256",
          "--config.train.log_every=50", "--config.train.checkpoint_every=100000"]


def rectflow(*args) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", RECTFLOW_TRACEBACK="1")
    return subprocess.Popen([sys.executable, "-m", "rectflow_jax.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, expected=0) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == expected, out[-3000:]
    return out


def terminate_when(proc, ready, timeout=300) -> None:
    """SIGTERM once `ready()` holds (the work has begun and is not yet done)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()[0][-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)


def raw_params(stage_dir):
    data = datasets.get_dataset({"name": "2gmm"})
    model = models.build_velocity_model(dict(name="mlp", hidden=128, depth=3, time_embed_dim=32), data.shape, 0)
    abstract = train.abstract_params(model, data.shape, 0)
    return {which: checkpoint.restore_params(stage_dir, abstract, which=which) for which in ("params", "ema_params")}


def assert_bit_identical(a, b):
    import jax

    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_sigterm_in_training_saves_exits_75_and_the_rerun_matches_an_uninterrupted_run(tmp_path):
    steps = "--config.train.num_steps=3000"
    whole = rectflow("train", *CONFIG, steps, f"--workdir={tmp_path / 'whole'}")
    stopped = tmp_path / "stopped"
    first = rectflow("train", *CONFIG, steps, f"--workdir={stopped}")
    # compiled.json is written just before step 1: the loop is running.
    terminate_when(first, lambda: (stopped / "compiled.json").exists())
    out = finish(first, expected=preemption.PREEMPTED_EXIT_CODE)
    assert "preempted" in out and "rerun to resume" in out
    saved = checkpoint.latest_step(stopped)
    assert saved is not None and 0 < saved < 3000, saved
    finish(rectflow("train", *CONFIG, steps, f"--workdir={stopped}"))
    finish(whole)
    assert checkpoint.latest_step(stopped) == checkpoint.latest_step(tmp_path / "whole") == 3000
    assert_bit_identical(raw_params(stopped), raw_params(tmp_path / "whole"))


@pytest.mark.slow
def test_sigterm_in_pair_generation_stops_at_a_shard_and_the_rerun_makes_every_pair_once(tmp_path):
    teacher = tmp_path / "1rf"
    finish(rectflow("train", *CONFIG, "--config.train.num_steps=50", f"--workdir={teacher}"))
    pairs = ["--config.pairs.num_pairs=6000", "--config.pairs.shard_size=300", "--config.pairs.batch_size=300",
             "--config.pairs.num_steps=400"]
    whole = tmp_path / "whole"
    finish(rectflow("pairs", *CONFIG, *pairs, f"--checkpoint={teacher}", f"--out={whole}"))
    stopped = tmp_path / "stopped"
    first = rectflow("pairs", *CONFIG, *pairs, f"--checkpoint={teacher}", f"--out={stopped}")
    terminate_when(first, lambda: any(stopped.glob("pairs-*.npz")))
    finish(first, expected=preemption.PREEMPTED_EXIT_CODE)
    made = sorted(p.name for p in stopped.glob("pairs-*.npz"))
    assert 0 < len(made) < 20 and not list(stopped.glob("*.tmp"))  # stopped between whole shards
    finish(rectflow("pairs", *CONFIG, *pairs, f"--checkpoint={teacher}", f"--out={stopped}"))
    shards = sorted(p.name for p in whole.glob("pairs-*.npz"))
    assert sorted(p.name for p in stopped.glob("pairs-*.npz")) == shards and len(shards) == 20
    for name in shards:
        with np.load(whole / name) as a, np.load(stopped / name) as b:
            assert a.files == b.files
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key])
