#!/usr/bin/env bash
# The test suite (what CI runs after scripts/install-cpu.sh):
#   bash scripts/install-cpu.sh && bash scripts/test.sh
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${FIDDLER_VENV:-$ROOT/.venv}
cd "$ROOT"
# pytest (not `python -m pytest`): the repo root must not be on sys.path, or the
# kernels/ folder would shadow Hugging Face's `kernels` package.
exec "$VENV/bin/pytest" -q -rs --durations=15 "$@" tests
