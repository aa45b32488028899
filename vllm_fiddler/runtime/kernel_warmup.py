"""Compiles the Triton MoE kernels' variants while the model loads (CUDA).

Each tile config of vllm_fiddler.kernels.triton.fused_moe, picked by a
step's token count, is a separate compilation. vLLM's start-up only runs the
profiling step (max_num_batched_tokens tokens), and decode runs 1-token steps,
so without this the first beam-search or serving step whose token count falls
in a new config stalls while Triton compiles. Triton keeps what it compiled on
disk (~/.triton/cache), so a restart loads it instead.
"""

from __future__ import annotations

import time

import torch

from vllm_fiddler.logger import logger


def warm_up_kernels(layers, stager, max_tokens: int) -> dict:
    """Launches fused_moe once per tile config that steps of 1..max_tokens tokens can pick:
    on each distinct shape of the layers' device-resident experts (the hot path) and on
    the staging slots (copied experts, K*C chunk slots per token as HybridMoE launches
    them). Returns {"configs": launches, "variants": kernel variants held after, "seconds": wall time}."""
    from vllm_fiddler.kernels.triton import compiled_variants, warm_up

    start = time.perf_counter()
    launched = 0
    shapes = set()
    for layer in layers:
        shape = tuple(layer.w13_gpu.shape)
        if shape[0] == 0 or shape in shapes:
            continue
        shapes.add(shape)
        launched += warm_up(layer.w13_gpu, layer.w2_gpu, layer.top_k, max_tokens, layer.math, layer.b13_gpu,
                            layer.b2_gpu)
    if stager is not None and layers:
        launched += warm_up(stager.w13_chunks, stager.w2_chunks, layers[0].top_k * stager.chunks, max_tokens)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    variants = compiled_variants()
    logger.info("fiddler: MoE kernels ready for steps of 1-%d tokens: %d tile configs, %d kernel variants "
                "in %.1f s (compiled now or loaded from Triton's cache)", max_tokens, launched, variants, seconds)
    return {"configs": launched, "variants": variants, "seconds": seconds}
