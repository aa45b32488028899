"""The throughput model against hand-computed steps, and its monotonicity."""

from __future__ import annotations

import random

import pytest

from vllm_fiddler.cost_model import default_for_shape
from vllm_fiddler.throughput import StepModel, roofline_decode_tok_s, route_counts

COST = default_for_shape()  # Mixtral-8x7B prior: CPU 6.5 ms an expert at 1-16 tokens, copy 6.47 ms
UNIFORM = tuple([1 / 8] * 8)


def model(gpu_per_layer: int, layers: int = 2, top_k: int = 2, other: float = 0.0) -> StepModel:
    return StepModel(COST, tuple(tuple(range(gpu_per_layer)) for _ in range(layers)), (UNIFORM,) * layers, top_k,
                     other_ms_per_layer=other)


def test_all_gpu_step_is_the_hot_work_plus_the_rest():
    m = model(8, layers=3, top_k=2, other=0.5)
    assert m.hit_rate() == 1.0
    # batch 1, top-2: two hit experts a layer, each one GPU expert at 1 token
    assert m.step_ms(1) == pytest.approx(3 * (2 * COST.gpu_ms(1) + 0.5))


def test_one_cold_expert_takes_the_cheaper_side():
    m = StepModel(COST, ((),), ((1.0, 0.0),), top_k=1)  # every token to expert 0, which is cold
    assert m.step_ms(1) == pytest.approx(min(COST.cpu_ms(1), COST.copy_ms + COST.gpu_ms(1)))
    m2 = StepModel(COST, ((),), ((0.5, 0.5),), top_k=2)  # two cold experts: one CPU, one copied
    assert m2.step_ms(1) == pytest.approx(max(COST.cpu_ms(1), COST.copy_ms + COST.gpu_ms(1)), rel=1e-6)
    assert m2.step_ms(1) < 2 * COST.cpu_ms(1)  # the min-max split, not the sum


def test_more_gpu_experts_decode_faster_and_prompts_take_longer():
    speeds = [model(g).decode_tok_s(1, samples=64) for g in (0, 2, 4, 8)]
    assert speeds == sorted(speeds) and speeds[-1] > 3 * speeds[0]
    m = model(2)
    assert m.ttft_s(4096, 2048) > m.ttft_s(2048, 2048) > m.ttft_s(512, 2048) > 0
    assert m.ttft_s(4096, 2048) == pytest.approx(2 * m.ttft_s(2048, 2048))
    # a batch reads each cold expert once a step for all its sequences
    assert m.batch_output_tok_s(64, 128, 128, 2048, 16) > 4 * m.decode_tok_s(1)


def test_route_counts_sum_to_the_pairs_and_follow_the_shares():
    rng = random.Random(0)
    share = (0.5, 0.25, 0.125, 0.125)
    counts = route_counts(rng, share, top_k=1, tokens=40)  # sampled
    assert sum(counts) == 40
    big = route_counts(rng, share, top_k=1, tokens=4000)  # expected counts
    assert big == [2000, 1000, 500, 500]
    pairs = route_counts(rng, UNIFORM, top_k=2, tokens=7)
    assert sum(pairs) == 14 and max(pairs) <= 7  # distinct experts per token


def test_roofline_and_bad_input():
    assert roofline_decode_tok_s(2e9, 120.0) == pytest.approx(60.0)
    with pytest.raises(ValueError):
        StepModel(COST, ((0,),), (UNIFORM, UNIFORM), 2)  # layers disagree
    with pytest.raises(ValueError):
        StepModel(COST, ((9,),), (UNIFORM,), 2)  # no expert 9
    with pytest.raises(ValueError):
        StepModel(COST, ((0,),), (UNIFORM,), 9)  # top-k > experts
