"""Popularity placement (pure code): counts in, plan + report out, against hand-computed values."""

import itertools
import json
import math
import random
import types

import pytest

from vllm_fiddler.config import FiddlerConfig, FiddlerConfigError
from vllm_fiddler.placement import (
    GIB,
    MoEShape,
    Placement,
    Popularity,
    hit_rate,
    load_placement_file,
    plan_even,
    plan_from_popularity,
    popularity_from_file,
    popularity_from_mapping,
    resolve_placement,
    write_placement_file,
    write_popularity_file,
)

# 3 layers x 4 experts, 31 routed (token, expert) pairs
COUNTS = [[5, 1, 0, 9],
          [2, 2, 2, 2],
          [0, 0, 7, 1]]


def test_hand_checked_plan():
    placement, report = plan_from_popularity(COUNTS, 4)
    # ranking: 9 (0,3), 7 (2,2), 5 (0,0), then the 2s of layer 1 by expert id: (1,0)
    assert placement == Placement(4, ((0, 3), (0,), (2,)))
    assert report.num_gpu_experts == 4 and report.num_experts_total == 12
    assert report.routed_tokens == 31
    assert report.expected_hit_rate == pytest.approx((9 + 5 + 2 + 7) / 31)
    # plan_even(3, 4, 4): layer 0 gets [0, 1], layers 1 and 2 get [0]
    assert report.even_hit_rate == pytest.approx((5 + 1 + 2 + 0) / 31)
    assert report.layer_hit_rates == pytest.approx((14 / 15, 2 / 8, 7 / 8))
    assert report.layer_gpu_experts == (2, 1, 1)
    text = report.text()
    for words in ("4/12 experts on GPU", "74.2%", "25.8%", "+48.4 points", "2/4", "93.3%"):
        assert words in text


def test_global_not_per_layer():
    # layer 1 is cold everywhere: all the budget goes to layer 0
    placement, report = plan_from_popularity([[10, 20, 30], [1, 2, 3]], 3)
    assert placement.gpu_experts == ((0, 1, 2), ())
    assert report.expected_hit_rate == pytest.approx(60 / 66)
    assert report.layer_hit_rates == (1.0, 0.0)


def test_float_counts():
    placement, report = plan_from_popularity([[0.5, 2.5], [1.5, 0.25]], 2)
    assert placement.gpu_experts == ((1,), (0,))
    assert report.expected_hit_rate == pytest.approx(4.0 / 4.75)


def planted_counts(num_layers=4, num_experts=8, hot=300, cold=20):
    """Two hot experts per layer, never the lowest ids (which plan_even takes)."""
    hot_ids = [{2, 5}, {3, 7}, {4, 6}, {2, 7}][:num_layers]
    return [[hot if e in hot_ids[l] else cold for e in range(num_experts)]
            for l in range(num_layers)], hot_ids


def test_planted_skew_beats_even_by_computed_margin():
    counts, hot_ids = planted_counts()
    placement, report = plan_from_popularity(counts, 8)  # 2 per layer
    assert [set(g) for g in placement.gpu_experts] == hot_ids
    per_layer = 2 * 300 + 6 * 20  # 720
    assert report.expected_hit_rate == pytest.approx(600 / per_layer)  # 5/6
    assert report.even_hit_rate == pytest.approx(40 / per_layer)  # experts 0, 1: cold
    assert report.expected_hit_rate - report.even_hit_rate == pytest.approx(5 / 6 - 1 / 18)


def routed_trace(num_tokens, num_layers, num_experts, top_k, weights, seed=0):
    """Counts of a synthetic routing trace: each token picks top_k distinct experts per layer."""
    rng = random.Random(seed)
    counts = [[0] * num_experts for _ in range(num_layers)]
    for _ in range(num_tokens):
        for l in range(num_layers):
            chosen = set()
            while len(chosen) < top_k:
                chosen.add(rng.choices(range(num_experts), weights=weights[l])[0])
            for e in chosen:
                counts[l][e] += 1
    return counts


def test_skewed_trace_margin_and_optimality():
    L, E, K, T = 4, 8, 2, 2000
    _, hot_ids = planted_counts(L, E)
    weights = [[20 if e in hot_ids[l] else 1 for e in range(E)] for l in range(L)]
    counts = routed_trace(T, L, E, K, weights)
    assert all(sum(r) == T * K for r in counts)
    placement, report = plan_from_popularity(counts, 2 * L)
    assert [set(g) for g in placement.gpu_experts] == hot_ids
    # the margin, from the counts directly
    hot = sum(counts[l][e] for l in range(L) for e in hot_ids[l])
    low = sum(counts[l][0] + counts[l][1] for l in range(L))
    total = L * T * K
    assert report.expected_hit_rate == pytest.approx(hot / total)
    assert report.even_hit_rate == pytest.approx(low / total)
    assert report.expected_hit_rate - report.even_hit_rate == pytest.approx((hot - low) / total)
    # a top-2 of weights 20, 20, 1 x 6 lands on a hot expert ~80% of the time; even ~10%
    assert report.expected_hit_rate - report.even_hit_rate > 0.6


@pytest.mark.parametrize("n", range(9))
def test_optimal_against_brute_force(n):
    counts = routed_trace(300, 2, 4, 2, [[1, 4, 2, 8], [3, 1, 9, 1]], seed=1)
    best = max(sum(counts[l][e] for l, e in subset)
               for subset in itertools.combinations([(l, e) for l in range(2) for e in range(4)], n))
    _, report = plan_from_popularity(counts, n)
    assert report.expected_hit_rate == pytest.approx(best / 1200)
    assert report.expected_hit_rate >= report.even_hit_rate


@pytest.mark.parametrize("n", range(13))
def test_uniform_counts_equal_even(n):
    counts = [[7] * 4 for _ in range(3)]
    placement, report = plan_from_popularity(counts, n)
    assert placement.num_gpu == n
    assert report.expected_hit_rate == pytest.approx(report.even_hit_rate)
    assert report.expected_hit_rate == pytest.approx(n / 12)
    assert report.even_hit_rate == pytest.approx(hit_rate(counts, plan_even(3, 4, n)))


def test_budget_zero():
    placement, report = plan_from_popularity(COUNTS, 0)
    assert placement == Placement(4, ((), (), ()))
    assert report.num_gpu_experts == 0
    assert report.expected_hit_rate == report.even_hit_rate == 0.0
    assert report.layer_hit_rates == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("n", [12, 13, 1000])
def test_budget_at_least_all_experts(n):
    placement, report = plan_from_popularity(COUNTS, n)
    assert placement.gpu_experts == ((0, 1, 2, 3),) * 3
    assert placement.num_cpu == 0
    assert report.num_gpu_experts == 12
    assert report.expected_hit_rate == report.even_hit_rate == 1.0


def test_ties_are_deterministic():
    # equal counts spread over the layers (rank within the layer), then lower layer, lower id
    assert plan_from_popularity([[1, 1, 1, 1], [1, 1, 1, 1]], 3)[0].gpu_experts == ((0, 1), (0,))
    assert plan_from_popularity([[1, 5, 5], [5, 1, 1]], 2)[0].gpu_experts == ((1,), (0,))
    assert plan_from_popularity([[1, 5, 5], [5, 1, 1]], 3)[0].gpu_experts == ((1, 2), (0,))
    assert plan_from_popularity([[0, 3], [3, 0], [3, 3]], 3)[0].gpu_experts == ((1,), (0,), (0,))
    runs = {plan_from_popularity([[2, 2, 1], [2, 1, 2]], 2) for _ in range(5)}
    assert len(runs) == 1


def test_all_zero_counts():
    placement, report = plan_from_popularity([[0, 0], [0, 0]], 1)
    assert placement.gpu_experts == ((0,), ())
    assert report.routed_tokens == 0
    assert report.expected_hit_rate == report.even_hit_rate == 0.0


@pytest.mark.parametrize("counts, words", [
    ([[1, 2], [3]], ["ragged", "layer 1 has 1", "layer 0 has 2"]),
    ([[1, -2], [3, 4]], ["negative", "layer 0 expert 1"]),
    ([[1, 2], [3, float("nan")]], ["layer 1 expert 1", "not a finite number"]),
    ([[1, 2], [3, float("inf")]], ["not a finite number"]),
    ([[1, "2"]], ["'2'", "not a finite number"]),
    ([[True, 2]], ["True"]),
    ([], ["no layers"]),
    ([[]], ["no experts"]),
    ([1, 2], ["layer 0 is not a list"]),
    ("abc", ["list of layers"]),
    (None, ["list of layers"]),
])
def test_bad_counts(counts, words):
    with pytest.raises(FiddlerConfigError) as e:
        plan_from_popularity(counts, 1)
    assert isinstance(e.value, ValueError)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("n", [-1, 1.5, True, None, "3"])
def test_bad_budget(n):
    with pytest.raises(FiddlerConfigError, match="num_gpu_experts"):
        plan_from_popularity(COUNTS, n)


# ------------------------------------------------------------ files
def test_popularity_file_round_trip(tmp_path):
    path = tmp_path / "pop.json"
    pop = Popularity(((5, 1, 0, 9), (2, 2, 2, 2), (0, 0, 7, 1)), model="m", prompts=3,
                     extra={"top_k": 2, "expert_bytes": 100})
    write_popularity_file(str(path), pop)
    data = json.loads(path.read_text())
    assert data["model"] == "m" and data["num_layers"] == 3 and data["num_experts"] == 4
    assert data["tokens"] == COUNTS and data["prompts"] == 3 and data["top_k"] == 2
    back = popularity_from_file(str(path))
    assert back == pop
    assert back.num_layers == 3 and back.num_experts == 4


@pytest.mark.parametrize("data, words", [
    ({"model": "m"}, ["\"tokens\""]),
    ([[1, 2]], ["\"tokens\""]),
    ({"tokens": [[1, 2], [3]]}, ["ragged"]),
    ({"tokens": [[1, -1]]}, ["negative"]),
    ({"tokens": [[1, 2]], "num_layers": 2}, ["num_layers is 2", "has 1"]),
    ({"tokens": [[1, 2]], "num_experts": 3}, ["num_experts is 3", "has 2"]),
    ({"tokens": [[1, 2]], "prompts": -1}, ["prompts"]),
])
def test_bad_popularity(data, words):
    with pytest.raises(FiddlerConfigError) as e:
        popularity_from_mapping(data)
    for w in words:
        assert w in str(e.value)


def test_popularity_file_errors(tmp_path):
    with pytest.raises(FiddlerConfigError, match="cannot read popularity file"):
        popularity_from_file(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FiddlerConfigError, match="cannot read popularity file"):
        popularity_from_file(str(bad))
    assert popularity_from_mapping({"tokens": [[1, 2]]}).model is None


TINY = types.SimpleNamespace(
    hidden_size=128, num_hidden_layers=3, num_local_experts=4, num_attention_heads=2,
    num_key_value_heads=1, head_dim=64, vocab_size=512, intermediate_size=192,
    num_experts_per_tok=2, tie_word_embeddings=False)


def test_placement_file_with_report_loads(tmp_path):
    """The "report" key rides along: load_placement_file and resolve_placement read "gpu_experts" only."""
    placement, report = plan_from_popularity(COUNTS, 4)
    path = tmp_path / "placement.json"
    write_placement_file(str(path), placement, report, budget_experts=4)
    data = json.loads(path.read_text())
    assert data["gpu_experts"] == [[0, 3], [0], [2]]
    assert data["report"]["expected_hit_rate"] == pytest.approx(23 / 31)
    assert data["report"]["budget_experts"] == 4
    assert load_placement_file(str(path), 3, 4) == placement
    shape = MoEShape.from_hf_config(TINY, dtype_bytes=2)
    cfg = FiddlerConfig.from_additional_config({"fiddler": {"placement": str(path)}})
    assert resolve_placement(cfg, shape, 4 * shape.expert_bytes)[0] == placement
    with pytest.raises(FiddlerConfigError, match="puts 4 experts"):
        resolve_placement(cfg, shape, 3 * shape.expert_bytes)
    assert math.isclose(4 * shape.expert_bytes / GIB, 4 * 3 * 128 * 192 * 2 / GIB)


def test_uniform_counts_spread_like_even():
    for n in range(0, 13):
        placement, _ = plan_from_popularity([[7] * 4] * 3, n)
        assert [len(g) for g in placement.gpu_experts] == [len(g) for g in plan_even(3, 4, n).gpu_experts]
