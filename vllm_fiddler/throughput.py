"""Throughput model: step time, decode tok/s, TTFT and batch throughput of a placement (pure).

No torch, no vLLM: what a step costs follows from the cost model (CPU expert time by
token count, copy time from the PCIe bandwidth, GPU expert time; calibrated on the
machine or the prior), the placement, the routing (each layer's expert shares and
top-k) and the tokens in the step.

Per MoE layer a step routes ``tokens * top_k`` (token, expert) pairs, each token to
``top_k`` distinct experts drawn by the layer's shares. The hot experts' work queues on
the GPU (``cost.gpu_ms`` per hit expert); the hit cold experts are split between the CPU
and copies as the runtime splits them (``cost_model.plan_cold_experts``, the min-max
plan, with host DRAM contention). The layer ends at the plan's critical path, plus
``other_ms_per_layer`` (attention, norms, the engine's per-layer overhead: measured, 0
by default). A step is the sum over layers; its expectation is averaged over sampled
routings (``samples``), since a layer's cost is not linear in its counts.

Not modelled, on purpose: the streamed chunks of batch-1 decode (a cut cold expert
computed partly in place by the GPU) and graph steps' launch savings, which make
measured decode faster than ``decode_tok_s`` when ``other_ms_per_layer`` is a
measured eager figure; the KV cache and attention's growth with context.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Sequence

from vllm_fiddler.cost_model import CostModel, plan_cold_experts
from vllm_fiddler.routing_model import draw_expert


@dataclasses.dataclass(frozen=True)
class StepModel:
    cost: CostModel
    gpu_experts: tuple[tuple[int, ...], ...]  # [L] each MoE layer's GPU-resident experts
    shares: tuple[tuple[float, ...], ...]  # [L][E] each expert's share of a layer's routed pairs
    top_k: int
    other_ms_per_layer: float = 0.0

    def __post_init__(self):
        if len(self.gpu_experts) != len(self.shares) or not self.shares:
            raise ValueError(f"gpu_experts has {len(self.gpu_experts)} layers, shares {len(self.shares)}: "
                             "one entry per MoE layer each")
        experts = len(self.shares[0])
        if not 1 <= self.top_k <= experts:
            raise ValueError(f"top_k must be in 1..{experts}, got {self.top_k}")
        for layer, (hot, share) in enumerate(zip(self.gpu_experts, self.shares)):
            if len(share) != experts or any(not (p >= 0 and math.isfinite(p)) for p in share) or sum(share) <= 0:
                raise ValueError(f"layer {layer}: shares must be {experts} finite numbers >= 0, not all 0")
            if any(not 0 <= e < experts for e in hot):
                raise ValueError(f"layer {layer}: GPU expert ids must be in 0..{experts - 1}, got {list(hot)}")
        if not self.other_ms_per_layer >= 0:
            raise ValueError(f"other_ms_per_layer must be >= 0, got {self.other_ms_per_layer}")

    @property
    def num_layers(self) -> int:
        return len(self.shares)

    def hit_rate(self) -> float:
        """Expected share of routed pairs on GPU experts (top-k picks are distinct, so with
        top_k > 1 this is the first pick's; exact for top_k = 1 or uniform shares)."""
        return sum(sum(share[e] for e in hot) / sum(share)
                   for hot, share in zip(self.gpu_experts, self.shares)) / self.num_layers

    def layer_ms(self, layer: int, counts: Sequence[int]) -> float:
        """One layer's time for its [E] routed-token counts."""
        hot = set(self.gpu_experts[layer])
        gpu_busy = sum(self.cost.gpu_ms(n) for e, n in enumerate(counts) if n and e in hot)
        cold = {e: n for e, n in enumerate(counts) if n and e not in hot}
        moe = plan_cold_experts(cold, self.cost, gpu_busy_ms=gpu_busy).critical_path_ms if cold else gpu_busy
        return moe + self.other_ms_per_layer

    def step_ms(self, tokens: int, samples: int = 16, seed: int = 0) -> float:
        """Expected time of a step of `tokens` tokens (averaged over `samples` routings)."""
        if tokens <= 0:
            return self.other_ms_per_layer * self.num_layers
        rng = random.Random(seed)
        total = 0.0
        for _ in range(samples):
            for layer, share in enumerate(self.shares):
                total += self.layer_ms(layer, route_counts(rng, share, self.top_k, tokens))
        return total / samples

    def decode_tok_s(self, batch: int = 1, samples: int = 16) -> float:
        """Decode throughput with `batch` sequences (one token each a step)."""
        return 1e3 * batch / self.step_ms(batch, samples)

    def ttft_s(self, prompt_tokens: int, max_batched_tokens: int, samples: int = 4) -> float:
        """First token of one prompt, prefilled in chunks of `max_batched_tokens`."""
        full, rest = divmod(prompt_tokens, max_batched_tokens)
        ms = full * self.step_ms(max_batched_tokens, samples) + (self.step_ms(rest, samples) if rest else 0.0)
        return ms / 1e3

    def batch_output_tok_s(self, prompts: int, input_len: int, output_len: int, max_batched_tokens: int,
                           max_num_seqs: int, samples: int = 4) -> float:
        """Offline batch: every prompt prefilled (in steps of `max_batched_tokens`), then
        `output_len` decode steps per wave of `max_num_seqs` sequences; output tokens per second."""
        prefill_tokens = prompts * input_len
        full, rest = divmod(prefill_tokens, max_batched_tokens)
        ms = full * self.step_ms(max_batched_tokens, samples) + (self.step_ms(rest, samples) if rest else 0.0)
        waves, last = divmod(prompts, max_num_seqs)
        ms += waves * output_len * self.step_ms(max_num_seqs, samples)
        if last:
            ms += output_len * self.step_ms(last, samples)
        return 1e3 * prompts * output_len / ms


# From this many routed pairs per expert on, a step's counts are their expectation: sampling
# them costs O(pairs * E) in Python, and a plan at hundreds of tokens per expert moves by
# well under 1% with the counts' sampling noise (binomial, sqrt(n) / n).
EXPECTED_COUNTS_MIN_PAIRS_PER_EXPERT = 16


def route_counts(rng: random.Random, share: Sequence[float], top_k: int, tokens: int) -> list[int]:
    """[E] routed-token counts of `tokens` tokens, each to `top_k` distinct experts by `share`."""
    if tokens * top_k >= EXPECTED_COUNTS_MIN_PAIRS_PER_EXPERT * len(share):
        total = sum(share)
        return [min(tokens, round(tokens * top_k * p / total)) for p in share]
    counts = [0] * len(share)
    for _ in range(tokens):
        picked: list[int] = []
        for _ in range(top_k):
            picked.append(draw_expert(rng, share, picked))
            counts[picked[-1]] += 1
    return counts


def roofline_decode_tok_s(cold_bytes_per_token: float, host_read_gb_s: float) -> float:
    """Batch-1 decode bound: every cold expert a token routes to read once from host DRAM."""
    return host_read_gb_s * 1e9 / cold_bytes_per_token if cold_bytes_per_token > 0 else math.inf
