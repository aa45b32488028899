"""Triton fused-MoE kernel for GPU-resident experts (see ``fused_moe.py``).

Public API, loaded lazily: importing this package imports neither triton nor
torch; the first attribute access does (and nothing is compiled until the
first launch).

- ``fused_moe(x, w13, w2, topk_weights, topk_ids, out=None, config=None, math=SILU, b13=None, b2=None)``:
  dense experts, or ``kernels.quant.QuantizedExperts`` (FP8 block-scaled, MXFP4, INT4 groups)
  read as stored
- ``get_config(T, Eg, H, I, K, dtype, device_name)``; ``config_kind(w13, dtype)``: the tables'
  dtype field (a quantized format's name for quantized experts)
- ``moe_align_block_size(topk_ids, block_m, num_experts)`` (and ``..._torch``, its torch twin)
- ``tile_configs(max_tokens, ...)`` / ``warm_up(w13, w2, top_k, max_tokens)``: compile every
  tile config a workload can hit, before serving
- ``default_config``, ``config_file_name``, ``device_name_for_config``, ``CONFIG_DIR``
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "fused_moe", "get_config", "config_kind", "moe_align_block_size", "moe_align_block_size_torch", "default_config",
    "fit_shared_memory", "tile_configs", "warm_up", "compiled_variants",
    "config_file_name", "device_name_for_config", "CONFIG_DIR",
]

if TYPE_CHECKING:  # for type checkers and IDEs only
    from .fused_moe import (CONFIG_DIR, config_file_name, config_kind, default_config, fit_shared_memory,  # noqa: F401
                            device_name_for_config, fused_moe, get_config, moe_align_block_size,
                            moe_align_block_size_torch, tile_configs, warm_up,
                            compiled_variants)


def __getattr__(name: str) -> Any:
    if name in __all__:
        module = importlib.import_module(".fused_moe", __name__)
        # Importing the submodule binds this package's attribute `fused_moe` to
        # the MODULE; rebind every public name, so that `fused_moe` is the
        # function. (The module itself: importlib.import_module(
        # "vllm_fiddler.kernels.triton.fused_moe").)
        for public in __all__:
            globals()[public] = getattr(module, public)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
