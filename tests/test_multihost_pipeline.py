"""Two processes x 2 devices on localhost run the whole toy pipeline as one process with 4 devices.

train -> pairs -> 2-RF -> pairs -> distill -> report, with FSDP-sharded parameters (so the
TensorBoard preview, pair generation and evaluation are collectives that hang if a process
sits one out). Compared: the report's metrics; every pair exists exactly once and equals the
one-process pair; and which process opened which file for writing, recorded by a Python
audit hook (tests/open_audit/sitecustomize.py) in every process: pairs.json, the report and
the samples are written by process 0 alone.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
AUDIT = Path(__file__).resolve().parent / "open_audit"

SHORT = ["--config.train.num_steps=60", "--config.stages.reflow.train.num_steps=40",
         "--config.stages.distill.train.num_steps=40", "--config.train.batch_size=64",
         "--config.train.log_every=20", "--config.train.checkpoint_every=1000", "--config.optim.warmup_steps=10",
         "--config.pairs.num_pairs=1500", "--config.pairs.shard_size=400", "--config.pairs.batch_size=128",
         "--config.pairs.num_steps=8", "--config.eval.num_samples=256", "--config.eval.steps=(1,2,8)",
         "--config.sample.batch_size=128", "--config.mesh.data=2", "--config.mesh.fsdp=2"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_pipeline(workdir: Path, processes: int, devices: int) -> list[tuple[int, str]]:
    """Runs the pipeline; returns (process id, path) of every file a process opened for writing."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=os.pathsep.join([str(AUDIT), str(ROOT), os.environ.get("PYTHONPATH", "")]),
               RECTFLOW_AUDIT_ROOT=str(workdir), RECTFLOW_TRACEBACK="1")
    base = [sys.executable, "-m", "rectflow_jax.cli", "pipeline", "--quiet",
            f"--config={ROOT / 'configs' / 'toy_2gmm.py'}", f"--workdir={workdir}", *SHORT]
    port = free_port()
    procs = []
    for i in range(processes):
        extra = [] if processes == 1 else [f"--config.distributed.coordinator=127.0.0.1:{port}",
                                           f"--config.distributed.num_processes={processes}",
                                           f"--config.distributed.process_id={i}"]
        log = open(workdir.parent / f"{workdir.name}-{i}.log", "w")
        procs.append(subprocess.Popen(base + extra, cwd=ROOT, env=dict(env, RECTFLOW_AUDIT_ID=str(i)),
                                      stdout=log, stderr=subprocess.STDOUT))
    for i, proc in enumerate(procs):
        try:
            proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                for p in procs:
                    p.kill()
        log_text = (workdir.parent / f"{workdir.name}-{i}.log").read_text()
        assert proc.returncode == 0, log_text[-4000:]
    opened = []
    for file in workdir.parent.glob(f"{workdir.name}.opens.*"):
        opened += [(int(file.suffix[1:]), line) for line in file.read_text().splitlines()]
    return opened


def pair_rows(pair_dir: Path) -> dict[str, np.ndarray]:
    shards = sorted(pair_dir.glob("pairs-*.npz"))
    loaded = [dict(np.load(s)) for s in shards]
    return {k: np.concatenate([shard[k] for shard in loaded]) for k in loaded[0]}


def flat_metrics(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in flat_metrics(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree} if isinstance(tree, (int, float)) and not isinstance(tree, bool) else {}


@pytest.mark.slow
def test_two_processes_run_the_toy_pipeline_as_one_with_four_devices(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_pipeline(one, processes=1, devices=4)
    opened = run_pipeline(two, processes=2, devices=2)

    metrics_one = flat_metrics(json.loads((one / "report" / "metrics.json").read_text()))
    metrics_two = flat_metrics(json.loads((two / "report" / "metrics.json").read_text()))
    assert metrics_one.keys() == metrics_two.keys() and len(metrics_one) > 20
    # Equal up to the order of the gradient all-reduce (gloo between processes, XLA within
    # one), whose rounding three stages of training carry on: about 1e-4 here. A process
    # training on other data, or a pair made twice, is off by far more (tens of percent).
    relative = {k: abs(metrics_two[k] - v) / max(abs(v), 1e-6) for k, v in metrics_one.items()}
    worst = max(relative, key=relative.get)
    print(f"largest relative difference of {len(relative)} metrics: {relative[worst]:.2e} ({worst})")
    assert relative[worst] < 2e-3, worst

    for pairs in ("pairs_1rf", "pairs_2rf"):
        rows_one, rows_two = pair_rows(one / pairs), pair_rows(two / pairs)
        assert len(rows_two["x0"]) == 1500
        assert len(np.unique(rows_two["x0"], axis=0)) == 1500  # no pair twice
        np.testing.assert_array_equal(rows_two["x0"], rows_one["x0"])
        # x1: the teachers, trained as above, differ by rounding (x1 spans about +-6).
        drift = float(np.max(np.abs(rows_two["x1"] - rows_one["x1"])))
        print(f"{pairs}: max |x1 difference| {drift:.2e}")
        assert drift < 1e-3

    writers = {}
    for process, path in opened:
        # Atomic writes go through a temporary name: count them as the file they become.
        writers.setdefault(Path(path).relative_to(two).as_posix().removesuffix(".tmp"), set()).add(process)
    shared = {p: w for p, w in writers.items()
              if p.startswith("report/") or p.endswith("pairs.json") or p.startswith("tensorboard")}
    assert any(p.startswith("report/") for p in shared) and any(p.endswith("pairs.json") for p in shared)
    assert all(w == {0} for w in shared.values()), {p: w for p, w in shared.items() if w != {0}}
    # Pair shards are written by their owner alone: both processes wrote some, none wrote one twice.
    shard_writers = {p: w for p, w in writers.items() if p.endswith(".npz") and "/pairs-" in p}
    assert all(len(w) == 1 for w in shard_writers.values())
    assert set().union(*shard_writers.values()) == {0, 1}
