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
3. Benchmarks only, when ``FIDDLER_DUMMY_ROUTER_SKEW`` is set: the dummy
   loader skews MoE gates after filling them; with ``FIDDLER_FAST_DUMMY_INIT=1``
   it fills large host-resident parameters at copy speed (vllm_fiddler.synthetic).

Porting to a new vLLM: check the two registry methods' signatures,
``MODELS_CONFIG_MAP`` and ``VerifyAndUpdateConfig``, the offload config
fields, and ``tests/test_vllm_compat.py``.
"""

from __future__ import annotations

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
    _select_piecewise_cudagraphs(vllm_config)


def _select_piecewise_cudagraphs(vllm_config: Any) -> None:
    # FULL graphs would capture the hybrid MoE op, freezing its host-side work
    # (routing, CPU experts) at capture time; piecewise graphs leave it eager.
    from vllm.config import CUDAGraphMode

    cc = vllm_config.compilation_config
    if cc.cudagraph_mode is None or cc.cudagraph_mode.has_full_cudagraphs():
        cc.cudagraph_mode = CUDAGraphMode.PIECEWISE


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
    install_dummy_router_skew()  # benchmarks only: FIDDLER_DUMMY_ROUTER_SKEW
    install_fast_host_dummy_init()  # benchmarks only: FIDDLER_FAST_DUMMY_INIT
