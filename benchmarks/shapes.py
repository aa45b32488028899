"""Real MoE shapes as Hugging Face configs, for ``--load-format dummy`` benchmarks.

No weights are written: vLLM fills them (and fiddler its experts) with random
values. ``layers`` trims a model where host memory or time demands it; every
per-layer shape stays the real one, and results say how many layers ran.
"""

from __future__ import annotations

import os


def _mixtral_8x7b(layers):
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_local_experts=8,
                         num_experts_per_tok=2, max_position_embeddings=32768, rope_theta=1e6,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def _qwen3_30b_a3b(layers):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                          max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
                          tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645)


def _deepseek_v3(layers):
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=layers, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
        n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4,
        num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=163840,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    config.topk_method, config.scoring_func = "noaux_tc", "sigmoid"  # as the checkpoint's config.json
    return config


def _gpt_oss_120b(layers):
    from transformers import GptOssConfig

    return GptOssConfig(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=layers,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=128, num_experts_per_tok=4,
        sliding_window=128, layer_types=["sliding_attention", "full_attention"] * (layers // 2) + (
            ["sliding_attention"] if layers % 2 else []),
        max_position_embeddings=131072, rope_theta=150000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                      "truncate": False, "original_max_position_embeddings": 4096},
        bos_token_id=199998, eos_token_id=200002)


SHAPES = {"mixtral-8x7b": (_mixtral_8x7b, 32, "MixtralForCausalLM"),
          "qwen3-30b-a3b": (_qwen3_30b_a3b, 48, "Qwen3MoeForCausalLM"),
          "deepseek-v3": (_deepseek_v3, 61, "DeepseekV3ForCausalLM"),
          "gpt-oss-120b": (_gpt_oss_120b, 36, "GptOssForCausalLM")}

# shapes whose only checkpoints are quantized: their experts' format (moe.quantized.ExpertFormat)
NATIVE_FORMAT = {"gpt-oss-120b": ("mxfp4", (1, 32))}
MXFP4_QUANTIZATION = {"quant_method": "mxfp4"}  # gpt-oss's config.json


def attention_backend(name: str) -> str:
    """vLLM's Triton attention for the shape (the GPU runtime has no FlashAttention): MLA for DeepSeek."""
    return "TRITON_MLA" if SHAPES[name][2] == "DeepseekV3ForCausalLM" else "TRITON_ATTN"


def config(name: str, layers: int | None = None):
    make, full, arch = SHAPES[name]
    cfg = make(layers or full)
    cfg.architectures = [arch]
    cfg.torch_dtype = "bfloat16"
    return cfg


# what the official FP8 checkpoints' config.json says (DeepSeek-V3/R1, Qwen3-FP8)
FP8_BLOCK_QUANTIZATION = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def expert_format(name: str, fp8: bool = False) -> tuple[str, tuple[int, int]] | None:
    """The experts' quantized format of the shape as built: FP8 128x128 (fp8), its checkpoints'
    only format (gpt-oss: MXFP4), or None (bf16)."""
    return ("fp8_block", (128, 128)) if fp8 else NATIVE_FORMAT.get(name)


def build(name: str, path: str, layers: int | None = None, fp8: bool = False) -> str:
    """Config + tokenizer of shape `name` in `path` (fp8: every linear layer and expert FP8 with
    128x128 block scales, as the official FP8 checkpoints; gpt-oss: MXFP4 experts, as its
    checkpoints ship); returns path."""
    from vllm_fiddler.tiny import build_tokenizer

    cfg = config(name, layers)
    if fp8:
        cfg.quantization_config = dict(FP8_BLOCK_QUANTIZATION)
    elif name in NATIVE_FORMAT:
        cfg.quantization_config = dict(MXFP4_QUANTIZATION)
    os.makedirs(path, exist_ok=True)
    cfg.save_pretrained(path)
    build_tokenizer(path, cfg.vocab_size)
    return path
