"""Two JAX processes on localhost train exactly like one process with the same global batch.

Compared: every step's loss and the raw params after the run (no LR warm-up, no EMA),
and the same comparison is shown to fail when a process reads the wrong data shard or
the gradients are not all-reduced across processes.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).resolve().parent / "mp_worker.py"
ROOT = WORKER.parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(tmp_path, name, *, processes=1, devices=1, fault=None):
    """Starts `processes` processes with `devices` CPU devices each; returns (procs, out dir).

    fault 'no_allreduce' starts only process 0 of the two, which then trains alone.
    """
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    common = [sys.executable, str(WORKER), f"--workdir={tmp_path / name}", f"--out={tmp_path / name / 'out'}"]
    if fault:
        common.append(f"--fault={fault}")
    if processes == 1:
        cmds = [common]
    elif fault == "no_allreduce":
        cmds = [common + [f"--num_processes={processes}", "--process_id=0"]]
    else:
        port = free_port()
        cmds = [common + [f"--coordinator=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={i}"]
                for i in range(processes)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in cmds]
    return procs, tmp_path / name / "out"


def finish(procs, out):
    for proc in procs:
        log, _ = proc.communicate(timeout=500)
        assert proc.returncode == 0, log[-3000:]
    losses = [h["loss"] for h in json.loads((out / "history.json").read_text())]
    with np.load(out / "params.npz") as params:
        return np.asarray(losses), {k: params[k] for k in params.files}


def same_run(a, b) -> bool:
    (losses_a, params_a), (losses_b, params_b) = a, b
    return (len(losses_a) == len(losses_b) == 12 and np.allclose(losses_a, losses_b, rtol=1e-5, atol=1e-6)
            and params_a.keys() == params_b.keys()
            and all(np.allclose(params_a[k], params_b[k], rtol=1e-5, atol=1e-6) for k in params_a))


@pytest.mark.slow
def test_two_processes_match_one_and_faults_are_caught(tmp_path):
    single = launch(tmp_path, "one", devices=2)
    two = launch(tmp_path, "two", processes=2)
    single, two = finish(*single), finish(*two)
    assert same_run(single, two), (single[0], two[0])

    faults = {fault: launch(tmp_path, fault, processes=2, fault=fault) for fault in ("same_shard", "no_allreduce")}
    for fault, run in faults.items():
        result = finish(*run)
        assert not same_run(single, result), f"the comparison misses the fault {fault!r}"
