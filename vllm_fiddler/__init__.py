"""vllm-fiddler: MoE models larger than GPU memory in vLLM.

Hot experts stay resident on the GPU; cold experts stay in (pinned) host
memory and are computed on the CPU, so a step moves a token's activations
(KB) over PCIe rather than an expert's weights (hundreds of MB).

Use: ``vllm serve <Mixtral checkpoint> --model-impl fiddler`` or
``LLM(model=..., model_impl="fiddler")``; options through
``--additional-config '{"fiddler": {...}}'`` (see vllm_fiddler.config).
"""

from __future__ import annotations

import functools

__version__ = "0.1.0"

# Architectures fiddler implements: HF architecture -> (registered name, class).
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "MixtralForCausalLM": (
        "FiddlerMixtralForCausalLM",
        "vllm_fiddler.models.mixtral:FiddlerMixtralForCausalLM",
    ),
}
MODEL_IMPL = "fiddler"


@functools.lru_cache(maxsize=1)
def register() -> None:
    """vLLM's general-plugin entry point; runs in every vLLM process.

    Lazy (imports vLLM only when called), idempotent (lru_cache, and the hooks
    guard themselves), and touches no CUDA.
    """
    from vllm_fiddler import metrics, vllm_hooks

    vllm_hooks.install()
    metrics.install_frontend_collector()
