"""Fiddler's options: ``--additional-config '{"fiddler": {...}}'``.

Pure Python (no torch, no vLLM import), so it is validated in the frontend
process before anything is allocated, and unit-tested in CPU CI. What a user
decides: how much GPU memory the experts get, which experts go there, how
many CPU threads compute the rest, and whether placement adapts while
serving. docs/options.md lists every option, the advanced ones included.

| key                   | type        | default | meaning |
|-----------------------|-------------|---------|---------|
| gpu_expert_budget_gb  | float >= 0  | auto    | GPU memory for resident experts (GiB) |
| placement             | str         | "even"  | "even", or a JSON file of GPU experts per layer |
| cpu_threads           | int >= 1    | auto    | threads computing cold experts |
| adaptation            | "auto", bool or object | "auto" | online re-placement of experts while serving |
| kv_cache_reserve_gb   | float >= 0  | auto    | advanced: kept free for KV cache when the budget is auto |
| staging_slots         | int >= 0    | 2       | advanced: GPU slots for copying cold experts; 0 = CPU only |
| streamed_chunks       | "auto" or list of int >= 0 | "auto" | advanced: per top-k position, chunks of a cold expert decode steps read from host memory on the GPU |
| arrival_coalesce_ms   | float >= 0  | 2.0     | advanced: an idle engine waits this long for the rest of a burst of requests; 0: vLLM's scheduler |

``adaptation``: ``true`` / ``false``; ``"auto"`` = on with a GPU when host
memory can also hold a copy of every GPU-resident expert (which re-placement
needs, see vllm_fiddler.runtime.replacer), off otherwise; or an object, which
turns it on and overrides the policy's knobs (ADAPTATION_KNOBS, defaults in
AdaptationSettings).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

CONFIG_KEY = "fiddler"
PLACEMENT_EVEN = "even"


class FiddlerConfigError(ValueError):
    """A bad fiddler option; the message names the key and what to change."""


@dataclasses.dataclass(frozen=True)
class FiddlerConfig:
    # None = auto: what gpu_memory_utilization leaves after the non-expert
    # weights and `kv_cache_reserve_gb` (see budget.auto_expert_budget_bytes).
    gpu_expert_budget_gb: float | None = None
    # None = auto: the KV cache of one max_model_len sequence plus margin.
    kv_cache_reserve_gb: float | None = None
    # "even" spreads the budget evenly across layers; anything else is a path
    # to a JSON placement file (see placement.load_placement_file).
    placement: str = PLACEMENT_EVEN
    # None = auto: the cores this process may run on, less one for the engine.
    cpu_threads: int | None = None
    # Expert-sized GPU buffers for the weight-copy path, taken from the expert
    # budget; two let one copy run while the previous expert computes.
    staging_slots: int = 2
    adaptation: "AdaptationSettings" = dataclasses.field(default_factory=lambda: AdaptationSettings())
    # An idle engine holds its first step while requests of one burst are
    # still arriving, once a request has arrived just after such a step began
    # (vllm_fiddler.arrivals: LLM.beam_search's beams, one at a time from the
    # client, ran 1.86 engine steps per beam step at width 8 on the H100).
    # The gap that ends a burst; 0 keeps vLLM's scheduler.
    arrival_coalesce_ms: float = 2.0
    # None = auto: routed steps' streamed chunks per top-k position come from the
    # cost model (cost_model.streamed_chunks) and the layer's hit rate; a tuple
    # fixes them (checked against the model's top-k and chunks before loading).
    streamed_chunks: tuple[int, ...] | None = None

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> "FiddlerConfig":
        """Parses vLLM's ``additional_config``; raises FiddlerConfigError."""
        raw = (additional_config or {}).get(CONFIG_KEY, {})
        if isinstance(raw, str):  # a JSON string inside the JSON, tolerated
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as e:
                raise FiddlerConfigError(f"additional_config['fiddler'] is not valid JSON: {e}") from e
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise FiddlerConfigError(
                f"additional_config['fiddler'] must be an object, got {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise FiddlerConfigError(
                f"unknown fiddler option(s) {unknown}; known options: {sorted(known)}")
        return cls(
            gpu_expert_budget_gb=_non_negative_float(raw, "gpu_expert_budget_gb"),
            kv_cache_reserve_gb=_non_negative_float(raw, "kv_cache_reserve_gb"),
            placement=_placement(raw),
            cpu_threads=_positive_int(raw, "cpu_threads"),
            staging_slots=_non_negative_int(raw, "staging_slots", default=2),
            adaptation=AdaptationSettings.parse(raw.get("adaptation", "auto")),
            arrival_coalesce_ms=_non_negative_float(raw, "arrival_coalesce_ms", unit="ms", default=2.0),
            streamed_chunks=_streamed_chunks(raw),
        )

    def resolved_cpu_threads(self, processes: int = 1) -> int:
        """Compute threads of one process's CPU experts, where `processes` share this host's
        cores (tensor-parallel ranks, each with its shard of every cold expert)."""
        if self.cpu_threads is not None:
            return self.cpu_threads
        return default_cpu_threads(processes)


@dataclasses.dataclass(frozen=True)
class AdaptationSettings:
    """Online re-placement (vllm_fiddler.runtime.replacer, policy in vllm_fiddler.adaptation).

    Defaults, for decode at a few tokens per expert per step (Mixtral: top-2 of
    8, so ~0.25 tokens per expert per step at batch 1): a 512-step half-life
    makes a rate estimate worth ~1500 steps (stderr ~0.02 tokens/step), so a
    2x popularity gap is told from noise within a few hundred steps, while
    one long prompt (thousands of tokens in one step) moves the heat at once.
    """

    enabled: bool | None = None  # None = auto
    interval_steps: int = 16  # steps between two reads of the routing counters
    half_life_steps: float = 512.0  # of the decaying per-expert heat
    horizon_steps: float = 256.0  # steps a swap is expected to pay over
    min_gain_ratio: float = 2.0  # expected gain must beat the copy this many times
    max_swaps_in_flight: int = 2  # concurrent expert copies (each ~6.5 ms of PCIe for Mixtral)
    min_rate_margin: float = 0.25  # the admitted expert must be this much hotter
    cooldown_steps: int = 128  # an expert that just moved stays put this long
    noise_z: float = 4.0  # standard errors the rate gap must clear

    @classmethod
    def parse(cls, value: Any) -> "AdaptationSettings":
        if value == "auto" or value is None:
            return cls()
        if isinstance(value, bool):
            return cls(enabled=value)
        if not isinstance(value, Mapping):
            raise FiddlerConfigError(
                f"fiddler option adaptation must be \"auto\", true, false or an object of "
                f"{sorted(ADAPTATION_KNOBS)}, got {value!r}")
        unknown = sorted(set(value) - set(ADAPTATION_KNOBS) - {"enabled"})
        if unknown:
            raise FiddlerConfigError(
                f"unknown fiddler adaptation option(s) {unknown}; known: {sorted(ADAPTATION_KNOBS)}")
        enabled = value.get("enabled", True)
        if not isinstance(enabled, bool):
            raise FiddlerConfigError(f"fiddler adaptation.enabled must be true or false, got {enabled!r}")
        knobs = {}
        for key, (kind, low) in ADAPTATION_KNOBS.items():
            if key not in value:
                continue
            v = value[key]
            ok = not isinstance(v, bool) and (isinstance(v, int) if kind is int else isinstance(v, (int, float)))
            if not ok or not math.isfinite(v) or v < low or (key in _POSITIVE_KNOBS and v == 0):
                bound = "> 0" if key in _POSITIVE_KNOBS else f">= {low}"
                raise FiddlerConfigError(
                    f"fiddler adaptation.{key} must be {'an integer' if kind is int else 'a number'} "
                    f"{bound}, got {v!r}")
            knobs[key] = kind(v)
        return cls(enabled=enabled, **knobs)


# adaptation knobs: key -> (type, lowest value)
ADAPTATION_KNOBS = {
    "interval_steps": (int, 1), "half_life_steps": (float, 0), "horizon_steps": (float, 0),
    "min_gain_ratio": (float, 0), "max_swaps_in_flight": (int, 1), "min_rate_margin": (float, 0),
    "cooldown_steps": (int, 0), "noise_z": (float, 0),
}
_POSITIVE_KNOBS = {"half_life_steps", "horizon_steps"}


def default_cpu_threads(processes: int = 1) -> int:
    """All cores this process may use but one, which the engine loop keeps; with several
    processes (tensor-parallel ranks), the cores less one engine loop each, split evenly.

    Leaving vLLM more (its frontend process and output thread also run every
    step) did not beat the H100 box's noise: batch-1 decode with 13 of 16 threads
    ran 19.1-32.0 tok/s over 6 engines (mean 24.2), with 15 threads 20.0-31.8
    over 9 (mean 23.9) (benchmarks/results/decode-host-h100.json)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, (n - processes) // processes)


def _non_negative_float(raw: Mapping[str, Any], key: str, unit: str = "GB",
                        default: float | None = None) -> float | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FiddlerConfigError(f"fiddler option {key} must be a number of {unit}, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise FiddlerConfigError(f"fiddler option {key} must be >= 0 {unit}, got {value!r}")
    return float(value)


def _positive_int(raw: Mapping[str, Any], key: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FiddlerConfigError(f"fiddler option {key} must be an integer >= 1, got {value!r}")
    return value


def _non_negative_int(raw: Mapping[str, Any], key: str, default: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FiddlerConfigError(f"fiddler option {key} must be an integer >= 0, got {value!r}")
    return value


def _streamed_chunks(raw: Mapping[str, Any]) -> tuple[int, ...] | None:
    value = raw.get("streamed_chunks", "auto")
    if value == "auto":
        return None
    if not isinstance(value, (list, tuple)) or not value or \
            any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in value):
        raise FiddlerConfigError(
            f"fiddler option streamed_chunks must be \"auto\" or a list of integers >= 0, one per top-k "
            f"position (e.g. [2, 2]), got {value!r}")
    return tuple(value)


def _placement(raw: Mapping[str, Any]) -> str:
    value = raw.get("placement", PLACEMENT_EVEN)
    if not isinstance(value, str) or not value:
        raise FiddlerConfigError(
            f"fiddler option placement must be \"even\" or a path to a JSON file, got {value!r}")
    if value != PLACEMENT_EVEN and not os.path.isfile(value):
        raise FiddlerConfigError(f"fiddler placement file {value!r} does not exist")
    return value
