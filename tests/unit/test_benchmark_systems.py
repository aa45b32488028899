"""The benchmarks' stock systems stay within the GPU budget they claim (benchmarks/gpu_e2e.py)."""

from __future__ import annotations

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_e2e():
    return load_benchmark("gpu_e2e")


def prefetch_share(kw: dict, layers: int) -> float:
    """Share of the experts' bytes vLLM's prefetch offloader keeps on the GPU with these
    settings: its resident layers plus one buffer slot per prefetch step."""
    group, offloaded, step = kw["offload_group_size"], kw["offload_num_in_group"], kw["offload_prefetch_step"]
    resident = sum(1 for i in range(layers) if i % group < group - offloaded)
    return (resident + step) / layers


@pytest.mark.parametrize("layers", [8, 16, 32])
@pytest.mark.parametrize("fraction", [0.1, 0.197, 0.3, 0.5])
def test_prefetch_within_budget_is_the_largest_that_fits(gpu_e2e, layers, fraction):
    kw = gpu_e2e.prefetch_within_budget(layers, fraction)
    assert 1 <= kw["offload_num_in_group"] <= kw["offload_group_size"]  # vLLM's own check
    share = prefetch_share(kw, layers)
    if fraction * layers >= 1:  # one layer of buffers fits
        assert share <= fraction + 1e-9
        bigger = dict(kw, offload_num_in_group=kw["offload_num_in_group"] - 1)
        if bigger["offload_num_in_group"] >= 1:
            assert prefetch_share(bigger, layers) > fraction  # one more resident layer would not fit


def test_the_e2e_budget_rows(gpu_e2e):
    """On an 80 GB GPU, 8 layers: the budget row keeps no layer resident; STOCK_PREFETCH holds 3/8."""
    fraction = gpu_e2e.resident_expert_fraction(79.2)
    assert 0.15 < fraction < 0.25
    assert prefetch_share(gpu_e2e.prefetch_within_budget(8, fraction), 8) == 1 / 8
    assert prefetch_share(gpu_e2e.STOCK_PREFETCH, 8) == 3 / 8 > fraction


@pytest.fixture(scope="module")
def e2e():
    return load_benchmark("e2e")


def test_ratios_same_budget_leave_out_the_over_budget_system(e2e):
    """TTFT (lower is better) and throughput: the conservative set counts every stock system,
    the same-budget set leaves out those holding more than the budget."""
    assert e2e.OVER_BUDGET_SYSTEMS == {"stock_prefetch"}
    table = {"prefill_2048": {"fiddler": 0.36, "stock_prefetch": 0.33, "stock_prefetch_budget": 0.44,
                              "stock_uva_experts": 1.7, "fiddler_gpu50": 0.2},
             "serve_c32": {"fiddler": 150.0, "stock_prefetch": 90.0, "stock_uva_experts": 75.0},
             "beam_4": {"stock_uva_experts": 2.0}}  # no fiddler figure: no ratio
    conservative = e2e.ratios(table)
    same_budget = e2e.ratios(table, e2e.OVER_BUDGET_SYSTEMS)
    assert conservative == pytest.approx({"prefill_2048": 0.33 / 0.36, "serve_c32": 150 / 90})
    assert same_budget == pytest.approx({"prefill_2048": 0.44 / 0.36, "serve_c32": 150 / 75})
