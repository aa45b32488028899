"""A skewed synthetic router for benchmarks on random (``--load-format dummy``) weights.

Random weights route almost uniformly, which hides what placement and
adaptation can do; real MoE routers are skewed. With
``FIDDLER_DUMMY_ROUTER_SKEW=<strength>`` in the environment, every process
that registers the plugin scales each MoE gate's rows after vLLM's dummy
loader has filled them, for fiddler and stock models alike (the hook is on
the dummy loader, not on fiddler's model), so every system of a benchmark
sees the same routing statistics.

Row r of a layer's gate (r-th most popular expert, a per-layer permutation
seeded by the layer index) is scaled by strength ** (-r / (E - 1)): logits
of popular experts have a larger spread, so they win the top-k more often.
Measured on Gaussian hidden states (200k tokens, E = 8, top-2), share of
routed (token, expert) pairs by popularity rank:
  strength  3: 17.3 16.1 14.7 13.3 11.7 10.3  8.8  7.7 %
  strength 30: 22.3 20.5 17.4 13.8 10.0  7.0  5.0  3.9 %  (uniform: 12.5 each)
Only weights change, never code paths, so compiled graphs see it too.

Also here, for the same benchmarks: ``FIDDLER_FAST_DUMMY_INIT=1`` fills
host-resident parameters of a dummy model at copy speed. vLLM's dummy loader
draws each parameter with a generator on the parameter's device; on the host
that generator is serial (~35 MB/s for bf16 on the H100 box), so stock vLLM's
prefetch offloader, whose offloaded weights live in host memory, took 489 s
to fill 8 Mixtral layers. The fast fill tiles one pool of uniform values (the
loader's own range) per parameter, rotated by a seed from its size, as
fiddler's own dummy experts do (HybridMoE.init_random). Device parameters and
UVA ones (host memory behind a CUDA pointer) keep vLLM's fill.
"""

from __future__ import annotations

import random
import re

from vllm_fiddler import envs

SKEW_ENV = "FIDDLER_DUMMY_ROUTER_SKEW"
FAST_INIT_ENV = "FIDDLER_FAST_DUMMY_INIT"
# host parameters at least this big are tiled from a pool (smaller ones keep vLLM's draw)
FAST_INIT_MIN_NUMEL = 1 << 22
FAST_INIT_POOL = 1 << 22
# a MoE block's router gate, as vLLM's models name it (Mixtral, Qwen, DeepSeek, GLM, OLMoE; gpt-oss)
_GATE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:block_sparse_moe|mlp)\.(?:gate|router)$")


def skew_strength() -> float | None:
    raw = (envs.FIDDLER_DUMMY_ROUTER_SKEW or "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{SKEW_ENV} must be a number >= 1, got {raw!r}") from None
    if not value >= 1.0:
        raise ValueError(f"{SKEW_ENV} must be a number >= 1, got {raw!r}")
    return value


def gate_row_scales(num_experts: int, layer: int, strength: float) -> list[float]:
    """[E] multipliers of one layer's gate rows: expert perm[r] gets strength ** (-r / (E - 1))."""
    perm = list(range(num_experts))
    random.Random(1000 + layer).shuffle(perm)
    scales = [1.0] * num_experts
    for rank, expert in enumerate(perm):
        scales[expert] = strength ** (-rank / max(1, num_experts - 1))
    return scales


def skew_router(model, strength: float) -> int:
    """Scales every MoE gate of `model` in place; returns how many gates it scaled."""
    import torch

    n = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            m = _GATE.search(name)
            weight = getattr(module, "weight", None)
            if m is None or weight is None or weight.dim() != 2:
                continue
            scales = torch.tensor(gate_row_scales(weight.shape[0], int(m.group(1)), strength),
                                  dtype=weight.dtype, device=weight.device)
            weight.mul_(scales[:, None])
            n += 1
    return n


def install_dummy_router_skew() -> None:
    """Wraps vLLM's dummy loader when SKEW_ENV is set (idempotent)."""
    strength = skew_strength()
    if strength is None:
        return
    from vllm_fiddler import compat

    def after(model) -> None:
        from vllm_fiddler.logger import logger

        n = skew_router(model, strength)
        logger.warning("fiddler: %s=%g: %d MoE gates skewed (synthetic router, benchmarks only)",
                       SKEW_ENV, strength, n)

    compat.patch_dummy_load(after)


def fill_tiled_uniform(param, low: float, high: float, seed: int, pool_size: int = FAST_INIT_POOL) -> None:
    """param <- uniform(low, high) values, one drawn pool of `pool_size` tiled (rotated by seed)."""
    import torch

    flat = param.data.view(-1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    pool = torch.empty(pool_size, dtype=torch.float32).uniform_(low, high, generator=gen).to(param.dtype)
    shift = (seed * 104729 + flat.numel()) % pool_size
    pool = torch.cat([pool[shift:], pool[:shift]])
    whole = flat.numel() // pool_size * pool_size
    if whole:
        flat[:whole].view(-1, pool_size).copy_(pool.expand(whole // pool_size, pool_size))
    flat[whole:].copy_(pool[:flat.numel() - whole])


def install_fast_host_dummy_init() -> None:
    """Wraps vLLM's per-parameter dummy fill when FAST_INIT_ENV=1 (idempotent)."""
    if not envs.FIDDLER_FAST_DUMMY_INIT:
        return
    import torch

    from vllm_fiddler import compat

    def fill(param, low: float, high: float, seed: int) -> bool:
        if (param.device.type == "cpu" and torch.is_floating_point(param) and param.is_contiguous()
                and param.numel() >= FAST_INIT_MIN_NUMEL and torch.finfo(param.dtype).bits >= 16):
            with torch.no_grad():
                fill_tiled_uniform(param, low, high, seed)
            return True
        return False

    compat.patch_dummy_fill(fill)
