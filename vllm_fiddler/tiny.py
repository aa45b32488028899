"""A tiny random Mixtral checkpoint in Hugging Face format, with a tokenizer.

No machine here can download weights: the demo and the tests build this
model with transformers' own ``MixtralForCausalLM`` (so Hugging Face is the
reference) and a small word-level tokenizer with a chat template.
"""

from __future__ import annotations

import json
import os

TINY_WORDS = (
    "the a an of to in and is was for on with as by at from that this it he she they we you "
    "model expert token gpu cpu memory weight fast slow layer router copy compute hello world "
    "one two three four five six seven eight nine ten red green blue cat dog sun moon sky sea "
    "time day night year good bad big small new old first last long short high low up down"
).split()

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def build_tokenizer(path: str, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    words = specials + list(TINY_WORDS)
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    vocab = {w: i for i, w in enumerate(words[:vocab_size])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def tiny_mixtral_config(**overrides):
    from transformers import MixtralConfig

    kw = dict(
        vocab_size=512, hidden_size=128, intermediate_size=192, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        initializer_range=0.1,
    )
    kw.update(overrides)
    return MixtralConfig(**kw)


def build_tiny_mixtral(path: str, *, seed: int = 0, dtype: str = "bfloat16", **overrides) -> str:
    """Writes config, safetensors weights and tokenizer to ``path``; returns it.

    initializer_range 0.1 (transformers' default is 0.02) gives logits with
    clear margins, so greedy tokens do not hinge on last-bit rounding.
    A stamp file makes a second call with the same arguments a no-op.
    """
    import torch
    from transformers import MixtralForCausalLM

    stamp = os.path.join(path, "fiddler-tiny.json")
    args = {"seed": seed, "dtype": dtype, **overrides}
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == args:
                return path
    torch.manual_seed(seed)
    config = tiny_mixtral_config(**overrides)
    model = MixtralForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer(path, config.vocab_size)
    with open(stamp, "w") as f:
        json.dump(args, f)
    return path


def build_mixtral_8x7b_shapes(path: str, num_layers: int = 32) -> str:
    """Config + tokenizer with Mixtral-8x7B's real shapes, for ``--load-format dummy``.

    No weights are written: vLLM fills them (and fiddler its experts) with
    random values. `num_layers` < 32 trims the model where host memory or
    time demands it; every per-layer shape stays the real one.
    """
    config = tiny_mixtral_config(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=num_layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=32768, rope_theta=1e6,
        initializer_range=0.02, torch_dtype="bfloat16")
    config.architectures = ["MixtralForCausalLM"]
    config.save_pretrained(path)
    build_tokenizer(path, config.vocab_size)
    return path
