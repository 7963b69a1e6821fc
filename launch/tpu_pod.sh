#!/usr/bin/env bash
# A rectflow command on every worker of a Cloud TPU pod slice, over gcloud ssh.
#
# Once per TPU VM (and after changing the code): put the repository on every worker and
# install it with the TPU extra.
#   launch/tpu_pod.sh setup my-tpu us-central2-b https://github.com/ORG/rectflow_jax.git
#   launch/tpu_pod.sh setup my-tpu us-central2-b .      # copies this checkout (no .git, runs/)
#   launch/tpu_pod.sh setup my-tpu us-central2-b        # already there: only installs
# Every launch after that only runs rectflow (no reinstall):
#   launch/tpu_pod.sh my-tpu us-central2-b pipeline --config configs/cifar10.py --workdir gs://b/run
#
# The arguments reach rectflow exactly as given: each is quoted with printf %q for the
# workers' shell. JAX discovers the coordinator and the process ids on TPU VMs, so no
# distributed flags are passed. The workers run from ~/$RECTFLOW_REMOTE_DIR (default
# rectflow_jax), so relative --config paths work; give --workdir on shared storage (gs://).
# Exit status 75 (rectflow saved a checkpoint and stopped: a maintenance event's SIGTERM)
# is passed through: rerunning the same command resumes.
#
# RECTFLOW_DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail

PREEMPTED_EXIT_CODE=75  # rectflow_jax.preemption.PREEMPTED_EXIT_CODE
remote_dir=${RECTFLOW_REMOTE_DIR:-rectflow_jax}
usage="usage: launch/tpu_pod.sh setup TPU ZONE [REPO_URL_OR_DIR]  |  launch/tpu_pod.sh TPU ZONE COMMAND ARGS..."

die() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }

# Runs an argv, or prints it (shell-quoted, ready to paste) under RECTFLOW_DRY_RUN=1.
run_or_print() {
  if [[ ${RECTFLOW_DRY_RUN:-} == 1 ]]; then
    local line
    printf -v line ' %q' "$@"
    echo "${line# }"
  else
    "$@"
  fi
}

# One command line for the workers' shell, on all of them at once.
on_all_workers() {
  run_or_print gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$1"
}

q_dir=$(printf %q "$remote_dir")

if [[ ${1:-} == setup ]]; then
  (( $# == 3 || $# == 4 )) || die "$usage"
  tpu=$2; zone=$3; source=${4:-}
  fetch=""
  if [[ -z $source ]]; then
    fetch="test -d $q_dir || { echo \"no ~/$q_dir on \$(hostname): give setup a repository\" >&2; exit 2; }"
  elif [[ -d $source ]]; then
    # A tarball rather than scp --recurse: scp nests the folder when it already exists.
    bundle_dir=$(mktemp -d)
    trap 'rm -rf "$bundle_dir"' EXIT
    bundle=$bundle_dir/rectflow_src.tgz
    run_or_print tar -C "$source" --exclude=.git --exclude=runs --exclude=__pycache__ -czf "$bundle" .
    run_or_print gcloud compute tpus tpu-vm scp "$bundle" "$tpu:rectflow_src.tgz" --zone "$zone" --worker=all
    fetch="mkdir -p $q_dir && tar -xzf rectflow_src.tgz -C $q_dir && rm rectflow_src.tgz"
  else
    q_url=$(printf %q "$source")
    fetch="if test -d $q_dir/.git; then git -C $q_dir pull --ff-only; else git clone $q_url $q_dir; fi"
  fi
  on_all_workers "set -e; $fetch; cd $q_dir && python3 -m pip install -q -e '.[tpu]'"
  exit 0
fi

(( $# >= 3 )) || die "$usage"
tpu=$1; zone=$2; shift 2
[[ $1 != -* ]] || die "the arguments after TPU ZONE start with a rectflow command (train, pipeline, ...), not $1"
printf -v quoted_args ' %q' "$@"
status=0
on_all_workers "cd $q_dir && exec python3 -m rectflow_jax.cli$quoted_args" || status=$?
if (( status == PREEMPTED_EXIT_CODE )); then
  echo "tpu_pod.sh: rectflow stopped at a checkpoint (exit $status): rerun the same command to resume" >&2
fi
exit "$status"
