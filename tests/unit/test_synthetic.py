"""The benchmarks' skewed synthetic router (vllm_fiddler.synthetic)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vllm_fiddler import synthetic


def test_scales_are_a_per_layer_permutation_of_a_geometric_ladder():
    a, b = synthetic.gate_row_scales(8, 0, 30.0), synthetic.gate_row_scales(8, 1, 30.0)
    ladder = sorted((30.0 ** (-r / 7) for r in range(8)), reverse=True)
    assert sorted(a, reverse=True) == pytest.approx(ladder) and sorted(b, reverse=True) == pytest.approx(ladder)
    assert a != b  # layers differ in which experts are popular
    assert synthetic.gate_row_scales(8, 0, 30.0) == a  # deterministic


def test_skew_router_skews_routing_of_every_gate():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(64, 8, bias=False)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.block_sparse_moe = Block()
            self.other = nn.Linear(64, 8, bias=False)  # not a gate: untouched

    model = nn.Module()
    model.layers = nn.ModuleList([Layer(), Layer()])
    torch.manual_seed(0)
    before = [layer.other.weight.clone() for layer in model.layers]
    x = torch.randn(20000, 64)
    assert synthetic.skew_router(model, 30.0) == 2
    for i, layer in enumerate(model.layers):
        assert torch.equal(layer.other.weight, before[i])
        top = layer.block_sparse_moe.gate(x).topk(2, dim=-1).indices.flatten()
        share = torch.bincount(top, minlength=8).float() / top.numel()
        popular = max(range(8), key=lambda e: synthetic.gate_row_scales(8, i, 30.0)[e])
        assert share.argmax().item() == popular and share.max() > 0.18 and share.min() < 0.07


@pytest.mark.parametrize("raw,expected", [("", None), ("30", 30.0), ("1", 1.0)])
def test_strength_from_env(monkeypatch, raw, expected):
    monkeypatch.setenv(synthetic.SKEW_ENV, raw)
    assert synthetic.skew_strength() == expected


@pytest.mark.parametrize("raw", ["abc", "0.5", "-2"])
def test_bad_strength_is_an_error(monkeypatch, raw):
    monkeypatch.setenv(synthetic.SKEW_ENV, raw)
    with pytest.raises(ValueError, match=synthetic.SKEW_ENV):
        synthetic.skew_strength()


def test_fill_tiled_uniform_range_and_determinism():
    a = torch.empty(3 * 1000 + 17, dtype=torch.bfloat16)
    synthetic.fill_tiled_uniform(a, -1e-3, 1e-3, seed=5, pool_size=1000)
    b = torch.empty_like(a)
    synthetic.fill_tiled_uniform(b, -1e-3, 1e-3, seed=5, pool_size=1000)
    assert torch.equal(a, b)
    assert a.float().abs().max() <= 1e-3 * 1.01 and a.float().std() > 3e-4  # uniform(-1e-3, 1e-3): std 5.8e-4
    c = torch.empty_like(a)
    synthetic.fill_tiled_uniform(c, -1e-3, 1e-3, seed=6, pool_size=1000)
    assert not torch.equal(a, c)


def test_fast_host_dummy_init_hook(monkeypatch):
    """Off unless asked; then vLLM's dummy loader tiles big host parameters and draws the rest."""
    from vllm.model_executor.model_loader import dummy_loader, weight_utils

    from vllm_fiddler import compat

    for module in (weight_utils, dummy_loader):  # undone after the test
        if hasattr(module, "initialize_single_dummy_weight"):
            monkeypatch.setattr(module, "initialize_single_dummy_weight", module.initialize_single_dummy_weight)
    original = weight_utils.initialize_single_dummy_weight
    monkeypatch.delenv(synthetic.FAST_INIT_ENV, raising=False)
    synthetic.install_fast_host_dummy_init()
    assert weight_utils.initialize_single_dummy_weight is original  # off unless asked
    monkeypatch.setenv(synthetic.FAST_INIT_ENV, "1")
    synthetic.install_fast_host_dummy_init()
    synthetic.install_fast_host_dummy_init()  # idempotent
    calls = []
    monkeypatch.setattr(synthetic, "fill_tiled_uniform", lambda p, lo, hi, seed: calls.append(p.numel()))
    big = torch.zeros(synthetic.FAST_INIT_MIN_NUMEL, dtype=torch.bfloat16)
    small = torch.zeros(64, 64, dtype=torch.bfloat16)
    model = nn.Module()
    model.big, model.small = nn.Parameter(big, requires_grad=False), nn.Parameter(small, requires_grad=False)
    compat.dummy_load(model)
    assert calls == [synthetic.FAST_INIT_MIN_NUMEL]  # the big host parameter: tiled, once
    assert model.small.abs().max() > 0 and model.small.abs().max() <= 1e-3  # the small one: vLLM's draw