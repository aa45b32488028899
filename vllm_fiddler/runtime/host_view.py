"""A CUDA tensor that reads pinned host memory in place (zero-copy, over PCIe).

Routed decode steps (HybridMoE._forward_routed_graphs, graph steps) let the GPU compute the first
chunks of each cold expert straight from the host copy while the CPU computes
the rest: no staging copy, no host decision, nothing to wait for on the host.
Kernels reading such a view pull the bytes over PCIe as they need them, the
way stock vLLM's UVA offload (`--cpu-offload-gb`) runs its experts.

How: pinned memory is mapped into the device's address space (unified virtual
addressing); the driver gives the device address (cuPointerGetAttribute), and
torch wraps it through ``__cuda_array_interface__`` without owning it. The
view must not outlive the host tensor: callers keep both.
"""

from __future__ import annotations

import torch

from vllm_fiddler.runtime.device_wait import _Driver


class _Interface:
    """The minimum of __cuda_array_interface__ torch.as_tensor needs (v3)."""

    def __init__(self, pointer: int, shape: tuple[int, ...], strides_bytes: tuple[int, ...], typestr: str):
        self.__cuda_array_interface__ = {"data": (pointer, False), "shape": shape, "strides": strides_bytes,
                                         "typestr": typestr, "version": 3}


_INT_VIEW = {2: (torch.int16, "<i2"), 4: (torch.int32, "<i4")}  # bf16/fp16, fp32 viewed as ints


def device_view(pinned: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor over `pinned`'s memory (same shape, strides and dtype); the caller keeps
    `pinned` alive as long as the view."""
    if pinned.device.type != "cpu" or not pinned.is_pinned():
        raise ValueError("device_view needs a pinned host tensor")
    if pinned.element_size() not in _INT_VIEW:
        raise ValueError(f"device_view: unsupported dtype {pinned.dtype}")
    int_dtype, typestr = _INT_VIEW[pinned.element_size()]
    pointer = _Driver().device_pointer(pinned.data_ptr())
    size = pinned.element_size()
    interface = _Interface(pointer, tuple(pinned.shape), tuple(s * size for s in pinned.stride()), typestr)
    view = torch.as_tensor(interface, device="cuda")
    assert view.dtype == int_dtype and view.data_ptr() == pointer
    return view.view(pinned.dtype)
