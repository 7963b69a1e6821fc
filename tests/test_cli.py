"""The `rectflow` command: its contract, and one clear line for each kind of bad input."""

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from rectflow_jax import checkpoint, pipeline, teachers, train
from rectflow_jax.configlib import load_config
from rectflow_jax.data import pairs

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs" / "toy_2gmm.py")
DIGITS = str(ROOT / "configs" / "digits.py")


def rectflow(*args, check=True, timeout=300):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", RECTFLOW_TRACEBACK="")
    result = subprocess.run([sys.executable, "-m", "rectflow_jax.cli", *args], capture_output=True, text=True,
                            env=env, timeout=timeout, cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def console(*args, code="main()"):
    """`rectflow ARGS` as the installed console script runs it (a __main__ without a docstring)."""
    script = f"import sys; sys.argv[0] = 'rectflow'; from rectflow_jax.cli import main\n{code}"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", RECTFLOW_TRACEBACK="")
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)


def error_line(result):
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [l for l in result.stderr.splitlines() if l.startswith("rectflow: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def tiny_toy(**train):
    config = load_config(TOY)
    config.train.update(dict(num_steps=30, log_every=10, checkpoint_every=10), **train)
    config.pairs.update(num_pairs=200, shard_size=100, num_steps=4, batch_size=100)
    config.mesh.data = 1  # fake devices only slow a 2-core CPU down
    return config


@pytest.fixture(scope="module")
def toy_stage(tmp_path_factory):
    stage = tmp_path_factory.mktemp("toy") / "1rf"
    pipeline.train_stage(tiny_toy(), stage, "rf", progress=False)
    return stage


def test_sample_contract(toy_stage, tmp_path):
    rectflow("sample", f"--config={TOY}", f"--checkpoint={toy_stage}", f"--out={tmp_path}/a",
             "--config.sample.num_steps=1", "--config.sample.num_samples=50", "--config.seed=7")
    pipeline.sample(_with(tiny_toy(), seed=7, num_steps=8, num_samples=50), toy_stage, tmp_path / "b")
    a, b = np.load(tmp_path / "a" / "samples.npz"), np.load(tmp_path / "b" / "samples.npz")
    assert a["x0"].dtype == np.float32 and a["x1"].shape == (50, 2)
    np.testing.assert_array_equal(a["x0"], b["x0"])  # same seed, same x0 at any step count
    assert not np.allclose(a["x1"], b["x1"])
    assert (tmp_path / "a" / "trajectories.png").stat().st_size > 0


def _with(config, seed, num_steps, num_samples):
    config.seed = seed
    config.sample.update(num_steps=num_steps, num_samples=num_samples)
    return config


def test_unknown_and_ill_typed_config_keys():
    line = error_line(rectflow("sample", f"--config={TOY}", "--config.sample.nmu_steps=3", "--out=/tmp/x",
                               "--checkpoint=/tmp/x", check=False))
    assert "nmu_steps" in line
    line = error_line(rectflow("sample", f"--config={TOY}", "--config.sample.num_steps=many", "--out=/tmp/x",
                               "--checkpoint=/tmp/x", check=False))
    assert "num_steps" in line and "many" in line


def test_missing_checkpoint_and_unknown_command(tmp_path):
    line = error_line(rectflow("sample", f"--config={TOY}", f"--checkpoint={tmp_path}/none", f"--out={tmp_path}",
                               check=False))
    assert "does not exist" in line
    assert "exactly one command" in error_line(rectflow("smaple", f"--config={TOY}", check=False))


def test_incompatible_checkpoint_and_teacher_shape(toy_stage, tmp_path):
    digits = load_config(DIGITS)
    with pytest.raises(teachers.IncompatibleTeacher, match=r"shape \(2,\), but this config's data has shape \(8, 8, 1\)"):
        pipeline.sample(digits, toy_stage, tmp_path)
    with pytest.raises(teachers.IncompatibleTeacher, match="shape"):
        pipeline.generate_pairs(digits, toy_stage, tmp_path / "pairs")
    assert not (tmp_path / "pairs").exists()
    with pytest.raises(checkpoint.CheckpointError, match="not a rectflow stage directory"):
        pipeline.sample(tiny_toy(), tmp_path, tmp_path / "out")


def test_empty_or_corrupt_pairs_stop_training(toy_stage, tmp_path):
    config = tiny_toy()
    pair_dir = tmp_path / "pairs"
    pipeline.generate_pairs(config, toy_stage, pair_dir, progress=False)
    shard = sorted(pair_dir.glob("*.npz"))[0]
    shard.write_bytes(b"garbage")
    with pytest.raises(pairs.PairDataError, match="pairs-00000-of-00002.npz.* corrupt"):
        pipeline.train_stage(config, tmp_path / "2rf", "reflow", pairs_dir=pair_dir, teacher_dir=toy_stage)
    assert not (tmp_path / "2rf").exists()
    line = error_line(rectflow("train", f"--config={TOY}", f"--workdir={tmp_path}/2rf", f"--pairs={tmp_path}",
                               f"--checkpoint={toy_stage}", check=False))
    assert "no pairs.json" in line


def test_nan_loss_names_the_step_and_keeps_checkpoint(tmp_path):
    config = tiny_toy(num_steps=60, checkpoint_every=2, log_every=1)
    config.optim.update(lr=1e20, warmup_steps=20, grad_clip=0.0)  # diverges at step 3
    with pytest.raises(train.TrainingDiverged,
                       match=r"loss became (nan|inf) at step 3 .*last good checkpoint \(step 2\)"):
        pipeline.train_stage(config, tmp_path / "nan", "rf", progress=False)
    meta, step = checkpoint.read_meta(tmp_path / "nan")
    assert step == 2 and meta["stage"] == "nan"


def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    """SIGKILL mid-stage, rerun: the parameters equal those of a run never interrupted."""
    steps = ["--config.train.num_steps=1500", "--config.train.checkpoint_every=100", "--config.train.log_every=100"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    cmd = [sys.executable, "-m", "rectflow_jax.cli", "train", f"--config={TOY}", f"--workdir={tmp_path}/killed",
           "--quiet", *steps]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and (checkpoint.latest_step(tmp_path / "killed") or 0) < 300:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.latest_step(tmp_path / "killed")
    assert 300 <= killed_at < 1500
    rectflow("train", f"--config={TOY}", f"--workdir={tmp_path}/killed", "--quiet", *steps)
    rectflow("train", f"--config={TOY}", f"--workdir={tmp_path}/straight", "--quiet", *steps)
    a = teachers.load_velocity_teacher(tmp_path / "killed")
    b = teachers.load_velocity_teacher(tmp_path / "straight")
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# What a user needs from each command's help: the flags it cannot run without, and more.
NEEDED_FLAGS = {"train": ("--config", "--workdir", "--pairs", "--checkpoint"),
                "pairs": ("--config", "--checkpoint", "--out"),
                "distill": ("--config", "--workdir", "--pairs", "--checkpoint"),
                "sample": ("--config", "--checkpoint", "--out", "--pretrained", "--prompt", "--prompts_file",
                           "--latents"),
                "eval": ("--config", "--checkpoint", "--pretrained", "--out"),
                "export": ("--checkpoint", "--out"),
                "pipeline": ("--config", "--workdir")}


def test_help_lists_the_commands_and_each_commands_flags_and_examples():
    general = console("--help")
    assert general.returncode == 0 and "USAGE" not in general.stdout, general.stdout + general.stderr
    for command in NEEDED_FLAGS:  # each listed with what it does
        assert re.search(rf"^  {command} +\w", general.stdout, re.M), general.stdout
    parse_only = "from absl import flags\nprint(*flags.FLAGS(sys.argv)[1:])"
    for command, needed in NEEDED_FLAGS.items():
        text = console(command, "--help").stdout
        assert text.startswith(f"usage: rectflow {command} [flags]"), text
        assert all(flag in text for flag in needed), (command, text)
        examples = [line.strip() for line in text.split("examples:")[1].splitlines() if line.strip()]
        assert examples and all(e.startswith(f"rectflow {command} ") for e in examples), text
        for example in examples:  # each parses: real flags and config keys, an existing config file
            parsed = console(*shlex.split(example)[1:], code=parse_only)
            assert parsed.stdout.split() == [command], (example, parsed.stderr[-2000:])
    assert console("help", "sample").stdout == console("sample", "-h").stdout


def test_a_bug_keeps_its_traceback_and_bad_input_stays_one_line(tmp_path):
    """A plain ValueError inside a command is a bug: the traceback shows. A project error is one line."""
    argv = ["sample", f"--config={TOY}", f"--checkpoint={tmp_path}", f"--out={tmp_path}/o"]
    raise_in_sample = "from rectflow_jax import pipeline\ndef sample(*args, **kwargs):\n    raise {}\n" \
                      "pipeline.sample = sample\nmain()"
    bug = console(*argv, code=raise_in_sample.format("ValueError('deliberate internal bug')"))
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "deliberate internal bug" in bug.stderr
    assert "rectflow: error:" not in bug.stderr
    known = console(*argv, code=raise_in_sample.format("checkpoint.CheckpointError('deliberate bad input')")
                    .replace("import pipeline", "import checkpoint, pipeline"))
    assert error_line(known) == "rectflow: error: deliberate bad input"


def test_user_input_errors_are_one_line(tmp_path):
    missing = error_line(rectflow("sample", f"--pretrained={tmp_path}", f"--prompts_file={tmp_path}/none.txt",
                                  f"--out={tmp_path}/o", check=False))
    assert "none.txt" in missing and "does not exist" in missing
    reflow = error_line(rectflow("train", f"--config={TOY}", f"--workdir={tmp_path}/2rf", f"--pairs={tmp_path}",
                                 check=False))
    assert "--checkpoint" in reflow
