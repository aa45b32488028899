"""Everything fiddler changes in vLLM, in one place (vLLM 0.26).

1. Model registry: the fiddler classes are registered under their own names,
   and ``inspect_model_cls``/``resolve_model_cls`` map a supported architecture
   to its fiddler class only when ``model_impl == "fiddler"``. Every other
   ``model_impl`` sees vLLM unchanged. The original architecture name is
   returned, so vLLM's name-keyed logic (tokenizer defaults, config hooks)
   keeps working.
2. A config hook (vLLM's per-architecture ``MODELS_CONFIG_MAP``), run in the
   frontend while ``VllmConfig`` is built, before any weight is allocated:
   it validates fiddler's options and the vLLM options fiddler cannot work
   with, and selects piecewise CUDA graphs (the hybrid MoE op does host work,
   so it must run outside graphs while the rest of the model keeps them).
3. The scheduler: unless the user names one (``--scheduler-cls``), a fiddler
   run gets ``CoalescingScheduler``, vLLM's own Scheduler or AsyncScheduler
   (as vLLM chose) with one change: an idle engine holds its first step
   while a burst of requests is still arriving (vllm_fiddler.arrivals), by
   vLLM's own pause state ``PAUSED_NEW`` for that one ``schedule()`` call.
4. Benchmarks only, when ``FIDDLER_DUMMY_ROUTER_SKEW`` is set: the dummy
   loader skews MoE gates after filling them; with ``FIDDLER_FAST_DUMMY_INIT=1``
   it fills large host-resident parameters at copy speed (vllm_fiddler.synthetic).

Porting to a new vLLM: check the two registry methods' signatures,
``MODELS_CONFIG_MAP`` and ``VerifyAndUpdateConfig``, the offload config
fields, the scheduler's ``add_request``/``schedule``/``running``/``waiting``/
``skipped_waiting`` and ``PauseState``, and ``tests/test_vllm_integration.py``.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from vllm_fiddler import MODEL_IMPL, SUPPORTED_ARCHITECTURES

_REGISTRY_METHODS = ("inspect_model_cls", "resolve_model_cls")


class UnsupportedArchitectureError(ValueError):
    pass


def uses_fiddler(model_config: Any) -> bool:
    return getattr(model_config, "model_impl", None) == MODEL_IMPL


def remap_architectures(architectures: str | list[str], model_config: Any) -> tuple[list[str], dict[str, str]]:
    """Architectures to resolve, and fiddler name -> original name.

    Identity unless model_impl is fiddler; then every supported architecture
    is swapped for its fiddler class, and none supported is an error.
    """
    archs = [architectures] if isinstance(architectures, str) else list(architectures)
    if not uses_fiddler(model_config):
        return archs, {}
    supported = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
    if not supported:
        raise UnsupportedArchitectureError(
            f"--model-impl fiddler does not support architecture(s) {archs}; "
            f"supported: {sorted(SUPPORTED_ARCHITECTURES)}. Use another --model-impl "
            f"(e.g. auto) for this model.")
    back = {SUPPORTED_ARCHITECTURES[a][0]: a for a in supported}
    return [SUPPORTED_ARCHITECTURES[a][0] for a in supported], back


def _install_registry() -> None:
    from vllm import ModelRegistry
    from vllm.model_executor.models.registry import _ModelRegistry

    for name, target in SUPPORTED_ARCHITECTURES.values():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, target)
    if getattr(_ModelRegistry, "_fiddler_patched", False):
        return
    for method in _REGISTRY_METHODS:
        original = getattr(_ModelRegistry, method)

        def wrapped(self, architectures, model_config, _original=original):
            archs, back = remap_architectures(architectures, model_config)
            resolved, arch = _original(self, archs, model_config)
            return resolved, back.get(arch, arch)

        wrapped.__name__ = method
        wrapped.__wrapped__ = original
        setattr(_ModelRegistry, method, wrapped)
    _ModelRegistry._fiddler_patched = True


def check_vllm_config(vllm_config: Any) -> None:
    """Frontend-time checks and settings for a fiddler run (raises ValueError)."""
    from vllm_fiddler.config import PLACEMENT_EVEN, FiddlerConfig
    from vllm_fiddler.placement import load_placement_file

    cfg = FiddlerConfig.from_additional_config(vllm_config.additional_config)
    if cfg.placement != PLACEMENT_EVEN:  # fail now, not after the engine has started
        hf = vllm_config.model_config.hf_config
        load_placement_file(cfg.placement, hf.num_hidden_layers, hf.num_local_experts)
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
    if vllm_config.quant_config is not None or vllm_config.model_config.quantization:
        raise ValueError("--model-impl fiddler supports unquantised (bf16/fp16/fp32) experts only; "
                         "remove --quantization.")
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1 \
            or parallel.data_parallel_size > 1 or parallel.enable_expert_parallel or parallel.enable_eplb:
        raise ValueError("--model-impl fiddler runs on one GPU for now: remove tensor/pipeline/data/"
                         "expert parallelism and EPLB options.")
    if vllm_config.lora_config is not None:
        raise ValueError("--model-impl fiddler does not support LoRA yet; remove --enable-lora.")
    _select_cudagraph_mode(vllm_config, cfg)
    _select_coalescing_scheduler(vllm_config, cfg)


COALESCING_SCHEDULER = "vllm_fiddler.vllm_hooks.CoalescingScheduler"


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
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler
        from vllm.v1.core.sched.scheduler import Scheduler

        base = AsyncScheduler if vllm_config.scheduler_config.async_scheduling else Scheduler
        return _coalescing(base)(*args, vllm_config=vllm_config, **kwargs)


@functools.cache
def _coalescing(base: type) -> type:
    from vllm.v1.core.sched.interface import PauseState

    from vllm_fiddler import arrivals
    from vllm_fiddler.config import FiddlerConfig
    from vllm_fiddler.logger import logger

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
            idle_with_waiting = not self.running and bool(self.waiting or self.skipped_waiting) \
                and self.pause_state == PauseState.UNPAUSED
            if not self.arrivals.hold(time.time(), idle_with_waiting):
                return super().schedule(*args, **kwargs)
            self.set_pause_state(PauseState.PAUSED_NEW)  # this step admits no waiting request
            try:
                return super().schedule(*args, **kwargs)
            finally:
                self.set_pause_state(PauseState.UNPAUSED)

    Coalescing.__name__ = Coalescing.__qualname__ = f"Coalescing{base.__name__}"
    return Coalescing


def _select_cudagraph_mode(vllm_config: Any, cfg: Any) -> None:
    # FULL graphs capture the hybrid MoE op, freezing its host-side work (routing,
    # planning, CPU experts) at capture time. Steps of up to routed_max_tokens tokens
    # can run inside them as graph steps (runtime.graph_jobs): the worker keeps FULL
    # decode graphs of those sizes only (_limit_full_cudagraphs), piecewise graphs,
    # with the op between their pieces, serve the rest. Otherwise piecewise only.
    from vllm.config import CUDAGraphMode

    cc = vllm_config.compilation_config
    if cfg.full_cuda_graphs and cfg.routed_max_tokens and cfg.wait_on_device:
        if cc.cudagraph_mode is None or cc.cudagraph_mode == CUDAGraphMode.FULL:
            cc.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
    elif cc.cudagraph_mode is None or cc.cudagraph_mode.has_full_cudagraphs():
        cc.cudagraph_mode = CUDAGraphMode.PIECEWISE


def _install_full_cudagraph_limit() -> None:
    """The worker's CUDA graph keys: FULL graphs only of token counts that graph steps serve
    (graph_jobs.full_graph_max_tokens, set by the model once its graph steps work; 0: none),
    so every other size dispatches to a piecewise graph or runs eagerly."""
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

    original = CudagraphDispatcher.initialize_cudagraph_keys
    if getattr(original, "_fiddler_patched", False):
        return

    def initialize_cudagraph_keys(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if uses_fiddler(self.vllm_config.model_config):
            _limit_full_cudagraphs(self.cudagraph_keys)

    initialize_cudagraph_keys._fiddler_patched = True
    CudagraphDispatcher.initialize_cudagraph_keys = initialize_cudagraph_keys


def _limit_full_cudagraphs(keys: dict) -> None:
    from vllm.config import CUDAGraphMode

    from vllm_fiddler.logger import logger
    from vllm_fiddler.runtime.graph_jobs import full_graph_max_tokens

    limit = full_graph_max_tokens()
    full = keys.get(CUDAGraphMode.FULL, set())
    dropped = {d for d in full if d.num_tokens > limit}
    full -= dropped
    if full:
        logger.info("fiddler: vLLM's FULL CUDA graphs serve steps of %s tokens (graph steps); %d larger "
                    "sizes run piecewise", sorted({d.num_tokens for d in full}), len(dropped))
    elif dropped:
        logger.info("fiddler: no FULL CUDA graphs (the MoE op's graph steps are off here); piecewise only")


def _install_config_hook() -> None:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    for arch in SUPPORTED_ARCHITECTURES:
        previous = MODELS_CONFIG_MAP.get(arch)
        if getattr(previous, "_fiddler_hook", False):
            continue

        class FiddlerConfigHook(VerifyAndUpdateConfig):
            _fiddler_hook = True
            _previous = previous

            @classmethod
            def verify_and_update_config(cls, vllm_config: Any) -> None:
                if cls._previous is not None:
                    cls._previous.verify_and_update_config(vllm_config)
                if uses_fiddler(vllm_config.model_config):
                    check_vllm_config(vllm_config)

            @classmethod
            def verify_and_update_model_config(cls, model_config: Any) -> None:
                if cls._previous is not None:
                    cls._previous.verify_and_update_model_config(model_config)

        MODELS_CONFIG_MAP[arch] = FiddlerConfigHook


def install() -> None:
    from vllm_fiddler.synthetic import install_dummy_router_skew, install_fast_host_dummy_init

    _install_registry()
    _install_config_hook()
    _install_full_cudagraph_limit()
    install_dummy_router_skew()  # benchmarks only: FIDDLER_DUMMY_ROUTER_SKEW
    install_fast_host_dummy_init()  # benchmarks only: FIDDLER_FAST_DUMMY_INIT
