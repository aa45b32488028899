"""Tiny random checkpoints of every MoE family fiddler verifies, built with transformers'
own config and model classes (so Hugging Face is the reference), with a tokenizer.

Each family has at least three MoE layers, so one placement file can put a whole
layer on the GPU, a whole layer on the CPU and split a third (FAMILIES[...].placement).
Routing variants covered: softmax with and without renormalisation, grouped top-k
(DeepSeek-V2), sigmoid with correction bias and routed scaling, grouped (DeepSeek-V3)
and not (GLM-4.5), a custom routing function with the router weight applied to the input
(Llama-4's sigmoid top-1), shared experts with and without a sigmoid gate (Qwen2-MoE),
first dense layers (DeepSeek, GLM), top-k 1, 2 and 4, 8 and 16 experts, gpt-oss's biased
clamped-SwiGLU experts; experts loaded one at a time and every expert at once (Llama-4's
fused checkpoint tensors, gpt-oss's).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

COMMON = dict(vocab_size=512, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
              initializer_range=0.1)


@dataclasses.dataclass(frozen=True)
class Family:
    architecture: str
    make_config: Callable[[], Any]
    moe_layers: tuple[int, ...]  # model layer indices of the MoE layers
    num_experts: int
    env: tuple[tuple[str, str], ...] = ()  # vLLM settings this family needs on the CPU platform
    fp32: bool = True  # vLLM's CPU platform runs it in fp32 (else bf16 only)
    # Router gate weights are scaled by this. Sigmoid scoring squeezes a random model's small
    # logits to 0.5 +- 0.01, where grouped top-k's group sums tie to 1e-6 often enough that
    # fp32 summation order (thread counts) flipped whole expert groups between two stock
    # engines; scaled gates spread the scores over (0, 1).
    gate_scale: float = 1.0
    # Sequences an engine step may hold. DeepSeek runs one at a time on the CPU platform: in
    # vLLM's MHA form of its attention there, a prompt's logprobs depend on which other
    # prompts share its steps, which depends on when each request reached the engine: two
    # stock engines on the same weights differed by up to 0.44 nats at prefill with 16, and
    # agreed exactly with 1 (fiddler within 2e-6 of both, every position).
    max_num_seqs: int = 16

    def placement(self) -> dict:
        """One MoE layer all on the GPU, one all on the CPU, one split, by model layer index."""
        first, second, third = self.moe_layers[:3]
        split = list(range(0, self.num_experts, 3))
        return {"gpu_experts": {str(first): list(range(self.num_experts)), str(second): [],
                                str(third): split}}


def _tf():
    import transformers

    return transformers


# MLA attention has no kernel on vLLM's CPU platform: there DeepSeek runs the same weights
# through vLLM's MHA form of its attention (VLLM_MLA_DISABLE); the MoE layers are the same.
_NO_MLA = (("VLLM_MLA_DISABLE", "1"),)

FAMILIES: dict[str, Family] = {
    "mixtral": Family("MixtralForCausalLM", lambda: _tf().MixtralConfig(
        **COMMON, num_hidden_layers=3, head_dim=32, intermediate_size=192, num_local_experts=8,
        num_experts_per_tok=2), (0, 1, 2), 8),
    "qwen2_moe": Family("Qwen2MoeForCausalLM", lambda: _tf().Qwen2MoeConfig(
        **COMMON, num_hidden_layers=3, intermediate_size=256, moe_intermediate_size=64,
        shared_expert_intermediate_size=96, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
        decoder_sparse_step=1), (0, 1, 2), 8),
    "qwen3_moe": Family("Qwen3MoeForCausalLM", lambda: _tf().Qwen3MoeConfig(
        **COMMON, num_hidden_layers=3, head_dim=32, intermediate_size=256, moe_intermediate_size=96,
        num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1), (0, 1, 2), 16),
    "olmoe": Family("OlmoeForCausalLM", lambda: _tf().OlmoeConfig(
        **COMMON, num_hidden_layers=3, intermediate_size=64, num_experts=8, num_experts_per_tok=2),
        (0, 1, 2), 8),
    "deepseek_v2": Family("DeepseekV2ForCausalLM", lambda: _tf().DeepseekV2Config(
        **COMMON, num_hidden_layers=4, intermediate_size=256, moe_intermediate_size=64, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=4, topk_group=2,
        topk_method="group_limited_greedy", kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16,
        qk_nope_head_dim=16, v_head_dim=32, routed_scaling_factor=1.0), (1, 2, 3), 8, _NO_MLA,
        max_num_seqs=1),
    "deepseek_v3": Family("DeepseekV3ForCausalLM", lambda: _with(_tf().DeepseekV3Config(
        **COMMON, num_hidden_layers=4, intermediate_size=256, moe_intermediate_size=64, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1, n_group=4, topk_group=2,
        kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
        routed_scaling_factor=2.5, norm_topk_prob=True), topk_method="noaux_tc", scoring_func="sigmoid"),
        (1, 2, 3), 16, _NO_MLA, gate_scale=8.0, max_num_seqs=1),
    "glm4_moe": Family("Glm4MoeForCausalLM", lambda: _tf().Glm4MoeConfig(
        **COMMON, num_hidden_layers=4, head_dim=32, intermediate_size=256, moe_intermediate_size=64,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1,
        topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, partial_rotary_factor=0.5),
        (1, 2, 3), 8, gate_scale=8.0),
    "llama4": Family("Llama4ForCausalLM", lambda: _tf().Llama4TextConfig(
        **COMMON, num_hidden_layers=3, head_dim=32, intermediate_size=96, intermediate_size_mlp=192,
        num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=1, attention_chunk_size=128,
        no_rope_layers=[1, 1, 0]), (0, 1, 2), 8),
    "gpt_oss": Family("GptOssForCausalLM", lambda: _tf().GptOssConfig(
        **COMMON, num_hidden_layers=3, head_dim=32, intermediate_size=64, num_local_experts=8,
        num_experts_per_tok=2, sliding_window=128,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
        (0, 1, 2), 8, fp32=False),
}


def _with(config: Any, **attrs: Any) -> Any:
    """Config attributes real checkpoints carry that the transformers class leaves out."""
    for k, v in attrs.items():
        setattr(config, k, v)
    return config


def build_family(name: str, path: str, seed: int = 0) -> str:
    """Writes config, bf16 safetensors and a tokenizer of family `name` to `path` (a no-op when a
    stamp says it is there); returns path. Router correction biases are drawn non-zero, so
    the biased selection is exercised."""
    import torch

    from vllm_fiddler.tiny import build_tokenizer

    family = FAMILIES[name]
    stamp = os.path.join(path, "fiddler-family.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == {"family": name, "seed": seed}:
                return path
    torch.manual_seed(seed)
    config = family.make_config()
    config.architectures = [family.architecture]
    model = getattr(_tf(), family.architecture)(config)
    with torch.no_grad():
        for module_name, buffer in list(model.named_buffers()) + list(model.named_parameters()):
            if module_name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.rand_like(buffer) * 0.2)
            elif module_name.endswith("mlp.gate.weight") and family.gate_scale != 1.0:
                buffer.mul_(family.gate_scale)
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    build_tokenizer(path, config.vocab_size)
    with open(stamp, "w") as f:
        json.dump({"family": name, "seed": seed}, f)
    return path
