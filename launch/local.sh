#!/usr/bin/env bash
# Runs llasm-jax on this machine (CPU, one GPU or one TPU VM host), from the repository root.
#
#   launch/local.sh --config configs/tiny.py --seconds 5
#   XLA_FLAGS=--xla_force_host_platform_device_count=8 launch/local.sh --batch 8   # 8 simulated CPU devices
#
# Expects the package installed (pip install -e '.[test]'); uses .venv if there is one.
set -euo pipefail

COMMAND=demo  # the llasm-jax subcommand to run; becomes "train" once training lands

cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then
  . .venv/bin/activate
fi
exec llasm-jax "$COMMAND" "$@"
