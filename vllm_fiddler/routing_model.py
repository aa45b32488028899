"""A synthetic routing model for random-weight benchmarks and simulations (pure: no torch, no vLLM).

A random-weight model routes almost uniformly and without memory when sampled at
temperature 1.0, and loops on a few tokens when decoded greedily, so that its routing
repeats every step: neither is how a trained model routes. This model has the two
properties that decide what an expert cache (and online re-placement) can gain:

- **popularity skew** (``skew``): expert ``e`` of a layer is routed with a Zipf share
  proportional to ``(rank_e + 1) ** -skew``, ranks a per-layer permutation; 0 is uniform.
- **temporal locality** (``locality``): the chance that a token keeps, in each top-k
  slot, the expert its predecessor in the same sequence picked in that slot; otherwise the
  slot is drawn from the layer's popularity (without repeating an expert of the token).

Both leave the long-run share of each expert at its popularity; locality only makes
consecutive tokens share experts. A token's first choice then repeats its
predecessor's with probability ``locality + (1 - locality) * sum(share ** 2)``
(repeat_rate()).

Defaults. The Mixtral paper (Jiang et al., 2024, "Mixtral of Experts", arXiv:2401.04088,
section 5, table 5) measured how often consecutive tokens of real text get the same first
expert: about 14% at layer 0, against 12.5% for independent uniform picks of 1 of 8, and
about 20-29% at layers 15 and 31, depending on the corpus. With uniform popularity that is
locality ~0.02 at layer 0 and ~0.1-0.19 deeper: DEFAULT_LOCALITY is 0.15. The paper found
no strong preference of experts by domain (its load-balanced router spreads tokens), so
DEFAULT_SKEW is 0; benchmarks report a grid of both knobs (benchmarks/replacement_grid.py),
the memoryless uniform corner included.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Sequence

DEFAULT_LOCALITY = 0.15
DEFAULT_SKEW = 0.0


@dataclasses.dataclass(frozen=True)
class SyntheticRouting:
    num_experts: int
    top_k: int
    skew: float = DEFAULT_SKEW
    locality: float = DEFAULT_LOCALITY
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.num_experts, int) and isinstance(self.top_k, int)
                and 1 <= self.top_k <= self.num_experts):
            raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={self.top_k!r}, "
                             f"num_experts={self.num_experts!r}")
        if not 0.0 <= self.locality <= 1.0:
            raise ValueError(f"locality must be in [0, 1], got {self.locality!r}")
        if not self.skew >= 0.0:
            raise ValueError(f"skew must be >= 0, got {self.skew!r}")

    def popularity(self, layer: int) -> list[float]:
        """[E] each expert's long-run share of a layer's routed (token, expert) draws."""
        ranks = list(range(self.num_experts))
        random.Random(self.seed * 1_000_003 + layer).shuffle(ranks)  # expert e has rank ranks[e]
        weights = [(r + 1) ** -self.skew for r in ranks]
        total = sum(weights)
        return [w / total for w in weights]

    def repeat_rate(self, layer: int) -> float:
        """Chance that a token's first-choice expert is its predecessor's (slot 0 draws from the
        popularity when it does not keep the predecessor's)."""
        share = self.popularity(layer)
        return self.locality + (1 - self.locality) * sum(p * p for p in share)

    def sequence(self, num_layers: int, tokens: int, stream: int = 0) -> list[list[tuple[int, ...]]]:
        """[T][L] the top-k experts of each token of one sequence, in slot order."""
        rng = random.Random(self.seed * 7919 + stream + 1)
        shares = [self.popularity(layer) for layer in range(num_layers)]
        out: list[list[tuple[int, ...]]] = []
        prev: list[tuple[int, ...]] | None = None
        for _ in range(tokens):
            row = []
            for layer in range(num_layers):
                chosen: list[int] = []
                for slot in range(self.top_k):
                    keep = prev is not None and rng.random() < self.locality and prev[layer][slot] not in chosen
                    chosen.append(prev[layer][slot] if keep else draw_expert(rng, shares[layer], chosen))
                row.append(tuple(chosen))
            out.append(row)
            prev = row
        return out

    def trace(self, num_layers: int, steps: int, sequences: int = 1) -> list[list[list[float]]]:
        """[S][L][E] routed-token counts of `steps` decode steps of `sequences` concurrent
        sequences (one token each a step): adaptation.simulate's input."""
        per_seq = [self.sequence(num_layers, steps, stream=s) for s in range(sequences)]
        return [step_counts([seq[t] for seq in per_seq], num_layers, self.num_experts) for t in range(steps)]


def step_counts(tokens: Sequence[Sequence[Sequence[int]]], num_layers: int, num_experts: int) -> list[list[float]]:
    """[L][E] routed-token counts of one step's tokens, each [L] of its top-k experts."""
    counts = [[0.0] * num_experts for _ in range(num_layers)]
    for token in tokens:
        for layer, experts in enumerate(token):
            for e in experts:
                counts[layer][e] += 1.0
    return counts


def draw_expert(rng: random.Random, share: Sequence[float], exclude: Sequence[int]) -> int:
    """One expert by share, never one of `exclude` (a token's top-k experts are distinct)."""
    total = sum(p for e, p in enumerate(share) if e not in exclude)
    x = rng.random() * total
    for e, p in enumerate(share):
        if e in exclude:
            continue
        x -= p
        if x < 0:
            return e
    return max((e for e in range(len(share)) if e not in exclude), key=lambda e: share[e])


def greedy_loop_trace(routing: SyntheticRouting, num_layers: int, steps: int, period: int = 3,
                      seed: int = 1) -> list[list[list[float]]]:
    """[S][L][E] a greedy random-weight decode as it routes: the output loops over `period`
    tokens, each with fixed experts, so the same few experts repeat every `period` steps."""
    loop = SyntheticRouting(routing.num_experts, routing.top_k, routing.skew, 0.0, seed).sequence(num_layers, period)
    return [step_counts([loop[t % period]], num_layers, routing.num_experts) for t in range(steps)]
