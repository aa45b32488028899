"""Pre-flight checks and the worker-side budget: impossible setups fail before allocation."""

import types

import pytest

from vllm_fiddler.config import FiddlerConfig, FiddlerConfigError
from vllm_fiddler.placement import GIB, MoEShape, plan_even
from vllm_fiddler.preflight import check_host_memory, cpu_isa_warning, host_bytes_needed
from vllm_fiddler.runtime.setup import expert_budget_bytes

MIXTRAL = MoEShape.from_hf_config(types.SimpleNamespace(
    hidden_size=4096, num_hidden_layers=32, num_local_experts=8, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, vocab_size=32000, intermediate_size=14336,
    num_experts_per_tok=2, tie_word_embeddings=False), dtype_bytes=2)


def test_cold_experts_must_fit_host_memory():
    placement = plan_even(32, 8, 56)  # ~a 24 GB GPU's share: 200 experts on the host
    needed = host_bytes_needed(MIXTRAL, placement, device_is_host=False)
    assert needed == 200 * MIXTRAL.expert_bytes  # 70.4 GB
    check_host_memory(needed, 125 * GIB)  # the H100 box: fits
    with pytest.raises(FiddlerConfigError) as e:
        check_host_memory(needed, 64 * GIB)
    assert "host-resident experts need" in str(e.value) and "gpu_expert_budget_gb" in str(e.value)


def test_cpu_platform_counts_every_expert():
    placement = plan_even(32, 8, 56)
    assert host_bytes_needed(MIXTRAL, placement, device_is_host=True) == 256 * MIXTRAL.expert_bytes


def test_isa_warning():
    assert cpu_isa_warning({"avx512f", "avx512_bf16"}) is None
    assert cpu_isa_warning({"amx_bf16"}) is None
    assert "torch" in cpu_isa_warning({"avx2"})


def test_budget_larger_than_gpu_is_refused():
    with pytest.raises(FiddlerConfigError, match="does not fit"):
        expert_budget_bytes(FiddlerConfig(gpu_expert_budget_gb=40.0), MIXTRAL, device_total_bytes=80 * GIB,
                            gpu_memory_utilization=0.30, max_model_len=4096)


def test_utilization_too_small_for_non_expert_weights():
    with pytest.raises(FiddlerConfigError, match="raise gpu_memory_utilization"):
        expert_budget_bytes(FiddlerConfig(), MIXTRAL, device_total_bytes=80 * GIB,
                            gpu_memory_utilization=0.05, max_model_len=4096)


def test_auto_budget_and_cpu_platform_default():
    budget, how = expert_budget_bytes(FiddlerConfig(kv_cache_reserve_gb=3), MIXTRAL,
                                      device_total_bytes=80 * GIB, gpu_memory_utilization=0.30,
                                      max_model_len=4096)
    assert how == "auto" and budget == int(80 * GIB * 0.30) - MIXTRAL.non_expert_bytes - 3 * GIB
    budget, how = expert_budget_bytes(FiddlerConfig(), MIXTRAL, device_total_bytes=None,
                                      gpu_memory_utilization=0.9, max_model_len=4096)
    assert budget == MIXTRAL.all_experts_bytes // 2 and "CPU platform" in how


def test_host_backing_adds_the_gpu_experts():
    placement = plan_even(32, 8, 56)
    assert host_bytes_needed(MIXTRAL, placement, device_is_host=False, host_backing=True) \
        == 256 * MIXTRAL.expert_bytes
    assert host_bytes_needed(MIXTRAL, placement, device_is_host=True, host_backing=True) \
        == (256 + 56) * MIXTRAL.expert_bytes


@pytest.mark.parametrize("wanted, on_cuda, host_gib, num_gpu, expect", [
    (None, True, 125, 56, (True, "auto")),  # the H100 box: 90 GB of experts fit beside the cold ones
    (None, True, 80, 56, (False, "cannot also hold")),  # 70 GB cold fits, 90 GB does not
    (None, False, 125, 56, (False, "no GPU")),
    (True, False, 125, 56, (True, "adaptation on")),
    (False, True, 125, 56, (False, "adaptation: false")),
    (True, True, 125, 0, (False, "nothing to swap")),
    (None, True, 125, 256, (False, "nothing to swap")),
])
def test_decide_adaptation(monkeypatch, wanted, on_cuda, host_gib, num_gpu, expect):
    from vllm_fiddler import preflight
    from vllm_fiddler.config import AdaptationSettings
    from vllm_fiddler.runtime.setup import decide_adaptation

    monkeypatch.setattr(preflight, "available_host_bytes", lambda: host_gib * GIB)
    cfg = FiddlerConfig(adaptation=AdaptationSettings(enabled=wanted))
    on, why = decide_adaptation(cfg, MIXTRAL, plan_even(32, 8, num_gpu), on_cuda)
    assert on == expect[0] and expect[1] in why


def test_host_backing_that_does_not_fit_names_the_switch(monkeypatch):
    from vllm_fiddler import preflight

    monkeypatch.setattr(preflight, "available_host_bytes", lambda: 80 * GIB)
    monkeypatch.setattr(preflight, "cpu_flags", lambda: {"amx_bf16"})
    placement = plan_even(32, 8, 56)
    assert preflight.run_preflight(MIXTRAL, placement, device_is_host=False) == []
    with pytest.raises(FiddlerConfigError, match='"adaptation": false'):
        preflight.run_preflight(MIXTRAL, placement, device_is_host=False, host_backing=True)


def test_fixed_streamed_chunks_must_fit_the_model():
    from vllm_fiddler.preflight import check_streamed_chunks

    check_streamed_chunks((2, 2), top_k=2, chunks=8)
    check_streamed_chunks((0, 8), top_k=2, chunks=8)
    for cut in ((2,), (2, 2, 2), (9, 0)):
        with pytest.raises(FiddlerConfigError, match="streamed_chunks .* 2 count.* 0 to 8"):
            check_streamed_chunks(cut, top_k=2, chunks=8)
