"""Two JAX processes on localhost train like one process with the same global batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from rectflow_jax import teachers

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["train", f"--config={ROOT / 'configs' / 'digits.py'}", "--quiet",
        "--config.train.num_steps=12", "--config.train.checkpoint_every=6", "--config.train.batch_size=16",
        "--config.model.ch=8", "--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()"]


def launch(workdir, *extra, devices=1):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.Popen([sys.executable, "-m", "rectflow_jax.cli", *ARGS, f"--workdir={workdir}", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    port = free_port()
    procs = [launch(tmp_path / "two", f"--config.distributed.coordinator=127.0.0.1:{port}",
                    "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}")
             for i in range(2)]
    single = launch(tmp_path / "one", devices=2)
    for proc in procs + [single]:
        out, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, out[-3000:]
    two = teachers.load_velocity_teacher(tmp_path / "two")
    one = teachers.load_velocity_teacher(tmp_path / "one")
    for a, b in zip(jax.tree_util.tree_leaves(two.params), jax.tree_util.tree_leaves(one.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
