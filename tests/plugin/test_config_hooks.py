"""Registration and start-up validation through vLLM's own config path (no engine started).

Each bad input must fail while vLLM builds its config, in the frontend,
before any weight is allocated, with a message naming the problem.
"""

from __future__ import annotations

import json
import types

import pytest

import vllm_fiddler


@pytest.fixture(scope="module", autouse=True)
def registered():
    vllm_fiddler.register()


def engine_config(model, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model, **kwargs).create_engine_config()


def test_register_is_idempotent_and_lazy():
    from vllm.config import VllmConfig
    from vllm.model_executor.models.registry import _ModelRegistry

    wrapped = _ModelRegistry.resolve_model_cls, VllmConfig.try_verify_and_update_config
    vllm_fiddler.register()
    vllm_fiddler.register.__wrapped__()  # even bypassing the lru_cache guard
    assert (_ModelRegistry.resolve_model_cls, VllmConfig.try_verify_and_update_config) == wrapped
    assert vllm_fiddler.register.__wrapped__.__module__ == "vllm_fiddler"


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("fiddler") == "vllm_fiddler:register"


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM",
                                  "GptOssForCausalLM", "LlamaForCausalLM"])
@pytest.mark.parametrize("impl", ["fiddler", "auto", "vllm"])
def test_model_impl_selects_class(impl, arch):
    """fiddler wraps vLLM's own class of any architecture (one wrapper, no class per model);
    other impls get vLLM's class untouched; the architecture name stays vLLM's."""
    from vllm import ModelRegistry

    from vllm_fiddler.moe.model import FiddlerModel

    mc = types.SimpleNamespace(model_impl=impl, convert_type="none", runner_type="generate",
                               hf_config=None)
    cls, resolved = ModelRegistry.resolve_model_cls([arch], mc)
    assert resolved == arch  # the original name, for vLLM's name-keyed logic
    base = cls.__mro__[2] if impl == "fiddler" else cls
    assert base.__name__ == arch
    assert issubclass(cls, FiddlerModel) == (impl == "fiddler")
    if impl == "fiddler":
        assert ModelRegistry.resolve_model_cls([arch], mc)[0] is cls  # one class per base


@pytest.mark.parametrize("asked, chosen", [
    (None, "FULL_AND_PIECEWISE"),  # vLLM's own default, with graph steps
    ("FULL", "FULL_AND_PIECEWISE"),  # FULL prefill graphs would capture planned steps
    ("FULL_DECODE_ONLY", "FULL_DECODE_ONLY"),
    ("PIECEWISE", "PIECEWISE"),
    ("NONE", "NONE"),
])
def test_cudagraph_mode(asked, chosen):
    from vllm.config import CUDAGraphMode

    from vllm_fiddler.plugin import _select_cudagraph_mode

    cc = types.SimpleNamespace(cudagraph_mode=getattr(CUDAGraphMode, asked) if asked else None)
    _select_cudagraph_mode(types.SimpleNamespace(compilation_config=cc))
    assert cc.cudagraph_mode == getattr(CUDAGraphMode, chosen)


@pytest.mark.parametrize("asked, chosen", [
    (None, "PIECEWISE"), ("FULL", "PIECEWISE"), ("FULL_AND_PIECEWISE", "PIECEWISE"),
    ("FULL_DECODE_ONLY", "PIECEWISE"), ("PIECEWISE", "PIECEWISE"), ("NONE", "NONE"),
])
def test_cudagraph_mode_on_model_runner_v2(asked, chosen, caplog):
    """Model Runner V2 has no dispatcher to limit FULL graphs to graph-step sizes: any FULL
    mode falls back to piecewise, with a warning that names the way back."""
    import logging

    from vllm.config import CUDAGraphMode

    from vllm_fiddler.plugin import _select_cudagraph_mode

    cc = types.SimpleNamespace(cudagraph_mode=getattr(CUDAGraphMode, asked) if asked else None)
    with caplog.at_level(logging.WARNING):
        _select_cudagraph_mode(types.SimpleNamespace(compilation_config=cc, use_v2_model_runner=True))
    assert cc.cudagraph_mode == getattr(CUDAGraphMode, chosen)
    warned = "VLLM_USE_V2_MODEL_RUNNER=0" in caplog.text
    assert warned == (asked != chosen or asked is None)


def test_full_cudagraphs_kept_only_for_graph_step_sizes():
    """vLLM's dispatcher keys: FULL graphs of the sizes the model's graph steps serve, none when it
    has none; piecewise keys untouched (those sizes dispatch to them instead)."""
    from vllm.config import CUDAGraphMode
    from vllm.forward_context import BatchDescriptor

    from vllm_fiddler.runtime import graph_jobs
    from vllm_fiddler.plugin import _limit_full_cudagraphs

    def keys():
        return {CUDAGraphMode.FULL: {BatchDescriptor(n, num_reqs=n, uniform=True) for n in (1, 2, 4, 8, 16)},
                CUDAGraphMode.PIECEWISE: {BatchDescriptor(n) for n in (1, 2, 4, 8, 16)}}

    before = graph_jobs.full_graph_max_tokens()
    try:
        for limit, kept in ((4, [1, 2, 4]), (0, []), (16, [1, 2, 4, 8, 16])):
            graph_jobs.set_full_graph_max_tokens(limit)
            k = keys()
            _limit_full_cudagraphs(types.SimpleNamespace(model_config=types.SimpleNamespace(model_impl="fiddler")), k)
            assert sorted(d.num_tokens for d in k[CUDAGraphMode.FULL]) == kept
            assert len(k[CUDAGraphMode.PIECEWISE]) == 5
    finally:
        graph_jobs.set_full_graph_max_tokens(before)


def test_dispatcher_key_limit_installed_once():
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

    from vllm_fiddler import compat
    from vllm_fiddler.plugin import _limit_full_cudagraphs

    patched = CudagraphDispatcher.initialize_cudagraph_keys
    assert getattr(patched, "_fiddler_patched", False)  # register() installed it
    compat.patch_cudagraph_keys(_limit_full_cudagraphs)
    assert CudagraphDispatcher.initialize_cudagraph_keys is patched


def test_other_impls_untouched(tiny_mixtral):
    cfg = engine_config(tiny_mixtral, model_impl="auto", cpu_offload_gb=1,
                        additional_config={"fiddler": {"bogus": 1}})
    assert cfg.model_config.model_impl == "auto"  # fiddler's checks do not apply
    assert cfg.scheduler_config.scheduler_cls is None


def test_fiddler_gets_the_coalescing_scheduler_unless_told_otherwise(tiny_mixtral):
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_fiddler.plugin import COALESCING_SCHEDULER, _coalescing

    cfg = engine_config(tiny_mixtral, model_impl="fiddler")
    assert cfg.scheduler_config.scheduler_cls == COALESCING_SCHEDULER
    cls = cfg.scheduler_config.get_scheduler_cls()  # resolves the name, as the engine core does
    assert cls.__name__ == "CoalescingScheduler"
    # the subclass keeps vLLM's base, async or not
    assert issubclass(_coalescing(AsyncScheduler), AsyncScheduler)
    assert issubclass(_coalescing(Scheduler), Scheduler) and not issubclass(_coalescing(Scheduler), AsyncScheduler)
    # the scheduler surface the subclass relies on (vllm_fiddler.compat)
    from vllm.v1.core.sched.interface import PauseState

    assert PauseState.PAUSED_NEW in PauseState
    for name in ("add_request", "schedule", "pause_state"):
        assert hasattr(Scheduler, name), name
    bare = Scheduler.__new__(Scheduler)  # the state the hold sets is the one vLLM's scheduler reads
    from vllm_fiddler import compat

    compat.hold_new_requests(bare, True)
    assert bare.pause_state == PauseState.PAUSED_NEW
    compat.hold_new_requests(bare, False)
    assert bare.pause_state == PauseState.UNPAUSED
    off = engine_config(tiny_mixtral, model_impl="fiddler", additional_config={"fiddler": {"arrival_coalesce_ms": 0}})
    assert off.scheduler_config.scheduler_cls is None
    mine = "vllm.v1.core.sched.scheduler.Scheduler"
    assert engine_config(tiny_mixtral, model_impl="fiddler", scheduler_cls=mine).scheduler_config.scheduler_cls == mine


@pytest.mark.parametrize("kwargs, words", [
    ({"additional_config": {"fiddler": {"bogus": 1}}}, ["unknown fiddler option", "bogus"]),
    ({"additional_config": {"fiddler": {"gpu_expert_budget_gb": -2}}}, ["gpu_expert_budget_gb", ">= 0"]),
    ({"additional_config": {"fiddler": {"cpu_threads": 0}}}, ["cpu_threads"]),
    ({"cpu_offload_gb": 2}, ["--cpu-offload-gb", "remove"]),
    ({"offload_group_size": 2}, ["prefetch offload"]),
])
def test_bad_input_fails_at_config_time(tiny_mixtral, kwargs, words):
    with pytest.raises(Exception) as e:
        engine_config(tiny_mixtral, model_impl="fiddler", **kwargs)
    for w in words:
        assert w in str(e.value)


def test_placement_file_naming_missing_expert(tiny_mixtral, tmp_path):
    f = tmp_path / "placement.json"
    f.write_text(json.dumps({"gpu_experts": {"1": [2, 9]}}))  # the tiny model has experts 0..7
    with pytest.raises(Exception) as e:
        engine_config(tiny_mixtral, model_impl="fiddler",
                      additional_config={"fiddler": {"placement": str(f)}})
    assert "layer 1 names expert 9, which does not exist" in str(e.value)


def test_dense_model_fails_at_config_time(tiny_llama):
    with pytest.raises(Exception) as e:
        engine_config(tiny_llama, model_impl="fiddler")
    assert "LlamaForCausalLM has no routed experts" in str(e.value)
    assert "dense model" in str(e.value) and "--model-impl auto" in str(e.value)
    # and without fiddler the same model resolves as usual
    assert engine_config(tiny_llama, model_impl="auto").model_config.architecture == "LlamaForCausalLM"


def test_placement_file_names_a_dense_layer(tmp_path):
    """DeepSeek's first layers are dense: a placement file keyed by model layer index may not
    name them (checked in the frontend from the config's first_k_dense_replace)."""
    from helpers.families import build_family

    model = build_family("deepseek_v3", str(tmp_path / "model"))
    f = tmp_path / "placement.json"
    f.write_text(json.dumps({"gpu_experts": {"0": [1]}}))
    with pytest.raises(Exception) as e:
        engine_config(model, model_impl="fiddler", additional_config={"fiddler": {"placement": str(f)}})
    assert "layer 0 is not an MoE layer of this model (its MoE layers: 1-3)" in str(e.value)


def test_parallelism_fiddler_does_not_split_fails_at_config_time(tiny_mixtral):
    """Tensor parallelism is taken (each rank holds a shard of every expert); pipeline, data and
    expert parallelism are refused before anything is allocated."""
    for kwargs, words in (({"pipeline_parallel_size": 2}, "pipeline"), ({"enable_expert_parallel": True}, "expert")):
        with pytest.raises(Exception) as e:
            engine_config(tiny_mixtral, model_impl="fiddler", **kwargs)
        assert words in str(e.value) and "tensor parallelism" in str(e.value)
