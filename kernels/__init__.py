"""Kernel sources for vllm-fiddler; installed as ``vllm_fiddler.kernels``.

- ``reference``: the fp32 torch oracle every kernel and the hybrid layer are
  tested against.
- ``cpu``: the CPU expert kernel (C++, AVX512-BF16 / AMX) and its torch
  fallback.
- ``triton``: the fused-MoE Triton kernel for GPU-resident experts.
"""
