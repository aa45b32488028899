"""Start-up decisions that need the device: the expert budget and placement.

Runs in the worker while the model is built, before any expert is allocated,
so an impossible budget fails here, not after allocating tens of GB.
"""

from __future__ import annotations

import torch

from vllm_fiddler import compat
from vllm_fiddler.config import FiddlerConfig, FiddlerConfigError
from vllm_fiddler.preflight import host_backing_fits, run_preflight
from vllm_fiddler.placement import (
    GIB,
    MoEShape,
    Placement,
    auto_expert_budget_bytes,
    default_kv_reserve_bytes,
    resolve_placement,
)

from vllm_fiddler.logger import logger


def expert_budget_bytes(cfg: FiddlerConfig, shape: MoEShape, *, device_total_bytes: int | None,
                        gpu_memory_utilization: float, max_model_len: int) -> tuple[int, str]:
    """The GPU expert budget and how it was chosen.

    device_total_bytes is None on a platform without device memory (vLLM's
    CPU platform): there the auto budget keeps half of the experts in the
    device set, so both code paths run.
    """
    if cfg.kv_cache_reserve_gb is not None:
        kv_reserve = int(cfg.kv_cache_reserve_gb * GIB)
    else:
        kv_reserve = default_kv_reserve_bytes(shape, max_model_len)
    available = None
    if device_total_bytes is not None:
        available = auto_expert_budget_bytes(
            gpu_total_bytes=device_total_bytes, gpu_memory_utilization=gpu_memory_utilization,
            non_expert_bytes=shape.non_expert_bytes, kv_reserve_bytes=kv_reserve)
        if available < 0:
            raise FiddlerConfigError(
                f"gpu_memory_utilization={gpu_memory_utilization} gives vLLM "
                f"{device_total_bytes * gpu_memory_utilization / GIB:.2f} GiB, less than the "
                f"non-expert weights ({shape.non_expert_bytes / GIB:.2f} GiB) plus the KV-cache "
                f"reserve ({kv_reserve / GIB:.2f} GiB): raise gpu_memory_utilization, or lower "
                f"kv_cache_reserve_gb / max_model_len")
    if cfg.gpu_expert_budget_gb is not None:
        budget = int(cfg.gpu_expert_budget_gb * GIB)
        if available is not None and budget > available:
            raise FiddlerConfigError(
                f"gpu_expert_budget_gb={cfg.gpu_expert_budget_gb} does not fit: "
                f"gpu_memory_utilization={gpu_memory_utilization} leaves {available / GIB:.2f} GiB "
                f"after non-expert weights ({shape.non_expert_bytes / GIB:.2f} GiB) and the "
                f"KV-cache reserve ({kv_reserve / GIB:.2f} GiB)")
        return budget, "gpu_expert_budget_gb"
    if available is None:
        return shape.all_experts_bytes // 2, "auto (CPU platform: half of the experts)"
    return available, "auto"


def resolve_model_placement(cfg: FiddlerConfig, shape: MoEShape, vllm_config) -> tuple[Placement, int, bool]:
    """(placement, staging slots, online re-placement on). Staging slots come out of the expert
    budget; re-placement needs a host copy of every expert (host backing)."""
    on_cuda = torch.get_default_device().type == "cuda"
    total = torch.cuda.mem_get_info()[1] if on_cuda else None
    budget, how = expert_budget_bytes(
        cfg, shape, device_total_bytes=total,
        gpu_memory_utilization=vllm_config.cache_config.gpu_memory_utilization,
        max_model_len=vllm_config.model_config.max_model_len)
    staging = 0
    if on_cuda and cfg.staging_slots and shape.expert_format is None:  # copies move bf16 experts
        staging = min(cfg.staging_slots, max(0, budget) // shape.expert_bytes)
    placement, source = resolve_placement(cfg, shape, budget - staging * shape.expert_bytes)
    if placement.num_cpu == 0:
        staging = 0  # nothing to copy
    adapt, why = decide_adaptation(cfg, shape, placement, on_cuda)
    rank, ranks = compat.tensor_parallel()
    # under tensor parallelism each rank holds a 1/ranks shard of every expert (shape.expert_bytes)
    # within its own GPU's budget, and says so
    shard = f"tensor-parallel rank {rank} of {ranks}, 1/{ranks} of each expert; " if ranks > 1 else ""
    logger.info("%s", placement.report(
        shape.expert_bytes, f"{shard}{source}; budget {how}; {staging} staging slots for copied experts; "
                            f"online re-placement {'on' if adapt else 'off'} ({why})", shape.layer_ids))
    for warning in run_preflight(shape, placement, device_is_host=not on_cuda, host_backing=adapt):
        logger.warning("%s", warning)
    return placement, staging, adapt


def decide_adaptation(cfg: FiddlerConfig, shape: MoEShape, placement: Placement, on_cuda: bool) -> tuple[bool, str]:
    """Whether online re-placement runs, and why (for the placement log line)."""
    wanted = cfg.adaptation.enabled
    if wanted is False:
        return False, "adaptation: false"
    if placement.num_gpu == 0 or placement.num_cpu == 0:
        return False, "every expert on one side: nothing to swap"
    if shape.expert_format is not None:
        if wanted:
            raise FiddlerConfigError("fiddler: adaptation.enabled is true, but online re-placement copies bf16 "
                                     f"experts and these are {shape.expert_format.describe()}; leave it unset")
        return False, "quantized experts: re-placement copies bf16 experts only"
    if wanted:
        return True, "adaptation on"
    if not on_cuda:
        return False, "auto: no GPU"
    if not host_backing_fits(shape, placement, device_is_host=False):
        return False, ("auto: host memory cannot also hold a copy of the GPU-resident experts "
                       f"({placement.num_gpu * shape.expert_bytes / GIB:.1f} GiB)")
    return True, "auto"
