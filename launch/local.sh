#!/usr/bin/env bash
# Runs llasm-jax on this machine (CPU, one GPU or one TPU VM host), from the repository root.
#
#   launch/local.sh --config configs/tiny.py:stage1 --workdir /tmp/tiny_stage1
#   XLA_FLAGS=--xla_force_host_platform_device_count=8 launch/local.sh --config configs/tiny.py:stage2 --config.mesh.shape.fsdp=2   # 8 simulated CPU devices
#
# Expects the package installed (pip install -e '.[test]'); uses .venv if there is one.
set -euo pipefail

COMMAND="${COMMAND:-train}"  # the llasm-jax subcommand: train (default), forward, generate, ...

cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then
  # shellcheck source=/dev/null  # the venv made at install time
  . .venv/bin/activate
fi
exec llasm-jax "$COMMAND" "$@"
