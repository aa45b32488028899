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
    from vllm import ModelRegistry
    from vllm.model_executor.models.registry import _ModelRegistry

    wrapped = _ModelRegistry.inspect_model_cls
    vllm_fiddler.register()
    vllm_fiddler.register.__wrapped__()  # even bypassing the lru_cache guard
    assert _ModelRegistry.inspect_model_cls is wrapped
    assert "FiddlerMixtralForCausalLM" in ModelRegistry.get_supported_archs()
    assert vllm_fiddler.register.__wrapped__.__module__ == "vllm_fiddler"


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("fiddler") == "vllm_fiddler:register"


@pytest.mark.parametrize("impl, expected", [
    ("fiddler", "FiddlerMixtralForCausalLM"), ("auto", "MixtralForCausalLM"), ("vllm", "MixtralForCausalLM")])
def test_model_impl_selects_class(impl, expected):
    from vllm import ModelRegistry

    mc = types.SimpleNamespace(model_impl=impl, convert_type="none", runner_type="generate",
                               hf_config=None)
    cls, arch = ModelRegistry.resolve_model_cls(["MixtralForCausalLM"], mc)
    assert cls.__name__ == expected
    assert arch == "MixtralForCausalLM"  # the original name, for vLLM's name-keyed logic


def test_fiddler_config_sets_piecewise_graphs(tiny_mixtral):
    from vllm.config import CUDAGraphMode

    for options in ({}, {"full_cuda_graphs": False}):
        cfg = engine_config(tiny_mixtral, model_impl="fiddler", additional_config={"fiddler": options})
        assert cfg.model_config.architecture == "MixtralForCausalLM"
        # on the CPU platform vLLM turns graphs off (FULL ones are kept from the op: test below)
        assert cfg.compilation_config.cudagraph_mode in (CUDAGraphMode.NONE, CUDAGraphMode.PIECEWISE)


@pytest.mark.parametrize("options, asked, chosen", [
    ({}, None, "FULL_AND_PIECEWISE"),  # vLLM's own default, with graph steps
    ({}, "FULL", "FULL_AND_PIECEWISE"),  # FULL prefill graphs would capture planned steps
    ({}, "FULL_DECODE_ONLY", "FULL_DECODE_ONLY"),
    ({}, "PIECEWISE", "PIECEWISE"),
    ({"full_cuda_graphs": False}, None, "PIECEWISE"),
    ({"full_cuda_graphs": False}, "FULL_AND_PIECEWISE", "PIECEWISE"),
    ({"routed_max_tokens": 0}, None, "PIECEWISE"),  # graph steps are routed steps
    ({"wait_on_device": False}, "FULL_DECODE_ONLY", "PIECEWISE"),
])
def test_cudagraph_mode_follows_the_graph_steps_option(options, asked, chosen):
    from vllm.config import CUDAGraphMode

    from vllm_fiddler.config import FiddlerConfig
    from vllm_fiddler.vllm_hooks import _select_cudagraph_mode

    cc = types.SimpleNamespace(cudagraph_mode=getattr(CUDAGraphMode, asked) if asked else None)
    _select_cudagraph_mode(types.SimpleNamespace(compilation_config=cc),
                           FiddlerConfig.from_additional_config({"fiddler": options}))
    assert cc.cudagraph_mode == getattr(CUDAGraphMode, chosen)


def test_full_cudagraphs_kept_only_for_graph_step_sizes():
    """vLLM's dispatcher keys: FULL graphs of the sizes the model's graph steps serve, none when it
    has none; piecewise keys untouched (those sizes dispatch to them instead)."""
    from vllm.config import CUDAGraphMode
    from vllm.forward_context import BatchDescriptor

    from vllm_fiddler.runtime import graph_jobs
    from vllm_fiddler.vllm_hooks import _limit_full_cudagraphs

    def keys():
        return {CUDAGraphMode.FULL: {BatchDescriptor(n, num_reqs=n, uniform=True) for n in (1, 2, 4, 8, 16)},
                CUDAGraphMode.PIECEWISE: {BatchDescriptor(n) for n in (1, 2, 4, 8, 16)}}

    before = graph_jobs.full_graph_max_tokens()
    try:
        for limit, kept in ((4, [1, 2, 4]), (0, []), (16, [1, 2, 4, 8, 16])):
            graph_jobs.set_full_graph_max_tokens(limit)
            k = keys()
            _limit_full_cudagraphs(k)
            assert sorted(d.num_tokens for d in k[CUDAGraphMode.FULL]) == kept
            assert len(k[CUDAGraphMode.PIECEWISE]) == 5
    finally:
        graph_jobs.set_full_graph_max_tokens(before)


def test_dispatcher_key_limit_installed_once():
    from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher

    from vllm_fiddler.vllm_hooks import _install_full_cudagraph_limit

    patched = CudagraphDispatcher.initialize_cudagraph_keys
    assert getattr(patched, "_fiddler_patched", False)  # register() installed it
    _install_full_cudagraph_limit()
    assert CudagraphDispatcher.initialize_cudagraph_keys is patched


def test_other_impls_untouched(tiny_mixtral):
    cfg = engine_config(tiny_mixtral, model_impl="auto", cpu_offload_gb=1,
                        additional_config={"fiddler": {"bogus": 1}})
    assert cfg.model_config.model_impl == "auto"  # fiddler's checks do not apply
    assert cfg.scheduler_config.scheduler_cls is None


def test_fiddler_gets_the_coalescing_scheduler_unless_told_otherwise(tiny_mixtral):
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_fiddler.vllm_hooks import COALESCING_SCHEDULER, _coalescing

    cfg = engine_config(tiny_mixtral, model_impl="fiddler")
    assert cfg.scheduler_config.scheduler_cls == COALESCING_SCHEDULER
    cls = cfg.scheduler_config.get_scheduler_cls()  # resolves the name, as the engine core does
    assert cls.__name__ == "CoalescingScheduler"
    # the subclass keeps vLLM's base, async or not
    assert issubclass(_coalescing(AsyncScheduler), AsyncScheduler)
    assert issubclass(_coalescing(Scheduler), Scheduler) and not issubclass(_coalescing(Scheduler), AsyncScheduler)
    # the scheduler surface the subclass relies on (vllm_hooks' porting notes)
    from vllm.v1.core.sched.interface import PauseState

    assert PauseState.PAUSED_NEW in PauseState
    for name in ("add_request", "schedule", "set_pause_state", "pause_state"):
        assert hasattr(Scheduler, name), name
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


def test_unsupported_architecture(tiny_llama):
    with pytest.raises(Exception) as e:
        engine_config(tiny_llama, model_impl="fiddler")
    assert "does not support architecture(s) ['LlamaForCausalLM']" in str(e.value)
    assert "MixtralForCausalLM" in str(e.value)
    # and without fiddler the same model resolves as usual
    assert engine_config(tiny_llama, model_impl="auto").model_config.architecture == "LlamaForCausalLM"
