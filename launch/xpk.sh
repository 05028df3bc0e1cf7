#!/usr/bin/env bash
# GKE launcher: the same llasm-jax job as launch/tpu.sh, on a TPU node pool of a GKE cluster that
# xpk made (https://github.com/AI-Hypercomputer/xpk, `pip install xpk`), as an xpk workload.
# Steps run alone or several in one call, in the order given; `--dry-run` prints the commands
# (one per line, pasteable) and runs nothing.
#
#   launch/xpk.sh image  --docker-image gcr.io/P/llasm-jax:v1
#   launch/xpk.sh run    --cluster C --workload stage1 --type v5p-64 --num-slices 2 \
#                        --docker-image gcr.io/P/llasm-jax:v1 -- train --config configs/llasm_cllama2_7b.py:stage1 --workdir gs://B/stage1
#   launch/xpk.sh list | logs | delete --cluster C --workload stage1
#   launch/xpk.sh --help;  launch/xpk.sh STEP --help
#
# image: builds launch/Dockerfile (Python 3.11 with `pip install -e '.[tpu]'`) from the files of
#   the checkout as launch/tpu.sh setup packs them (git's tracked and untracked-not-ignored
#   files, sent as a tar context so nothing else goes in), and pushes it.
# run: `xpk workload create ... --command 'llasm-jax --distributed ARGS...'`, the arguments quoted
#   once (printf %q) for the container's shell. xpk runs it in every pod of every slice; JAX finds
#   the other hosts and slices from the environment GKE and xpk set (`--distributed`).
# logs: `xpk workload list` for the workload's state (it also points kubectl at the cluster),
#   then `kubectl logs -f` of the pod of slice 0, worker 0, which is JAX process 0 (container
#   jax-tpu, xpk's default --docker-name); pods are found by the JobSet labels, which need
#   Kubernetes >= 1.28 for the completion index. xpk also prints a Cloud Logging link on create.
# Data on GKE: attach a bucket with `xpk storage attach` and pass --storage NAME; workdirs and
#   checkpoints go to gs:// paths directly.
#
# Settings are flags with environment fallbacks (--cluster/CLUSTER, --workload/WORKLOAD,
# --type/ACCELERATOR_TYPE, --docker-image/DOCKER_IMAGE, --project/PROJECT, --zone/ZONE, ...).
# All xpk flags used exist in xpk's parser (src/xpk/parser/workload.py, 2026).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STEPS_ALL="image run list logs delete"
# shellcheck source=/dev/null  # launch/lib.sh: die, shq, print_cmd, x
. "$ROOT/launch/lib.sh"

usage() {
  case "${1:-}" in
    image) cat <<'EOF'
launch/xpk.sh image --docker-image IMAGE
  Builds launch/Dockerfile from the checkout's files (as launch/tpu.sh setup copies them) as
  IMAGE (DOCKER_IMAGE, e.g. gcr.io/PROJECT/llasm-jax:v1) and pushes it.
EOF
      ;;
    run) cat <<'EOF'
launch/xpk.sh run --cluster C --workload W --type TYPE --docker-image IMAGE [--num-slices N]
                  [--project P] [--zone Z] [--max-restarts N] [--env K=V]... [--storage NAME]...
                  [--xpk-arg ARG]... -- LLASM_JAX_ARGS...
  Submits `llasm-jax --distributed LLASM_JAX_ARGS...` as xpk workload W on N slices (NUM_SLICES,
  default 1) of TPU type TYPE (v5p-64, v5litepod-256, v6e-64, ...). --max-restarts
  (MAX_RESTARTS): restarts after failures (the job resumes from its workdir). --env K=V: an
  environment variable in the container; --storage NAME: an xpk storage to mount;
  --xpk-arg ARG: one more flag for `xpk workload create` (repeat), e.g. --xpk-arg=--spot.
EOF
      ;;
    list) cat <<'EOF'
launch/xpk.sh list --cluster C [--workload W] [--project P] [--zone Z]
  The cluster's workloads and their states (only W's when given).
EOF
      ;;
    logs) cat <<'EOF'
launch/xpk.sh logs --cluster C --workload W [--project P] [--zone Z] [--slice S] [--worker N] [--lines N]
  The workload's state, then follows the log of slice S, worker N (default 0 and 0: JAX process
  0) from its start (--lines N: the last N lines).
EOF
      ;;
    delete) cat <<'EOF'
launch/xpk.sh delete --cluster C --workload W [--project P] [--zone Z]
  Deletes the workload without asking; the cluster stays.
EOF
      ;;
    *) cat <<'EOF'
launch/xpk.sh STEP... [OPTIONS] [-- LLASM_JAX_ARGS...]
  Steps, run in the order given: image, run, list, logs, delete (launch/xpk.sh STEP --help).
  Common options:
    --cluster C        xpk cluster (CLUSTER), required but for image
    --workload W       workload name (WORKLOAD), required for run, logs and delete
    --type TYPE        TPU type for run, e.g. v5p-64 (ACCELERATOR_TYPE)
    --docker-image I   image for image and run (DOCKER_IMAGE)
    --project P        project (PROJECT; default: gcloud's configured project)
    --zone Z           zone (ZONE; default: gcloud's configured compute/zone)
    --dry-run          print the commands, one per line, and run nothing (or DRY_RUN=1)
EOF
      ;;
  esac
}

# ---- settings: flags, then environment, then defaults
CLUSTER="${CLUSTER:-}"
WORKLOAD="${WORKLOAD:-}"
TYPE="${ACCELERATOR_TYPE:-}"
NUM_SLICES="${NUM_SLICES:-1}"
IMAGE="${DOCKER_IMAGE:-}"
PROJECT="${PROJECT:-}"
ZONE="${ZONE:-}"
MAX_RESTARTS="${MAX_RESTARTS:-}"
SLICE=0
WORKER=0
LINES=""
if [[ "${DRY_RUN:-0}" == 1 ]]; then DRY_RUN=1; else DRY_RUN=0; fi
HELP=0
STEPS=()
ENVS=()
STORAGES=()
XPK_ARGS=()
JAX_ARGS=()

while (($#)); do
  arg=$1
  shift
  if [[ "$arg" == --*=* ]]; then  # --flag=value -> --flag value
    set -- "${arg#*=}" "$@"
    arg=${arg%%=*}
  fi
  case "$arg" in
    --) JAX_ARGS=("$@"); break ;;
    -h|--help) HELP=1; continue ;;
    --dry-run) DRY_RUN=1; continue ;;
    --*) (($#)) || die "$arg needs a value" ;;
  esac
  case "$arg" in
    --cluster) CLUSTER=$1 ;;
    --workload) WORKLOAD=$1 ;;
    --type) TYPE=$1 ;;
    --num-slices) NUM_SLICES=$1 ;;
    --docker-image) IMAGE=$1 ;;
    --project) PROJECT=$1 ;;
    --zone) ZONE=$1 ;;
    --max-restarts) MAX_RESTARTS=$1 ;;
    --env) [[ "$1" == [A-Za-z_]*=* ]] || die "--env takes KEY=VALUE, not '$1'"; ENVS+=(--env "$1") ;;
    --storage) STORAGES+=(--storage "$1") ;;
    --xpk-arg) XPK_ARGS+=("$1") ;;
    --slice) SLICE=$1 ;;
    --worker) WORKER=$1 ;;
    --lines) LINES=$1 ;;
    --*) die "unknown option $arg (see launch/xpk.sh --help)" ;;
    *)
      [[ " $STEPS_ALL " == *" $arg "* ]] \
        || die "unknown step or argument '$arg' (steps: $STEPS_ALL; llasm-jax arguments go after --)"
      STEPS+=("$arg")
      continue ;;
  esac
  shift
done

usage_if_asked "$HELP" "${#STEPS[@]}" "${STEPS[0]:-}"
[[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "--num-slices '$NUM_SLICES': a positive number"
[[ "$SLICE$WORKER" =~ ^[0-9]+$ ]] || die "--slice and --worker take numbers"
[[ -z "$LINES" || "$LINES" =~ ^[0-9]+$ ]] || die "--lines '$LINES': a number of lines"

need_cluster() { [[ -n "$CLUSTER" ]] || die "no cluster: pass --cluster CLUSTER or set CLUSTER"; }
need_workload() { [[ -n "$WORKLOAD" ]] || die "no workload name: pass --workload NAME or set WORKLOAD"; }
need_image() {
  [[ -n "$IMAGE" ]] || die "no docker image: pass --docker-image IMAGE or set DOCKER_IMAGE (build one: launch/xpk.sh image)"
}

# --project/--zone when given (xpk defaults them from gcloud's configuration).
G=()
if [[ -n "$PROJECT" ]]; then G+=(--project "$PROJECT"); fi
if [[ -n "$ZONE" ]]; then G+=(--zone "$ZONE"); fi

step_image() {
  need_image
  local context="${TMPDIR:-/tmp}"
  context="${context%/}/llasm_jax-image.tgz"
  x launch/tpu.sh pack "$context"
  if ((DRY_RUN)); then
    printf '%s < %s\n' "$(print_cmd docker build -f launch/Dockerfile -t "$IMAGE" -)" "$(shq "$context")"
  else
    printf '+ %s < %s\n' "$(print_cmd docker build -f launch/Dockerfile -t "$IMAGE" -)" "$(shq "$context")" >&2
    docker build -f launch/Dockerfile -t "$IMAGE" - < "$context"
  fi
  x rm -f "$context"
  x docker push "$IMAGE"
}

step_run() {
  need_cluster
  need_workload
  [[ -n "$TYPE" ]] || die "no TPU type: pass --type TYPE (e.g. v5p-64) or set ACCELERATOR_TYPE"
  need_image
  ((${#JAX_ARGS[@]})) || die "run needs llasm-jax arguments after --, e.g. run -- train --config configs/llasm_cllama2_7b.py:stage1"
  local restarts=()
  if [[ -n "$MAX_RESTARTS" ]]; then restarts=(--max-restarts "$MAX_RESTARTS"); fi
  x xpk workload create --cluster "$CLUSTER" --workload "$WORKLOAD" --tpu-type "$TYPE" \
    --num-slices "$NUM_SLICES" --docker-image "$IMAGE" ${G[@]+"${G[@]}"} \
    ${restarts[@]+"${restarts[@]}"} ${ENVS[@]+"${ENVS[@]}"} ${STORAGES[@]+"${STORAGES[@]}"} \
    ${XPK_ARGS[@]+"${XPK_ARGS[@]}"} --command "llasm-jax --distributed$(printf ' %q' "${JAX_ARGS[@]}")"
}

step_list() {
  need_cluster
  local filter=()
  if [[ -n "$WORKLOAD" ]]; then filter=(--filter-by-job "$WORKLOAD"); fi
  x xpk workload list --cluster "$CLUSTER" ${filter[@]+"${filter[@]}"} ${G[@]+"${G[@]}"}
}

step_logs() {
  need_cluster
  need_workload
  x xpk workload list --cluster "$CLUSTER" --filter-by-job "$WORKLOAD" ${G[@]+"${G[@]}"}
  local selector="jobset.sigs.k8s.io/jobset-name=$WORKLOAD,jobset.sigs.k8s.io/job-index=$SLICE"
  selector+=",batch.kubernetes.io/job-completion-index=$WORKER"
  x kubectl logs -f -l "$selector" -c jax-tpu --tail="${LINES:--1}"
}

step_delete() {
  need_cluster
  need_workload
  x xpk workload delete --cluster "$CLUSTER" --workload "$WORKLOAD" ${G[@]+"${G[@]}"} --force
}

cd "$ROOT"  # image builds from the checkout
for step in "${STEPS[@]}"; do
  "step_$step"
done
