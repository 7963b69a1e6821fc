"""Running the `rectflow` command from tests, as a user would, and reading its one error line.

Not a test module: tests import it (tests/ is on sys.path, as for sd_reference).
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rectflow(*args, check=True, timeout=900, **popen):
    """`python -m rectflow_jax.cli ARGS` on one CPU device; with `popen` keywords, the running process."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", RECTFLOW_TRACEBACK="")
    command = [sys.executable, "-m", "rectflow_jax.cli", *map(str, args)]
    if popen:
        return subprocess.Popen(command, env=env, cwd=ROOT, **popen)
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def error_line(result):
    """The single `rectflow: error:` line of a run that failed on bad input (exit 2, no traceback)."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [l for l in result.stderr.splitlines() if l.startswith("rectflow: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]
