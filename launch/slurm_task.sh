#!/usr/bin/env bash
# One task (one GPU) of launch/slurm.sbatch, started by its srun: runs rectflow with the
# batch script's arguments, unchanged, plus this process's place in the job.
#   srun launch/slurm_task.sh train --config configs/cifar10.py --workdir /shared/1rf
# exec, so that srun's SIGTERM reaches rectflow itself (it saves and exits with 75).
set -euo pipefail
: "${RECTFLOW_COORDINATOR:?is set by launch/slurm.sbatch (host:port of process 0)}"
: "${SLURM_NTASKS:?is set by srun}"
: "${SLURM_PROCID:?is set by srun}"
exec rectflow "$@" \
  --config.distributed.coordinator="$RECTFLOW_COORDINATOR" \
  --config.distributed.num_processes="$SLURM_NTASKS" \
  --config.distributed.process_id="$SLURM_PROCID"
