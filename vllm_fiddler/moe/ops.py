"""The hybrid MoE layer as opaque custom ops: ``torch.ops.vllm_fiddler.moe`` / ``moe_shared``.

A fiddler model's MoERunners call these instead of vLLM's ``moe_forward`` /
``moe_forward_shared`` (compat.set_runner_entry). They run the same layer
body (vLLM's ``_forward_impl``: gate, shared experts, routing, our method's
``apply``) but write into outputs the caller allocated (``mutates_args``), as
vLLM's attention does: vLLM splits its piecewise CUDA graphs at them
(SPLITTING_OPS), the next piece reads the output where it was at capture,
and the op's host-side work (the CPU experts) runs every step. Under a FULL
graph capture the op is captured whole; the hybrid layer then records a
graph step (vllm_fiddler.runtime.graph_jobs).
"""

from __future__ import annotations

import threading

import torch
from torch.library import Library

from vllm_fiddler import compat

NAMESPACE = "vllm_fiddler"
SPLITTING_OPS = (f"{NAMESPACE}::moe", f"{NAMESPACE}::moe_shared")

_lib = Library(NAMESPACE, "FRAGMENT")
_registered = False
_local = threading.local()


def take_output(x: torch.Tensor) -> torch.Tensor:
    """The routed experts' output buffer [T, H] for this op (the caller's, when the method
    runs inside it with a matching shape), else a new one."""
    out = getattr(_local, "out", None)
    _local.out = None
    if out is not None and out.shape == x.shape and out.dtype == x.dtype:
        return out
    return torch.empty_like(x)


def _run(runner, hidden_states, router_logits, shared_experts_input, input_ids, out):
    _local.out = out
    try:
        result = compat.runner_forward_impl(runner, hidden_states, router_logits, shared_experts_input,
                                            input_ids)
    finally:
        _local.out = None
    return result


def _moe(hidden_states: torch.Tensor, router_logits: torch.Tensor, input_ids: torch.Tensor | None,
         out: torch.Tensor, layer_name: str) -> None:
    fused = _run(compat.layer_by_name(layer_name), hidden_states, router_logits, None, input_ids, out)
    if fused.data_ptr() != out.data_ptr():
        out.copy_(fused)


def _moe_shared(hidden_states: torch.Tensor, router_logits: torch.Tensor, shared_experts_input: torch.Tensor,
                input_ids: torch.Tensor | None, out: torch.Tensor, shared_out: torch.Tensor,
                layer_name: str) -> None:
    shared, fused = _run(compat.layer_by_name(layer_name), hidden_states, router_logits, shared_experts_input,
                         input_ids, out)
    if fused.data_ptr() != out.data_ptr():
        out.copy_(fused)
    shared_out.copy_(shared)


def _moe_fake(hidden_states, router_logits, input_ids, out, layer_name) -> None:
    return None


def _moe_shared_fake(hidden_states, router_logits, shared_experts_input, input_ids, out, shared_out,
                     layer_name) -> None:
    return None


def register_ops() -> None:
    global _registered
    if _registered:
        return
    compat.register_custom_op(_lib, "moe", _moe, ["out"], _moe_fake)
    compat.register_custom_op(_lib, "moe_shared", _moe_shared, ["out", "shared_out"], _moe_shared_fake)
    _registered = True


def make_entry(runner):
    """The runner's replacement for vLLM's moe_forward op (compat.set_runner_entry): same
    inputs and results, through our ops with outputs allocated here."""
    name = runner.layer_name
    if compat.runner_has_shared_experts(runner):
        def entry(hidden_states, router_logits, shared_experts_input, input_ids, _layer_name, _unpadded):
            out = torch.empty_like(hidden_states)
            shared_out = torch.empty_like(shared_experts_input)
            torch.ops.vllm_fiddler.moe_shared(hidden_states, router_logits, shared_experts_input, input_ids,
                                              out, shared_out, name)
            return shared_out, out
    else:
        def entry(hidden_states, router_logits, shared_experts_input, input_ids, _layer_name, _unpadded):
            out = torch.empty_like(hidden_states)
            torch.ops.vllm_fiddler.moe(hidden_states, router_logits, input_ids, out, name)
            return out
    return entry
