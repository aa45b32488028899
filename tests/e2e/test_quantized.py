"""Quantized checkpoints end to end on vLLM's CPU platform: FP8 block-scaled experts
(Mixtral, Qwen3-MoE), MXFP4 ones with biases (gpt-oss) and INT4 W4A16 groups from
compressed-tensors (Mixtral, Qwen3-MoE) and AutoGPTQ (Qwen3-MoE, as Qwen3-30B-A3B-GPTQ-Int4 ships),
and INT4 groups with zero points from AutoAWQ (Mixtral).

fiddler runs the quantized checkpoint (tests/helpers/quantized.py: experts as DeepSeek-V3,
gpt-oss and llm-compressor write them; FP8 with partial scale blocks, INT4 in groups of 32);
the references are the same model with every expert dequantized: stock vLLM and Hugging Face
(fp32) on it. vLLM runs these checkpoints in bf16, and a quantized value times its scale
(fp32; a power of two for MXFP4; bf16 times a 4-bit integer for INT4) rounds to the same
bf16 number whether fiddler dequantizes it or stock vLLM casts the dequantized checkpoint, so
both engines hold the same weights: the criteria are the bf16 families' (test_families):
greedy tokens equal stock's up to a near tie, and log-probabilities as close to HF as stock's
are. A wrong scale, a gate/up swap, a nibble-order swap, a missing bias or a misplaced expert
moves most positions by tenths of a nat. The placement puts a whole MoE layer on each side
and splits a third.

Bad checkpoints fail while the model is built or loaded, with the reason: a format fiddler
does not load, scales of the wrong shape, layers in different formats.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import test_families
import torch

from helpers.families import FAMILIES, build_family
from helpers.quantized import write_fp8_block, write_int4_awq, write_int4_gptq, write_int4_group, write_mxfp4
from test_families import check_as_close_to_hf_as_stock, check_tokens_close, generate, top_n

pytestmark = pytest.mark.slow


WRITERS = {"fp8": write_fp8_block, "mxfp4": write_mxfp4, "int4": write_int4_group, "gptq": write_int4_gptq,
           "awq": write_int4_awq}
CHECKPOINTS = [("mixtral", "fp8"), ("qwen3_moe", "fp8"), ("gpt_oss", "mxfp4"), ("mixtral", "int4"),
               ("qwen3_moe", "int4"), ("qwen3_moe", "gptq"), ("mixtral", "awq")]


@pytest.fixture(scope="module", params=CHECKPOINTS, ids=[f"{name}-{fmt}" for name, fmt in CHECKPOINTS])
def quantized_family(request, tmp_path_factory):
    """(name, format, quantized checkpoint, dequantized reference, fiddler options)."""
    name, fmt = request.param
    src = build_family(name, str(tmp_path_factory.mktemp(name)))
    quantized, ref = WRITERS[fmt](src, str(tmp_path_factory.mktemp(f"{name}-{fmt}")))
    placement = tmp_path_factory.mktemp(f"{name}-placement") / "placement.json"
    placement.write_text(json.dumps(FAMILIES[name].placement()))
    with pytest.MonkeyPatch.context() as mp:
        if torch.cuda.is_available():  # the GPU runtime's attention backend (no FlashAttention there)
            mp.setattr(test_families, "ENGINE", dict(test_families.ENGINE, attention_backend="TRITON_ATTN"))
        yield name, fmt, quantized, ref, {"placement": str(placement)}


# A near tie, at the first position where the greedy runs part: each run's token among the
# other's NEAR_TIE_TOP. Rounding in a layer's router (vLLM's CPU kernels differ by CPU, AMX
# or not) now and then flips a near-tied expert choice, which moves the position's
# log-probabilities by tenths of a nat (test_families' HF test): measured on gpt-oss MXFP4,
# fiddler's token 0.11 nats under its own top one and ranked below stock's top 5, the same
# with fiddler on the dequantized bf16 checkpoint. The flat top of these tiny models' 512-token
# distributions spans ~0.5 nats over 5 tokens, so 20. Wrong weights move most positions by
# tenths to whole nats, which the HF check (top 5, as test_families') catches.
NEAR_TIE_TOP = 20


def test_quantized_experts_match_stock_on_the_dequantized_weights(quantized_family):
    name, fmt, quantized, ref, options = quantized_family
    ours = generate(quantized, "fiddler", "bfloat16", options, logprobs=NEAR_TIE_TOP)
    stock = generate(ref, "auto", "bfloat16", logprobs=NEAR_TIE_TOP)
    check_tokens_close(ours, stock, f"{name} {fmt}")
    check_as_close_to_hf_as_stock(top_n(ours, 5), top_n(stock, 5), FAMILIES[name], ref, f"{name} {fmt}")


def start_up_error(path: str) -> str:
    """What a fiddler engine on `path` fails with, in a process of its own (an engine that fails
    mid-build in this one would leave torch's default dtype and device changed for later tests)."""
    code = ("import sys\nfrom vllm import LLM\nLLM(model=sys.argv[1], model_impl='fiddler', dtype='bfloat16', "
            "enforce_eager=True, max_model_len=128)")
    proc = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert proc.returncode != 0, "the engine started"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def mixtral_bf16(tmp_path_factory):
    return build_family("mixtral", str(tmp_path_factory.mktemp("mixtral-src")))


def test_per_tensor_fp8_is_refused_at_build(mixtral_bf16, tmp_path):
    fp8, _ = write_fp8_block(mixtral_bf16, str(tmp_path), config_overrides={"weight_block_size": None})
    assert "experts quantized as FP8 with per-tensor scales" in start_up_error(fp8)


def test_scales_of_the_wrong_shape_are_refused_at_load(mixtral_bf16, tmp_path):
    fp8, _ = write_fp8_block(mixtral_bf16, str(tmp_path), scale_rows_off=1)
    error = start_up_error(fp8)
    assert "has shape" in error and ("expects [6, 3]" in error or "expects [4, 4]" in error), error


def test_layers_in_different_formats_are_refused_at_build(mixtral_bf16, tmp_path):
    fp8, _ = write_fp8_block(mixtral_bf16, str(tmp_path), quantize_layers={0, 2})
    assert "experts come in different formats" in start_up_error(fp8)


def test_int8_weights_are_refused_at_build(mixtral_bf16, tmp_path):
    int8, _ = write_int4_group(mixtral_bf16, str(tmp_path), scheme_overrides={"num_bits": 8})
    error = start_up_error(int8)
    assert "experts quantized as compressed-tensors pack-quantized with 8-bit int group symmetric (actorder None) " \
           "weights and no input activations" in error, error


def test_gptq_act_order_is_refused_at_build(mixtral_bf16, tmp_path):
    """fiddler's refusal, or vLLM's own where it refuses act-order for every engine (0.32)."""
    act_order, _ = write_int4_gptq(mixtral_bf16, str(tmp_path), config_overrides={"desc_act": True})
    error = start_up_error(act_order)
    assert ("experts quantized as GPTQ 4-bit symmetric with act-order (desc_act) in groups of 32" in error
            or "activation ordering (desc_act=True) is no longer supported" in error), error


def test_gptq_groups_out_of_order_are_refused_at_load(mixtral_bf16, tmp_path):
    """A checkpoint whose config says no act-order but whose g_idx reorders the groups. vLLM
    releases that drop g_idx at load (0.32: QuantizationConfig.get_checkpoint_weight_mapper)
    ignore it, as a checkpoint without act-order lets them, and so does fiddler there."""
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

    if hasattr(QuantizationConfig, "get_checkpoint_weight_mapper"):
        pytest.skip("this vLLM drops g_idx at load")
    shuffled, _ = write_int4_gptq(mixtral_bf16, str(tmp_path), g_idx_shift=1)
    error = start_up_error(shuffled)
    assert "has a g_idx that is not its" in error and "loads GPTQ checkpoints without act-order" in error, error


# GPTQ, as Qwen3-30B-A3B-GPTQ-Int4 ships; AWQ's zero-point words with fp16 scale bits:
# test_quantized_layer.test_awq_layer_matches_the_oracle
FP16_CHECKPOINTS = [("qwen3_moe", "gptq")]


@pytest.mark.parametrize("name, fmt", FP16_CHECKPOINTS, ids=[f"{n}-{f}" for n, f in FP16_CHECKPOINTS])
def test_fp16_checkpoints_run_on_the_native_kernels(name, fmt, tmp_path, monkeypatch):
    """GPTQ and AWQ checkpoints run in fp16 (vLLM's "auto" dtype for them): host experts take
    the native kernels in fp16 (none falls back to torch's dequantizing path), and the tokens
    and log-probabilities meet the bf16 runs' criteria against stock vLLM in fp16 on the
    dequantized weights."""
    from vllm_fiddler.runtime import cpu_experts

    fallbacks = []
    monkeypatch.setattr(cpu_experts, "_warn_quantized_in_torch", lambda *args: fallbacks.append(args))
    src = build_family(name, str(tmp_path / "src"))
    quantized, ref = WRITERS[fmt](src, str(tmp_path / fmt))
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps(FAMILIES[name].placement()))
    ours = generate(quantized, "fiddler", "float16", {"placement": str(placement)}, logprobs=NEAR_TIE_TOP)
    assert not fallbacks, f"host experts fell back to torch: {fallbacks[0][1].fmt}, x {fallbacks[0][0].dtype}"
    stock = generate(ref, "auto", "float16", logprobs=NEAR_TIE_TOP)
    check_tokens_close(ours, stock, f"{name} {fmt} fp16")
    check_as_close_to_hf_as_stock(top_n(ours, 5), top_n(stock, 5), FAMILIES[name], ref, f"{name} {fmt} fp16")
