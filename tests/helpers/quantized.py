"""Tiny quantized checkpoints in the official layouts, written from a bf16 one (helpers.families).

FP8 block-scaled, as DeepSeek-V3's checkpoints ship: each expert projection ``...weight``
float8_e4m3fn with ``...weight_scale_inv`` float32 per bn x bk block, and config.json's
``quantization_config`` {"quant_method": "fp8", "activation_scheme": "dynamic",
"weight_block_size": [bn, bk]}. Only the routed experts are quantized here: every other
linear layer is listed in ``ignored_layers`` (vLLM's CPU platform has no FP8 linear kernel).

MXFP4, as gpt-oss ships: each expert projection ``...gate_up_proj_blocks`` uint8 [E, 2I, H/32,
16] (two e2m1 values a byte, low nibble first) with ``...gate_up_proj_scales`` uint8 [E, 2I,
H/32] (an e8m0 exponent per 32 inputs), likewise ``down_proj`` [E, H, I/32, 16]; biases stay
bf16; config.json's ``quantization_config`` {"quant_method": "mxfp4"}.

INT4 groups (W4A16), as llm-compressor writes GPTQ-style checkpoints for vLLM's
``compressed-tensors`` config: each expert projection ``...weight_packed`` int32 [N, K/8] (eight
4-bit values a word, value + 8), ``...weight_scale`` bf16 [N, K/g] and ``...weight_shape`` [N, K];
``quantization_config`` {"quant_method": "compressed-tensors", "format": "pack-quantized", ...}
with one symmetric int4 group scheme for "Linear" and every non-expert linear layer in
``ignore``.

INT4 groups in AutoGPTQ's layout, as Qwen's and TheBloke's GPTQ-Int4 checkpoints ship for
vLLM's ``auto_gptq`` config: each expert projection ``...qweight`` int32 [K/8, N] (eight 4-bit
values a word along K, value + 8), ``...scales`` fp16 [K/g, N], ``...qzeros`` int32 [K/g, N/8]
(every nibble 7: AutoGPTQ stores the symmetric zero point 8 less one) and ``...g_idx`` int32
[K] (i // g: no act-order); ``quantization_config`` {"quant_method": "gptq", "bits": 4, "sym":
true, "desc_act": false, ...}. Only the experts are quantized; vLLM finds which from the
safetensors dtypes. The scales are fp16 values that bf16 holds exactly, so a bf16 engine holds
them unrounded.

INT4 groups with zero points in AutoAWQ's layout (GEMM version), as the community's
Qwen3-MoE and Mixtral AWQ checkpoints ship for vLLM's ``awq`` config: each expert projection
``...qweight`` int32 [K, N/8] and ``...qzeros`` int32 [K/g, N/8] (eight columns a word in
AWQ's nibble order 0 2 4 6 1 3 5 7), ``...scales`` fp16 [K/g, N]; ``quantization_config``
{"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": true, "version": "gemm",
"modules_to_not_convert": [...]} listing every linear layer besides the experts. Scales are
bf16-exact fp16 values, as for GPTQ.

Next to each, the reference: the same model with each expert dequantized (fp32 tensors), which
stock vLLM loads as an unquantized checkpoint.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

EXPERT = re.compile(r"\.experts\.\d+\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")


def _copy_others(src: str, dst: str) -> tuple[str, str]:
    """(quantized, reference) directories under dst, holding src's files other than weights."""
    out, ref = os.path.join(dst, "quantized"), os.path.join(dst, "reference")
    for d in (out, ref):
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(src):
            if not f.endswith(".safetensors") and f != "model.safetensors.index.json":
                shutil.copy(os.path.join(src, f), d)
    return out, ref


def _load_all(src: str) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
        tensors.update(load_file(f))
    return tensors


def _write(out: str, ref: str, quantized: dict, reference: dict, quantization_config: dict) -> None:
    from safetensors.torch import save_file

    save_file(quantized, os.path.join(out, "model.safetensors"))
    save_file(reference, os.path.join(ref, "model.safetensors"))
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = quantization_config
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


def write_mxfp4(src: str, dst: str) -> tuple[str, str]:
    """(MXFP4 checkpoint, dequantized reference) under dst, from gpt-oss's bf16 checkpoint at src
    (gate_up_proj [E, H, 2I], down_proj [E, I, H]: inputs first)."""
    from vllm_fiddler.kernels.quant import dequant_mxfp4, quant_mxfp4

    out, ref = _copy_others(src, dst)
    quantized, reference = {}, {}
    for name, w in _load_all(src).items():
        if re.search(r"\.experts\.(gate_up_proj|down_proj)$", name):
            blocks, scales = quant_mxfp4(w.float().transpose(1, 2))  # [E, N, K/32, 16], [E, N, K/32]
            quantized[name + "_blocks"], quantized[name + "_scales"] = blocks, scales
            reference[name] = dequant_mxfp4(blocks, scales).transpose(1, 2).contiguous()
        else:
            quantized[name] = reference[name] = w
    _write(out, ref, quantized, reference, {"quant_method": "mxfp4"})
    return out, ref


def write_int4_group(src: str, dst: str, group: int = 32, *, scheme_overrides: dict | None = None
                     ) -> tuple[str, str]:
    """(compressed-tensors INT4 checkpoint, dequantized reference) under dst, from the bf16
    checkpoint at src; scheme_overrides change the weights' quantization args in config.json."""
    import torch

    from vllm_fiddler.kernels.quant import dequant_int4_group, quant_int4_group

    out, ref = _copy_others(src, dst)
    quantized, reference, ignored = {}, {}, ["lm_head"]
    for name, w in _load_all(src).items():
        if EXPERT.search(name):
            base = name[:-len("weight")]
            packed, scale = quant_int4_group(w.float(), group)
            scale = scale.to(torch.bfloat16)  # the checkpoint's dtype
            quantized[base + "weight_packed"], quantized[base + "weight_scale"] = packed, scale
            quantized[base + "weight_shape"] = torch.tensor(list(w.shape), dtype=torch.int64)
            reference[name] = dequant_int4_group(packed, scale.float(), w.shape[-1], group)
        else:
            quantized[name] = reference[name] = w
            if name.endswith(".weight") and name.count(".") > 2:  # a linear layer's (norms are ignored anyway)
                ignored.append(name[:-len(".weight")])
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group,
               "dynamic": False, "actorder": None, "observer": "minmax", **(scheme_overrides or {})}
    _write(out, ref, quantized, reference, {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": ignored})
    return out, ref


def write_int4_gptq(src: str, dst: str, group: int = 32, *, config_overrides: dict | None = None,
                    g_idx_shift: int = 0) -> tuple[str, str]:
    """(AutoGPTQ INT4 checkpoint, dequantized reference) under dst, from the bf16 checkpoint at
    src; config_overrides change config.json's quantization_config; g_idx_shift rolls each
    g_idx by that many inputs (an act-order checkpoint mislabelled as in weight order)."""
    import torch

    from vllm_fiddler.kernels.quant import dequant_int4_group, quant_int4_group

    out, ref = _copy_others(src, dst)
    quantized, reference = {}, {}
    for name, w in _load_all(src).items():
        if EXPERT.search(name):
            base = name[:-len("weight")]
            n, k = w.shape
            packed, scale = quant_int4_group(w.float(), group)  # [N, K/8], [N, K/g]
            scale = scale.to(torch.bfloat16).to(torch.float16)  # fp16 as AutoGPTQ writes, bf16-exact
            quantized[base + "qweight"] = packed.t().contiguous()
            quantized[base + "scales"] = scale.t().contiguous()
            quantized[base + "qzeros"] = torch.full((k // group, n // 8), 0x77777777, dtype=torch.int32)
            g_idx = torch.arange(k, dtype=torch.int32) // group
            quantized[base + "g_idx"] = torch.roll(g_idx, g_idx_shift)
            reference[name] = dequant_int4_group(packed, scale.float(), k, group)
        else:
            quantized[name] = reference[name] = w
    _write(out, ref, quantized, reference, {
        "quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq", **(config_overrides or {})})
    return out, ref


def write_int4_awq(src: str, dst: str, group: int = 32, *, config_overrides: dict | None = None
                   ) -> tuple[str, str]:
    """(AutoAWQ INT4 checkpoint, dequantized reference) under dst, from the bf16 checkpoint at src;
    config_overrides change config.json's quantization_config."""
    import torch

    from vllm_fiddler.kernels.quant import awq_pack, dequant_int4_zp, pack_scale_zero, quant_int4_zp, unpack_int4

    out, ref = _copy_others(src, dst)
    quantized, reference, others = {}, {}, ["lm_head"]
    for name, w in _load_all(src).items():
        if EXPERT.search(name):
            base = name[:-len("weight")]
            k = w.shape[1]
            packed, scale, zero = quant_int4_zp(w.float(), group)  # [N, K/8], [N, K/g], [N, K/g]
            scale = scale.to(torch.bfloat16).to(torch.float16)  # fp16 as AutoAWQ writes, bf16-exact
            quantized[base + "qweight"] = awq_pack(unpack_int4(packed, k).t().contiguous())  # [K, N/8]
            quantized[base + "qzeros"] = awq_pack(zero.t().contiguous())  # [K/g, N/8]
            quantized[base + "scales"] = scale.t().contiguous()  # [K/g, N]
            reference[name] = dequant_int4_zp(packed, pack_scale_zero(scale.float(), zero), k, group)
        else:
            quantized[name] = reference[name] = w
            if name.endswith(".weight") and name.count(".") > 2 and ".experts." not in name:
                others.append(name[:-len(".weight")])  # a linear layer's (norms are ignored anyway)
    _write(out, ref, quantized, reference, {
        "quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": others, **(config_overrides or {})})
    return out, ref


def write_fp8_block(src: str, dst: str, block: tuple[int, int] = (32, 48), *, quantize_layers=None,
                    scale_rows_off: int = 0, config_overrides: dict | None = None) -> tuple[str, str]:
    """(fp8 checkpoint, dequantized reference) under dst, from the bf16 checkpoint at src.

    quantize_layers: model layer indices whose experts are quantized (default all; others
    are listed as ignored, making a mixed-format checkpoint); scale_rows_off: scales written
    with that many rows too few (a malformed checkpoint)."""
    from vllm_fiddler.kernels.quant import dequant_fp8_block, quant_fp8_block

    out, ref = _copy_others(src, dst)
    quantized, reference, ignored = {}, {}, []
    for name, w in _load_all(src).items():
        layer = re.search(r"layers\.(\d+)\.", name)
        if EXPERT.search(name) and (quantize_layers is None or int(layer.group(1)) in quantize_layers):
            q, s = quant_fp8_block(w.float(), block)
            quantized[name] = q
            quantized[name + "_scale_inv"] = s[:s.shape[0] - scale_rows_off].contiguous()
            reference[name] = dequant_fp8_block(q, s, block)
        else:
            quantized[name] = reference[name] = w
            if EXPERT.search(name):  # a layer left unquantized: its experts module is ignored
                module = name[:name.rindex(".experts.") + len(".experts")]
                if module not in ignored:
                    ignored.append(module)
            elif name.endswith(".weight"):
                ignored.append(name[:-len(".weight")])
    _write(out, ref, quantized, reference, {"quant_method": "fp8", "activation_scheme": "dynamic",
                                            "weight_block_size": list(block), "ignored_layers": ignored,
                                            **(config_overrides or {})})
    return out, ref
