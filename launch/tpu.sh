#!/usr/bin/env bash
# Cloud TPU VM launcher: create a slice, install llasm_jax on every worker, run llasm-jax on all
# of them at once, follow the log, stop, delete. Steps run alone or several in one call, in the
# order given; `--dry-run` prints the commands (one per line, pasteable) and runs nothing.
#
#   launch/tpu.sh create --name my-v5p --zone us-east5-a --type v5p-64
#   launch/tpu.sh setup  --name my-v5p --zone us-east5-a --data-bucket gs://B/data
#   launch/tpu.sh run    --name my-v5p --zone us-east5-a -- train --config configs/llasm_cllama2_7b.py:stage1 --workdir gs://B/stage1
#   launch/tpu.sh logs | stop | status | delete --name my-v5p --zone us-east5-a
#   launch/tpu.sh --help;  launch/tpu.sh STEP --help
#
# Settings are flags with environment fallbacks (--name/TPU_NAME, --zone/ZONE, --project/PROJECT,
# --type/ACCELERATOR_TYPE, ...), so `export TPU_NAME=... ZONE=...` once and the steps get short.
#
# create: `gcloud compute tpus tpu-vm create`, which returns when the slice is READY; with --spot
#   or --reserved (or --queued, on demand) a queued resource named NAME-qr (--qr-name) whose node
#   is NAME, and then waits until the queue reports ACTIVE (--no-wait returns at once): a queued
#   request waits in line for the capacity instead of failing when none is free. Pass the same
#   --spot/--reserved/--queued to `delete`, which then deletes the queued resource together with
#   its node (--force).
# setup: the checkout's files as git lists them (tracked and untracked-not-ignored, so local edits
#   go too; never .git or .venv) are packed into one tarball, copied to every worker with one scp
#   and unpacked into ~/llasm_jax (--dir), replacing what an earlier setup left but keeping the
#   venv; or --from-pip SPEC installs a released package instead. Each worker gets uv and a
#   Python 3.11 venv (--python; jax needs >= 3.11, newer than the images' python3) with
#   `pip install -e '.[tpu]'`. With --data-bucket BUCKET[/DIR] it also installs gcsfuse from
#   Google's apt repository and mounts the bucket at /mnt/data (--mount) with --implicit-dirs:
#   datasets are read through the mount (grain reads files; gcsfuse is the way its docs give for
#   GCS), while checkpoints and workdirs go to gs:// directly, never through the mount.
# run: every worker starts the same `llasm-jax --distributed ARGS...` (arguments after --, quoted
#   once with printf %q) as a detached background job (setsid, stdin from /dev/null) writing
#   ~/llasm_jax_logs/JOB.log, .pid and, when it ends, .rc; ~/llasm_jax_logs/latest names the
#   newest job. Detached, the job outlives the ssh connection: a dropped laptop connection or a
#   Ctrl-C never kills one host of the slice (which would hang the others in a collective). Then a
#   second ssh to worker 0, which is JAX process 0, follows its log (`tail -F --pid`, so it ends
#   with the job) and exits with the job's exit status. Ctrl-C stops only the following; `logs`
#   resumes it and `stop` ends the job. A worker refuses to start while its previous job still runs.
#
# All gcloud flags used exist in Google Cloud SDK 528 (`gcloud compute tpus ... --help`). Remote
# commands assume the workers' login shell is bash (true of the TPU VM Ubuntu images). Written for
# macOS's bash 3.2 too (no associative arrays, guarded empty-array expansions).
# Shell code for the workers is written in single quotes on purpose: it expands there, not here.
# shellcheck disable=SC2016
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STEPS_ALL="create setup run logs stop status delete"
LOGS='$HOME/llasm_jax_logs'  # expanded on the workers
# shellcheck source=/dev/null  # launch/lib.sh: die, shq, print_cmd, x
. "$ROOT/launch/lib.sh"

usage() {
  case "${1:-}" in
    create) cat <<'EOF'
launch/tpu.sh create --name NAME --zone ZONE --type TYPE [--project P] [--version RUNTIME]
                     [--spot | --reserved | --queued [--qr-name QR] [--no-wait]] [--create-arg ARG]...
  A TPU VM slice of any accelerator type (v4-32, v5litepod-256, v5p-64, v6e-64, ...). The runtime
  defaults by generation: v2/v3/v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
  v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e (--version / RUNTIME_VERSION to choose another).
  --spot / --reserved / --queued: a queued resource QR (default NAME-qr, QR_NAME) with node NAME,
  on spot, reserved or on-demand capacity; waits until it is ACTIVE unless --no-wait.
  --create-arg ARG: one more flag for gcloud's create (repeat), e.g. --create-arg=--network=N.
EOF
      ;;
    setup) cat <<'EOF'
launch/tpu.sh setup --name NAME --zone ZONE [--project P] [--dir DIR] [--python 3.11]
                    [--from-pip SPEC] [--data-bucket BUCKET[/DIR] [--mount /mnt/data]] [--internal-ip]
  Copies this checkout (git's tracked and untracked-not-ignored files) to every worker into
  ~/DIR (default llasm_jax, REPO_DIR), or with --from-pip installs SPEC there instead; makes
  DIR/.venv with uv (Python --python, default 3.11) and installs '.[tpu]'.
  --data-bucket (DATA_BUCKET): installs gcsfuse and mounts gs://BUCKET (only DIR of it, if given)
  at --mount (DATA_MOUNT, default /mnt/data) on every worker, for reading datasets; write
  checkpoints and workdirs to gs:// paths directly.
EOF
      ;;
    run) cat <<'EOF'
launch/tpu.sh run --name NAME --zone ZONE [--project P] [--dir DIR] [--job JOB] [--env K=V]...
                  [--detach] -- LLASM_JAX_ARGS...
  Starts `llasm-jax --distributed LLASM_JAX_ARGS...` on every worker as a detached job writing
  ~/llasm_jax_logs/JOB.log (JOB, JOB_NAME: default COMMAND-YYYYmmdd-HHMMSS), then follows worker
  0's log until the job ends and exits with its status. Ctrl-C stops following, not the job;
  --detach does not follow at all. --env K=V sets an environment variable for the job.
  e.g. launch/tpu.sh run -- train --config configs/llasm_cllama2_7b.py:stage1 --workdir gs://B/s1
EOF
      ;;
    logs) cat <<'EOF'
launch/tpu.sh logs --name NAME --zone ZONE [--project P] [--worker N] [--job JOB] [--lines N]
  Prints a worker's job log (default worker 0, the newest job) and follows it while the job runs;
  exits with the job's status. --lines N starts at the last N lines instead of the first.
EOF
      ;;
    stop) cat <<'EOF'
launch/tpu.sh stop --name NAME --zone ZONE [--project P] [--job JOB]
  Sends SIGTERM to the job (default the newest) on every worker, and SIGKILL to what is left of
  it after 60 s, so that the chips are free for the next run. The slice stays up.
EOF
      ;;
    status) cat <<'EOF'
launch/tpu.sh status --name NAME --zone ZONE [--project P] [--spot | --reserved | --queued [--qr-name QR]]
  Describes the TPU VM, or with --spot/--reserved/--queued the queued resource (its state).
EOF
      ;;
    delete) cat <<'EOF'
launch/tpu.sh delete --name NAME --zone ZONE [--project P] [--spot | --reserved | --queued [--qr-name QR]]
  Deletes the TPU VM without asking, or with --spot/--reserved/--queued (as given to create) the
  queued resource and its node.
EOF
      ;;
    *) cat <<'EOF'
launch/tpu.sh STEP... [OPTIONS] [-- LLASM_JAX_ARGS...]
  Steps, run in the order given: create, setup, run, logs, stop, status, delete
  (launch/tpu.sh STEP --help for each). Common options:
    --name NAME        TPU VM name (TPU_NAME), required
    --zone ZONE        zone, e.g. us-east5-a (ZONE), required
    --project PROJECT  project (PROJECT; default: gcloud's configured project)
    --type TYPE        accelerator type for create, e.g. v5p-64 (ACCELERATOR_TYPE)
    --internal-ip      ssh/scp to the workers' internal IPs
    --dry-run          print the commands, one per line, and run nothing (or DRY_RUN=1)
  e.g. launch/tpu.sh create setup run --name my-v5p --zone us-east5-a --type v5p-64 -- train --config C
EOF
      ;;
  esac
}

# ---- settings: flags, then environment, then defaults
NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
TYPE="${ACCELERATOR_TYPE:-}"
VERSION="${RUNTIME_VERSION:-}"
QR_NAME="${QR_NAME:-}"
REPO_DIR="${REPO_DIR:-llasm_jax}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
DATA_BUCKET="${DATA_BUCKET:-}"
DATA_MOUNT="${DATA_MOUNT:-/mnt/data}"
JOB="${JOB_NAME:-}"
CAPACITY=""  # spot | reserved | queued (on demand) | "" (plain TPU VM)
FROM_PIP=""
WORKER=0
LINES=""
WAIT=1
DETACH=0
if [[ "${DRY_RUN:-0}" == 1 ]]; then DRY_RUN=1; else DRY_RUN=0; fi
INTERNAL_IP=0
HELP=0
STEPS=()
ENVS=()
CREATE_ARGS=()
JAX_ARGS=()

set_capacity() {
  [[ -z "$CAPACITY" || "$CAPACITY" == "$1" ]] || die "--$CAPACITY and --$1 exclude each other"
  CAPACITY=$1
}

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
    --spot|--reserved|--queued) set_capacity "${arg#--}"; continue ;;
    --no-wait) WAIT=0; continue ;;
    --detach) DETACH=1; continue ;;
    --internal-ip) INTERNAL_IP=1; continue ;;
    --*) (($#)) || die "$arg needs a value" ;;
  esac
  case "$arg" in
    --name) NAME=$1 ;;
    --zone) ZONE=$1 ;;
    --project) PROJECT=$1 ;;
    --type) TYPE=$1 ;;
    --version) VERSION=$1 ;;
    --qr-name) QR_NAME=$1 ;;
    --create-arg) CREATE_ARGS+=("$1") ;;
    --dir) REPO_DIR=$1 ;;
    --python) PYTHON_VERSION=$1 ;;
    --from-pip) FROM_PIP=$1 ;;
    --data-bucket) DATA_BUCKET=$1 ;;
    --mount) DATA_MOUNT=$1 ;;
    --job) JOB=$1 ;;
    --env) [[ "$1" == [A-Za-z_]*=* ]] || die "--env takes KEY=VALUE, not '$1'"; ENVS+=("$1") ;;
    --worker) WORKER=$1 ;;
    --lines) LINES=$1 ;;
    --*) die "unknown option $arg (see launch/tpu.sh --help)" ;;
    pack) STEPS+=("$arg"); continue ;;  # internal: `pack FILE` writes setup's tarball
    *)
      if [[ " $STEPS_ALL " == *" $arg "* ]]; then
        STEPS+=("$arg")
      elif [[ "${STEPS[*]:-}" == pack ]]; then
        PACK_OUT=$arg
      else
        die "unknown step or argument '$arg' (steps: $STEPS_ALL; llasm-jax arguments go after --)"
      fi
      continue ;;
  esac
  shift
done

usage_if_asked "$HELP" "${#STEPS[@]}" "${STEPS[0]:-}"

# ---- internal step: the tarball of the checkout that setup copies (git's file list when a git checkout)
pack() {
  local out=$1
  if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
      | while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done \
      | tar --null -T - -czf "$out")
  else
    tar -C "$ROOT" --exclude=.git --exclude=.venv --exclude=__pycache__ -czf "$out" .
  fi
}
if [[ "${STEPS[0]}" == pack ]]; then
  [[ -n "${PACK_OUT:-}" ]] || die "pack needs an output file: launch/tpu.sh pack FILE.tgz"
  pack "$PACK_OUT"
  exit 0
fi

# ---- checks, each naming its fix
[[ -n "$NAME" ]] || die "no TPU name: pass --name NAME or set TPU_NAME"
[[ -n "$ZONE" ]] || die "no zone: pass --zone ZONE (e.g. us-east5-a) or set ZONE"
QR_NAME="${QR_NAME:-$NAME-qr}"
[[ -z "$JOB" || "$JOB" =~ ^[A-Za-z0-9._-]+$ ]] || die "--job '$JOB': use letters, digits, '.', '_', '-'"
[[ "$WORKER" =~ ^([0-9]+|all)$ ]] || die "--worker '$WORKER': a worker number or all"
[[ -z "$LINES" || "$LINES" =~ ^[0-9]+$ ]] || die "--lines '$LINES': a number of lines"

G=(--zone "$ZONE")  # the flags of every gcloud command
if [[ -n "$PROJECT" ]]; then G+=(--project "$PROJECT"); fi
SSH_FLAGS=()
if ((INTERNAL_IP)); then SSH_FLAGS+=(--internal-ip); fi

# Runs a shell command on workers ($1: a worker number or all).
ssh_workers() {
  x gcloud compute tpus tpu-vm ssh "$NAME" "${G[@]}" ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"} --worker="$1" --command "$2"
}

default_runtime() {
  case "$1" in
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

step_create() {
  [[ -n "$TYPE" ]] || die "no accelerator type: pass --type TYPE (e.g. v5p-64) or set ACCELERATOR_TYPE"
  local runtime="${VERSION:-}"
  if [[ -z "$runtime" ]]; then
    runtime=$(default_runtime "$TYPE") \
      || die "no default runtime for accelerator type '$TYPE': pass --version RUNTIME (gcloud compute tpus tpu-vm versions list --zone $ZONE)"
  fi
  if [[ -z "$CAPACITY" ]]; then
    x gcloud compute tpus tpu-vm create "$NAME" "${G[@]}" --accelerator-type "$TYPE" --version "$runtime" \
      ${CREATE_ARGS[@]+"${CREATE_ARGS[@]}"}
    return
  fi
  local capacity=()
  if [[ "$CAPACITY" != queued ]]; then capacity=(--"$CAPACITY"); fi
  x gcloud compute tpus queued-resources create "$QR_NAME" "${G[@]}" --node-id "$NAME" \
    --accelerator-type "$TYPE" --runtime-version "$runtime" ${capacity[@]+"${capacity[@]}"} \
    ${CREATE_ARGS[@]+"${CREATE_ARGS[@]}"}
  ((WAIT)) || return 0
  local describe=(gcloud compute tpus queued-resources describe "$QR_NAME" "${G[@]}" --format 'value(state.state)')
  if ((DRY_RUN)); then  # the poll, shown once
    print_cmd "${describe[@]}"
    return
  fi
  local state last=""
  while :; do
    state=$("${describe[@]}")
    if [[ "$state" != "$last" ]]; then
      printf '%s: queued resource %s: %s\n' "$PROG" "$QR_NAME" "$state" >&2
      last=$state
    fi
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED|SUSPENDING|SUSPENDED)
        die "queued resource $QR_NAME is $state; see launch/tpu.sh status --$CAPACITY, then delete --$CAPACITY" ;;
    esac
    sleep 30
  done
}

UV_SETUP='export PATH="$HOME/.local/bin:$PATH"; command -v uv >/dev/null || python3 -m pip install --user -q uv || curl -LsSf https://astral.sh/uv/install.sh | sh'

step_setup() {
  local dir install remote
  dir=$(printf %q "$REPO_DIR")
  if [[ -n "$FROM_PIP" ]]; then
    install="uv pip install --python .venv/bin/python $(printf %q "$FROM_PIP")"
    remote="set -e; mkdir -p $dir; $UV_SETUP; cd $dir"
  else
    local tarball="${TMPDIR:-/tmp}"
    tarball="${tarball%/}/llasm_jax-$NAME.tgz"
    if ((DRY_RUN)); then print_cmd "$0" pack "$tarball"; else pack "$tarball"; fi
    x gcloud compute tpus tpu-vm scp "$tarball" "$NAME:llasm_jax_src.tgz" "${G[@]}" \
      ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"} --worker=all
    x rm -f "$tarball"
    install='uv pip install --python .venv/bin/python -e ".[tpu]"'
    remote="set -e; mkdir -p $dir; find $dir -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +;"
    remote+=' tar -xzf "$HOME/llasm_jax_src.tgz" -C '"$dir"'; rm -f "$HOME/llasm_jax_src.tgz";'
    remote+=" $UV_SETUP; cd $dir"
  fi
  # A venv of another Python (e.g. the image's 3.10) is made anew.
  local py
  py=$(printf %q "$PYTHON_VERSION")
  remote+="; case \"\$(.venv/bin/python -V 2>&1)\" in \"Python $py\"*) ;; *) rm -rf .venv; uv venv --seed --python $py .venv ;; esac; $install"
  remote+='; echo "$(hostname): llasm_jax installed in '"$dir"'"'
  ssh_workers all "$remote"
  [[ -n "$DATA_BUCKET" ]] || return 0

  local bucket="${DATA_BUCKET#gs://}" only_dir="" mnt
  bucket="${bucket%/}"
  if [[ "$bucket" == */* ]]; then only_dir="--only-dir $(printf %q "${bucket#*/}") "; fi
  bucket=$(printf %q "${bucket%%/*}")
  mnt=$(printf %q "$DATA_MOUNT")
  remote='set -e; if ! command -v gcsfuse >/dev/null; then'
  remote+=' echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null;'
  remote+=' curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null;'
  remote+=' sudo apt-get -o DPkg::Lock::Timeout=600 update -qq; sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq gcsfuse; fi;'
  remote+=" if mountpoint -q $mnt; then echo \"\$(hostname): $mnt already mounted\";"
  remote+=" else sudo mkdir -p $mnt; sudo chown \"\$(id -u):\$(id -g)\" $mnt; gcsfuse --implicit-dirs $only_dir$bucket $mnt; fi"
  ssh_workers all "$remote"
}

# Shell code that sets J to the job's name: --job, else the newest job on that worker.
job_var() {
  if [[ -n "$JOB" ]]; then printf 'J=%s' "$JOB"; else printf 'J=$(cat "$L/latest" 2>/dev/null)'; fi
}

# Worker-side: print the log of job $J (from line 1, or the last --lines), following it while the
# job runs; exit with the job's status.
follow_script() {
  local from="+1"
  if [[ -n "$LINES" ]]; then from=$LINES; fi
  printf '%s' "L=$LOGS; $(job_var);"' [ -n "$J" ] && [ -e "$L/$J.log" ] || { echo "$(hostname): no llasm-jax job log in $L" >&2; exit 1; };'
  printf '%s' ' if [ -e "$L/$J.rc" ]; then tail -n '"$from"' "$L/$J.log"; else tail -n '"$from"' -F --pid="$(cat "$L/$J.pid")" "$L/$J.log"; fi;'
  printf '%s' ' rc=$(cat "$L/$J.rc" 2>/dev/null); echo "$(hostname): llasm-jax job $J ended with exit status ${rc:-unknown}" >&2; [ "${rc:-1}" = 0 ]'
}

step_run() {
  ((${#JAX_ARGS[@]})) || die "run needs llasm-jax arguments after --, e.g. run -- train --config configs/llasm_cllama2_7b.py:stage1"
  JOB="${JOB:-${JAX_ARGS[0]//[^A-Za-z0-9._-]/_}-$(date +%Y%m%d-%H%M%S)}"
  local envs="" e
  for e in ${ENVS[@]+"${ENVS[@]}"}; do envs+=" $(printf %q "$e")"; done
  if [[ -n "$envs" ]]; then envs=" env$envs"; fi
  local remote="L=$LOGS; J=$JOB;"
  remote+=' mkdir -p "$L" || exit 1; P=$(cat "$L/latest" 2>/dev/null);'
  remote+=' if [ -n "$P" ] && [ ! -e "$L/$P.rc" ] && kill -0 "$(cat "$L/$P.pid" 2>/dev/null)" 2>/dev/null; then'
  remote+=' echo "$(hostname): llasm-jax job $P still runs; end it first with launch/tpu.sh stop" >&2; exit 1; fi;'
  remote+=" echo \"\$J\" > \"\$L/latest\"; cd $(printf %q "$REPO_DIR") || exit 1;"
  remote+=" setsid$envs bash -c '.venv/bin/llasm-jax \"\$@\"; echo \$? > \"\$0\"' \"\$L/\$J.rc\" --distributed"
  remote+="$(printf ' %q' "${JAX_ARGS[@]}")"
  remote+=' > "$L/$J.log" 2>&1 < /dev/null & echo $! > "$L/$J.pid"; echo "$(hostname): started llasm-jax job $J, log $L/$J.log"'
  ssh_workers all "$remote"
  if ((DETACH)); then
    ((DRY_RUN)) || printf '%s: job %s started; follow it with: launch/tpu.sh logs --job %s\n' "$PROG" "$JOB" "$JOB" >&2
  else
    ssh_workers 0 "$(follow_script)"
  fi
}

step_logs() { ssh_workers "$WORKER" "$(follow_script)"; }

step_stop() {
  local remote
  remote="L=$LOGS; $(job_var);"
  remote+=' P=$(cat "$L/$J.pid" 2>/dev/null); if [ -n "$J" ] && [ -n "$P" ] && [ ! -e "$L/$J.rc" ] && kill -0 "$P" 2>/dev/null;'
  remote+=' then kill -TERM -- "-$P"; i=0; while kill -0 -- "-$P" 2>/dev/null && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done;'
  remote+=' kill -KILL -- "-$P" 2>/dev/null; echo 143 > "$L/$J.rc"; echo "$(hostname): stopped llasm-jax job $J";'
  remote+=' else echo "$(hostname): no llasm-jax job running"; fi'
  ssh_workers all "$remote"
}

step_status() {
  if [[ -n "$CAPACITY" ]]; then
    x gcloud compute tpus queued-resources describe "$QR_NAME" "${G[@]}"
  else
    x gcloud compute tpus tpu-vm describe "$NAME" "${G[@]}"
  fi
}

step_delete() {
  if [[ -n "$CAPACITY" ]]; then
    x gcloud compute tpus queued-resources delete "$QR_NAME" "${G[@]}" --force --quiet
  else
    x gcloud compute tpus tpu-vm delete "$NAME" "${G[@]}" --quiet
  fi
}

for step in "${STEPS[@]}"; do
  "step_$step"
done
