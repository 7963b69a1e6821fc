#!/usr/bin/env bash
# Runs a rectflow command as N JAX processes on this machine (CPU collectives over gloo),
# the way a multi-host job runs: each process loads its share of every global batch.
#   launch/local_multiprocess.sh 2 train --config configs/toy_2gmm.py --workdir runs/mp
set -euo pipefail
num_processes=$1; shift
port=${RECTFLOW_PORT:-12355}
pids=()
for ((i = 0; i < num_processes; i++)); do
  rectflow "$@" --quiet \
    --config.distributed.coordinator="127.0.0.1:${port}" \
    --config.distributed.num_processes="${num_processes}" \
    --config.distributed.process_id="${i}" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
