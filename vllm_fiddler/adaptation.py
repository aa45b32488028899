"""Online adaptation of expert placement: which resident GPU expert to swap for a host one, and when.

Pure planning code (standard library only: no torch, no CUDA, no vLLM), so it
runs in CPU CI and can be reasoned about on its own. The runtime feeds it the
per-expert heat counters (routed tokens, each step's count valued by
``step_value_table``) it reads off the device every few steps and executes
the swaps it returns as async host->device copies.

The pieces:

- ``ExpertHeat``: exponentially decaying per-(layer, expert) routed-token
  counts -> a tokens-per-step rate per expert, plus how many steps' worth of
  evidence that rate rests on (to tell a real shift from sampling noise).
- ``AdaptationPolicy``: what a swap costs and when one is worth it (the
  hysteresis that keeps the placement from thrashing).
- ``plan_swaps``: rates + residency -> the few swaps worth making now.
- ``simulate`` / ``static_hit_rate``: replay a routing trace against the
  policy, for tests and benchmarks.

Why the rules look the way they do. A swap costs one expert copy (6.5 ms for
Mixtral on PCIe Gen5) and pays back only while the admitted expert stays
hotter than the evicted one. Three things make a swap bad: the hot set moves
again before the copy pays off (fast alternation), the "difference" is
sampling noise (a few tokens per expert per decode step), or the same expert
goes back and forth. Respectively: the expected gain over `horizon_steps`
must beat the copy `min_gain_ratio` times over; the rate gap must clear both
a relative margin and `noise_z` standard errors; and an expert that just
moved sits out `cooldown_steps`.

Per layer the number of resident experts never changes: the GPU memory for a
layer's experts is allocated once, and a swap evicts one resident expert and
admits one host expert into its slot.

Shape legend: L = MoE layers, E = experts per layer, R_l = resident (GPU)
experts of layer l, S = steps in a trace.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any


class AdaptationError(ValueError):
    """Bad input to this module (a ValueError: callers may catch either)."""


# A rate difference below this (tokens/step) is treated as none, so float
# noise in decayed sums never decides a swap.
_EPS = 1e-12


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _check_row(row: object, width: int, what: str) -> tuple[float, ...]:
    """One layer's per-expert numbers: exactly `width` finite values >= 0."""
    if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
        raise AdaptationError(
            f"{what}: expected a list of {width} per-expert numbers, got {type(row).__name__}")
    if len(row) != width:
        raise AdaptationError(f"{what}: has {len(row)} experts, expected {width}")
    for e, c in enumerate(row):
        if not _is_number(c):
            raise AdaptationError(f"{what}: expert {e}: {c!r} is not a finite number")
        if c < 0:
            raise AdaptationError(f"{what}: expert {e}: negative value {c!r}")
    return tuple(float(c) for c in row)


def _check_matrix(rows: object, what: str, num_layers: int | None = None) -> tuple[tuple[float, ...], ...]:
    """[L][E] finite numbers >= 0, every layer the same length (and L = num_layers when given)."""
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or not rows:
        raise AdaptationError(
            f"{what}: expected a non-empty list of layers, each a list of per-expert numbers")
    if num_layers is not None and len(rows) != num_layers:
        raise AdaptationError(f"{what}: has {len(rows)} layers, expected {num_layers}")
    first = rows[0]
    if isinstance(first, (str, bytes)) or not isinstance(first, Sequence) or not first:
        raise AdaptationError(f"{what}: layer 0 is not a non-empty list of per-expert numbers")
    return tuple(_check_row(r, len(first), f"{what}: layer {l}") for l, r in enumerate(rows))


def _check_resident(resident: object, num_layers: int, num_experts: int) -> tuple[tuple[int, ...], ...]:
    """[L][R_l] distinct expert ids in range; the order (= GPU slot order) is kept."""
    if isinstance(resident, (str, bytes)) or not isinstance(resident, Sequence):
        raise AdaptationError("resident: expected a list of layers, each a list of GPU expert ids")
    if len(resident) != num_layers:
        raise AdaptationError(f"resident: has {len(resident)} layers, the rates have {num_layers}")
    out = []
    for l, experts in enumerate(resident):
        if isinstance(experts, (str, bytes)) or not isinstance(experts, Sequence):
            raise AdaptationError(f"resident: layer {l} must list expert ids")
        for e in experts:
            if not _is_int(e) or not 0 <= e < num_experts:
                raise AdaptationError(f"resident: layer {l} names expert {e!r}, which does not exist "
                                 f"(experts are 0..{num_experts - 1})")
        if len(set(experts)) != len(experts):
            raise AdaptationError(f"resident: layer {l} lists an expert twice")
        out.append(tuple(experts))
    return tuple(out)


# ---------------------------------------------------------------- heat


class ExpertHeat:
    """Exponentially decaying routed-token counts per (layer, expert), and per-step rates.

    A count observed `half_life_steps` steps ago weighs half as much as one
    observed now; ``math.inf`` never forgets (a plain running mean).

    The rate is heat / (decayed number of steps observed), i.e. a decayed
    mean of tokens per step, so it does not depend on how long the runtime
    has been running or how often it reads the counters.

    Batched observations: ``observe(layer, counts, steps=n)`` means `counts`
    arrived over the last n steps and is taken as spread evenly over them (the
    runtime cannot know the split). Its heat and rates are exactly those of n
    calls ``observe(layer, [c / n ...], steps=1)``: the batch weighs
    sum_{i<n} d**i / n (d = per-step decay), not 1, as its steps are on
    average older than the newest one. (effective_steps differs slightly: it
    describes the sums actually read, see there.)
    """

    def __init__(self, num_layers: int, num_experts: int, half_life_steps: float):
        for name, v in (("num_layers", num_layers), ("num_experts", num_experts)):
            if not _is_int(v) or v < 1:
                raise AdaptationError(f"{name} must be an integer >= 1, got {v!r}")
        if isinstance(half_life_steps, bool) or not isinstance(half_life_steps, (int, float)) \
                or math.isnan(half_life_steps) or half_life_steps <= 0:
            raise AdaptationError(
                f"half_life_steps must be > 0 (math.inf: never forget), got {half_life_steps!r}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.half_life_steps = float(half_life_steps)
        # ln(per-step decay), <= 0; 0 when nothing is ever forgotten
        self._log_decay = -math.log(2) / self.half_life_steps
        self._heat = [[0.0] * num_experts for _ in range(num_layers)]  # [L][E] decayed tokens
        self._steps = [0.0] * num_layers  # [L] decayed steps observed: sum of weights w_i
        self._steps_sq = [0.0] * num_layers  # [L] sum of w_i**2 / n_i (see effective_steps)

    def _check_layer(self, layer: int) -> None:
        if not _is_int(layer) or not 0 <= layer < self.num_layers:
            raise AdaptationError(f"layer must be an integer in 0..{self.num_layers - 1}, got {layer!r}")

    def observe(self, layer: int, counts: Sequence[float], steps: int = 1) -> None:
        """Adds `counts` [E] (tokens routed to each expert over the last `steps` steps)."""
        self._check_layer(layer)
        row = _check_row(counts, self.num_experts, f"counts for layer {layer}")
        if not _is_int(steps) or steps < 1:
            raise AdaptationError(f"steps must be an integer >= 1, got {steps!r}")
        decay = math.exp(self._log_decay * steps)
        # weight of the whole batch: sum_{i<steps} d**i (d = per-step decay),
        # via expm1 so that long half-lives do not cancel to 0/0
        if self._log_decay == 0.0:
            weight = float(steps)
        else:
            weight = math.expm1(self._log_decay * steps) / math.expm1(self._log_decay)
        heat = self._heat[layer]
        for e, c in enumerate(row):
            heat[e] = heat[e] * decay + c * (weight / steps)
        self._steps[layer] = self._steps[layer] * decay + weight
        self._steps_sq[layer] = self._steps_sq[layer] * decay * decay + weight * weight / steps

    def observe_all(self, counts: Sequence[Sequence[float]], steps: int = 1) -> None:
        """observe() for every layer: counts [L][E]."""
        rows = _check_matrix(counts, "counts", self.num_layers)
        if len(rows[0]) != self.num_experts:
            raise AdaptationError(
                f"counts: has {len(rows[0])} experts per layer, expected {self.num_experts}")
        for layer, row in enumerate(rows):
            self.observe(layer, row, steps)

    def heat(self, layer: int) -> tuple[float, ...]:
        """[E] decayed routed tokens (the raw sum, not normalised)."""
        self._check_layer(layer)
        return tuple(self._heat[layer])

    def rate(self, layer: int) -> tuple[float, ...]:
        """[E] decayed mean tokens per step; all 0.0 before the first observation."""
        self._check_layer(layer)
        steps = self._steps[layer]
        return tuple(h / steps if steps > 0 else 0.0 for h in self._heat[layer])

    def rates(self) -> tuple[tuple[float, ...], ...]:
        """[L][E] rate() of every layer: what plan_swaps takes."""
        return tuple(self.rate(l) for l in range(self.num_layers))

    def effective_steps(self) -> tuple[float, ...]:
        """[L] how many independent steps each layer's rates are worth (0.0 before any observation).

        (sum w)**2 / sum(w**2) over the observations' weights: if the tokens an
        expert gets per step are Poisson with mean r, its rate estimate has
        variance r / effective_steps. With a long enough history it tends to
        (1 + d) / (1 - d) ~= 2.885 * half_life_steps (d = per-step decay).
        A batched read (observe(steps=n)) is one sum whose tokens all get the
        same weight, so it counts for a little more than n single reads
        weighed by age.
        """
        return tuple(s * s / sq if sq > 0 else 0.0 for s, sq in zip(self._steps, self._steps_sq))


def step_saving_ms(cpu_ms: Callable[[float], float], gpu_ms: Callable[[float], float], copy_ms: float,
                   tokens: float) -> float:
    """S(n): what serving an expert's n tokens of one step from the GPU saves over serving them
    cold, on the CPU or by copying the expert in, whichever is cheaper."""
    g = gpu_ms(tokens)
    return min(cpu_ms(tokens), copy_ms + g) - g


def step_value_table(cpu_ms: Callable[[float], float], gpu_ms: Callable[[float], float], copy_ms: float,
                     max_tokens: int) -> tuple[float, ...]:
    """[max_tokens + 1] what one step's n tokens of an expert are worth as evidence for keeping it
    on the GPU, in 1-token steps: v(n) = S(n) / S(1), S = step_saving_ms. v is made non-decreasing and at most n; v(0) = 0. Steps with
    more tokens than max_tokens take v(max_tokens) (by then the copy caps S).

    Why not raw tokens: the policy prices a routed token at the decode saving (saved_ms_per_token
    = S(1)), but a cold expert's cost grows far slower than its tokens (the CPU reads its
    weights once per step, whatever the count) and is capped by one copy (a long prefill copies
    it anyway). Counted raw, one 2048-token prompt weighs as much as ~500 decode steps of its
    experts, and placement chases whatever the last long prompt touched. (Mixtral on the H100
    box: S(1) = 2.3 ms, S saturates at the 6.5 ms copy, so any step's hit is worth 1 to ~2.8.)
    If the GPU does not beat the CPU at 1 token (S(1) <= 0), there is no decode saving to
    compare with, and the table is raw tokens (v(n) = n).
    """
    if not _is_int(max_tokens) or max_tokens < 1:
        raise AdaptationError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    if not _is_number(copy_ms) or copy_ms < 0:
        raise AdaptationError(f"copy_ms must be a finite number >= 0, got {copy_ms!r}")

    def saving(n: int) -> float:
        return step_saving_ms(cpu_ms, gpu_ms, copy_ms, n)

    unit = saving(1)
    if not (_is_number(unit) and unit > 0):
        return tuple(float(n) for n in range(max_tokens + 1))
    table = [0.0]
    best = 0.0
    for n in range(1, max_tokens + 1):
        best = max(best, saving(n) / unit)  # non-decreasing: more tokens never prove less
        table.append(min(float(n), best))
    return tuple(table)


# ---------------------------------------------------------------- policy


@dataclasses.dataclass(frozen=True)
class AdaptationPolicy:
    """When a swap is worth an expert copy.

    A swap (evict resident expert x, admit host expert y) is made only if all hold:
      gain := (rate_y - rate_x) * saved_ms_per_token * horizon_steps > copy_ms * min_gain_ratio
      rate_y > rate_x * (1 + min_rate_margin)
      rate_y - rate_x > noise_z * sqrt((rate_y + rate_x) / effective_steps)   (when plan_swaps is
          given effective_steps: the gap is `noise_z` Poisson standard errors wide)
      neither x nor y moved in the last cooldown_steps steps
    and at most max_swaps_per_round copies are in flight at once.
    """

    copy_ms: float  # one expert host->device (6.47 ms: Mixtral-8x7B bf16 over PCIe Gen5, pinned)
    saved_ms_per_token: float  # per routed token served by a GPU expert instead of the CPU
    horizon_steps: float = 128.0  # future steps a swap is expected to pay over
    min_gain_ratio: float = 2.0  # expected gain must exceed copy_ms this many times
    max_swaps_per_round: int = 2  # concurrent async copies (earlier rounds' in-flight ones count)
    min_rate_margin: float = 0.25  # admitted rate must beat the evicted one by this fraction
    cooldown_steps: int = 32  # an expert swapped in or out stays put this many steps
    noise_z: float = 4.0  # standard errors the rate gap must clear (0: no noise test)

    def __post_init__(self):
        for name in ("copy_ms", "saved_ms_per_token", "horizon_steps"):
            v = getattr(self, name)
            if not _is_number(v) or v <= 0:
                raise AdaptationError(f"{name} must be a finite number > 0, got {v!r}")
        for name in ("min_gain_ratio", "min_rate_margin", "noise_z"):
            v = getattr(self, name)
            if not _is_number(v) or v < 0:
                raise AdaptationError(f"{name} must be a finite number >= 0, got {v!r}")
        for name in ("max_swaps_per_round", "cooldown_steps"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise AdaptationError(f"{name} must be an integer >= 0, got {v!r}")

    @classmethod
    def priced(cls, cost: Any, settings: Any) -> "AdaptationPolicy":
        """The runtime's policy: `settings` (config.AdaptationSettings) priced by a cost model
        (cost_model.CostModel); the heat counters' unit is one token's saving in a step."""
        return cls(copy_ms=cost.copy_ms,
                   saved_ms_per_token=max(1e-3, step_saving_ms(cost.cpu_ms, cost.gpu_ms, cost.copy_ms, 1)),
                   horizon_steps=settings.horizon_steps, min_gain_ratio=settings.min_gain_ratio,
                   max_swaps_per_round=settings.max_swaps_in_flight, min_rate_margin=settings.min_rate_margin,
                   cooldown_steps=settings.cooldown_steps, noise_z=settings.noise_z)

    @property
    def min_rate_gap(self) -> float:
        """The smallest rate difference (tokens/step) whose expected gain clears the copy cost test."""
        return self.copy_ms * self.min_gain_ratio / (self.saved_ms_per_token * self.horizon_steps)

    def expected_gain_ms(self, admit_rate: float, evict_rate: float) -> float:
        return (admit_rate - evict_rate) * self.saved_ms_per_token * self.horizon_steps


# ---------------------------------------------------------------- planning


@dataclasses.dataclass(frozen=True)
class Swap:
    """Evict `evict` from layer `layer`'s GPU slot and copy `admit` into it."""

    layer: int
    evict: int  # resident expert -> served from the CPU from now on
    admit: int  # host expert -> copied into evict's GPU slot
    expected_gain_ms: float  # (admit_rate - evict_rate) * saved_ms_per_token * horizon_steps
    copy_ms: float
    admit_rate: float = 0.0  # tokens/step when planned (for logs)
    evict_rate: float = 0.0

    @property
    def net_gain_ms(self) -> float:
        return self.expected_gain_ms - self.copy_ms

    def text(self) -> str:
        return (f"layer {self.layer}: expert {self.evict} -> CPU ({self.evict_rate:.3g} tok/step), "
                f"expert {self.admit} -> GPU ({self.admit_rate:.3g} tok/step): expected gain "
                f"{self.expected_gain_ms:.1f} ms vs copy {self.copy_ms:.2f} ms")


@dataclasses.dataclass(frozen=True)
class AdaptationPlan:
    """plan_swaps' answer: the swaps to start now, best first, and why others wait."""

    step: int
    swaps: tuple[Swap, ...]
    limit: int  # copies this round could start: max_swaps_per_round - in_flight
    held_back: tuple[str, ...] = ()  # one line per layer whose best pair was refused, and why
    deferred: int = 0  # swaps refused only by the copy limit: plan again once a copy lands

    def text(self) -> str:
        rows = [f"fiddler adaptation @ step {self.step}: {len(self.swaps)} swap(s) (limit {self.limit})"]
        rows += ["  " + s.text() for s in self.swaps]
        rows += ["  held back: " + h for h in self.held_back]
        return "\n".join(rows)


def _refusal(policy: AdaptationPolicy, admit_rate: float, evict_rate: float,
             effective_steps: float | None) -> str | None:
    """Why a (admit, evict) pair is not worth a copy, or None if it is."""
    gap = admit_rate - evict_rate
    if gap <= _EPS or admit_rate <= evict_rate * (1 + policy.min_rate_margin) + _EPS:
        return f"rate margin below {policy.min_rate_margin:.0%}"
    gain = policy.expected_gain_ms(admit_rate, evict_rate)
    if gain <= policy.copy_ms * policy.min_gain_ratio:
        return f"gain {gain:.1f} ms <= {policy.min_gain_ratio:g} x copy {policy.copy_ms:.2f} ms"
    if effective_steps is not None and policy.noise_z > 0:
        if effective_steps <= 0:
            return "no observations yet"
        stderr = math.sqrt((admit_rate + evict_rate) / effective_steps)
        if gap <= policy.noise_z * stderr:
            return (f"gap {gap:.3g} tok/step within noise ({policy.noise_z:g} x {stderr:.3g}, "
                    f"{effective_steps:.0f} effective steps)")
    return None


def plan_swaps(rates: Sequence[Sequence[float]], resident: Sequence[Sequence[int]],
               policy: AdaptationPolicy, *, step: int,
               last_moved: Mapping[tuple[int, int], int] | None = None,
               effective_steps: Sequence[float] | None = None,
               in_flight: int = 0) -> AdaptationPlan:
    """The swaps worth starting at `step`, best first.

    rates [L][E]: tokens/step per expert (ExpertHeat.rates()).
    resident [L][R_l]: GPU experts per layer, as they will be once every
      in-flight copy has landed (swaps already planned count as made).
    last_moved {(layer, expert): step it was last swapped in or out}: the
      cooldown; experts absent from it are free to move.
    effective_steps [L] (ExpertHeat.effective_steps()): enables the noise
      test; None skips it (rates then taken as exact).
    in_flight: copies from earlier rounds still running; they count against
      max_swaps_per_round, which bounds concurrent copies.

    Within a layer the k-th hottest movable host expert is paired with the
    k-th coldest movable resident one, k = 0, 1, ...; the first pair that
    fails a rule ends that layer (the pairs after it have a smaller gap).
    Over all layers the pairs are taken by net gain (expected gain - copy),
    ties to the lower layer, then the earlier pair; so a layer's pairs are
    taken in order and the answer is deterministic.
    """
    rows = _check_matrix(rates, "rates")
    L, E = len(rows), len(rows[0])
    slots = _check_resident(resident, L, E)
    if not isinstance(policy, AdaptationPolicy):
        raise AdaptationError(f"policy must be an AdaptationPolicy, got {type(policy).__name__}")
    if not _is_int(step) or step < 0:
        raise AdaptationError(f"step must be an integer >= 0, got {step!r}")
    if not _is_int(in_flight) or in_flight < 0:
        raise AdaptationError(f"in_flight must be an integer >= 0, got {in_flight!r}")
    if effective_steps is not None and (
            isinstance(effective_steps, (str, bytes)) or not isinstance(effective_steps, Sequence)
            or len(effective_steps) != L or not all(_is_number(n) and n >= 0 for n in effective_steps)):
        raise AdaptationError(f"effective_steps: expected {L} finite numbers >= 0 (one per layer)")
    moved = dict(last_moved or {})
    for key, when in moved.items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(_is_int(k) for k in key)) \
                or not _is_int(when):
            raise AdaptationError(f"last_moved: expected {{(layer, expert): step}}, got {key!r}: {when!r}")

    def cooling(l: int, e: int) -> bool:
        return (l, e) in moved and step - moved[(l, e)] < policy.cooldown_steps

    limit = max(0, policy.max_swaps_per_round - in_flight)
    candidates: list[tuple[tuple[float, int, int], Swap]] = []  # (sort key, swap)
    held_back: list[str] = []
    for l in range(L):
        row, on_gpu = rows[l], set(slots[l])
        # hottest host experts first, coldest resident ones first; ids break ties
        admits = sorted((e for e in range(E) if e not in on_gpu and not cooling(l, e)),
                        key=lambda e: (-row[e], e))
        evicts = sorted((e for e in slots[l] if not cooling(l, e)), key=lambda e: (row[e], e))
        n_eff = None if effective_steps is None else float(effective_steps[l])
        for k, (y, x) in enumerate(zip(admits, evicts)):
            why = _refusal(policy, row[y], row[x], n_eff)
            if why is not None:
                if row[y] > row[x]:  # a would-be improvement: worth a line in the log
                    held_back.append(f"layer {l}: {x} -> {y} ({row[x]:.3g} vs {row[y]:.3g} tok/step): {why}")
                break
            swap = Swap(layer=l, evict=x, admit=y, expected_gain_ms=policy.expected_gain_ms(row[y], row[x]),
                        copy_ms=policy.copy_ms, admit_rate=row[y], evict_rate=row[x])
            candidates.append(((-swap.net_gain_ms, l, k), swap))
    candidates.sort(key=lambda c: c[0])
    chosen = tuple(s for _, s in candidates[:limit])
    held_back += [f"layer {s.layer}: {s.evict} -> {s.admit} (net gain {s.net_gain_ms:.1f} ms): "
                  f"over the limit of {policy.max_swaps_per_round} copies in flight"
                  for _, s in candidates[limit:]]
    return AdaptationPlan(step=step, swaps=chosen, limit=limit, held_back=tuple(held_back),
                          deferred=len(candidates) - len(chosen))


def apply_swaps(resident: Sequence[Sequence[int]], swaps: Sequence[Swap]) -> tuple[tuple[int, ...], ...]:
    """resident [L][R_l] after `swaps`, in order: each admit takes its evict's position (its GPU slot)."""
    out = [list(r) for r in resident]
    for s in swaps:
        if not 0 <= s.layer < len(out):
            raise AdaptationError(f"swap names layer {s.layer}, resident has {len(out)} layers")
        layer = out[s.layer]
        if s.evict not in layer:
            raise AdaptationError(f"swap evicts expert {s.evict} of layer {s.layer}, which is not resident")
        if s.admit in layer:
            raise AdaptationError(
                f"swap admits expert {s.admit} of layer {s.layer}, which is already resident")
        layer[layer.index(s.evict)] = s.admit
    return tuple(tuple(r) for r in out)


# ---------------------------------------------------------------- simulation
# A trace is what the runtime's device counters see: trace[s][l][e] = tokens
# routed to expert e of layer l at step s ([S][L][E]; a token counts once in
# each of its top-k experts). A token routed to a GPU-resident expert is a hit.


def _check_trace(trace: object, num_layers: int) -> tuple[tuple[tuple[float, ...], ...], ...]:
    if isinstance(trace, (str, bytes)) or not isinstance(trace, Sequence):
        raise AdaptationError("trace: expected a list of steps, each [layer][expert] routed-token counts")
    steps = tuple(_check_matrix(s, f"trace step {i}", num_layers) for i, s in enumerate(trace))
    if steps and any(len(s[0]) != len(steps[0][0]) for s in steps):
        raise AdaptationError("trace: steps disagree on the number of experts")
    return steps


def trace_counts(trace: Sequence[Sequence[Sequence[float]]]) -> tuple[tuple[float, ...], ...]:
    """[L][E] tokens routed over the whole trace (a popularity profile of it)."""
    if not trace:
        raise AdaptationError("trace: no steps")
    steps = _check_trace(trace, len(trace[0]))
    L, E = len(steps[0]), len(steps[0][0])
    return tuple(tuple(sum(s[l][e] for s in steps) for e in range(E)) for l in range(L))


def static_hit_rate(trace: Sequence[Sequence[Sequence[float]]], resident: Sequence[Sequence[int]]) -> float:
    """Share of the trace's routed tokens that land on `resident` [L][R_l] (0.0 if none routed)."""
    if not trace:
        return 0.0
    steps = _check_trace(trace, len(resident))
    slots = _check_resident(resident, len(resident), len(steps[0][0]))
    total = sum(sum(sum(r) for r in s) for s in steps)
    hits = sum(sum(s[l][e] for e in slots[l]) for s in steps for l in range(len(slots)))
    return hits / total if total else 0.0


@dataclasses.dataclass(frozen=True)
class SimulationResult:
    """What simulate() saw: tokens served from the GPU, and the swaps it made."""

    hits: float  # routed tokens served by a GPU-resident expert
    total: float  # routed tokens
    swaps: tuple[tuple[int, Swap], ...]  # (step planned for, swap), in plan order
    final_resident: tuple[tuple[int, ...], ...]  # [L][R_l] once every planned copy has landed
    per_phase: tuple[float, ...] = ()  # hit rate of each phase_steps-long window (if asked)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.total if self.total else 0.0

    @property
    def num_swaps(self) -> int:
        return len(self.swaps)

    def text(self) -> str:
        rows = [(f"adaptive hit rate {self.hit_rate:.1%} of {self.total:g} routed tokens, "
                 f"{self.num_swaps} swap(s)")]
        if self.per_phase:
            rows.append("  per phase: " + " ".join(f"{r:.1%}" for r in self.per_phase))
        return "\n".join(rows)


def simulate(trace: Sequence[Sequence[Sequence[float]]], initial_resident: Sequence[Sequence[int]],
             policy: AdaptationPolicy, *, half_life_steps: float, replan_every: int = 1,
             copy_latency_steps: int = 1, copy_in_place: bool = False,
             phase_steps: int | None = None, replan_on_landing: bool = False) -> SimulationResult:
    """Replays `trace` [S][L][E] under online adaptation, as the runtime would run it.

    Per step s: copies due at s land; the step's tokens are served (hits
    counted against the GPU experts serving now); its counts are accumulated.
    Every `replan_every` steps the accumulated counts go to an ExpertHeat in
    one batched observe (the runtime reads the device counters that rarely)
    and plan_swaps runs for step p = s + 1, with the cooldown, the noise test
    and the copies still in flight. With replan_on_landing (what the runtime
    does), a step in which a copy landed while the last plan had deferred
    swaps over the copy limit also plans, on the rates already observed: the
    copy limit then bounds the copies in flight, not the swaps per interval.

    A swap planned for step p lands at the start of step p + copy_latency_steps
    (0: an instantaneous copy); copies never stall a step. Until it lands the
    admitted expert is served from the CPU. By default (a staging buffer) the
    evicted expert keeps serving from the GPU until then and the switch is
    atomic (this needs a spare expert-sized GPU buffer per copy in flight,
    i.e. max_swaps_per_round of them); copy_in_place=True models a copy that
    overwrites the evicted expert's slot, which then serves nothing from the
    GPU until it lands (both experts on the CPU for copy_latency_steps).
    """
    if isinstance(initial_resident, (str, bytes)) or not isinstance(initial_resident, Sequence) \
            or not initial_resident:
        raise AdaptationError("initial_resident: expected a list of layers, each a list of GPU expert ids")
    if not isinstance(policy, AdaptationPolicy):
        raise AdaptationError(f"policy must be an AdaptationPolicy, got {type(policy).__name__}")
    steps = _check_trace(trace, len(initial_resident))
    if not steps:
        raise AdaptationError("trace: no steps")
    L, E = len(steps[0]), len(steps[0][0])
    committed = [list(r) for r in _check_resident(initial_resident, L, E)]  # [L][R_l], slot order
    serving = [set(r) for r in committed]  # [L] GPU experts serving tokens right now
    if not _is_int(replan_every) or replan_every < 1:
        raise AdaptationError(f"replan_every must be an integer >= 1, got {replan_every!r}")
    if not _is_int(copy_latency_steps) or copy_latency_steps < 0:
        raise AdaptationError(f"copy_latency_steps must be an integer >= 0, got {copy_latency_steps!r}")
    if phase_steps is not None and (not _is_int(phase_steps) or phase_steps < 1):
        raise AdaptationError(f"phase_steps must be an integer >= 1 or None, got {phase_steps!r}")

    heat = ExpertHeat(L, E, half_life_steps)
    pending: list[tuple[int, Swap]] = []  # (landing step, swap), in plan order
    last_moved: dict[tuple[int, int], int] = {}
    planned: list[tuple[int, Swap]] = []
    acc = [[0.0] * E for _ in range(L)]  # counts since the last observe
    hits = total = 0.0
    phase_hits: list[float] = []
    phase_total: list[float] = []
    deferred = 0  # the last plan's swaps over the copy limit
    for s, counts in enumerate(steps):
        landed = False
        while pending and pending[0][0] <= s:  # same latency for all: landing order = plan order
            landed = True
            _, sw = pending.pop(0)
            serving[sw.layer].discard(sw.evict)
            # in place, an admit that a later copy is already overwriting never serves
            if not (copy_in_place and any(o.layer == sw.layer and o.evict == sw.admit for _, o in pending)):
                serving[sw.layer].add(sw.admit)
        step_hits = sum(counts[l][e] for l in range(L) for e in serving[l])
        step_total = sum(sum(r) for r in counts)
        hits += step_hits
        total += step_total
        if phase_steps is not None:
            if s % phase_steps == 0:
                phase_hits.append(0.0)
                phase_total.append(0.0)
            phase_hits[-1] += step_hits
            phase_total[-1] += step_total
        for l in range(L):
            for e in range(E):
                acc[l][e] += counts[l][e]
        observe = (s + 1) % replan_every == 0
        if not observe and not (replan_on_landing and landed and deferred):
            continue
        if observe:
            heat.observe_all(acc, steps=replan_every)
            acc = [[0.0] * E for _ in range(L)]
        p = s + 1
        plan = plan_swaps(heat.rates(), committed, policy, step=p, last_moved=last_moved,
                          effective_steps=heat.effective_steps(),
                          in_flight=sum(1 for land, _ in pending if land > p))
        deferred = plan.deferred
        for sw in plan.swaps:
            committed = [list(r) for r in apply_swaps(committed, [sw])]
            last_moved[(sw.layer, sw.evict)] = last_moved[(sw.layer, sw.admit)] = p
            pending.append((p + copy_latency_steps, sw))
            planned.append((p, sw))
            if copy_in_place:
                serving[sw.layer].discard(sw.evict)
    return SimulationResult(
        hits=hits, total=total, swaps=tuple(planned),
        final_resident=tuple(tuple(r) for r in committed),
        per_phase=tuple(h / t if t else 0.0 for h, t in zip(phase_hits, phase_total)))
