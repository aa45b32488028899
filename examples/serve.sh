#!/usr/bin/env bash
# OpenAI-compatible server with fiddler's hybrid MoE.
#   MODEL=mistralai/Mixtral-8x7B-v0.1 bash examples/serve.sh [extra vllm serve args]
# With no MODEL, serves the tiny random Mixtral the demo builds (no GPU needed).
# Then: curl localhost:${PORT:-8000}/v1/completions -H 'Content-Type: application/json' \
#         -d '{"model": "fiddler", "prompt": "hello", "max_tokens": 16}'
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
if [ -z "${MODEL:-}" ]; then
  MODEL=$("$PY" -c "import os; from vllm_fiddler.tiny import build_tiny_mixtral; \
print(build_tiny_mixtral(os.path.expanduser('~/.cache/vllm_fiddler/tiny-mixtral')))")
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
fi
VLLM=$(dirname "$PY")/vllm
[ -x "$VLLM" ] || VLLM=vllm
exec "$VLLM" serve "$MODEL" --model-impl fiddler --served-model-name fiddler \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" \
  --additional-config "${FIDDLER_CONFIG:-{\"fiddler\": {}}}" "$@"
