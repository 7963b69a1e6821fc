"""The seeds' claim on the 2-GMM toy, end to end through `rectflow pipeline` and its report.

Reflow straightens (one-step 2-RF is as good as many-step 1-RF, the few-step gap
collapses, the transport cost does not grow) and distillation gives one step.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rectflow_jax import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def rectflow_pipeline(workdir, *overrides):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", RECTFLOW_TRACEBACK="")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "rectflow_jax.cli", "pipeline", "--quiet",
                             f"--config={ROOT / 'configs' / 'toy_2gmm.py'}", f"--workdir={workdir}", *overrides],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if overrides:
        return result
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((workdir / "report" / "metrics.json").read_text()), time.perf_counter() - start


def test_toy_2gmm_pipeline_straightens_and_distills(tmp_path):
    report, seconds = rectflow_pipeline(tmp_path)
    print(f"toy_2gmm pipeline: {seconds:.0f} s; claims {report['claims']}")
    claims, stages = report["claims"], report["stages"]
    # One-step 2-RF is at least 5x closer to pi1 than one-step 1-RF.
    assert claims["2rf_1step_energy_distance_over_1rf"] <= 0.2
    # The 1-step vs 100-step gap from the same x0 shrinks at least 10x.
    assert claims["1rf_gap_over_2rf_gap"] >= 10
    # Rectification lowers the cost below the independent coupling's, and reflow keeps
    # it (equal up to the fit's error: the 2-RF coupling is the 1-RF one, straightened).
    assert stages["1rf"]["steps"]["100"]["transport_cost"] < 0.8 * claims["independent_coupling_transport_cost"]
    assert claims["2rf_transport_cost_over_1rf"] <= 1.01
    assert stages["2rf"]["straightness"] < 0.01 * stages["1rf"]["straightness"]
    # The distilled one-step generator is about as good as 1-RF with 100 steps.
    assert claims["distill_1step_energy_distance_over_1rf_finest"] <= 2.0

    text = (tmp_path / "report" / "report.md").read_text()
    assert "| 2-RF | 1 |" in text and "2rf_trajectories.png" in text
    for name in ("1rf", "2rf", "distill"):
        assert (tmp_path / "report" / f"{name}_trajectories.png").stat().st_size > 10_000

    # A rerun finds every stage finished: no training, no new pairs, the same report.
    steps = {name: checkpoint.latest_step(tmp_path / name) for name in ("1rf", "2rf", "distill")}
    shards = sorted(p.stat().st_mtime_ns for p in (tmp_path / "pairs_2rf").glob("*.npz"))
    again, _ = rectflow_pipeline(tmp_path)
    assert {name: checkpoint.latest_step(tmp_path / name) for name in steps} == steps
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "pairs_2rf").glob("*.npz")) == shards
    assert again["claims"] == report["claims"]

    # 1-RF trains on: the pairs it made at step 2000 are not its pairs any more, though
    # every shard exists; the pipeline stops with one line rather than reflow on them.
    longer = rectflow_pipeline(tmp_path, "--config.train.num_steps=2050")
    errors = [line for line in longer.stderr.splitlines() if line.startswith("rectflow: error:")]
    assert longer.returncode == 2 and len(errors) == 1, longer.stderr[-3000:]
    assert "pairs_1rf" in errors[0] and "teacher_step: 2000 -> 2050" in errors[0]
    assert checkpoint.latest_step(tmp_path / "1rf") == 2050
