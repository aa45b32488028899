"""The benchmarks' stock systems stay within the GPU budget they claim (benchmarks/gpu_e2e.py)."""

from __future__ import annotations

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def gpu_e2e():
    spec = importlib.util.spec_from_file_location("gpu_e2e", os.path.join(REPO, "benchmarks", "gpu_e2e.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
