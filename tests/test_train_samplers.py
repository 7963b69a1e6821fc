"""`rectflow train` with each time sampler, chosen and tuned from the command line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rectflow_jax import checkpoint, flow

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "configs" / "toy_2gmm.py"
# Each sampler, with one of its arguments set away from the default.
SAMPLERS = {"uniform": {"eps": 0.01}, "logit_normal": {"mean": 0.0, "std": 0.5}, "u_shaped": {"a": 2.5}}


def rectflow(*args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", RECTFLOW_TRACEBACK="")
    return subprocess.Popen([sys.executable, "-m", "rectflow_jax.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_train_toy_with_each_time_sampler_from_the_cli(tmp_path):
    assert set(SAMPLERS) == set(flow.TIME_SAMPLERS)
    runs = {name: rectflow("train", f"--config={TOY}", f"--workdir={tmp_path / name}", "--quiet",
                           f"--config.flow.time_sampler={name}", "--config.train.num_steps=3",
                           *(f"--config.flow.{name}.{arg}={value}" for arg, value in args.items()),
                           "--config.train.batch_size=16", "--config.train.checkpoint_every=3")
            for name, args in SAMPLERS.items()}  # at once: their start-ups overlap
    for name, proc in runs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {out[-3000:]}"
        meta, step = checkpoint.read_meta(tmp_path / name)
        assert step == 3 and meta["run"]["flow"] == {"time_sampler": name, "loss": "l2", name: SAMPLERS[name]}


def test_an_argument_of_another_sampler_is_one_clear_error(tmp_path):
    proc = rectflow("train", f"--config={TOY}", f"--workdir={tmp_path}", "--config.flow.time_sampler=u_shaped",
                    "--config.flow.u_shaped.eps=0.01")
    out, _ = proc.communicate(timeout=300)
    lines = [line for line in out.splitlines() if line.startswith("rectflow: error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in out, out[-3000:]
    assert "eps" in lines[0]
