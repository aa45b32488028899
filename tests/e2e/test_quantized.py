"""Quantized checkpoints end to end on vLLM's CPU platform: FP8 block-scaled experts
(Mixtral, Qwen3-MoE) and MXFP4 ones (gpt-oss).

fiddler runs the quantized checkpoint (tests/helpers/quantized.py: experts as DeepSeek-V3 and
gpt-oss ship them, FP8 with partial scale blocks); the references are the same model with
every expert dequantized: stock vLLM and Hugging Face (fp32) on it. vLLM runs these
checkpoints in bf16, and a quantized value times its scale (fp32, or a power of two for
MXFP4) rounds to the same bf16 number whether fiddler dequantizes it or stock vLLM casts the
dequantized checkpoint, so both engines hold the same weights: the criteria are the bf16 families' (test_families): greedy tokens equal
stock's up to a near tie, and log-probabilities as close to HF as stock's are. A wrong scale
block, a gate/up swap or a misplaced expert moves most positions by tenths of a nat. The
placement puts a whole MoE layer on each side and splits a third.

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
from helpers.quantized import write_fp8_block, write_int4_group, write_mxfp4
from test_families import check_as_close_to_hf_as_stock, check_tokens_close, generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def fp8_family(request, tmp_path_factory):
    name = request.param
    src = build_family(name, str(tmp_path_factory.mktemp(name)))
    fp8, ref = write_fp8_block(src, str(tmp_path_factory.mktemp(f"{name}-fp8")))
    placement = tmp_path_factory.mktemp(f"{name}-placement") / "placement.json"
    placement.write_text(json.dumps(FAMILIES[name].placement()))
    with pytest.MonkeyPatch.context() as mp:
        if torch.cuda.is_available():  # the GPU runtime's attention backend (no FlashAttention there)
            mp.setattr(test_families, "ENGINE", dict(test_families.ENGINE, attention_backend="TRITON_ATTN"))
        yield name, fp8, ref, {"placement": str(placement)}


def test_fp8_block_experts_match_stock_on_the_dequantized_weights(fp8_family):
    name, fp8, ref, options = fp8_family
    ours = generate(fp8, "fiddler", "bfloat16", options)
    stock = generate(ref, "auto", "bfloat16")
    check_tokens_close(ours, stock, f"{name} fp8")
    check_as_close_to_hf_as_stock(ours, stock, FAMILIES[name], ref, f"{name} fp8")


@pytest.fixture(scope="module")
def gpt_oss_mxfp4(tmp_path_factory):
    src = build_family("gpt_oss", str(tmp_path_factory.mktemp("gpt_oss")))
    mx, ref = write_mxfp4(src, str(tmp_path_factory.mktemp("gpt_oss-mxfp4")))
    placement = tmp_path_factory.mktemp("gpt_oss-placement") / "placement.json"
    placement.write_text(json.dumps(FAMILIES["gpt_oss"].placement()))
    return mx, ref, {"placement": str(placement)}


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def int4_family(request, tmp_path_factory):
    name = request.param
    src = build_family(name, str(tmp_path_factory.mktemp(name)))
    int4, ref = write_int4_group(src, str(tmp_path_factory.mktemp(f"{name}-int4")))
    placement = tmp_path_factory.mktemp(f"{name}-placement") / "placement.json"
    placement.write_text(json.dumps(FAMILIES[name].placement()))
    return name, int4, ref, {"placement": str(placement)}


def test_int4_group_experts_match_stock_on_the_dequantized_weights(int4_family):
    """compressed-tensors' pack-quantized INT4 (groups of 32, bf16 scales): a code times its
    bf16 scale is exact in bf16 (4 bits times 8), so both engines hold the same weights."""
    name, int4, ref, options = int4_family
    ours = generate(int4, "fiddler", "bfloat16", options)
    stock = generate(ref, "auto", "bfloat16")
    check_tokens_close(ours, stock, f"{name} int4")
    check_as_close_to_hf_as_stock(ours, stock, FAMILIES[name], ref, f"{name} int4")


def test_int8_weights_are_refused_at_build(mixtral_bf16, tmp_path):
    int8, _ = write_int4_group(mixtral_bf16, str(tmp_path), scheme_overrides={"num_bits": 8})
    error = start_up_error(int8)
    assert "experts quantized as compressed-tensors pack-quantized with 8-bit int group symmetric (actorder None) " \
           "weights and no input activations" in error, error


def test_mxfp4_experts_with_biases_match_stock_on_the_dequantized_weights(gpt_oss_mxfp4):
    mx, ref, options = gpt_oss_mxfp4
    ours = generate(mx, "fiddler", "bfloat16", options)
    stock = generate(ref, "auto", "bfloat16")
    check_tokens_close(ours, stock, "gpt_oss mxfp4")
    check_as_close_to_hf_as_stock(ours, stock, FAMILIES["gpt_oss"], ref, "gpt_oss mxfp4")


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
