"""Preemption: SIGTERM (SLURM's --signal, a TPU VM's maintenance event) becomes a clean stop.

The handler only sets a flag. Long loops (training steps, pair shards) ask `requested(step)`
at their boundaries; on several processes every process gets the same answer at the same
step, so they all save and stop together. The loop then raises `Preempted`, and the CLI
exits with PREEMPTED_EXIT_CODE once the checkpoint is written: rerunning the same command
resumes (launch/slurm.sbatch requeues on it).
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np

log = logging.getLogger("rectflow")

# EX_TEMPFAIL from sysexits.h: "try again later". launch/slurm.sbatch requeues on it.
PREEMPTED_EXIT_CODE = 75

_signalled = threading.Event()
_installed = False
# Agreement points so far: JAX's sync point wants ids that only grow, and callers' steps restart
# with every stage or pair set; every process makes the same calls, so the counts agree.
_checks = 0


class Preempted(RuntimeError):
    """A stop was requested; the work done so far is saved, and rerunning the command resumes it."""


def install_handler() -> None:
    """SIGTERM sets the stop flag instead of killing the process (main thread only; idempotent)."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, lambda signum, frame: _signalled.set())
    _installed = True


def request() -> None:
    """Asks for a stop as SIGTERM would (tests, and callers with their own signals)."""
    _signalled.set()


def clear() -> None:
    _signalled.clear()


def signalled() -> bool:
    """Whether this process has been asked to stop (no agreement across processes)."""
    return _signalled.is_set()


def requested(step: int) -> bool:
    """Whether to stop at boundary `step` (a training step, a shard): the same answer on every process.

    One process: its own flag. Several: the flags are OR-ed by a tiny all-gather, so a
    signal that reaches one host stops all of them at the same step; where JAX's
    preemption service runs (TPU, GPU clusters) its sync point also counts.
    """
    global _checks
    if jax.process_count() == 1:
        return _signalled.is_set()
    from jax.experimental import multihost_utils

    _checks += 1

    flags = multihost_utils.process_allgather(np.asarray(_signalled.is_set(), np.int32))
    stop = bool(np.any(flags))
    try:
        stop = stop or multihost_utils.reached_preemption_sync_point(_checks)
    except RuntimeError:  # no preemption service in this runtime (CPU, or not enabled)
        pass
    if stop:
        log.info("stop requested: every process stops at %s", step)
    return stop
