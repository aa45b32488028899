"""Shared fixtures: a tiny random Mixtral built with transformers, and vLLM settings for 2-core CI."""

from __future__ import annotations

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the folder is not a package); `name` may name a
    subfolder's script, e.g. "investigations/engine_trace"."""
    spec = importlib.util.spec_from_file_location(os.path.basename(name),
                                                  os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# vLLM's CPU platform reserves KV cache from host RAM: keep it small so CI's
# 24 GB machine fits the engines one after another.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory) -> str:
    """bf16 tiny Mixtral: 3 layers, 8 experts, top-2, H=128, I=192, with a tokenizer."""
    from vllm_fiddler.tiny import build_tiny_mixtral

    return build_tiny_mixtral(str(tmp_path_factory.mktemp("tiny-mixtral")))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A config-only Llama checkpoint: an architecture fiddler does not support."""
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1,
                architectures=["LlamaForCausalLM"]).save_pretrained(path)
    return str(path)
