"""Tiny quantized checkpoints in the official layouts, written from a bf16 one (helpers.families).

FP8 block-scaled, as DeepSeek-V3's checkpoints ship: each expert projection ``...weight``
float8_e4m3fn with ``...weight_scale_inv`` float32 per bn x bk block, and config.json's
``quantization_config`` {"quant_method": "fp8", "activation_scheme": "dynamic",
"weight_block_size": [bn, bk]}. Only the routed experts are quantized here: every other
linear layer is listed in ``ignored_layers`` (vLLM's CPU platform has no FP8 linear kernel).

Next to it, the reference: the same model with each expert dequantized (fp32 tensors), which
stock vLLM loads as an unquantized checkpoint.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

EXPERT = re.compile(r"\.experts\.\d+\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")


def write_fp8_block(src: str, dst: str, block: tuple[int, int] = (32, 48), *, quantize_layers=None,
                    scale_rows_off: int = 0, config_overrides: dict | None = None) -> tuple[str, str]:
    """(fp8 checkpoint, dequantized reference) under dst, from the bf16 checkpoint at src.

    quantize_layers: model layer indices whose experts are quantized (default all; others
    are listed as ignored, making a mixed-format checkpoint); scale_rows_off: scales written
    with that many rows too few (a malformed checkpoint)."""
    import torch
    from safetensors.torch import load_file, save_file

    from vllm_fiddler.kernels.quant import dequant_fp8_block, quant_fp8_block

    out, ref = os.path.join(dst, "fp8"), os.path.join(dst, "reference")
    for d in (out, ref):
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(src):
            if not f.endswith(".safetensors") and f != "model.safetensors.index.json":
                shutil.copy(os.path.join(src, f), d)
    tensors = {}
    for f in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
        tensors.update(load_file(f))
    quantized, reference, ignored = {}, {}, []
    for name, w in tensors.items():
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
    save_file(quantized, os.path.join(out, "model.safetensors"))
    save_file(reference, os.path.join(ref, "model.safetensors"))
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block), "ignored_layers": ignored,
                                     **(config_overrides or {})}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return out, ref
