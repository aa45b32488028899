#!/usr/bin/env bash
# The test suite (what CI runs after scripts/install-cpu.sh):
#   bash scripts/install-cpu.sh && bash scripts/test.sh         # vLLM 0.26.0 (.venv)
#   FIDDLER_VLLM=0.32.0 bash scripts/test.sh                     # .venv-0.32.0
# Extra arguments go to the main pytest run, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/scripts/vllm-release.sh"  # VENV: this release's (FIDDLER_VLLM), or FIDDLER_VENV
cd "$ROOT"
# pytest (not `python -m pytest`): the repo root must not be on sys.path, or the
# kernels/ folder would shadow Hugging Face's `kernels` package.
"$VENV/bin/pytest" -q -rs --durations=15 "$@" tests
# On a CPU with AVX512-BF16 but no AMX (some CI machines), run the AMX kernel code
# once more with its tile instructions emulated in scalar code (the emulation is
# built on the AVX512-BF16 kernels), so every ISA path is tested.
if grep -q avx512_bf16 /proc/cpuinfo 2>/dev/null && ! grep -q amx_tile /proc/cpuinfo 2>/dev/null; then
  FIDDLER_CPU_AMX_EMULATE=1 "$VENV/bin/pytest" -q -rs tests/kernels/test_cpu_expert_kernel.py
fi
