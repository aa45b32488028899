"""vllm-fiddler: MoE models larger than GPU memory in vLLM.

Hot experts stay resident on the GPU; cold experts stay in (pinned) host
memory and are computed on the CPU, so a step moves a token's activations
(KB) over PCIe rather than an expert's weights (hundreds of MB).

Use: ``vllm serve <MoE checkpoint> --model-impl fiddler`` or
``LLM(model=..., model_impl="fiddler")``; options through
``--additional-config '{"fiddler": {...}}'`` (see vllm_fiddler.config).
"""

from __future__ import annotations

import functools

__version__ = "0.1.0"

# MoE families whose hybrid layers are tested against stock vLLM and Hugging Face
# (tests/e2e/test_families.py); other architectures built on vLLM's FusedMoE run
# through the same checks, with a warning at start-up.
VERIFIED_ARCHITECTURES: dict[str, str] = {
    "MixtralForCausalLM": "Mixtral",
    "Qwen2MoeForCausalLM": "Qwen2-MoE",
    "Qwen3MoeForCausalLM": "Qwen3-MoE",
    "OlmoeForCausalLM": "OLMoE",
    "DeepseekV2ForCausalLM": "DeepSeek-V2",
    "DeepseekV3ForCausalLM": "DeepSeek-V3 / R1 / Kimi-K2",
    "Glm4MoeForCausalLM": "GLM-4.5",
    "GptOssForCausalLM": "gpt-oss",
}
MODEL_IMPL = "fiddler"


@functools.lru_cache(maxsize=1)
def register() -> None:
    """vLLM's general-plugin entry point; runs in every vLLM process.

    Lazy (imports vLLM only when called), idempotent (lru_cache, and the hooks
    guard themselves), and touches no CUDA.
    """
    from vllm_fiddler import compat, envs, metrics, plugin

    compat.check_vllm_version()
    plugin.install()
    metrics.install_frontend_collector()
    if envs.FIDDLER_DUMMY_ROUTER_SKEW or envs.FIDDLER_FAST_DUMMY_INIT:
        from vllm_fiddler import synthetic  # benchmarks only: not imported by a serving process

        synthetic.install_dummy_router_skew()
        synthetic.install_fast_host_dummy_init()
