#!/usr/bin/env bash
# Runs llasm-jax on every worker of a Cloud TPU VM slice (v4/v5e/v5p/v6e pods), all at once.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh --config configs/llasm_cllama2_7b_stage1.py --workdir gs://BUCKET/stage1
#
# Every host must run the same program at the same time: JAX then sees all chips of the slice
# as one set of devices (`--distributed` calls jax.distributed.initialize(), which finds the
# other hosts from the TPU metadata). Each worker needs the repository at $REPO_DIR with a
# venv holding the package and jax[tpu]; SETUP=1 creates it first (from a checkout already
# copied to the workers, e.g. with `gcloud compute tpus tpu-vm scp --recurse --worker=all`).
set -euo pipefail

COMMAND="${COMMAND:-train}"  # the llasm-jax subcommand: train (default), forward, generate, ...

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone, e.g. us-east5-a}"
REPO_DIR="${REPO_DIR:-\$HOME/llasm_jax}"  # expanded on the workers, not here
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then
  PROJECT_FLAG=(--project "$PROJECT")
fi

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command "$1"
}

if [[ "${SETUP:-0}" == 1 ]]; then
  ssh_all "cd $REPO_DIR && python3 -m venv .venv && . .venv/bin/activate && pip install -e . 'jax[tpu]'"
fi

# Quote the arguments once here so they arrive on the workers exactly as given.
ARGS=$(printf ' %q' "$@")
ssh_all "cd $REPO_DIR && . .venv/bin/activate && llasm-jax --distributed $COMMAND$ARGS"
