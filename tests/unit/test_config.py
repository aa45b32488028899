"""FiddlerConfig: every bad option is a clear error naming the key."""

import pytest

from vllm_fiddler.config import FiddlerConfig, FiddlerConfigError


def parse(options):
    return FiddlerConfig.from_additional_config({"fiddler": options})


def test_defaults_when_absent():
    assert FiddlerConfig.from_additional_config({}) == FiddlerConfig()
    assert FiddlerConfig.from_additional_config(None) == FiddlerConfig()
    assert FiddlerConfig().placement == "even"


def test_valid_options(tmp_path):
    f = tmp_path / "p.json"
    f.write_text('{"gpu_experts": []}')
    cfg = parse({"gpu_expert_budget_gb": 12, "kv_cache_reserve_gb": 0.5, "placement": str(f),
                 "cpu_threads": 7})
    assert (cfg.gpu_expert_budget_gb, cfg.kv_cache_reserve_gb, cfg.cpu_threads) == (12.0, 0.5, 7)
    assert cfg.resolved_cpu_threads() == 7
    assert parse({"gpu_expert_budget_gb": 0}).gpu_expert_budget_gb == 0.0
    assert parse({}).staging_slots == 2 and parse({"staging_slots": 0}).staging_slots == 0
    assert parse({}).arrival_coalesce_ms == 2.0 and parse({"arrival_coalesce_ms": 0}).arrival_coalesce_ms == 0.0
    assert parse({"arrival_coalesce_ms": 0.5}).arrival_coalesce_ms == 0.5
    assert parse({}).streamed_chunks is None and parse({"streamed_chunks": "auto"}).streamed_chunks is None
    assert parse({"streamed_chunks": [2, 1]}).streamed_chunks == (2, 1)


@pytest.mark.parametrize("retired", ["wait_on_device", "blocking_sync", "cuda_graph_max_tokens",
                                     "routed_max_tokens", "routed_graphs", "full_cuda_graphs"])
def test_retired_switches_are_unknown(retired):
    """The A/B switches of the execution paths are gone: each step size takes the path that
    measured fastest."""
    with pytest.raises(FiddlerConfigError, match="unknown fiddler option"):
        parse({retired: True})


def test_json_string_is_accepted():
    assert FiddlerConfig.from_additional_config({"fiddler": '{"cpu_threads": 3}'}).cpu_threads == 3


@pytest.mark.parametrize("options, words", [
    ({"gpu_budget": 1}, ["unknown fiddler option", "gpu_budget", "gpu_expert_budget_gb"]),
    ({"gpu_expert_budget_gb": -1}, ["gpu_expert_budget_gb", ">= 0"]),
    ({"gpu_expert_budget_gb": float("nan")}, ["gpu_expert_budget_gb"]),
    ({"gpu_expert_budget_gb": "12"}, ["gpu_expert_budget_gb", "number"]),
    ({"gpu_expert_budget_gb": True}, ["gpu_expert_budget_gb"]),
    ({"kv_cache_reserve_gb": -0.5}, ["kv_cache_reserve_gb"]),
    ({"cpu_threads": 0}, ["cpu_threads", ">= 1"]),
    ({"cpu_threads": 2.5}, ["cpu_threads"]),
    ({"staging_slots": -1}, ["staging_slots", ">= 0"]),
    ({"placement": ""}, ["placement"]),
    ({"streamed_chunks": 2}, ["streamed_chunks", "list of integers"]),
    ({"streamed_chunks": []}, ["streamed_chunks", "one per top-k"]),
    ({"streamed_chunks": [2, -1]}, ["streamed_chunks", ">= 0"]),
    ({"streamed_chunks": [2, True]}, ["streamed_chunks"]),
    ({"streamed_chunks": "fast"}, ["streamed_chunks", '"auto"']),
    ({"arrival_coalesce_ms": -1}, ["arrival_coalesce_ms", ">= 0 ms"]),
    ({"arrival_coalesce_ms": "2"}, ["arrival_coalesce_ms", "number of ms"]),
    ({"arrival_coalesce_ms": float("inf")}, ["arrival_coalesce_ms"]),
    ({"placement": "/no/such/file.json"}, ["placement file", "/no/such/file.json", "does not exist"]),
])
def test_bad_options_name_the_problem(options, words):
    with pytest.raises(FiddlerConfigError) as e:
        parse(options)
    for w in words:
        assert w in str(e.value)


def test_not_an_object():
    with pytest.raises(FiddlerConfigError, match="must be an object"):
        FiddlerConfig.from_additional_config({"fiddler": [1, 2]})
    with pytest.raises(FiddlerConfigError, match="not valid JSON"):
        FiddlerConfig.from_additional_config({"fiddler": "{oops"})


def test_default_cpu_threads_leaves_one_core():
    import os

    n = len(os.sched_getaffinity(0))
    assert FiddlerConfig().resolved_cpu_threads() == max(1, n - 1)


def test_adaptation_forms():
    from vllm_fiddler.config import AdaptationSettings

    assert parse({}).adaptation == AdaptationSettings() and AdaptationSettings().enabled is None
    assert parse({"adaptation": "auto"}).adaptation.enabled is None
    assert parse({"adaptation": True}).adaptation.enabled is True
    assert parse({"adaptation": False}).adaptation.enabled is False
    knobs = parse({"adaptation": {"interval_steps": 4, "half_life_steps": 64, "noise_z": 0,
                                  "cooldown_steps": 0, "max_swaps_in_flight": 1}}).adaptation
    assert knobs.enabled is True and (knobs.interval_steps, knobs.half_life_steps, knobs.noise_z) == (4, 64.0, 0.0)
    assert (knobs.cooldown_steps, knobs.max_swaps_in_flight) == (0, 1)
    assert parse({"adaptation": {"enabled": False}}).adaptation.enabled is False


@pytest.mark.parametrize("value, words", [
    ("sometimes", ["adaptation", "auto"]),
    (1, ["adaptation"]),
    ({"interval": 4}, ["unknown fiddler adaptation option", "interval", "interval_steps"]),
    ({"interval_steps": 0}, ["adaptation.interval_steps", ">= 1"]),
    ({"interval_steps": 2.5}, ["adaptation.interval_steps", "integer"]),
    ({"half_life_steps": 0}, ["adaptation.half_life_steps", "> 0"]),
    ({"horizon_steps": -1}, ["adaptation.horizon_steps"]),
    ({"noise_z": float("inf")}, ["adaptation.noise_z"]),
    ({"max_swaps_in_flight": 0}, ["adaptation.max_swaps_in_flight", ">= 1"]),
    ({"cooldown_steps": True}, ["adaptation.cooldown_steps"]),
    ({"enabled": "yes"}, ["adaptation.enabled"]),
])
def test_bad_adaptation_values(value, words):
    with pytest.raises(FiddlerConfigError) as e:
        parse({"adaptation": value})
    for w in words:
        assert w in str(e.value)
