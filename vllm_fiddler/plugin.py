"""What fiddler changes in vLLM, and when (the hooks themselves live in vllm_fiddler.compat).

1. Model resolution: with ``model_impl == "fiddler"`` the worker builds vLLM's
   own class for the architecture, wrapped by ``fiddler_model_class`` (one
   wrapper for every model). Every other ``model_impl`` sees vLLM unchanged.
2. FusedMoE layers built inside such a model get ``FiddlerMoEMethod``
   (vllm_fiddler.moe.method).
3. A config check, run in the frontend while ``VllmConfig`` is built, before
   any weight is allocated: fiddler's options, the model (it must have routed
   experts), and the vLLM options fiddler cannot work with. It also selects
   the CUDA-graph mode (below) and the scheduler.
4. CUDA graphs: the hybrid MoE op does host work, so vLLM's piecewise graphs
   split at it; vLLM's FULL decode graphs are kept only for the step sizes
   the op's graph steps serve (vllm_fiddler.runtime.graph_jobs).
5. The scheduler: unless the user names one (``--scheduler-cls``), a fiddler
   run gets ``CoalescingScheduler``, vLLM's own Scheduler or AsyncScheduler
   (as vLLM chose) with one change: an idle engine holds its first step
   while a burst of requests is still arriving (vllm_fiddler.arrivals).
"""

from __future__ import annotations

import functools
import time
from typing import Any

from vllm_fiddler import MODEL_IMPL, VERIFIED_ARCHITECTURES, compat


def uses_fiddler(model_config: Any) -> bool:
    return getattr(model_config, "model_impl", None) == MODEL_IMPL


def _wrap_model_class(cls: type, model_config: Any) -> type:
    if not uses_fiddler(model_config):
        return cls
    from vllm_fiddler.moe.model import fiddler_model_class

    return fiddler_model_class(cls)


def check_vllm_config(vllm_config: Any) -> None:
    """Frontend-time checks and settings for a fiddler run (raises ValueError)."""
    if not uses_fiddler(vllm_config.model_config):
        return
    from vllm_fiddler.config import PLACEMENT_EVEN, FiddlerConfig, FiddlerConfigError
    from vllm_fiddler.logger import logger
    from vllm_fiddler.placement import load_placement_file, moe_layout

    cfg = FiddlerConfig.from_additional_config(vllm_config.additional_config)
    model_config = vllm_config.model_config
    hf = compat.text_hf_config(model_config)
    arch = model_config.architecture
    layout = moe_layout(hf)
    if layout is None:
        raise FiddlerConfigError(
            f"--model-impl fiddler: {arch} has no routed experts (its config names no expert count): it "
            "is a dense model, which fits no better offloading experts; use --model-impl auto")
    if arch not in VERIFIED_ARCHITECTURES:
        logger.warning("fiddler: %s is not among the verified families (%s); its MoE layers run through "
                       "the same checks, and any feature the hybrid layer does not compute stops the start",
                       arch, ", ".join(sorted(VERIFIED_ARCHITECTURES)))
    if cfg.placement != PLACEMENT_EVEN:  # fail now, not after the engine has started
        layer_ids, num_experts, _ = layout
        load_placement_file(cfg.placement, layer_ids, num_experts)
    problems = []
    offload = getattr(vllm_config, "offload_config", None)
    if offload is not None:
        if offload.uva.cpu_offload_gb > 0:
            problems.append("--cpu-offload-gb")
        if offload.uva.cpu_offload_params:
            problems.append("--cpu-offload-params")
        if offload.prefetch.offload_group_size > 0:
            problems.append("--offload-group-size (prefetch offload)")
    if problems:
        raise ValueError(
            f"--model-impl fiddler manages expert placement itself; remove {', '.join(problems)} "
            f"(vLLM's weight offload would fight fiddler over the same weights). Set the GPU "
            f"expert budget with --additional-config '{{\"fiddler\": {{\"gpu_expert_budget_gb\": N}}}}'.")
    quantization = model_config.quantization or getattr(vllm_config.quant_config, "get_name", lambda: None)()
    if quantization is not None and quantization not in compat.LOADED_QUANTIZATIONS:
        raise ValueError(f"--model-impl fiddler loads unquantized experts and FP8 block-scaled, MXFP4 and INT4 ones "
                         f"(vLLM's {', '.join(compat.LOADED_QUANTIZATIONS)} configs) so far; this model is "
                         f"quantized as {quantization}.")
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1 or parallel.data_parallel_size > 1 or parallel.enable_expert_parallel \
            or parallel.enable_eplb:
        raise ValueError("--model-impl fiddler runs with tensor parallelism or on one GPU: remove pipeline, "
                         "data and expert parallelism and EPLB options.")
    if vllm_config.lora_config is not None:
        raise ValueError("--model-impl fiddler does not support LoRA yet; remove --enable-lora.")
    _select_cudagraph_mode(vllm_config)
    _select_coalescing_scheduler(vllm_config, cfg)


COALESCING_SCHEDULER = "vllm_fiddler.plugin.CoalescingScheduler"


def _select_coalescing_scheduler(vllm_config: Any, cfg: Any) -> None:
    sched = vllm_config.scheduler_config
    if cfg.arrival_coalesce_ms > 0 and sched.scheduler_cls is None:
        sched.scheduler_cls = COALESCING_SCHEDULER


class CoalescingScheduler:
    """vLLM's Scheduler, or its AsyncScheduler when async scheduling is on,
    whose idle engine waits for requests still arriving (vllm_fiddler.arrivals).

    A class by name, so ``--scheduler-cls`` can name it; it builds the subclass
    of the base vLLM chose for this engine, decided after fiddler's config
    hook has run.
    """

    def __new__(cls, *args: Any, vllm_config: Any, **kwargs: Any):
        base = compat.scheduler_base(vllm_config.scheduler_config.async_scheduling)
        return _coalescing(base)(*args, vllm_config=vllm_config, **kwargs)


@functools.cache
def _coalescing(base: type) -> type:
    from vllm_fiddler import arrivals
    from vllm_fiddler.config import FiddlerConfig
    from vllm_fiddler.logger import logger

    PauseState = compat.pause_state()

    class Coalescing(base):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            cfg = FiddlerConfig.from_additional_config(self.vllm_config.additional_config)
            self.arrivals = arrivals.ArrivalCoalescer(cfg.arrival_coalesce_ms / 1e3)
            arrivals.last_coalescer = self.arrivals  # read by stats.model_stats
            logger.info("fiddler: %s on vLLM's %s: an idle engine waits up to %.1f ms for requests that arrive "
                        "together, once arrivals have come in bursts (arrival_coalesce_ms; vLLM's warning about "
                        "custom scheduler classes refers to this one)",
                        type(self).__name__, base.__name__, cfg.arrival_coalesce_ms)

        def add_request(self, request: Any) -> None:
            super().add_request(request)
            before = self.arrivals.stragglers
            self.arrivals.on_add(request.arrival_time, time.time())
            if before == 0 and self.arrivals.stragglers == 1:
                logger.info("fiddler: a request arrived just after an idle engine's step began; idle steps now "
                            "wait for requests arriving together (up to %.1f ms)", 1e3 * self.arrivals.max_hold_s)

        def schedule(self, *args: Any, **kwargs: Any) -> Any:
            idle_with_waiting = not self.running and compat.waiting_requests(self) \
                and self.pause_state == PauseState.UNPAUSED
            if not self.arrivals.hold(time.time(), idle_with_waiting):
                return super().schedule(*args, **kwargs)
            compat.hold_new_requests(self, True)  # this step admits no waiting request
            try:
                return super().schedule(*args, **kwargs)
            finally:
                compat.hold_new_requests(self, False)

    Coalescing.__name__ = Coalescing.__qualname__ = f"Coalescing{base.__name__}"
    return Coalescing


def _select_cudagraph_mode(vllm_config: Any) -> None:
    # FULL graphs capture the hybrid MoE op, freezing its host-side work (planning, CPU
    # experts) at capture time. Steps of up to ROUTED_MAX_TOKENS tokens run inside them as
    # graph steps (runtime.graph_jobs): the worker keeps FULL decode graphs of those sizes
    # only (_limit_full_cudagraphs); piecewise graphs, with the op between their pieces,
    # serve the rest.
    CUDAGraphMode = compat.cudagraph_mode()
    cc = vllm_config.compilation_config
    if compat.uses_model_runner_v2(vllm_config):
        # Model Runner V2 (vLLM's default on CUDA from 0.32) dispatches its graphs without the
        # dispatcher whose FULL sizes fiddler limits: a FULL graph of a larger step would freeze
        # the op's host-side work at capture. Piecewise graphs keep the op between their pieces.
        if cc.cudagraph_mode is None or cc.cudagraph_mode.has_full_cudagraphs():
            from vllm_fiddler.logger import logger

            logger.warning("fiddler: vLLM's Model Runner V2 is in use; fiddler's graph steps need the V1 "
                           "runner's FULL decode graphs, so CUDA graphs are piecewise only here (slower "
                           "batch-1 decode). VLLM_USE_V2_MODEL_RUNNER=0 keeps graph steps.")
            cc.cudagraph_mode = CUDAGraphMode.PIECEWISE
        return
    if cc.cudagraph_mode is None or cc.cudagraph_mode == CUDAGraphMode.FULL:
        cc.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE


def _limit_full_cudagraphs(vllm_config: Any, keys: dict) -> None:
    """The worker's CUDA graph keys: FULL graphs only of token counts that graph steps serve
    (graph_jobs.full_graph_max_tokens, set by the model once its graph steps work; 0: none),
    so every other size dispatches to a piecewise graph or runs eagerly."""
    if not uses_fiddler(vllm_config.model_config):
        return
    from vllm_fiddler.logger import logger
    from vllm_fiddler.runtime.graph_jobs import full_graph_max_tokens

    limit = full_graph_max_tokens()
    full = keys.get(compat.cudagraph_mode().FULL, set())
    dropped = {d for d in full if d.num_tokens > limit}
    full -= dropped
    if full:
        logger.info("fiddler: vLLM's FULL CUDA graphs serve steps of %s tokens (graph steps); %d larger "
                    "sizes run piecewise", sorted({d.num_tokens for d in full}), len(dropped))
    elif dropped:
        logger.info("fiddler: no FULL CUDA graphs (the MoE op's graph steps are off here); piecewise only")


def _choose_method(*args: Any) -> Any:
    from vllm_fiddler.moe.method import choose_method  # imported in the worker, when models are built

    return choose_method(*args)


def install() -> None:
    compat.patch_model_resolution(_wrap_model_class)
    compat.patch_quant_method_selection(_choose_method)
    compat.patch_config_verification(check_vllm_config)
    compat.patch_cudagraph_keys(_limit_full_cudagraphs)
