"""Fiddler's options: ``--additional-config '{"fiddler": {...}}'``.

Pure Python (no torch, no vLLM import), so it is validated in the frontend
process before anything is allocated, and unit-tested in CPU CI.

| key                   | type        | default | meaning |
|-----------------------|-------------|---------|---------|
| gpu_expert_budget_gb  | float >= 0  | auto    | GPU memory for resident experts |
| kv_cache_reserve_gb   | float >= 0  | auto    | kept free for KV cache when the budget is auto |
| placement             | str         | "even"  | "even", or a JSON file of GPU experts per layer |
| cpu_threads           | int >= 1    | auto    | threads computing cold experts |
| staging_slots         | int >= 0    | 2       | GPU slots for copying cold experts (CUDA); 0 = CPU only |
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
        )

    def resolved_cpu_threads(self) -> int:
        if self.cpu_threads is not None:
            return self.cpu_threads
        return default_cpu_threads()


def default_cpu_threads() -> int:
    """All cores this process may use but one, which the engine loop keeps."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, n - 1)


def _non_negative_float(raw: Mapping[str, Any], key: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FiddlerConfigError(f"fiddler option {key} must be a number of GB, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise FiddlerConfigError(f"fiddler option {key} must be >= 0 GB, got {value!r}")
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


def _placement(raw: Mapping[str, Any]) -> str:
    value = raw.get("placement", PLACEMENT_EVEN)
    if not isinstance(value, str) or not value:
        raise FiddlerConfigError(
            f"fiddler option placement must be \"even\" or a path to a JSON file, got {value!r}")
    if value != PLACEMENT_EVEN and not os.path.isfile(value):
        raise FiddlerConfigError(f"fiddler placement file {value!r} does not exist")
    return value
