"""The synthetic routing model: popularity, locality and the traces simulations replay."""

from __future__ import annotations

import pytest

from vllm_fiddler.routing_model import SyntheticRouting, greedy_loop_trace


def test_popularity_is_zipf_over_a_per_layer_permutation():
    uniform = SyntheticRouting(8, 2, skew=0.0)
    assert uniform.popularity(0) == pytest.approx([1 / 8] * 8)
    skewed = SyntheticRouting(8, 2, skew=1.0)
    for layer in range(3):
        share = skewed.popularity(layer)
        assert sum(share) == pytest.approx(1.0)
        assert sorted(share, reverse=True) == pytest.approx([(1 / r) / sum(1 / k for k in range(1, 9))
                                                             for r in range(1, 9)])
    assert skewed.popularity(0) != skewed.popularity(1)  # each layer its own favourites
    assert max(SyntheticRouting(8, 2, skew=1.5).popularity(0)) > max(skewed.popularity(0))


@pytest.mark.parametrize("skew, locality", [(0.0, 0.0), (0.0, 0.15), (1.0, 0.3), (1.5, 0.6)])
def test_first_choice_repeats_as_predicted_and_shares_follow_popularity(skew, locality):
    model = SyntheticRouting(8, 2, skew=skew, locality=locality, seed=3)
    tokens = 20000
    seq = model.sequence(num_layers=2, tokens=tokens)
    for layer in range(2):
        first = [tok[layer][0] for tok in seq]
        repeats = sum(a == b for a, b in zip(first, first[1:])) / (tokens - 1)
        assert repeats == pytest.approx(model.repeat_rate(layer), abs=0.015)  # ~3 binomial stderr
        share = [first.count(e) / tokens for e in range(8)]
        assert share == pytest.approx(model.popularity(layer), abs=0.015)
        assert all(len(set(tok[layer])) == 2 for tok in seq)  # top-k experts are distinct


def test_memoryless_uniform_corner_repeats_at_chance():
    model = SyntheticRouting(8, 2, skew=0.0, locality=0.0)
    assert model.repeat_rate(0) == pytest.approx(1 / 8)


def test_trace_counts_every_sequence_token_once_per_slot():
    model = SyntheticRouting(16, 4, skew=0.5, locality=0.2)
    trace = model.trace(num_layers=3, steps=50, sequences=5)
    assert len(trace) == 50 and all(len(step) == 3 and all(len(c) == 16 for c in step) for step in trace)
    assert all(sum(c) == 5 * 4 for step in trace for c in step)
    assert trace == model.trace(num_layers=3, steps=50, sequences=5)  # deterministic by seed
    assert trace != SyntheticRouting(16, 4, skew=0.5, locality=0.2, seed=1).trace(3, 50, 5)


def test_greedy_loop_repeats_its_period():
    trace = greedy_loop_trace(SyntheticRouting(8, 2), num_layers=2, steps=30, period=3)
    assert all(trace[t] == trace[t % 3] for t in range(30))
    assert sum(1 for e in range(8) if any(trace[t][0][e] for t in range(3))) <= 6


@pytest.mark.parametrize("kwargs", [dict(top_k=0), dict(top_k=9), dict(locality=1.5), dict(skew=-1.0)])
def test_bad_knobs_are_refused(kwargs):
    args = dict(num_experts=8, top_k=2) | kwargs
    with pytest.raises(ValueError):
        SyntheticRouting(**args)
