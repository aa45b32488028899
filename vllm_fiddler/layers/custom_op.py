"""The hybrid MoE as one opaque custom op: ``torch.ops.vllm_fiddler.hybrid_moe``.

torch.compile sees a single node with a fake implementation; vLLM splits its
piecewise CUDA graphs at it (``SPLITTING_OP``), so the op's host-side work
(routing, the CPU experts) runs eagerly every step while the rest of the
model keeps its graphs. The output is caller-allocated (``mutates_args``),
as vLLM's attention does, so graph pieces keep stable addresses.
"""

from __future__ import annotations

import torch
from torch.library import Library

OP_NAMESPACE = "vllm_fiddler"
OP_NAME = "hybrid_moe"
SPLITTING_OP = f"{OP_NAMESPACE}::{OP_NAME}"

_lib = Library(OP_NAMESPACE, "FRAGMENT")
_registered = False


def _hybrid_moe(hidden_states: torch.Tensor, router_logits: torch.Tensor, out: torch.Tensor,
                layer_name: str) -> None:
    from vllm.forward_context import get_forward_context

    layer = get_forward_context().no_compile_layers[layer_name]
    layer.experts.forward_into(hidden_states, router_logits, out)


def _hybrid_moe_fake(hidden_states: torch.Tensor, router_logits: torch.Tensor, out: torch.Tensor,
                     layer_name: str) -> None:
    return None


def register_op() -> None:
    global _registered
    if _registered:
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(OP_NAME, _hybrid_moe, mutates_args=["out"],
                              fake_impl=_hybrid_moe_fake, target_lib=_lib)
    _registered = True
