"""Measures the cost model's inputs on this machine (CUDA), with a cache file.

What is timed, on the model's real shapes and the runtime's real code paths:
- CPU: one cold expert through the CPU kernel at several token counts;
- PCIe: one expert's weights host->device into a staging slot;
- GPU: one expert through the Triton kernel at several token counts.
The result is saved under ~/.cache/vllm_fiddler keyed by CPU, GPU, shape,
dtype and threads, so later starts skip the ~1 s of measurement.
"""

from __future__ import annotations

import os
import time

import torch

from vllm_fiddler.cpuinfo import cpu_model_name
from vllm_fiddler.logger import logger

CPU_TOKENS = (1, 4, 16, 64, 256)
GPU_TOKENS = (1, 16, 64, 256, 1024)


def machine_key(hidden: int, inter: int, dtype: torch.dtype, threads: int) -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "nogpu"
    raw = f"{cpu_model_name()}|{os.cpu_count()}|{gpu}|H{hidden}|I{inter}|{dtype}|t{threads}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in raw)


def _time_ms(fn, reps: int, sync=None) -> float:
    fn()  # warm-up
    if sync:
        sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if sync:
        sync()
    return (time.perf_counter() - start) * 1e3 / reps


def measure(layer, runtime, stager) -> dict:
    """Raw measurements on a HybridMoE layer with at least one cold expert, through the
    runtime's own paths: whole experts in the host's chunked layout (see HybridMoE)."""
    from vllm_fiddler.kernels.triton import fused_moe
    from vllm_fiddler.runtime.cpu_experts import cpu_moe_forward

    H, I, C = layer.hidden_size, layer.intermediate_size, layer.chunks
    dtype, device = layer.w13_cpu.dtype, layer.device
    n_cold = layer.w13_cpu.shape[0]
    chunk = torch.arange(C, dtype=torch.int32)  # [C]
    cpu_points = []
    for t in CPU_TOKENS:
        x = torch.randn(t, H, device="cpu").to(dtype)
        w = torch.ones(t, C, device="cpu")
        out = torch.zeros(t, H, device="cpu")
        # rotate through the cold experts so DRAM, not the L3, is measured
        it = iter(range(10**9))

        def one():
            e = next(it) % n_cold
            ids = (chunk + e * C).expand(t, C).contiguous()  # [t, C] every chunk of expert e
            cpu_moe_forward(x, layer.w13_cpu_chunks, layer.w2_cpu_chunks, ids, w, out)

        cpu_points.append((t, runtime.time_on_worker(one, reps=3)))
    copy_ms = _time_ms(lambda: stager.release(stager.stage(layer.w13_cpu[0], layer.w2_cpu[0])[0]), 3,
                       torch.cuda.synchronize)
    expert_bytes = 3 * H * I * layer.w13_cpu.element_size()
    gpu_points = []
    for t in GPU_TOKENS:
        x = torch.randn(t, H, device=device).to(dtype)
        ids = chunk.to(device).expand(t, C).contiguous()  # staging slot 0, every chunk
        w = torch.ones(t, C, device=device)
        gpu_points.append((t, _time_ms(lambda: fused_moe(x, stager.w13_chunks, stager.w2_chunks, w, ids), 5,
                                       torch.cuda.synchronize)))
    return {"cpu_points": cpu_points, "h2d_gb_s": expert_bytes / copy_ms / 1e6, "copy_latency_ms": 0.0,
            "gpu_points": gpu_points, "expert_bytes": expert_bytes}


def load_or_measure(layer, runtime, stager, threads: int):
    from vllm_fiddler import cost_model

    key = machine_key(layer.hidden_size, layer.intermediate_size, layer.w13_cpu.dtype, threads) + f"_C{layer.chunks}"
    cached = cost_model.load_cached(key)
    if cached is not None:
        logger.info("fiddler: cost model from cache (%s)", key)
        return cached
    m = measure(layer, runtime, stager)
    model = cost_model.fit_from_measurements(**m)
    cost_model.save_cached(key, model)
    logger.info("fiddler: cost model measured: CPU expert %s ms by tokens, H2D %.1f GB/s, GPU expert %s ms",
                [(t, round(ms, 2)) for t, ms in m["cpu_points"]], m["h2d_gb_s"],
                [(t, round(ms, 3)) for t, ms in m["gpu_points"]])
    return model
