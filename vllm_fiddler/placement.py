"""Where each (layer, expert) lives: ``gpu`` (device-resident) or ``cpu``.

Pure planning code (no torch, no vLLM): counts and a budget in, a Placement
and a printable report out, so it is unit-tested in CPU CI.

Shape legend: L = MoE layers, E = experts per layer.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, Sequence

from vllm_fiddler.config import PLACEMENT_EVEN, FiddlerConfig, FiddlerConfigError

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class MoEShape:
    """The sizes placement and budgets need: a model's MoE layers (L of them; dense layers
    are not counted), each with E experts of the same shape."""

    num_layers: int  # L: MoE layers
    num_experts: int  # E
    hidden_size: int  # H
    intermediate_size: int  # I (per expert)
    top_k: int
    dtype_bytes: int
    non_expert_bytes: int  # attention, norms, router gates, shared experts, dense layers, embeddings
    kv_bytes_per_token: int
    layer_ids: tuple[int, ...] = ()  # [L] each MoE layer's index in the model (default 0..L-1)
    has_bias: bool = False  # experts carry biases (gpt-oss)
    # the experts' quantized format (moe.quantized.ExpertFormat: expert_bytes(H, I)), None: dtype_bytes each
    expert_format: Any = None

    def __post_init__(self) -> None:
        if not self.layer_ids:
            object.__setattr__(self, "layer_ids", tuple(range(self.num_layers)))
        if len(self.layer_ids) != self.num_layers:
            raise ValueError(f"{len(self.layer_ids)} layer ids for {self.num_layers} MoE layers")

    @property
    def expert_bytes(self) -> int:
        if self.expert_format is not None:  # as stored: values and scales
            return self.expert_format.expert_bytes(self.hidden_size, self.intermediate_size, self.dtype_bytes)
        # w1 and w3 are [I, H], w2 is [H, I]; biases [2I] and [H]
        bias = 2 * self.intermediate_size + self.hidden_size if self.has_bias else 0
        return (3 * self.hidden_size * self.intermediate_size + bias) * self.dtype_bytes

    @property
    def all_experts_bytes(self) -> int:
        return self.num_layers * self.num_experts * self.expert_bytes

    @classmethod
    def from_layers(cls, layers: Sequence[Any], dtype_bytes: int, non_expert_bytes: int,
                    kv_bytes_per_token: int, expert_format: Any = None) -> "MoEShape":
        """From the MoE layers vLLM built (objects with layer_index, num_experts, top_k,
        hidden_size, intermediate_size, has_bias), in model order."""
        if not layers:
            raise FiddlerConfigError("fiddler: the model has no MoE layers")
        first = layers[0]
        keys = ("num_experts", "top_k", "hidden_size", "intermediate_size", "has_bias")
        for layer in layers[1:]:
            if any(getattr(layer, k) != getattr(first, k) for k in keys):
                raise FiddlerConfigError(
                    f"fiddler: MoE layers {first.layer_index} and {layer.layer_index} differ in shape "
                    f"({', '.join(f'{k}={getattr(first, k)}/{getattr(layer, k)}' for k in keys)}); "
                    "fiddler places experts of one shape per model for now")
        return cls(num_layers=len(layers), num_experts=first.num_experts, hidden_size=first.hidden_size,
                   intermediate_size=first.intermediate_size, top_k=first.top_k, dtype_bytes=dtype_bytes,
                   non_expert_bytes=non_expert_bytes, kv_bytes_per_token=kv_bytes_per_token,
                   layer_ids=tuple(layer.layer_index for layer in layers), has_bias=first.has_bias,
                   expert_format=expert_format)

    @classmethod
    def from_hf_config(cls, hf: Any, dtype_bytes: int) -> "MoEShape":
        """An estimate from a Hugging Face config, for tools and benchmarks that plan before
        any model is built (the engine uses from_layers). Raises FiddlerConfigError for a
        config that names no routed experts."""
        layout = moe_layout(hf)
        if layout is None:
            raise FiddlerConfigError(f"fiddler: {type(hf).__name__} names no routed experts")
        layer_ids, E, K = layout
        H, L = hf.hidden_size, hf.num_hidden_layers
        I = _first_attr(hf, ("moe_intermediate_size", "intermediate_size"))
        heads = hf.num_attention_heads
        kv_heads = getattr(hf, "num_key_value_heads", None) or heads
        head_dim = getattr(hf, "head_dim", None) or H // heads
        attn = H * heads * head_dim + 2 * H * kv_heads * head_dim + heads * head_dim * H
        per_layer = attn + 2 * H + H * E  # + two RMSNorms + router gate
        embed = hf.vocab_size * H
        lm_head = 0 if getattr(hf, "tie_word_embeddings", False) else hf.vocab_size * H
        non_expert = (L * per_layer + embed + lm_head + H) * dtype_bytes
        return cls(
            num_layers=len(layer_ids), num_experts=E, hidden_size=H, intermediate_size=I, top_k=K,
            dtype_bytes=dtype_bytes, non_expert_bytes=non_expert,
            kv_bytes_per_token=2 * L * kv_heads * head_dim * dtype_bytes, layer_ids=layer_ids,
            has_bias=getattr(hf, "model_type", "") == "gpt_oss")


# Hugging Face config attributes naming the routed experts, across families.
_EXPERT_ATTRS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_ATTRS = ("num_experts_per_tok", "moe_topk", "top_k")


def _first_attr(hf: Any, names: Sequence[str]) -> Any:
    for name in names:
        value = getattr(hf, name, None)
        if value:
            return value
    return None


def moe_layout(hf: Any) -> tuple[tuple[int, ...], int, int] | None:
    """(indices of the MoE layers, experts per layer, top-k) read off a Hugging Face config,
    or None if it names no routed experts (a dense model). Covers first_k_dense_replace
    (DeepSeek, GLM), decoder_sparse_step and mlp_only_layers (Qwen), moe_layer_freq."""
    E = _first_attr(hf, _EXPERT_ATTRS)
    K = _first_attr(hf, _TOP_K_ATTRS)
    if not isinstance(E, int) or not isinstance(K, int) or E < 1:
        return None
    first_dense = getattr(hf, "first_k_dense_replace", 0) or 0
    dense = set(getattr(hf, "mlp_only_layers", None) or ())
    sparse_step = getattr(hf, "decoder_sparse_step", None) or 1  # Qwen: layer i+1 divisible
    freq = getattr(hf, "moe_layer_freq", None) or 1  # DeepSeek: layer i divisible
    ids = tuple(i for i in range(hf.num_hidden_layers)
                if i >= first_dense and i not in dense and (i + 1) % sparse_step == 0 and i % freq == 0)
    return ids, E, K


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

    def report(self, expert_bytes: int, source: str, layer_ids: Sequence[int] = ()) -> str:
        """The one-time startup log: experts on GPU per (MoE) layer, GB on each side; rows are
        labelled with the model's layer indices (`layer_ids`, default 0..L-1)."""
        rows = [f"fiddler placement ({source}): {self.num_gpu}/{self.num_gpu + self.num_cpu} "
                f"experts on GPU = {format_bytes(self.num_gpu * expert_bytes)}, "
                f"{self.num_cpu} on CPU = {format_bytes(self.num_cpu * expert_bytes)}"]
        ids = layer_ids or tuple(range(self.num_layers))
        rows.append("  layer | gpu experts")
        for start in range(0, self.num_layers, 8):
            chunk = range(start, min(start + 8, self.num_layers))
            rows.append(f"  {ids[start]:>2}-{ids[chunk[-1]]:<2} | " + " ".join(
                _expert_list(self.gpu_experts[l], self.num_experts) for l in chunk))
        return "\n".join(rows)


def _expert_list(experts: Sequence[int], num_experts: int) -> str:
    """"n/E:[ids]", ranges of consecutive ids folded ("0-63") so 512-expert layers stay short."""
    parts, run = [], []
    for e in experts:
        if run and e == run[-1] + 1:
            run.append(e)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 2 else ",".join(map(str, run)))
        run = [e]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 2 else ",".join(map(str, run)))
    return f"{len(experts)}/{num_experts}:[{','.join(parts)}]"


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


def placement_from_mapping(data: Any, layers: int | Sequence[int], num_experts: int,
                           source: str = "placement") -> Placement:
    """Validates ``{"gpu_experts": [[e, ...] per MoE layer]}`` or ``{"gpu_experts": {"layer":
    [e, ...]}}``. `layers`: the model's MoE layer indices (an int L: 0..L-1). The list names MoE
    layers in order; the object's keys are model layer indices (for DeepSeek's first dense
    layers, its first key is 3, say), and layers left out keep no expert on the GPU."""
    layer_ids = tuple(range(layers)) if isinstance(layers, int) else tuple(layers)
    num_layers = len(layer_ids)
    ordinal = {layer: i for i, layer in enumerate(layer_ids)}
    if not isinstance(data, Mapping) or "gpu_experts" not in data:
        raise FiddlerConfigError(f"{source}: expected an object with key \"gpu_experts\"")
    raw = data["gpu_experts"]
    if isinstance(raw, Sequence) and not isinstance(raw, str):
        items = [(layer_ids[i] if i < num_layers else None, experts) for i, experts in enumerate(raw)]
        if len(raw) > num_layers:
            raise FiddlerConfigError(
                f"{source}: lists {len(raw)} layers, the model has {num_layers} MoE layers")
    elif isinstance(raw, Mapping):
        items = []
        for key, experts in raw.items():
            try:
                items.append((int(key), experts))
            except ValueError:
                raise FiddlerConfigError(f"{source}: layer key {key!r} is not an integer") from None
    else:
        raise FiddlerConfigError(f"{source}: \"gpu_experts\" must be a list or an object")
    chosen: list[tuple[int, ...]] = [() for _ in range(num_layers)]
    for layer, experts in items:
        if layer not in ordinal:
            raise FiddlerConfigError(
                f"{source}: layer {layer} is not an MoE layer of this model (its MoE layers: "
                f"{_ranges(layer_ids)})")
        if not isinstance(experts, Sequence) or isinstance(experts, str):
            raise FiddlerConfigError(f"{source}: layer {layer} must list expert ids")
        for e in experts:
            if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < num_experts:
                raise FiddlerConfigError(
                    f"{source}: layer {layer} names expert {e!r}, which does not exist "
                    f"(experts are 0..{num_experts - 1})")
        if len(set(experts)) != len(experts):
            raise FiddlerConfigError(f"{source}: layer {layer} lists an expert twice")
        chosen[ordinal[layer]] = tuple(sorted(experts))
    return Placement(num_experts, tuple(chosen))


def _ranges(ids: Sequence[int]) -> str:
    """"0-2, 5, 7-9": sorted ids with runs folded."""
    parts, start, prev = [], None, None
    for i in list(ids) + [None]:
        if start is not None and i is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = i
    return ", ".join(parts)


def load_placement_file(path: str, layers: int | Sequence[int], num_experts: int) -> Placement:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise FiddlerConfigError(f"cannot read fiddler placement file {path!r}: {e}") from e
    return placement_from_mapping(data, layers, num_experts, source=f"placement file {path!r}")


def resolve_placement(cfg: FiddlerConfig, shape: MoEShape, budget_bytes: int) -> tuple[Placement, str]:
    """The placement for this run, and a word on where it came from.

    Raises FiddlerConfigError when a placement file does not fit the budget.
    """
    fit = max(0, budget_bytes) // shape.expert_bytes
    if cfg.placement == PLACEMENT_EVEN:
        return plan_even(shape.num_layers, shape.num_experts, fit), (
            f"even, budget {format_bytes(budget_bytes)}")
    placement = load_placement_file(cfg.placement, shape.layer_ids, shape.num_experts)
    if placement.num_gpu > fit:
        raise FiddlerConfigError(
            f"placement file {cfg.placement!r} puts {placement.num_gpu} experts "
            f"({placement.num_gpu * shape.expert_bytes / GIB:.2f} GiB) on the GPU, but the "
            f"expert budget is {budget_bytes / GIB:.2f} GiB ({fit} experts): raise "
            f"gpu_expert_budget_gb or gpu_memory_utilization, or list fewer experts")
    return placement, f"file {cfg.placement}"


# ---------------------------------------------------------------- popularity
# Counts in, plan + report out: a profile (tokens routed to each expert,
# vllm_fiddler.profile) and a budget give the placement that keeps the most
# routed tokens on the GPU, and a report of what it buys over plan_even.

POPULARITY_KEYS = ("model", "num_layers", "num_experts", "tokens", "prompts")


def validate_counts(counts: Any, source: str = "popularity counts") -> tuple[tuple[float, ...], ...]:
    """[L][E] non-negative finite numbers, every layer the same length -> a tuple copy.

    Raises FiddlerConfigError (a ValueError) naming the first problem.
    """
    if isinstance(counts, (str, bytes)) or not isinstance(counts, Sequence):
        raise FiddlerConfigError(f"{source}: expected a list of layers, each a list of per-expert counts")
    if not counts:
        raise FiddlerConfigError(f"{source}: no layers")
    rows: list[tuple[float, ...]] = []
    width = None
    for layer, row in enumerate(counts):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise FiddlerConfigError(f"{source}: layer {layer} is not a list of per-expert counts")
        if width is None:
            width = len(row)
            if width == 0:
                raise FiddlerConfigError(f"{source}: layer 0 has no experts")
        elif len(row) != width:
            raise FiddlerConfigError(
                f"{source}: ragged counts: layer {layer} has {len(row)} experts, layer 0 has {width}")
        for expert, c in enumerate(row):
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
                raise FiddlerConfigError(
                    f"{source}: layer {layer} expert {expert}: {c!r} is not a finite number")
            if c < 0:
                raise FiddlerConfigError(f"{source}: layer {layer} expert {expert}: negative count {c!r}")
        rows.append(tuple(row))
    return tuple(rows)


def layer_hit_rates(counts: Sequence[Sequence[float]], placement: Placement) -> tuple[float, ...]:
    """Per layer: share of that layer's routed tokens that land on its GPU experts (0 if none routed)."""
    rates = []
    for layer, row in enumerate(counts):
        total = sum(row)
        on_gpu = sum(row[e] for e in placement.on_gpu(layer)) if layer < placement.num_layers else 0
        rates.append(on_gpu / total if total else 0.0)
    return tuple(rates)


def hit_rate(counts: Sequence[Sequence[float]], placement: Placement) -> float:
    """Share of all routed tokens that land on GPU experts (0 if none routed)."""
    total = sum(sum(row) for row in counts)
    on_gpu = sum(sum(row[e] for e in placement.on_gpu(layer))
                 for layer, row in enumerate(counts) if layer < placement.num_layers)
    return on_gpu / total if total else 0.0


@dataclasses.dataclass(frozen=True)
class PlacementReport:
    """What a placement buys under a popularity profile, next to plan_even.

    Hit rate = share of routed (token, expert) pairs that land on a GPU
    expert; every such pair is CPU work saved, wherever it is.
    """

    num_gpu_experts: int  # placed on the GPU (the budget, capped at L*E)
    num_experts_total: int  # L*E
    routed_tokens: float  # all (token, expert) pairs in the profile
    expected_hit_rate: float
    even_hit_rate: float  # plan_even with the same number of GPU experts
    layer_hit_rates: tuple[float, ...]  # [L]
    layer_gpu_experts: tuple[int, ...]  # [L] how many of each layer's experts are on the GPU

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {
            "layer_hit_rates": list(self.layer_hit_rates),
            "layer_gpu_experts": list(self.layer_gpu_experts)}

    def text(self) -> str:
        n, total = self.num_gpu_experts, self.num_experts_total
        gain = self.expected_hit_rate - self.even_hit_rate
        rows = [(f"popularity placement: {n}/{total} experts on GPU; expected GPU hit rate "
                 f"{self.expected_hit_rate:.1%} of {self.routed_tokens:g} routed (token, expert) pairs, "
                 f"even placement {self.even_hit_rate:.1%} ({100 * gain:+.1f} points)"),
                "  layer | gpu experts | hit rate"]
        E = self.num_experts_total // max(1, len(self.layer_gpu_experts))
        rows += [f"  {l:>5} | {f'{g}/{E}':>11} | {r:.1%}"
                 for l, (g, r) in enumerate(zip(self.layer_gpu_experts, self.layer_hit_rates))]
        return "\n".join(rows)


def plan_from_popularity(counts: Sequence[Sequence[float]],
                         num_gpu_experts: int) -> tuple[Placement, PlacementReport]:
    """The `num_gpu_experts` (layer, expert) pairs with the most routed tokens go to the GPU.

    Global, not per layer: a token routed to a GPU expert saves the same CPU
    work in any layer, so a hot expert anywhere beats a cold one elsewhere.
    Ties go first to the layer holding fewer of the tied experts so far (an
    expert's rank within its own layer), then to the lower layer and expert
    id: uniform counts spread like plan_even, keeping per-layer CPU work
    level, and the result is deterministic.
    The budget is capped at L*E; negative budgets are an error.
    """
    rows = validate_counts(counts)
    if isinstance(num_gpu_experts, bool) or not isinstance(num_gpu_experts, int) or num_gpu_experts < 0:
        raise FiddlerConfigError(f"num_gpu_experts must be an integer >= 0, got {num_gpu_experts!r}")
    L, E = len(rows), len(rows[0])
    n = min(num_gpu_experts, L * E)
    rank = {}  # (l, e) -> rank of e within layer l by (-count, id)
    for l in range(L):
        for r, e in enumerate(sorted(range(E), key=lambda e: (-rows[l][e], e))):
            rank[(l, e)] = r
    ranked = sorted(rank, key=lambda p: (-rows[p[0]][p[1]], rank[p], p))
    chosen: list[list[int]] = [[] for _ in range(L)]
    for l, e in ranked[:n]:
        chosen[l].append(e)
    placement = Placement(E, tuple(tuple(sorted(c)) for c in chosen))
    report = PlacementReport(
        num_gpu_experts=n, num_experts_total=L * E,
        routed_tokens=sum(sum(r) for r in rows),
        expected_hit_rate=hit_rate(rows, placement),
        even_hit_rate=hit_rate(rows, plan_even(L, E, n)),
        layer_hit_rates=layer_hit_rates(rows, placement),
        layer_gpu_experts=tuple(len(c) for c in chosen))
    return placement, report


@dataclasses.dataclass(frozen=True)
class Popularity:
    """A popularity file: tokens[l][e] = tokens routed to expert e of layer l while profiling."""

    tokens: tuple[tuple[float, ...], ...]  # [L][E]
    model: str | None = None
    prompts: int | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # other keys, kept as read

    @property
    def num_layers(self) -> int:
        return len(self.tokens)

    @property
    def num_experts(self) -> int:
        return len(self.tokens[0])

    def to_dict(self) -> dict:
        return {"model": self.model, "num_layers": self.num_layers,
                "num_experts": self.num_experts, "tokens": [list(r) for r in self.tokens],
                "prompts": self.prompts, **self.extra}


def popularity_from_mapping(data: Any, source: str = "popularity") -> Popularity:
    """Validates ``{"model", "num_layers", "num_experts", "tokens": [[...] per layer], "prompts"}``.

    Only "tokens" is required; num_layers / num_experts, when present, must match it.
    """
    if not isinstance(data, Mapping) or "tokens" not in data:
        raise FiddlerConfigError(f"{source}: expected an object with key \"tokens\" ([layer][expert] counts)")
    tokens = validate_counts(data["tokens"], source)
    for key, actual in (("num_layers", len(tokens)), ("num_experts", len(tokens[0]))):
        if key in data and data[key] != actual:
            raise FiddlerConfigError(f"{source}: {key} is {data[key]!r} but \"tokens\" has {actual}")
    prompts = data.get("prompts")
    if prompts is not None and (isinstance(prompts, bool) or not isinstance(prompts, int) or prompts < 0):
        raise FiddlerConfigError(f"{source}: prompts must be an integer >= 0, got {prompts!r}")
    model = data.get("model")
    extra = {k: v for k, v in data.items() if k not in POPULARITY_KEYS}
    return Popularity(tokens, None if model is None else str(model), prompts, extra)


def popularity_from_file(path: str) -> Popularity:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise FiddlerConfigError(f"cannot read popularity file {path!r}: {e}") from e
    return popularity_from_mapping(data, source=f"popularity file {path!r}")


def write_popularity_file(path: str, popularity: Popularity) -> None:
    validate_counts(popularity.tokens)
    with open(path, "w") as f:
        f.write(_dumps_rows(popularity.to_dict(), "tokens"))


def placement_to_mapping(placement: Placement, report: PlacementReport | None = None,
                         **extra: Any) -> dict:
    """The placement-file object: ``{"gpu_experts": [[e, ...] per layer]}``, plus an
    informational "report" (placement_from_mapping reads only "gpu_experts")."""
    data: dict[str, Any] = {"gpu_experts": [list(g) for g in placement.gpu_experts]}
    if report is not None or extra:
        data["report"] = {**(report.to_dict() if report is not None else {}), **extra}
    return data


def write_placement_file(path: str, placement: Placement, report: PlacementReport | None = None,
                         **extra: Any) -> None:
    with open(path, "w") as f:
        f.write(_dumps_rows(placement_to_mapping(placement, report, **extra), "gpu_experts"))


def _dumps_rows(data: Mapping[str, Any], rows_key: str) -> str:
    """JSON with `rows_key` (a list of lists) one layer per line, the rest indented."""
    parts = []
    for key, value in data.items():
        if key == rows_key:
            body = ",\n".join("  " + json.dumps(list(r)) for r in value)
            parts.append(f" {json.dumps(key)}: [\n{body}\n ]")
        else:
            parts.append(f" {json.dumps(key)}: " + json.dumps(value, indent=1).replace("\n", "\n "))
    return "{\n" + ",\n".join(parts) + "\n}\n"
