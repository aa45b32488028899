"""Where each (layer, expert) lives: ``gpu`` (device-resident) or ``cpu``.

Pure planning code (no torch, no vLLM): counts and a budget in, a Placement
and a printable report out, so it is unit-tested in CPU CI.

Shape legend: L = MoE layers, E = experts per layer.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

from vllm_fiddler.config import PLACEMENT_EVEN, FiddlerConfig, FiddlerConfigError

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class MoEShape:
    """The sizes placement and budgets need, read off a Hugging Face config."""

    num_layers: int  # L
    num_experts: int  # E
    hidden_size: int  # H
    intermediate_size: int  # I (per expert)
    top_k: int
    dtype_bytes: int
    non_expert_bytes: int  # attention, norms, router gates, embeddings, lm_head
    kv_bytes_per_token: int

    @property
    def expert_bytes(self) -> int:
        # w1 and w3 are [I, H], w2 is [H, I]
        return 3 * self.hidden_size * self.intermediate_size * self.dtype_bytes

    @property
    def all_experts_bytes(self) -> int:
        return self.num_layers * self.num_experts * self.expert_bytes

    @classmethod
    def from_hf_config(cls, hf: Any, dtype_bytes: int) -> "MoEShape":
        """Mixtral-style config (MixtralConfig attribute names)."""
        H, L, E = hf.hidden_size, hf.num_hidden_layers, hf.num_local_experts
        heads = hf.num_attention_heads
        kv_heads = getattr(hf, "num_key_value_heads", None) or heads
        head_dim = getattr(hf, "head_dim", None) or H // heads
        attn = H * heads * head_dim + 2 * H * kv_heads * head_dim + heads * head_dim * H
        per_layer = attn + 2 * H + H * E  # + two RMSNorms + router gate
        embed = hf.vocab_size * H
        lm_head = 0 if getattr(hf, "tie_word_embeddings", False) else hf.vocab_size * H
        non_expert = (L * per_layer + embed + lm_head + H) * dtype_bytes
        return cls(
            num_layers=L, num_experts=E, hidden_size=H,
            intermediate_size=hf.intermediate_size, top_k=hf.num_experts_per_tok,
            dtype_bytes=dtype_bytes, non_expert_bytes=non_expert,
            kv_bytes_per_token=2 * L * kv_heads * head_dim * dtype_bytes,
        )


def auto_expert_budget_bytes(*, gpu_total_bytes: int, gpu_memory_utilization: float,
                             non_expert_bytes: int, kv_reserve_bytes: int) -> int:
    """What vLLM's share of the GPU leaves for experts; may be <= 0 (none fit)."""
    return int(gpu_total_bytes * gpu_memory_utilization) - non_expert_bytes - kv_reserve_bytes


def default_kv_reserve_bytes(shape: MoEShape, max_model_len: int) -> int:
    # One full-length sequence of KV cache, plus 1 GiB for activations and the
    # profile run's peak (vLLM sizes the real KV cache from what is left).
    return shape.kv_bytes_per_token * max_model_len + GIB


def format_bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 1024**2:.2f} MiB"


@dataclasses.dataclass(frozen=True)
class Placement:
    """gpu_experts[l] = sorted ids of layer l's device-resident experts."""

    num_experts: int
    gpu_experts: tuple[tuple[int, ...], ...]  # [L][<=E]

    @property
    def num_layers(self) -> int:
        return len(self.gpu_experts)

    def on_gpu(self, layer: int) -> tuple[int, ...]:
        return self.gpu_experts[layer]

    def on_cpu(self, layer: int) -> tuple[int, ...]:
        gpu = set(self.gpu_experts[layer])
        return tuple(e for e in range(self.num_experts) if e not in gpu)

    @property
    def num_gpu(self) -> int:
        return sum(len(g) for g in self.gpu_experts)

    @property
    def num_cpu(self) -> int:
        return self.num_layers * self.num_experts - self.num_gpu

    def report(self, expert_bytes: int, source: str) -> str:
        """The one-time startup log: experts on GPU per layer, GB on each side."""
        per_layer = [len(g) for g in self.gpu_experts]
        rows = [f"fiddler placement ({source}): {self.num_gpu}/{self.num_gpu + self.num_cpu} "
                f"experts on GPU = {format_bytes(self.num_gpu * expert_bytes)}, "
                f"{self.num_cpu} on CPU = {format_bytes(self.num_cpu * expert_bytes)}"]
        rows.append("  layer | gpu experts")
        for start in range(0, self.num_layers, 8):
            chunk = range(start, min(start + 8, self.num_layers))
            rows.append(f"  {start:>2}-{chunk[-1]:<2} | " + " ".join(
                f"{per_layer[l]}/{self.num_experts}:[{','.join(map(str, self.gpu_experts[l]))}]"
                for l in chunk))
        return "\n".join(rows)


def plan_even(num_layers: int, num_experts: int, num_gpu_experts: int) -> Placement:
    """Spreads `num_gpu_experts` over the layers as evenly as possible.

    With no popularity profile every expert is equally likely, so an even
    spread keeps every layer's expected CPU work equal (the slowest layer sets
    the step time). Within a layer the lowest ids are taken.
    """
    total = num_layers * num_experts
    n = max(0, min(num_gpu_experts, total))
    base, extra = divmod(n, num_layers) if num_layers else (0, 0)
    return Placement(num_experts, tuple(
        tuple(range(base + (1 if l < extra else 0))) for l in range(num_layers)))


def placement_from_mapping(data: Any, num_layers: int, num_experts: int,
                           source: str = "placement") -> Placement:
    """Validates ``{"gpu_experts": [[e, ...] per layer] or {"layer": [e, ...]}}``."""
    if not isinstance(data, Mapping) or "gpu_experts" not in data:
        raise FiddlerConfigError(f"{source}: expected an object with key \"gpu_experts\"")
    raw = data["gpu_experts"]
    if isinstance(raw, Sequence) and not isinstance(raw, str):
        items = list(enumerate(raw))
        if len(raw) > num_layers:
            raise FiddlerConfigError(
                f"{source}: lists {len(raw)} layers, the model has {num_layers}")
    elif isinstance(raw, Mapping):
        items = []
        for key, experts in raw.items():
            try:
                items.append((int(key), experts))
            except ValueError:
                raise FiddlerConfigError(f"{source}: layer key {key!r} is not an integer") from None
    else:
        raise FiddlerConfigError(f"{source}: \"gpu_experts\" must be a list or an object")
    layers: list[tuple[int, ...]] = [() for _ in range(num_layers)]
    for layer, experts in items:
        if not 0 <= layer < num_layers:
            raise FiddlerConfigError(
                f"{source}: layer {layer} does not exist (the model has layers 0..{num_layers - 1})")
        if not isinstance(experts, Sequence) or isinstance(experts, str):
            raise FiddlerConfigError(f"{source}: layer {layer} must list expert ids")
        for e in experts:
            if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < num_experts:
                raise FiddlerConfigError(
                    f"{source}: layer {layer} names expert {e!r}, which does not exist "
                    f"(experts are 0..{num_experts - 1})")
        if len(set(experts)) != len(experts):
            raise FiddlerConfigError(f"{source}: layer {layer} lists an expert twice")
        layers[layer] = tuple(sorted(experts))
    return Placement(num_experts, tuple(layers))


def load_placement_file(path: str, num_layers: int, num_experts: int) -> Placement:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise FiddlerConfigError(f"cannot read fiddler placement file {path!r}: {e}") from e
    return placement_from_mapping(data, num_layers, num_experts, source=f"placement file {path!r}")


def resolve_placement(cfg: FiddlerConfig, shape: MoEShape, budget_bytes: int) -> tuple[Placement, str]:
    """The placement for this run, and a word on where it came from.

    Raises FiddlerConfigError when a placement file does not fit the budget.
    """
    fit = max(0, budget_bytes) // shape.expert_bytes
    if cfg.placement == PLACEMENT_EVEN:
        return plan_even(shape.num_layers, shape.num_experts, fit), (
            f"even, budget {format_bytes(budget_bytes)}")
    placement = load_placement_file(cfg.placement, shape.num_layers, shape.num_experts)
    if placement.num_gpu > fit:
        raise FiddlerConfigError(
            f"placement file {cfg.placement!r} puts {placement.num_gpu} experts "
            f"({placement.num_gpu * shape.expert_bytes / GIB:.2f} GiB) on the GPU, but the "
            f"expert budget is {budget_bytes / GIB:.2f} GiB ({fit} experts): raise "
            f"gpu_expert_budget_gb or gpu_memory_utilization, or list fewer experts")
    return placement, f"file {cfg.placement}"
