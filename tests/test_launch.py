"""Cluster launchers and sweeps: launch/slurm.sbatch, launch/tpu_pod.sh, launch/sweep.py.

No cluster here: srun, scontrol, sbatch, gcloud and rectflow are shims put first on PATH
that record what they are given, so the tests check what would reach rectflow on a
cluster: every argument intact (spaces, quotes), the distributed flags, SIGTERM passed
on, exit status 75 requeued. One slow test runs a real 2x2 sweep of tiny trainings.

    python -m pytest -q tests/test_launch.py
"""

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"

_spec = importlib.util.spec_from_file_location("rectflow_sweep", LAUNCH / "sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)

# A value that word splitting (`$*`, `bash -c "..."`) or a missing %q would change.
TRICKY = '--config.sample.negative_prompt=blurry,  "low" quality\'s $HOME'
COMMAND = ["train", "--config", "configs/toy_2gmm.py", TRICKY]

FAKE_SRUN = """#!/usr/bin/env python3
# Fake srun: FAKE_NTASKS tasks of the step here, with SLURM_PROCID; SIGTERM is passed to each, as srun does.
import os, signal, subprocess, sys
ntasks = int(os.environ.get("FAKE_NTASKS", "2"))
tasks = [subprocess.Popen(sys.argv[1:], env=dict(os.environ, SLURM_NTASKS=str(ntasks), SLURM_PROCID=str(i)))
         for i in range(ntasks)]
signal.signal(signal.SIGTERM, lambda *_: [task.send_signal(signal.SIGTERM) for task in tasks])
sys.exit(max(task.wait() for task in tasks))
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >>"$FAKE_OUT/scontrol.log"
if [[ $1 == show ]]; then printf 'gpu-node07\\ngpu-node08\\n'; fi
"""
# Writes its argv one per line; FAKE_WAIT_FOR_TERM: runs until SIGTERM, then exits 75 as rectflow does.
FAKE_RECTFLOW = """#!/usr/bin/env bash
printf '%s\\n' "$@" >"$FAKE_OUT/argv.$SLURM_JOB_ID.$SLURM_PROCID"
if [[ -n ${FAKE_WAIT_FOR_TERM:-} ]]; then
  trap 'echo TERM >"$FAKE_OUT/term.$SLURM_PROCID"; exit 75' TERM
  touch "$FAKE_OUT/started.$SLURM_PROCID"
  for ((i = 0; i < 600; i++)); do sleep 0.05; done  # at most 30 s: a failing test leaves nothing running
  exit 1
fi
exit "${FAKE_EXIT:-0}"
"""
FAKE_SBATCH = """#!/usr/bin/env python3
# Fake sbatch: records its argv, then runs the script once per array index, as the array tasks would.
import json, os, subprocess, sys
args = sys.argv[1:]
out = os.environ["FAKE_OUT"]
json.dump({"argv": args, "launch_dir": os.environ.get("RECTFLOW_LAUNCH_DIR")}, open(f"{out}/sbatch.json", "w"))
array = next(a for a in args if a.startswith("--array=")).split("=", 1)[1]
script = next(i for i, a in enumerate(args) if not a.startswith("--"))
indices = []
for part in array.split(","):
    first, _, last = part.partition("-")
    indices += range(int(first), int(last or first) + 1)
for index in indices:
    env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(index), SLURM_JOB_ID=str(5000 + index),
               SLURM_JOB_NODELIST="gpu-node07", SLURM_SUBMIT_DIR=os.getcwd())
    subprocess.run(["bash", *args[script:]], env=env, check=True)
"""
# Fake gcloud: records its argv; `ssh --command C` runs C with bash in FAKE_HOME (one worker), with
# FAKE_REMOTE_BIN's python3 first on PATH; `scp SRC TPU:DEST` copies SRC to FAKE_HOME/DEST.
FAKE_GCLOUD = """#!/usr/bin/env bash
n=$(ls "$FAKE_OUT" | grep -c '^gcloud\\.' || true)
printf '%s\\n' "$@" >"$FAKE_OUT/gcloud.$n"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  if [[ ${args[i]} == --command ]]; then
    cd "$FAKE_HOME" && PATH="$FAKE_REMOTE_BIN:$PATH" exec bash -c "${args[i + 1]}"
  fi
done
if [[ $4 == scp ]]; then cp "$5" "$FAKE_HOME/${6#*:}"; fi
"""
FAKE_REMOTE_PYTHON = """#!/usr/bin/env bash
printf '%s\\n' "$@" >"$FAKE_OUT/remote_argv"
exit "${FAKE_EXIT:-0}"
"""


def shims(tmp_path, **scripts) -> dict:
    """An environment whose PATH starts with these shims (name -> script); FAKE_OUT collects what they record."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECTFLOW_", "SLURM_"))}
    return dict(env, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_OUT=str(out))


def slurm_env(tmp_path, **extra) -> dict:
    env = shims(tmp_path, srun=FAKE_SRUN, scontrol=FAKE_SCONTROL, rectflow=FAKE_RECTFLOW)
    return {**env, "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-node[07-08]", "SLURM_SUBMIT_DIR": str(ROOT),
            "FAKE_NTASKS": "2", **extra}


def received_argv(tmp_path, job_id="4242", process=0) -> list[str]:
    return (tmp_path / "out" / f"argv.{job_id}.{process}").read_text().splitlines()


def distributed_flags(host: str, job_id: int, ntasks: int, process: int) -> list[str]:
    return [f"--config.distributed.coordinator={host}:{10000 + job_id % 20000}",
            f"--config.distributed.num_processes={ntasks}", f"--config.distributed.process_id={process}"]


def sbatch(*args, env, **popen):
    return subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60, **popen)


# --- launch/slurm.sbatch ---------------------------------------------------------------------------------------

def test_sbatch_gives_every_gpu_process_the_arguments_intact_and_its_place(tmp_path):
    result = sbatch(*COMMAND, env=slurm_env(tmp_path))
    assert result.returncode == 0, result.stderr
    for process in (0, 1):
        assert received_argv(tmp_path, process=process) == COMMAND + distributed_flags("gpu-node07", 4242, 2, process)
    assert "requeue" not in (tmp_path / "out" / "scontrol.log").read_text()
    header = (LAUNCH / "slurm.sbatch").read_text()
    for directive in ("--ntasks-per-node=8", "--gpus-per-task=1", "--signal=B:TERM@", "--requeue"):
        assert f"#SBATCH {directive}" in header


@pytest.mark.parametrize("status, requeued", [(75, True), (1, False)])
def test_sbatch_requeues_only_a_run_that_stopped_at_a_checkpoint(tmp_path, status, requeued):
    result = sbatch(*COMMAND, env=slurm_env(tmp_path, FAKE_EXIT=str(status)))
    assert result.returncode == status, result.stderr
    log = (tmp_path / "out" / "scontrol.log").read_text().splitlines()
    assert ("requeue 4242" in log) == requeued, log


def test_sbatch_passes_sigterm_to_the_step_and_requeues(tmp_path):
    # SLURM's --signal=B:TERM reaches only the batch shell; it must reach rectflow.
    env = slurm_env(tmp_path, FAKE_WAIT_FOR_TERM="1")
    job = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), *COMMAND], env=env, cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "out"
    deadline = time.monotonic() + 30
    while not all((out / f"started.{i}").exists() for i in (0, 1)):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=30)
    assert job.returncode == 75, stderr
    assert all((out / f"term.{i}").read_text().strip() == "TERM" for i in (0, 1))
    assert "requeue 4242" in (out / "scontrol.log").read_text().splitlines()


def test_sbatch_refuses_to_run_outside_slurm_or_without_a_command(tmp_path):
    env = slurm_env(tmp_path)
    assert "no SLURM_JOB_ID" in sbatch(*COMMAND, env={k: v for k, v in env.items() if k != "SLURM_JOB_ID"}).stderr
    result = sbatch(env=env)
    assert result.returncode == 2 and "give a rectflow command" in result.stderr


# --- launch/tpu_pod.sh -----------------------------------------------------------------------------------------

def tpu_env(tmp_path, **extra) -> dict:
    env = shims(tmp_path, gcloud=FAKE_GCLOUD)
    remote_bin, home = tmp_path / "remote_bin", tmp_path / "home"
    remote_bin.mkdir()
    (home / "rectflow_jax").mkdir(parents=True)
    (remote_bin / "python3").write_text(FAKE_REMOTE_PYTHON)
    (remote_bin / "python3").chmod(0o755)
    return dict(env, FAKE_REMOTE_BIN=str(remote_bin), FAKE_HOME=str(home), **extra)


def tpu_pod(*args, env):
    return subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def gcloud_calls(tmp_path) -> list[list[str]]:
    calls = sorted((tmp_path / "out").glob("gcloud.*"), key=lambda p: int(p.suffix[1:]))
    return [p.read_text().splitlines() for p in calls]


def test_tpu_pod_runs_only_rectflow_on_every_worker(tmp_path):
    result = tpu_pod("my-tpu", "us-central2-b", *COMMAND, env=tpu_env(tmp_path))
    assert result.returncode == 0, result.stderr
    [call] = gcloud_calls(tmp_path)
    assert call[:8] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone", "us-central2-b", "--worker=all"]
    assert call[8] == "--command" and "pip" not in call[9], call
    # What the worker's shell made of the quoted command: rectflow's arguments, unchanged.
    remote = (tmp_path / "out" / "remote_argv").read_text().splitlines()
    assert remote == ["-m", "rectflow_jax.cli", *COMMAND]
    assert not any(arg.startswith("--config.distributed") for arg in remote)


def test_tpu_pod_passes_exit_75_through(tmp_path):
    result = tpu_pod("my-tpu", "us-central2-b", *COMMAND, env=tpu_env(tmp_path, FAKE_EXIT="75"))
    assert result.returncode == 75 and "rerun the same command" in result.stderr


def test_tpu_pod_setup_installs_the_tpu_extra(tmp_path):
    source = tmp_path / "checkout"
    (source / ".git").mkdir(parents=True)
    (source / "setup.py").write_text("# the repository\n")
    env = tpu_env(tmp_path)
    result = tpu_pod("setup", "my-tpu", "us-central2-b", str(source), env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "remote_argv").read_text().splitlines() == ["-m", "pip", "install", "-q", "-e",
                                                                          ".[tpu]"]
    copied = tmp_path / "home" / "rectflow_jax"
    assert (copied / "setup.py").exists() and not (copied / ".git").exists()
    calls = gcloud_calls(tmp_path)
    assert [call[3] for call in calls] == ["scp", "ssh"] and all("--worker=all" in call for call in calls)


def test_tpu_pod_dry_run_prints_the_command(tmp_path):
    result = tpu_pod("my-tpu", "us-central2-b", *COMMAND, env=tpu_env(tmp_path, RECTFLOW_DRY_RUN="1"))
    assert result.returncode == 0, result.stderr
    assert gcloud_calls(tmp_path) == []
    printed = shlex.split(result.stdout)
    assert printed[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone", "us-central2-b",
                           "--worker=all"]
    assert printed[10].startswith("cd rectflow_jax && exec python3 -m rectflow_jax.cli ")
    assert shlex.split(printed[10].split(" && ", 1)[1]) == ["exec", "python3", "-m", "rectflow_jax.cli", *COMMAND]


# --- launch/sweep.py -------------------------------------------------------------------------------------------

def write_sweep(tmp_path, text: str, name="sweep.py") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_product_and_chain():
    grid = sweep.product({"optim.lr": [1e-3, 3e-4], "train.batch_size": [64, 128]})
    assert grid == [{"optim.lr": 1e-3, "train.batch_size": 64}, {"optim.lr": 1e-3, "train.batch_size": 128},
                    {"optim.lr": 3e-4, "train.batch_size": 64}, {"optim.lr": 3e-4, "train.batch_size": 128}]
    assert sweep.product(seed=[0, 1]) == [{"seed": 0}, {"seed": 1}]
    assert sweep.chain(sweep.product(seed=[0]), [{"optim.lr": 1e-4}]) == [{"seed": 0}, {"optim.lr": 1e-4}]
    with pytest.raises(sweep.SweepError, match="has no values"):
        sweep.product({"optim.lr": []})
    with pytest.raises(sweep.SweepError, match="give a list of values"):
        sweep.product({"optim.lr": 1e-3})


def test_sweep_files_python_and_json(tmp_path):
    py = write_sweep(tmp_path, 'SWEEP = chain(product({"optim.lr": [1e-3, 3e-4]}), [{"seed": 7}])\n')
    assert sweep.load_sweep(py) == [{"optim.lr": 1e-3}, {"optim.lr": 3e-4}, {"seed": 7}]
    grid = write_sweep(tmp_path, json.dumps({"product": {"optim.lr": [1e-3], "seed": [0, 1]}}), "grid.json")
    assert sweep.load_sweep(grid) == [{"optim.lr": 1e-3, "seed": 0}, {"optim.lr": 1e-3, "seed": 1}]
    runs = write_sweep(tmp_path, json.dumps({"runs": [{"seed": 0}, {"train.num_steps": 5}]}), "runs.json")
    assert sweep.load_sweep(runs) == [{"seed": 0}, {"train.num_steps": 5}]


def test_runs_get_readable_safe_names_workdirs_and_arguments():
    records = sweep.expand([{"optim.lr": 1e-3, "train.batch_size": 64}, {"data.prompts": "a b/c's.txt"}, {}],
                           "/r", ["train", "--config", "configs/toy_2gmm.py"])
    assert [r["name"] for r in records] == ["optim.lr=0.001,train.batch_size=64", "data.prompts=a_b_c_s.txt", "base"]
    assert records[0]["workdir"] == "/r/optim.lr=0.001,train.batch_size=64"
    assert records[0]["args"] == ["train", "--config", "configs/toy_2gmm.py", "--workdir",
                                  "/r/optim.lr=0.001,train.batch_size=64", "--config.optim.lr=0.001",
                                  "--config.train.batch_size=64"]
    assert records[1]["args"][-1] == "--config.data.prompts=a b/c's.txt"
    long = sweep.expand([{"data.prompts": "x" * 300}], "/r", ["train"])[0]["name"]
    assert len(long) < 140 and "/" not in long


@pytest.mark.parametrize("runs, command, message", [
    ([], ["train"], "no runs"),
    ([{"optim.lr": "a b"}, {"optim.lr": "a/b"}], ["train"], "both get the name"),
    ([{"seed": 1}, {"seed": 1}], ["train"], "both get the name"),
    ([{"optim lr": 1}], ["train"], "not a config key"),
    ([{"optim..lr": 1}], ["train"], "not a config key"),
    ([{"--config.optim.lr": 1}], ["train"], "not a config key"),
    ([{"config.optim.lr": 1}], ["train"], "leave out 'config.'"),
    ([{"train.freeze": ["a"]}], ["train"], "give a str, int, float or bool"),
    ([{"seed": 1}], ["train", "--workdir", "w"], "leave --workdir out"),
    ([{"seed": 1}], ["train", "--config.seed=3"], "both in the command and in the sweep"),
    ([{"seed": 1}], ["rectflow", "train"], "start with a rectflow command"),
    ([{"seed": 1}], [], "give the rectflow command after --"),
])
def test_bad_sweeps_are_clear_errors(runs, command, message):
    with pytest.raises(sweep.SweepError, match=message):
        sweep.expand(runs, "/r", command)


def test_bad_sweep_files_and_flags_are_clear_errors(tmp_path):
    with pytest.raises(sweep.SweepError, match="defines no SWEEP"):
        sweep.load_sweep(write_sweep(tmp_path, "RUNS = []\n"))
    with pytest.raises(sweep.SweepError, match="a sweep is"):
        sweep.load_sweep(write_sweep(tmp_path, '{"grid": {}}', "bad.json"))
    good = write_sweep(tmp_path, "SWEEP = [{'seed': 0}]\n", "good.py")
    with pytest.raises(sweep.SweepError, match="needs --tpu NAME and --zone ZONE"):
        sweep.main(["--sweep", str(good), "--root", str(tmp_path / "r"), "--mode", "tpu", "--", "train"])
    # From the command line: one line on stderr and exit status 2, as rectflow does.
    result = subprocess.run([sys.executable, str(LAUNCH / "sweep.py"), "--sweep", str(tmp_path / "missing.py"),
                             "--root", str(tmp_path / "r"), "--", "train"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip() == f"sweep: error: no sweep file '{tmp_path}/missing.py'"


def test_root_of_another_sweep_is_refused_and_the_same_sweep_continues(tmp_path, capsys):
    file = write_sweep(tmp_path, "SWEEP = product(seed=[0, 1])\n")
    root = tmp_path / "root"
    base = ["--sweep", str(file), "--root", str(root), "--dry_run", "--"]
    assert sweep.main(base + ["train", "--config", "configs/toy_2gmm.py"]) == 0
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["runs"][0]["status"] = 0  # as if run 0 had finished
    (root / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert sweep.main(base + ["train", "--config", "configs/toy_2gmm.py"]) == 0
    out = capsys.readouterr().out
    assert "skip seed=0 (done)" in out and "--config.seed=1" in out and "--config.seed=0" not in out
    with pytest.raises(sweep.SweepError, match="belongs to a different sweep"):
        sweep.main(base + ["train", "--config", "configs/toy_moons.py"])
    write_sweep(tmp_path, "SWEEP = product(seed=[0, 1, 2])\n")
    with pytest.raises(sweep.SweepError, match="belongs to a different sweep"):
        sweep.main(base + ["train", "--config", "configs/toy_2gmm.py"])


def slurm_sweep_file(tmp_path) -> Path:
    # Run 2 carries a value with spaces and quotes: it must reach rectflow as one argument.
    return write_sweep(tmp_path, 'SWEEP = chain(product(seed=[0, 1]), '
                                 '[{"sample.negative_prompt": "blurry,  \\"low\\" quality\'s"}])\n')


def test_slurm_sweep_is_one_array_job_whose_tasks_read_their_runs(tmp_path, capsys):
    root = tmp_path / "root"
    argv = ["--sweep", str(slurm_sweep_file(tmp_path)), "--root", str(root), "--mode", "slurm", "--dry_run",
            "--", "train", "--config", "configs/toy_2gmm.py"]
    assert sweep.main(argv) == 0
    printed = shlex.split(capsys.readouterr().out.splitlines()[-1])
    manifest = root / "manifest.json"
    assert printed == [f"RECTFLOW_LAUNCH_DIR={LAUNCH}", "sbatch", "--array=0-2", str(LAUNCH / "slurm.sbatch"),
                       "--from_manifest", str(manifest)]
    task = subprocess.run([sys.executable, str(LAUNCH / "sweep.py"), "--run_from_manifest", str(manifest),
                           "--index", "2"], capture_output=True, check=True)
    assert task.stdout.split(b"\0")[:-1] == [arg.encode() for arg in [
        "train", "--config", "configs/toy_2gmm.py", "--workdir", str(root / "sample.negative_prompt=blurry,_low_quality_s"),
        "--config.sample.negative_prompt=blurry,  \"low\" quality's"]]
    with pytest.raises(sweep.SweepError, match="has runs 0-2, not 3"):
        sweep.run_from_manifest(manifest, 3)
    # Finished runs are left out of the array.
    runs = json.loads(manifest.read_text())
    runs["runs"][1]["status"] = 0
    manifest.write_text(json.dumps(runs))
    assert sweep.main(argv) == 0
    assert "--array=0,2" in capsys.readouterr().out
    assert sweep.array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_slurm_sweep_array_tasks_run_their_manifest_runs(tmp_path):
    # sbatch, srun, scontrol and rectflow are shims: the fake sbatch runs slurm.sbatch once per array index.
    env = slurm_env(tmp_path, FAKE_NTASKS="1")
    shims(tmp_path, sbatch=FAKE_SBATCH)
    for set_by_each_task in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_SUBMIT_DIR"):
        del env[set_by_each_task]
    root = tmp_path / "root"
    result = subprocess.run([sys.executable, str(LAUNCH / "sweep.py"), "--sweep", str(slurm_sweep_file(tmp_path)),
                             "--root", str(root), "--mode", "slurm", "--", "train", "--config",
                             "configs/toy_2gmm.py"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    submitted = json.loads((tmp_path / "out" / "sbatch.json").read_text())
    assert submitted["argv"][0] == "--array=0-2" and submitted["launch_dir"] == str(LAUNCH)
    for run in json.loads((root / "manifest.json").read_text())["runs"]:
        job_id = 5000 + run["index"]
        assert received_argv(tmp_path, str(job_id)) == run["args"] + distributed_flags("gpu-node07", job_id, 1, 0)
    assert received_argv(tmp_path, "5002")[5] == "--config.sample.negative_prompt=blurry,  \"low\" quality's"


def test_tpu_sweep_prints_one_pod_command_per_run(tmp_path, capsys):
    argv = ["--sweep", str(slurm_sweep_file(tmp_path)), "--root", "gs://bucket/sweep", "--manifest",
            str(tmp_path / "manifest.json"), "--mode", "tpu", "--tpu", "my-tpu", "--zone", "us-central2-b",
            "--dry_run", "--", "train", "--config", "configs/toy_2gmm.py"]
    assert sweep.main(argv) == 0
    printed = [shlex.split(line) for line in capsys.readouterr().out.splitlines()[1:]]
    runs = json.loads((tmp_path / "manifest.json").read_text())["runs"]
    assert printed == [[str(LAUNCH / "tpu_pod.sh"), "my-tpu", "us-central2-b", *run["args"]] for run in runs]
    assert runs[0]["workdir"] == "gs://bucket/sweep/seed=0"
    with pytest.raises(sweep.SweepError, match="give --manifest FILE"):
        sweep.main([a for a in argv if a not in ("--manifest", str(tmp_path / "manifest.json"))])


def test_local_sweep_goes_past_a_failed_run_and_retries_only_it(tmp_path, monkeypatch, capsys):
    # A stand-in for `python -m rectflow_jax.cli` (the slow test runs the real one): seed=1 fails.
    assert sweep.local_command(["train"]) == [sys.executable, "-m", "rectflow_jax.cli", "train"]
    fake = write_sweep(tmp_path, "import sys\nopen(sys.argv[1], 'a').write(sys.argv[-1] + '\\n')\n"
                                 "sys.exit(3 if sys.argv[-1] == '--config.seed=1' else 0)\n", "fake_rectflow.py")
    calls = tmp_path / "calls.txt"
    monkeypatch.setattr(sweep, "local_command", lambda args: [sys.executable, str(fake), str(calls), *args])
    argv = ["--sweep", str(write_sweep(tmp_path, "SWEEP = product(seed=[0, 1, 2])\n")), "--root",
            str(tmp_path / "root"), "--", "train", "--config", "configs/toy_2gmm.py"]
    assert sweep.main(argv) == 1
    runs = json.loads((tmp_path / "root" / "manifest.json").read_text())["runs"]
    assert [run["status"] for run in runs] == [0, 3, 0] and all(run["seconds"] >= 0 for run in runs)
    assert runs[1]["command"] == [sys.executable, str(fake), str(calls), *runs[1]["args"]]
    assert "1 of 3 runs failed: seed=1 (3)" in capsys.readouterr().err
    assert sweep.main(argv) == 1
    assert calls.read_text().split() == ["--config.seed=0", "--config.seed=1", "--config.seed=2", "--config.seed=1"]


@pytest.mark.slow
def test_local_sweep_trains_every_run_and_skips_them_on_a_rerun(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    file = write_sweep(tmp_path, "SWEEP = product({'optim.lr': [1e-3, 3e-4], 'seed': [0, 1]})\n")
    root = tmp_path / "root"
    argv = ["--sweep", str(file), "--root", str(root), "--mode", "local", "--", "train", "--config",
            "configs/toy_2gmm.py", "--config.train.num_steps=3", "--config.train.log_every=1",
            "--config.train.checkpoint_every=3", "--config.train.batch_size=64", "--quiet"]
    assert sweep.main(argv) == 0
    manifest = json.loads((root / "manifest.json").read_text())
    names = ["optim.lr=0.001,seed=0", "optim.lr=0.001,seed=1", "optim.lr=0.0003,seed=0", "optim.lr=0.0003,seed=1"]
    assert [run["name"] for run in manifest["runs"]] == names
    assert all(run["status"] == 0 and run["seconds"] > 0 for run in manifest["runs"])
    assert all((root / name / "checkpoints" / "3").is_dir() for name in names)
    capsys.readouterr()
    start = time.monotonic()
    assert sweep.main(argv) == 0
    assert capsys.readouterr().out.count("(done)") == 4 and time.monotonic() - start < 5
    assert json.loads((root / "manifest.json").read_text())["runs"] == manifest["runs"]
