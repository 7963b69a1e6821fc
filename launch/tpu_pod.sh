#!/usr/bin/env bash
# Runs a rectflow command on every host of a Cloud TPU pod slice. JAX discovers the
# coordinator and process ids on TPU VMs, so no distributed flags are needed.
#   launch/tpu_pod.sh my-tpu us-central2-b pipeline --config configs/cifar10.py --workdir gs://b/run
set -euo pipefail
tpu=$1; zone=$2; shift 2
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/rectflow_jax && pip install -q -e . && rectflow $*"
