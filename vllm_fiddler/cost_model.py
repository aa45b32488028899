"""Cold-expert cost model: compute a cold expert on the CPU, or copy it to the GPU?

Pure Python (no torch, no CUDA), so it is unit-tested in CPU CI and can be
reasoned about on its own.

Per MoE layer and step, each COLD (CPU-resident) expert that received tokens
is either

  (a) computed on the CPU, or
  (b) copied host->device over PCIe into a GPU staging slot and computed
      there by the Triton kernel.

Three resources work concurrently: the CPU thread pool, the PCIe copy stream
and the GPU compute stream. The step's timeline, as modelled here:

- **CPU queue.** CPU experts run one after another, each on the whole pool:
  it ends at sum(cpu_ms(n_e)) over the CPU experts.
- **PCIe queue.** Copies run one after another: copy i starts when copy i-1
  is done (and, with `staging_slots` = S, when the GPU has finished the
  expert copied S copies earlier, whose slot it reuses).
- **GPU queue.** The hot experts' work (`gpu_busy_ms`) is queued first; each
  copied expert's compute then starts once both its copy and the previous
  GPU work are done.

- **Host DRAM contention.** The CPU kernel and the copies read the same host
  DRAM, so while both are busy each runs slower than alone: the CPU queue
  progresses at 1 / `cpu_contended_slowdown` of its solo rate and the copy
  in flight at 1 / `h2d_contended_slowdown` of its own; whenever only one of
  them is busy (the other done, or the PCIe queue idle, waiting for a
  staging slot), it runs at full speed. Both factors are 1.0 by default (no
  contention: the timeline above, exactly); calibration measures them. The
  overlap is computed exactly for this two-resource timeline (`HostDram`).

Simplifications, on purpose: the tokens' activations (KBs) moving over PCIe
are not counted; contention is one constant factor per side, whatever the
token count or the share of bandwidth the CPU kernel actually uses (it is
measured with decode-sized, DRAM-bound CPU work, the worst case: at hundreds
of tokens the kernel is compute-bound and slows less), it applies to a
copy's fixed latency as well as to its bytes, and the GPU's own memory
traffic does not count; the GPU runs one thing at a time (the hot work
first, then the copied experts in copy order); staging slots are reused
round-robin, a copy into a slot waiting for the GPU to finish the expert
that slot held (`staging_slots`, 2 = double buffering); `max_copies` is a
hard cap per step.

The step's critical path is the max of the three queues' end times, and that
is what `plan_cold_experts` minimises, NOT the sum of per-expert costs: with
4 cold experts that each cost 6.5 ms either way, min-sum is indifferent (26 ms
on one side), while min-max splits 2/2 and ends in ~13 ms.

Measured on the target (H100 80GB HBM3 box, Mixtral-8x7B bf16, expert =
3*4096*14336*2 B = 352 MB), the figures `default_for_shape` is built from:
torch CPU expert 6.5 ms for 1-16 tokens, 9.7 ms at 64, 18.8 ms at 128, 61 ms
at 512; H2D copy of one expert 6.47 ms (55 GB/s, pinned); GPU expert 0.17 ms
(decode) to 0.32 ms. So in decode (a few tokens per expert) a copy costs about
one CPU expert, and splitting halves the critical path once two or more cold
experts are hit; in prefill the CPU is 10-100x slower and copies win.

Contention, measured on the same box (benchmarks/results/host-bandwidth-h100.json,
16 threads reading 4 GiB of host DRAM, pinned 1 GiB H2D copies): DRAM read
alone 115.6 GB/s, H2D alone 50.7 GB/s; both at once 92.7 + 40.1 GB/s, i.e.
the CPU reads 1.25x slower and the copies run 1.27x slower while they
overlap (MEASURED_CPU_CONTENDED_SLOWDOWN, MEASURED_H2D_CONTENDED_SLOWDOWN:
what calibration should find there; the prior `default_for_shape` leaves
contention off unless asked). Ignoring it, the planner gives the CPU a share
that then runs slower than planned (prefill) and balances decode splits on
rates that do not hold while both sides run.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import math
import os
import re
import tempfile
from typing import Any, Iterable, Mapping, Sequence

Point = tuple[float, float]  # (tokens, ms)

# Mixtral-8x7B on the target box (see the module docstring): the rough prior.
MIXTRAL_H, MIXTRAL_I, MIXTRAL_DTYPE_BYTES = 4096, 14336, 2
MIXTRAL_EXPERT_BYTES = 3 * MIXTRAL_H * MIXTRAL_I * MIXTRAL_DTYPE_BYTES  # 352,321,536
# torch CPU expert on the H100 box's host CPU (whole thread pool), ms by tokens.
MEASURED_CPU_POINTS: tuple[Point, ...] = ((1, 6.5), (16, 6.5), (64, 9.7), (128, 18.8), (512, 61.0))
MEASURED_H2D_GB_S = 55.0  # pinned host -> H100, one 352 MB expert
MEASURED_COPY_MS = 6.47  # that copy, end to end
# 6.47 ms - 352 MB / 55 GB/s (6.406 ms) = ~0.064 ms fixed cost per copy.
MEASURED_COPY_LATENCY_MS = MEASURED_COPY_MS - MIXTRAL_EXPERT_BYTES / (MEASURED_H2D_GB_S * 1e6)
# GPU expert (Triton fused_moe, one expert): 0.17 ms for a few tokens (weight
# streaming: 352 MB at ~2.1-3 TB/s), 0.32 ms at the top of the measured range.
# The token counts of those two readings were not recorded; 16 and 512 are
# assumptions. Beyond 512 the prior follows the FLOPs: 2*3*H*I flops/token at
# ~500 TFLOP/s, i.e. ~0.7 us per token for Mixtral.
GPU_FLOPS_PER_MS = 500e9  # 500 TFLOP/s effective, bf16 grouped GEMM on an H100 (assumption)
# Host DRAM shared by the CPU kernel and the copies (benchmarks/results/host-bandwidth-h100.json).
MEASURED_DRAM_READ_GB_S = 115.55  # 16 threads reading host DRAM, alone
MEASURED_PINNED_H2D_GB_S = 50.70  # pinned host -> H100 (1 GiB copies), alone
MEASURED_DRAM_READ_CONTENDED_GB_S = 92.74  # ... while the copies run
MEASURED_PINNED_H2D_CONTENDED_GB_S = 40.06  # ... while the CPU reads
MEASURED_CPU_CONTENDED_SLOWDOWN = MEASURED_DRAM_READ_GB_S / MEASURED_DRAM_READ_CONTENDED_GB_S  # 1.246
MEASURED_H2D_CONTENDED_SLOWDOWN = MEASURED_PINNED_H2D_GB_S / MEASURED_PINNED_H2D_CONTENDED_GB_S  # 1.266

_EPS = 1e-9


# ----------------------------------------------------------------------------
# The cost model
# ----------------------------------------------------------------------------


def _clean_points(points: Iterable[Sequence[float]], what: str) -> tuple[Point, ...]:
    """Sorted by tokens, duplicates averaged, ms made non-decreasing (measurement noise).

    Noise only ever adds time (a cold thread pool, page faults, a neighbour on
    the memory bus), so where fewer tokens measured slower than more tokens,
    the fewer-token point is the inflated one: it is lowered to the later
    minimum, never the later points raised. (On the H100 box a fresh worker's
    first point read 7.2 ms at 1 token against 4.6 ms at 16; raising the later
    points would have priced every CPU expert ~50% too high.)"""
    by_tokens: dict[float, list[float]] = {}
    for p in points:
        tokens, ms = float(p[0]), float(p[1])
        if not (tokens >= 0 and ms >= 0 and math.isfinite(tokens) and math.isfinite(ms)):
            raise ValueError(f"{what}: bad point {tuple(p)} (need tokens >= 0, ms >= 0)")
        by_tokens.setdefault(tokens, []).append(ms)
    if not by_tokens:
        raise ValueError(f"{what}: no points")
    out: list[Point] = []
    for tokens in sorted(by_tokens, reverse=True):
        ms = sum(by_tokens[tokens]) / len(by_tokens[tokens])
        if out and ms > out[-1][1]:
            ms = out[-1][1]  # fewer tokens never take more time
        out.append((tokens, ms))
    return tuple(reversed(out))


def interpolate(points: Sequence[Point], tokens: float) -> float:
    """Piecewise-linear ms at `tokens`; 0 for 0 tokens.

    Below the first point: the first point's time (a fixed cost dominates
    there: the weights are read once whatever the token count). Above the
    last: the last segment's slope, extended (compute grows linearly); with
    a single point, that point's time everywhere.
    """
    if tokens <= 0:
        return 0.0
    xs = [p[0] for p in points]
    if tokens <= xs[0] or len(points) == 1:  # one point: a flat cost
        return points[0][1]
    if tokens >= xs[-1]:
        (x0, y0), (x1, y1) = points[-2], points[-1]
        slope = (y1 - y0) / (x1 - x0) if x1 > x0 else 0.0
        return y1 + slope * (tokens - x1)
    i = bisect.bisect_right(xs, tokens)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Costs of one expert of one MoE layer, in ms, on one machine.

    cpu_points: (tokens, ms) of one expert on the CPU (whole pool), interpolated.
    h2d_gb_s, copy_latency_ms: a copy takes copy_latency_ms + expert_bytes / bandwidth.
    expert_bytes: w13 + w2 of one expert.
    gpu_points: (tokens, ms) of one expert on the GPU (weights already there).
    stream_gb_s: how fast the GPU's kernels read one expert's chunks in place from
        pinned host memory (routed steps' streamed chunks); 0 = not measured (a
        cache file without it), priced as a copy.
    cpu_contended_slowdown, h2d_contended_slowdown (>= 1): how much slower the
        CPU queue and the copy in flight run while both are busy (they read the
        same host DRAM); 1.0 = no contention, the model before these existed
        (and what a cache file without them loads as). See `HostDram`.
    The descriptive fields (machine, shape, source) only name and document it.
    Frozen and hashable, so plans are memoised per (routing, cost model).
    """

    cpu_points: tuple[Point, ...]
    h2d_gb_s: float
    copy_latency_ms: float
    expert_bytes: int
    gpu_points: tuple[Point, ...]
    machine: str = ""  # e.g. "H100-80GB-HBM3|Xeon-8480+|t52"
    shape: str = ""  # e.g. "H4096-I14336-bf16"
    source: str = ""  # where the numbers come from
    cpu_contended_slowdown: float = 1.0  # CPU queue, while a copy runs
    h2d_contended_slowdown: float = 1.0  # a copy, while the CPU queue runs
    stream_gb_s: float = 0.0  # GPU kernels reading host chunks in place; 0: as a copy

    def __post_init__(self):
        object.__setattr__(self, "cpu_points", _clean_points(self.cpu_points, "cpu_points"))
        object.__setattr__(self, "gpu_points", _clean_points(self.gpu_points, "gpu_points"))
        if not (self.h2d_gb_s > 0 and math.isfinite(self.h2d_gb_s)):
            raise ValueError(f"h2d_gb_s must be > 0, got {self.h2d_gb_s}")
        if not (self.copy_latency_ms >= 0 and math.isfinite(self.copy_latency_ms)):
            raise ValueError(f"copy_latency_ms must be >= 0, got {self.copy_latency_ms}")
        if not self.expert_bytes > 0:
            raise ValueError(f"expert_bytes must be > 0, got {self.expert_bytes}")
        object.__setattr__(self, "expert_bytes", int(self.expert_bytes))
        if not (self.stream_gb_s >= 0 and math.isfinite(self.stream_gb_s)):
            raise ValueError(f"stream_gb_s must be >= 0, got {self.stream_gb_s}")
        object.__setattr__(self, "stream_gb_s", float(self.stream_gb_s))
        for name in ("cpu_contended_slowdown", "h2d_contended_slowdown"):
            v = float(getattr(self, name))
            if not (v >= 1.0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 1, got {getattr(self, name)}")
            object.__setattr__(self, name, v)

    @property
    def contended(self) -> bool:
        """Whether overlapping CPU work and copies slow each other down."""
        return self.cpu_contended_slowdown != 1.0 or self.h2d_contended_slowdown != 1.0

    # -- costs ---------------------------------------------------------------

    def cpu_ms(self, tokens: float) -> float:
        """One expert on the CPU with `tokens` tokens."""
        return interpolate(self.cpu_points, tokens)

    def gpu_ms(self, tokens: float) -> float:
        """One expert on the GPU with `tokens` tokens (weights resident)."""
        return interpolate(self.gpu_points, tokens)

    @property
    def copy_ms(self) -> float:
        """One expert's weights host -> device."""
        return self.copy_latency_ms + self.expert_bytes / (self.h2d_gb_s * 1e6)

    @property
    def stream_ms(self) -> float:
        """One expert's weights read in place by the GPU's kernels (a copy's time if not measured)."""
        if self.stream_gb_s > 0:
            return self.expert_bytes / (self.stream_gb_s * 1e6)
        return self.copy_ms - self.copy_latency_ms

    def breakeven_tokens(self, max_tokens: int = 1 << 20) -> int | None:
        """The fewest tokens at which copy + GPU beats the CPU for a lone expert; None if never."""
        lo, hi = 1, max_tokens
        if self.copy_ms + self.gpu_ms(hi) >= self.cpu_ms(hi):
            return None
        while lo < hi:
            mid = (lo + hi) // 2
            if self.copy_ms + self.gpu_ms(mid) < self.cpu_ms(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo

    # -- identity and persistence --------------------------------------------

    @property
    def key(self) -> str:
        """Names this model's machine and shape, for a cache file name."""
        return make_key(self.machine or "unknown", self.shape or f"B{self.expert_bytes}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cpu_points"] = [list(p) for p in self.cpu_points]
        d["gpu_points"] = [list(p) for p in self.gpu_points]
        # 2: the contention factors (a version-1 file loads with 1.0); 3: stream_gb_s (0 without)
        d["version"] = 3
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CostModel":
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        kw["cpu_points"] = tuple(tuple(p) for p in kw["cpu_points"])
        kw["gpu_points"] = tuple(tuple(p) for p in kw["gpu_points"])
        return cls(**kw)

    @classmethod
    def from_json(cls, text: str) -> "CostModel":
        return cls.from_dict(json.loads(text))

    def describe(self) -> str:
        pts = ", ".join(f"{t:g}:{self.cpu_ms(t):.2f}" for t in (1, 16, 64, 128, 512, 2048))
        gpts = ", ".join(f"{t:g}:{self.gpu_ms(t):.3f}" for t in (1, 16, 64, 128, 512, 2048))
        be = self.breakeven_tokens()
        return (f"CostModel[{self.key}] expert {self.expert_bytes / 1e6:.0f} MB; copy {self.copy_ms:.2f} ms "
                f"({self.h2d_gb_s:g} GB/s + {self.copy_latency_ms:.3f} ms); CPU ms by tokens {{{pts}}}; "
                f"GPU ms {{{gpts}}}; lone-expert break-even {be} tokens; overlapping, CPU "
                f"{self.cpu_contended_slowdown:.3g}x and copies {self.h2d_contended_slowdown:.3g}x slower; "
                f"in-place reads {self.stream_ms:.2f} ms an expert"
                + (f"; source: {self.source}" if self.source else ""))


def _safe(text: str) -> str:
    """File-name-safe: letters, digits, '-', '_', '.' (anything else -> '_'), at most 200 chars."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:200]


def make_key(machine: str, shape: str) -> str:
    """The cache key of a machine and a shape, e.g. 'H100_80GB_HBM3_Xeon_8480_t52-H4096-I14336-bf16'."""
    return _safe(f"{machine}-{shape}")


def shape_tag(hidden_size: int, intermediate_size: int, dtype_bytes: int = 2) -> str:
    """'H4096-I14336-bf16'."""
    dtype = {1: "fp8", 2: "bf16", 4: "fp32"}.get(dtype_bytes, f"{dtype_bytes}B")
    return f"H{hidden_size}-I{intermediate_size}-{dtype}"


# ----------------------------------------------------------------------------
# Building a cost model
# ----------------------------------------------------------------------------


def fit_from_measurements(cpu_points: Iterable[Sequence[float]], h2d_gb_s: float, copy_latency_ms: float,
                          gpu_points: Iterable[Sequence[float]], expert_bytes: int, *,
                          machine: str = "", shape: str = "", source: str = "measured",
                          cpu_contended_slowdown: float = 1.0, h2d_contended_slowdown: float = 1.0,
                          stream_gb_s: float = 0.0) -> CostModel:
    """A CostModel from raw measurements (what runtime/calibrate.py times on the device).

    cpu_points / gpu_points: (tokens, ms) pairs, any order; repeated token
    counts are averaged and the times made non-decreasing in tokens (noise).
    h2d_gb_s and copy_latency_ms: see fit_copy() to derive them from timed copies.
    cpu/h2d_contended_slowdown: contended time / solo time of CPU expert work
    and of copies run at the same time (>= 1; 1.0 when not measured).
    stream_gb_s: the GPU kernels' in-place read of host chunks (0 when not measured).
    """
    return CostModel(cpu_points=tuple(tuple(p) for p in cpu_points), h2d_gb_s=float(h2d_gb_s),
                     copy_latency_ms=float(copy_latency_ms), expert_bytes=int(expert_bytes),
                     gpu_points=tuple(tuple(p) for p in gpu_points), machine=machine, shape=shape,
                     source=source, cpu_contended_slowdown=float(cpu_contended_slowdown),
                     h2d_contended_slowdown=float(h2d_contended_slowdown), stream_gb_s=float(stream_gb_s))


def fit_copy(samples: Iterable[Sequence[float]]) -> tuple[float, float]:
    """(GB/s, latency ms) from (bytes, ms) copy timings, by least squares ms = latency + bytes/bw.

    With one size only, the latency is taken as 0. The latency is clamped at 0.
    """
    pts = [(float(b), float(ms)) for b, ms in samples]
    if not pts:
        raise ValueError("no copy samples")
    xs = {b for b, _ in pts}
    if len(xs) == 1:
        b = pts[0][0]
        ms = sum(m for _, m in pts) / len(pts)
        return b / ms / 1e6, 0.0
    n = len(pts)
    mx = sum(b for b, _ in pts) / n
    my = sum(m for _, m in pts) / n
    slope = sum((b - mx) * (m - my) for b, m in pts) / sum((b - mx) ** 2 for b, _ in pts)  # ms per byte
    latency = max(0.0, my - slope * mx)
    if slope <= 0:
        raise ValueError("copy time does not grow with size: cannot fit a bandwidth")
    return 1.0 / slope / 1e6, latency


def default_for_shape(hidden_size: int = MIXTRAL_H, intermediate_size: int = MIXTRAL_I,
                      dtype_bytes: int = MIXTRAL_DTYPE_BYTES, *, h2d_gb_s: float = MEASURED_H2D_GB_S,
                      machine: str = "prior-H100-box", cpu_contended_slowdown: float = 1.0,
                      h2d_contended_slowdown: float = 1.0) -> CostModel:
    """A ROUGH PRIOR, used until calibration has run on the machine.

    Built from the Mixtral-8x7B figures measured on the H100 box (module
    docstring, MEASURED_* constants), scaled to another expert size by its
    bytes (CPU and GPU expert time are both proportional to 3*H*I per token
    at every token count: weight reads at few tokens, FLOPs at many). The
    H2D bandwidth and per-copy latency are the measured ones; a different
    PCIe link makes this prior wrong by that ratio, which is why calibration
    (runtime/calibrate.py -> fit_from_measurements) replaces it. Contention is
    off (1.0) unless given: pass MEASURED_CPU_CONTENDED_SLOWDOWN and
    MEASURED_H2D_CONTENDED_SLOWDOWN for the H100 box's.
    """
    expert_bytes = 3 * hidden_size * intermediate_size * dtype_bytes
    scale = expert_bytes / MIXTRAL_EXPERT_BYTES
    cpu = tuple((t, ms * scale) for t, ms in MEASURED_CPU_POINTS)
    flops_per_token = 2 * 3 * hidden_size * intermediate_size
    gpu = [(1, 0.17 * scale), (16, 0.17 * scale), (512, 0.32 * scale)]
    for t in (1024, 2048, 4096, 8192):  # compute-bound tail: FLOPs at GPU_FLOPS_PER_MS, continuous at 512
        gpu.append((t, 0.32 * scale + (t - 512) * flops_per_token / GPU_FLOPS_PER_MS))
    return CostModel(cpu_points=cpu, h2d_gb_s=h2d_gb_s, copy_latency_ms=MEASURED_COPY_LATENCY_MS,
                     expert_bytes=expert_bytes, gpu_points=tuple(gpu), machine=machine,
                     shape=shape_tag(hidden_size, intermediate_size, dtype_bytes),
                     source="prior: Mixtral-8x7B figures measured on the H100 box, scaled by expert bytes",
                     cpu_contended_slowdown=cpu_contended_slowdown, h2d_contended_slowdown=h2d_contended_slowdown)


# ----------------------------------------------------------------------------
# Cache files
# ----------------------------------------------------------------------------


def cache_dir() -> str:
    """$FIDDLER_CACHE_DIR, else $XDG_CACHE_HOME/vllm_fiddler, else ~/.cache/vllm_fiddler."""
    from vllm_fiddler import envs

    d = envs.FIDDLER_CACHE_DIR
    if d:
        return d
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vllm_fiddler")


def cache_path(key: str, directory: str | None = None) -> str:
    return os.path.join(directory or cache_dir(), f"cost_model-{_safe(key)}.json")


def save(model: CostModel, path: str) -> str:
    """Writes model as JSON at path, atomically (temp file + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".cost_model-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(model.to_json())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(path: str) -> CostModel | None:
    """The model at path; None if missing or unreadable (a stale or corrupt cache is re-measured)."""
    try:
        with open(path) as f:
            return CostModel.from_json(f.read())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_cached(key: str, model: CostModel, directory: str | None = None) -> str:
    """Saves under the cache dir as cost_model-<key>.json; returns the path."""
    return save(model, cache_path(key, directory))


def load_cached(key: str, directory: str | None = None) -> CostModel | None:
    return load(cache_path(key, directory))


# ----------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ColdPlan:
    """Where each hit cold expert runs this step, and the modelled timeline.

    cpu: experts computed on the CPU, in CPU-queue order (ascending id).
    copy: experts copied to the GPU, in copy order.
    critical_path_ms: max(cpu_ms, gpu_end_ms) (gpu_end_ms includes the hot work).
    """

    cpu: tuple[int, ...]
    copy: tuple[int, ...]
    critical_path_ms: float
    cpu_ms: float  # CPU queue end
    pcie_ms: float  # PCIe queue end (last copy done)
    gpu_end_ms: float  # GPU queue end: hot work, then the copied experts
    gpu_busy_ms: float  # the hot GPU work given
    token_counts: tuple[tuple[int, int], ...]  # (expert, tokens), ascending expert
    exact: bool  # found by exhaustive search (else the heuristic)
    all_cpu_ms: float  # critical path with every expert on the CPU
    all_copy_ms: float  # ... with every expert copied (respecting max_copies: +inf if it cannot)

    def report(self) -> str:
        n = dict(self.token_counts)
        cpu = " ".join(f"e{e}({n[e]})" for e in self.cpu) or "-"
        cp = " ".join(f"e{e}({n[e]})" for e in self.copy) or "-"
        how = "exact" if self.exact else "heuristic"
        best_one_sided = min(self.all_cpu_ms, self.all_copy_ms)
        gain = (f", {best_one_sided / self.critical_path_ms:.2f}x vs best one-sided"
                if self.critical_path_ms > 0 and math.isfinite(best_one_sided) else "")
        return (f"cold plan ({how}): {len(self.token_counts)} cold experts hit, critical path "
                f"{self.critical_path_ms:.2f} ms{gain}\n"
                f"  cpu  queue {self.cpu_ms:7.2f} ms: {cpu}\n"
                f"  pcie queue {self.pcie_ms:7.2f} ms, gpu end {self.gpu_end_ms:.2f} ms "
                f"(hot {self.gpu_busy_ms:.2f} ms): copy {cp}\n"
                f"  all-cpu {self.all_cpu_ms:.2f} ms, all-copy {self.all_copy_ms:.2f} ms")


def copy_order(experts: Sequence[int], copy_ms: float, gpu_ms: Mapping[int, float]) -> list[int]:
    """Johnson's rule for the two-stage flow shop (PCIe copy, then GPU compute).

    Experts whose GPU time is at least the copy time go first, by id (copy
    times are all equal); the others follow by decreasing GPU time, so the
    shortest compute is last after the final copy. Optimal for two machines
    free at time 0; a heuristic when the GPU starts busy or slots are bounded.
    """
    first = sorted(e for e in experts if gpu_ms[e] >= copy_ms)
    rest = sorted((e for e in experts if gpu_ms[e] < copy_ms), key=lambda e: (-gpu_ms[e], e))
    return first + rest


class HostDram:
    """The CPU queue and the PCIe copies sharing host DRAM: exact contended end times.

    The CPU queue holds `cpu_work` ms of solo work from t = 0, back to back.
    Copies are placed one at a time, in order, each from a start time no
    earlier than the previous copy's end (`copy(start, work)` returns its
    end). While the CPU queue and a copy are both running, the CPU progresses
    at 1 / cpu_slowdown and the copy at 1 / h2d_slowdown of their solo rates;
    whichever runs alone runs at full speed. So with one copy of `w` ms from
    t = 0 against `c` ms of CPU work, both slowed while overlapping:
    if c * s_cpu <= w * s_h2d the CPU ends at c * s_cpu and the copy at
    c * s_cpu + (w - c * s_cpu / s_h2d); otherwise the copy ends at w * s_h2d
    and the CPU at w * s_h2d + (c - w * s_h2d / s_cpu).
    With both factors 1.0 it is the uncontended timeline, bit for bit
    (copy ends at start + work, the CPU at cpu_work).
    """

    __slots__ = ("end", "left", "plain", "s_cpu", "s_h2d", "t")

    def __init__(self, cpu_work: float, cpu_slowdown: float = 1.0, h2d_slowdown: float = 1.0):
        self.s_cpu, self.s_h2d = cpu_slowdown, h2d_slowdown
        self.plain = cpu_slowdown == 1.0 and h2d_slowdown == 1.0
        self.t = 0.0  # the CPU's progress is accounted up to here
        self.left = cpu_work  # CPU solo work left at self.t
        self.end: float | None = cpu_work if (self.plain or cpu_work <= 0) else None  # CPU end, once known

    def copy(self, start: float, work: float) -> float:
        """A copy of `work` solo ms starting at `start` (>= the previous copy's end); returns its end."""
        if self.end is None and start > self.t:  # the CPU alone until the copy starts
            if start - self.t >= self.left:
                self.end = self.t + self.left
            else:
                self.left -= start - self.t
                self.t = start
        if self.end is not None:  # the CPU is done (or nothing contends): full speed
            return start + work
        s_cpu, s_h2d = self.s_cpu, self.s_h2d
        if self.left * s_cpu > work * s_h2d:  # the copy ends first, the CPU still busy
            end = start + work * s_h2d
            self.left -= work * s_h2d / s_cpu
            self.t = end
            return end
        cpu_end = start + self.left * s_cpu  # the CPU ends first (or together)
        self.end = cpu_end
        return cpu_end + max(0.0, work - self.left * s_cpu / s_h2d)  # the rest of the copy alone

    @property
    def cpu_end(self) -> float:
        """The CPU queue's end (after the last copy placed)."""
        return self.end if self.end is not None else self.t + self.left


def overlap(cpu_work: float, copy_work: float, cpu_slowdown: float, h2d_slowdown: float
            ) -> tuple[float, float]:
    """(CPU end, PCIe end) of `cpu_work` and `copy_work` solo ms, both busy from t = 0 (see HostDram)."""
    dram = HostDram(cpu_work, cpu_slowdown, h2d_slowdown)
    pcie = dram.copy(0.0, copy_work) if copy_work > 0 else 0.0
    return dram.cpu_end, pcie


def simulate(cpu: Iterable[int], copy: Sequence[int], cpu_ms: Mapping[int, float],
             gpu_ms: Mapping[int, float], copy_ms: float, gpu_busy_ms: float = 0.0,
             staging_slots: int | None = None, cpu_slowdown: float = 1.0, h2d_slowdown: float = 1.0
             ) -> tuple[float, float, float, float]:
    """The timeline of one plan: (critical path, CPU end, PCIe end, GPU end), in ms.

    `copy` is in copy order. Staging slots (when given) are used round-robin:
    copy i goes to slot i % S and cannot start before the GPU finished the
    expert of copy i - S (double buffering when S = 2); without a bound,
    every copy has its own slot. cpu_slowdown / h2d_slowdown: host DRAM
    contention while the CPU queue and a copy overlap (HostDram; 1.0: none).
    """
    dram = HostDram(sum(cpu_ms[e] for e in cpu), cpu_slowdown, h2d_slowdown)
    pcie = 0.0
    gpu = gpu_busy_ms
    done: list[float] = []  # GPU end of each copied expert
    for i, e in enumerate(copy):
        start = pcie
        if staging_slots is not None and i >= staging_slots:
            start = max(start, done[i - staging_slots])
        pcie = dram.copy(start, copy_ms)
        gpu = max(gpu, pcie) + gpu_ms[e]
        done.append(gpu)
    cpu_end = dram.cpu_end
    return max(cpu_end, gpu), cpu_end, pcie, gpu


# plans search every subset up to this many hit cold experts (see plan_cold_experts)
EXACT_LIMIT = 12


def plan_cold_experts(token_counts: Mapping[int, int], cost: CostModel, gpu_busy_ms: float = 0.0,
                      max_copies: int | None = None, staging_slots: int | None = None,
                      exact_limit: int = EXACT_LIMIT) -> ColdPlan:
    """Splits the hit cold experts between the CPU and copies, minimising the critical path
    (simulate, with the cost model's host DRAM contention factors).

    token_counts: cold expert id -> tokens routed to it this step (experts with
        0 tokens are ignored).
    gpu_busy_ms: GPU work already queued this step (the hot experts); copied
        experts compute after it.
    max_copies: at most this many copies this step (None: no bound; 0: none),
        e.g. the staging slots free when slots are not reused within a step.
    staging_slots: the number of staging buffers when they ARE reused within
        the step: a copy waits until the GPU has computed the expert in the
        slot it overwrites (see simulate). None: no such wait.
    exact_limit: exhaustive search up to this many hit experts (identical
        costs are interchangeable, and branch-and-bound prunes plans that
        cannot win: the exhaustive optimum, usually in well under 1 ms);
        above it, a heuristic (the best prefixes of the experts ranked three
        ways by what a copy saves, then local search: one more / one fewer
        copy, or a swap, until nothing improves).

    Ties (within 1e-9 ms) go to fewer copies, then to the lower total busy
    time (CPU + PCIe + GPU), then to copying the lower expert ids: the plan
    is deterministic.
    """
    ids, ranked = _ranked(token_counts)
    plan = _plan_cached(ranked, cost, float(gpu_busy_ms), None if max_copies is None else int(max_copies),
                        None if staging_slots is None else int(staging_slots), int(exact_limit))
    return _relabel_cold(plan, ids)


# Plans are computed and cached on experts relabelled 0..n-1 in ascending id
# order (_ranked): every choice and tie-break above compares ids only by order,
# so the plan of any ids is the ranked plan with the labels mapped back. The
# cache then keys on the token counts alone: a batch-1 decode step has a few
# shapes ({a: 1, b: 1}, ...), where keys with ids missed for ~1400 expert pairs
# (53 cold experts) and each miss planned for ~0.16 ms on the engine thread,
# between the routing copy and the CPU's start.
def _ranked(token_counts: Mapping[int, int]) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """(hit expert ids ascending, ((rank, tokens), ...)) of the experts with tokens."""
    items = sorted((int(e), int(n)) for e, n in token_counts.items() if n > 0)
    return tuple(e for e, _ in items), tuple((r, n) for r, (_, n) in enumerate(items))


def _relabel_cold(plan: "ColdPlan", ids: Sequence[int]) -> "ColdPlan":
    return dataclasses.replace(plan, cpu=tuple(ids[r] for r in plan.cpu), copy=tuple(ids[r] for r in plan.copy),
                               token_counts=tuple((ids[r], n) for r, n in plan.token_counts))


@functools.lru_cache(maxsize=4096)
def _plan_cached(items: tuple[tuple[int, int], ...], cost: CostModel, gpu_busy_ms: float,
                 max_copies: int | None, staging_slots: int | None, exact_limit: int) -> ColdPlan:
    if staging_slots is not None and staging_slots < 1:
        raise ValueError("staging_slots must be >= 1 (or None)")
    experts = [e for e, _ in items]
    cpu_ms = {e: cost.cpu_ms(n) for e, n in items}
    gpu_ms = {e: cost.gpu_ms(n) for e, n in items}
    copy_ms = cost.copy_ms
    s_cpu, s_h2d = cost.cpu_contended_slowdown, cost.h2d_contended_slowdown
    limit = len(experts) if max_copies is None else max(0, min(max_copies, len(experts)))

    def evaluate(copy_set: Iterable[int]):
        copy_set = frozenset(copy_set)
        order = copy_order(sorted(copy_set), copy_ms, gpu_ms)
        cpu = [e for e in experts if e not in copy_set]
        crit, cpu_end, pcie_end, gpu_end = simulate(cpu, order, cpu_ms, gpu_ms, copy_ms, gpu_busy_ms,
                                                    staging_slots, s_cpu, s_h2d)
        busy = cpu_end + len(order) * copy_ms + sum(gpu_ms[e] for e in order)
        key = (round(crit / _EPS), len(order), round(busy / _EPS), tuple(sorted(copy_set)))
        return key, (tuple(cpu), tuple(order), crit, cpu_end, pcie_end, gpu_end)

    # Starting points: the best prefix of the experts ranked by what a copy
    # saves, three ways (CPU time; CPU minus GPU time; CPU per GPU time).
    rankings = [
        sorted(experts, key=lambda e: (-cpu_ms[e], e)),
        sorted(experts, key=lambda e: (-(cpu_ms[e] - gpu_ms[e]), e)),
        sorted(experts, key=lambda e: (-cpu_ms[e] / max(gpu_ms[e], 1e-12), e)),
    ]
    starts = [min((evaluate(r[:m]) for m in range(limit + 1)), key=lambda c: c[0]) for r in rankings]
    best = min(starts, key=lambda c: c[0])
    if len(experts) <= exact_limit:
        best = _exact(experts, cpu_ms, gpu_ms, copy_ms, gpu_busy_ms, limit, evaluate, best)
        exact = True
    else:  # local search from each distinct start
        for start in {tuple(sorted(s[1][1])): s for s in starts}.values():
            cand = _descend(experts, limit, evaluate, start)
            if cand[0] < best[0]:
                best = cand
        exact = False
    cpu, order, crit, cpu_end, pcie_end, gpu_end = best[1]
    all_cpu = evaluate(())[1][2]
    all_copy = evaluate(experts)[1][2] if limit == len(experts) else math.inf
    return ColdPlan(cpu=cpu, copy=order, critical_path_ms=crit, cpu_ms=cpu_end, pcie_ms=pcie_end,
                    gpu_end_ms=gpu_end, gpu_busy_ms=gpu_busy_ms, token_counts=items, exact=exact,
                    all_cpu_ms=all_cpu, all_copy_ms=all_copy)


def _exact(experts, cpu_ms, gpu_ms, copy_ms, gpu_busy_ms, limit, evaluate, best):
    """The optimum over every subset of at most `limit` copies.

    Experts with the same CPU and GPU times are interchangeable, so it
    enumerates how many of each such group to copy (the lowest ids of a group
    are the ones copied). A candidate is simulated only if two lower bounds leave it a
    chance to beat (or tie) `best`: its CPU queue's solo work (its end exactly
    without contention; contention only delays it), and its GPU end >=
    max(m copies at solo speed + the smallest GPU time, hot work + the m
    smallest GPU times). Pruning only drops strictly worse plans, so the
    result is the exhaustive search's, tie-breaks included.
    """
    groups: dict[tuple[float, float], list[int]] = {}
    for e in experts:  # same CPU and GPU time: interchangeable (decode: 1-16 tokens all cost the same)
        groups.setdefault((cpu_ms[e], gpu_ms[e]), []).append(e)  # ascending ids within a group
    # Depth-first over the groups, most CPU-expensive first, copying as many as
    # possible first: good plans come early and bound the rest.
    group_lists = [groups[k] for k in sorted(groups, reverse=True)]
    group_cpu = [cpu_ms[g[0]] for g in group_lists]
    total_cpu = sum(cpu_ms.values())
    g_sorted = sorted(gpu_ms.values())
    g_min = g_sorted[0] if g_sorted else 0.0
    gpu_lb = [0.0] + [max(m * copy_ms + g_min, gpu_busy_ms + sum(g_sorted[:m])) for m in range(1, limit + 1)]
    # max_save[i][r]: the most CPU time r more copies can take off, from groups i.. on.
    n_groups = len(group_lists)
    max_save = []
    for i in range(n_groups + 1):
        rest = [c for gc, g in zip(group_cpu[i:], group_lists[i:]) for c in [gc] * len(g)]  # descending
        acc = [0.0]
        for c in rest:
            acc.append(acc[-1] + c)
        max_save.append(acc)
    slack = 1e-6  # ms: a bound must beat the best by more than this to prune (ties stay in)
    best_box = [best]
    chosen: list[int] = []

    def dfs(i: int, m: int, saved: float) -> None:
        bound = best_box[0][1][2] + slack
        if gpu_lb[m] > bound:  # gpu_lb grows with m: no completion can do better
            return
        left = max_save[i]
        if total_cpu - saved - left[min(limit - m, len(left) - 1)] > bound:
            return
        if i == n_groups:
            cand = evaluate([e for g, c in zip(group_lists, chosen) for e in g[:c]])
            if cand[0] < best_box[0][0]:
                best_box[0] = cand
            return
        for c in range(min(len(group_lists[i]), limit - m), -1, -1):
            chosen.append(c)
            dfs(i + 1, m + c, saved + c * group_cpu[i])
            chosen.pop()

    dfs(0, 0, 0.0)
    return best_box[0]


def _descend(experts, limit, evaluate, best, max_passes: int = 64):
    """From `best`: single moves (copy one more / one fewer) and swaps, first improvement, until none."""
    current = set(best[1][1])
    for _ in range(max_passes):
        on_cpu = [e for e in experts if e not in current]
        moves = [current - {c} for c in sorted(current)]
        if len(current) < limit:
            moves += [current | {p} for p in on_cpu]
        moves += [(current - {c}) | {p} for c in sorted(current) for p in on_cpu]
        for m in moves:
            cand = evaluate(m)
            if cand[0] < best[0]:
                best, current = cand, set(m)
                break
        else:
            break
    return best


# ----------------------------------------------------------------------------
# Splitting one expert between the CPU and a copy
# ----------------------------------------------------------------------------
#
# A SwiGLU expert is a sum over its intermediate dimension:
#   ffn(x) = sum_c w2[:, c] (silu(w1[c] x) * w3[c] x)   over chunks c of rows,
# so its chunks can run on different sides and the outputs simply add. At
# decode a cold expert is bound by bytes on either side (DRAM on the CPU, PCIe
# for a copy), and two whole-expert choices leave one side idle part of the
# step: with 2 cold experts of 1 token each on the H100 box (CPU 3.4 ms, copy
# 6.5 ms per expert), "copy one, CPU the other" ends at ~6.7 ms, while copying
# 5/8 of one expert and computing the rest on the CPU ends at ~4.7 ms, close
# to the bandwidth bound 704 MB / (DRAM + PCIe GB/s). (Those are solo rates.
# With the measured contention, 1.25x / 1.27x while both run, the same cut
# ends at ~5.7 ms against 6.8 ms for whole experts, all on the CPU: the sum of
# the two bandwidths measured together, 132.8 GB/s, bounds it at ~5.3 ms.)
# As in a fractional knapsack, an optimal split needs at most one expert cut
# in two; the whole-expert plan stays the starting point.


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """A cold plan in chunks: `gpu_chunks[e]` of expert e's `chunks` chunks are copied and
    computed on the GPU (its first ones), the rest on the CPU.

    copy: experts with at least one chunk copied, in copy order (a split expert last).
    split: the one expert cut between the sides, or None.
    cpu_ms, gpu_end_ms: the CPU queue's and the GPU's end (with host DRAM contention).
    """

    chunks: int
    gpu_chunks: tuple[tuple[int, int], ...]  # (expert, chunks on the GPU), ascending expert
    copy: tuple[int, ...]
    split: int | None
    critical_path_ms: float
    cpu_ms: float
    gpu_end_ms: float
    whole: ColdPlan  # the whole-expert plan it refines

    def on_gpu(self, expert: int) -> int:
        return dict(self.gpu_chunks).get(expert, 0)

    def report(self) -> str:
        g = dict(self.gpu_chunks)
        split = f"; e{self.split} split {g[self.split]}/{self.chunks} on the GPU" if self.split is not None else ""
        return (f"chunk plan: critical path {self.critical_path_ms:.2f} ms (whole experts "
                f"{self.whole.critical_path_ms:.2f} ms){split}; CPU {self.cpu_ms:.2f} ms, GPU end "
                f"{self.gpu_end_ms:.2f} ms")


def timeline_items(cpu_work: float, copies: Sequence[tuple[float, float]], gpu_busy_ms: float = 0.0,
                   cpu_slowdown: float = 1.0, h2d_slowdown: float = 1.0) -> tuple[float, float, float, float]:
    """(critical path, CPU end, PCIe end, GPU end) of copies [(copy ms, GPU ms)] in order, after
    `gpu_busy_ms` of hot work, with `cpu_work` ms of CPU work (solo) from t = 0 (unbounded staging
    slots, as the runtime plans), host DRAM contention as in HostDram."""
    dram = HostDram(cpu_work, cpu_slowdown, h2d_slowdown)
    pcie = 0.0
    gpu = gpu_busy_ms
    for c_ms, g_ms in copies:
        pcie = dram.copy(pcie, c_ms)
        gpu = max(gpu, pcie) + g_ms
    cpu_end = dram.cpu_end
    return max(cpu_end, gpu), cpu_end, pcie, gpu


def simulate_items(cpu_end: float, copies: Sequence[tuple[float, float]], gpu_busy_ms: float = 0.0,
                   cpu_slowdown: float = 1.0, h2d_slowdown: float = 1.0) -> tuple[float, float]:
    """(critical path, GPU end) of copies [(copy ms, GPU ms)] in order, after `gpu_busy_ms` of hot
    work, with the CPU queue ending at `cpu_end` (unbounded staging slots, as the runtime plans).
    With contention factors (HostDram), `cpu_end` is the CPU queue's solo work, which the copies
    then delay: see timeline_items for the contended CPU end."""
    crit, _, _, gpu = timeline_items(cpu_end, copies, gpu_busy_ms, cpu_slowdown, h2d_slowdown)
    return crit, gpu


def plan_cold_chunks(token_counts: Mapping[int, int], cost: CostModel, chunks: int, gpu_busy_ms: float = 0.0,
                     max_copies: int | None = None) -> ChunkPlan:
    """`plan_cold_experts`, then the best cut of one expert into a CPU part and a copied part.

    Each expert has `chunks` equal chunks. A part of f chunks costs f/chunks of the
    expert's CPU time, or a copy of f/chunks of its bytes (plus the fixed copy
    latency) and f/chunks of its GPU time. Candidates: a CPU expert sends its
    first j chunks to the GPU (its part copied after the whole copies), or a
    copied expert keeps only its first j chunks on the GPU (it moves to the end
    of the copy order). Every candidate is timed with the cost model's host
    DRAM contention (timeline_items), so the split point balances the CPU and
    the copies at their contended rates. The best candidate is kept only if
    it shortens the critical path by more than 1e-6 ms: ties keep whole experts.
    """
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    ids, ranked = _ranked(token_counts)
    max_copies = None if max_copies is None else int(max_copies)
    whole = _plan_cached(ranked, cost, float(gpu_busy_ms), max_copies, None, EXACT_LIMIT)
    plan = _chunk_cached(whole, cost, int(chunks), float(gpu_busy_ms), max_copies)
    return dataclasses.replace(plan, gpu_chunks=tuple((ids[r], j) for r, j in plan.gpu_chunks),
                               copy=tuple(ids[r] for r in plan.copy),
                               split=None if plan.split is None else ids[plan.split],
                               whole=_relabel_cold(plan.whole, ids))


@functools.lru_cache(maxsize=4096)
def _chunk_cached(whole: ColdPlan, cost: CostModel, chunks: int, gpu_busy_ms: float,
                  max_copies: int | None) -> ChunkPlan:
    n = dict(whole.token_counts)
    gpu_chunks = {e: chunks for e in whole.copy}
    best = (whole.critical_path_ms, None, None, whole.cpu_ms, whole.gpu_end_ms)
    if chunks > 1 and n:
        s_cpu, s_h2d = cost.cpu_contended_slowdown, cost.h2d_contended_slowdown
        # the whole plan's CPU queue, solo (= whole.cpu_ms, bit for bit, without contention)
        cpu_work = sum(cost.cpu_ms(n[e]) for e in whole.cpu)
        lat = cost.copy_latency_ms
        bw_ms = cost.copy_ms - lat  # the whole expert's bytes over PCIe

        def part(e: int, j: int) -> tuple[float, float]:  # (copy ms, GPU ms) of j chunks of e
            return lat + bw_ms * j / chunks, cost.gpu_ms(n[e]) * j / chunks

        whole_copies = [(cost.copy_ms, cost.gpu_ms(n[e])) for e in whole.copy]
        # a CPU expert sends its first j chunks to the GPU
        if max_copies is None or len(whole.copy) < max_copies:
            for e in whole.cpu:
                for j in range(1, chunks):
                    crit, cpu_end, _, gpu_end = timeline_items(cpu_work - cost.cpu_ms(n[e]) * j / chunks,
                                                               whole_copies + [part(e, j)], gpu_busy_ms,
                                                               s_cpu, s_h2d)
                    if crit < best[0] - 1e-6:
                        best = (crit, e, j, cpu_end, gpu_end)
        # a copied expert keeps its first j chunks on the GPU, the rest go to the CPU
        for i, e in enumerate(whole.copy):
            others = whole_copies[:i] + whole_copies[i + 1:]
            for j in range(1, chunks):
                crit, cpu_end, _, gpu_end = timeline_items(cpu_work + cost.cpu_ms(n[e]) * (chunks - j) / chunks,
                                                           others + [part(e, j)], gpu_busy_ms, s_cpu, s_h2d)
                if crit < best[0] - 1e-6:
                    best = (crit, e, j, cpu_end, gpu_end)
    crit, split, j, cpu_end, gpu_end = best
    copy = list(whole.copy)
    if split is not None:
        gpu_chunks[split] = j
        copy = [e for e in copy if e != split] + [split]
    return ChunkPlan(chunks=chunks, gpu_chunks=tuple(sorted(gpu_chunks.items())), copy=tuple(copy),
                     split=split, critical_path_ms=crit, cpu_ms=cpu_end, gpu_end_ms=gpu_end, whole=whole)


def streamed_chunks(cost: CostModel, chunks: int, top_k: int = 1, tokens: float = 1.0,
                    cold_share: float = 1.0, cold_patterns: Sequence[float] | None = None) -> tuple[int, ...]:
    """[top_k] of a cold expert's `chunks` chunks, how many a routed step (no host planning:
    HybridMoE._forward_routed_graphs and graph steps) has the GPU compute straight from host memory while the CPU
    computes the rest, per top-k position of the (token, k) pair.

    The total m over the top_k positions is spread as evenly as the positions allow (the
    first ones take one more), and minimises a layer's expected max(CPU share, PCIe share),
    both sides slowed by host DRAM contention while the other runs, where each position's
    expert is cold (on the host) with probability `cold_share`, the others' GPU hit rate.
    Positions give the cut a finer grain than one expert's chunks: 5 of 16 chunks of two
    experts where one expert alone has only 2 or 3 of 8; but a layer with one cold expert
    then runs that expert's cut alone. Priced as if every position were cold (the old
    model), the H100 box took (3, 2) of 8 chunks for Mixtral's top-2 where (2, 2) was 4%
    slower; at decode's measured 57% hit rate most cold layers had one cold expert, whose 3
    streamed chunks outlasted the CPU's 5 (3.2 against 2.3 ms): the CPU jobs waited 5.0 ms
    a step for their routing and decode ran 45.2 tok/s (e2e-h100.json repeats). (3, 2)
    never beat (2, 2) on one machine (benchmarks/results/routed-decode-h100.json).

    cold_patterns [2^top_k] (counts or weights, any scale) replaces that independence with what
    the layer's tokens did: entry `mask` is how often a token had exactly the positions of
    `mask` (bit k: position k) cold. Settled batch-1 decode is far from independent: with
    the dummy router each cold layer had exactly one cold expert a token (engine-trace-h100.json),
    where a 50% share priced independently puts a quarter of the weight on two cold
    experts. With the CPU at 3.3 ms an expert (a slow host's ~105 GB/s; contention 1.22x /
    1.25x) that picks (3, 2), where exactly one cold expert a token wants (2, 2): a lone
    expert's 3 streamed chunks outlast the CPU's 5, and engines that streamed
    (3, 2) waited 2.6-5.0 ms a step for their routing against 0.4-0.8 with (2, 2).

    The GPU's in-place reads are priced at their own measured rate (stream_ms; a copy's
    where a model lacks it): one calibration timed them at 50.1 GB/s against the copies'
    54.9. All 0 when streaming saves nothing.
    """
    for name, v in (("chunks", chunks), ("top_k", top_k)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not 0.0 < cold_share <= 1.0:
        raise ValueError(f"cold_share must be in (0, 1], got {cold_share!r}")
    if cold_patterns is not None:
        weights = [float(w) for w in cold_patterns]
        if len(weights) != 1 << top_k or min(weights) < 0 or not sum(weights) > 0:
            raise ValueError(f"cold_patterns needs 2^top_k = {1 << top_k} non-negative weights, not all 0; "
                             f"got {weights!r}")
        total_weight = sum(weights)
        cold_patterns = [w / total_weight for w in weights]  # shares
    cpu, pcie = cost.cpu_ms(tokens), cost.stream_ms

    def layer_ms(gpu_chunks: int, cold: int) -> float:  # `cold` experts, the GPU taking gpu_chunks of theirs
        cpu_chunks = cold * chunks - gpu_chunks
        both = gpu_chunks > 0 and cpu_chunks > 0  # the two sides overlap, and contend for host DRAM
        return max(cpu * cpu_chunks / chunks * (cost.cpu_contended_slowdown if both else 1.0),
                   pcie * gpu_chunks / chunks * (cost.h2d_contended_slowdown if both else 1.0))

    def expected_ms(m: int) -> float:
        q, r = divmod(m, top_k)  # the first r positions stream q + 1 chunks, the others q
        if cold_patterns is not None:
            total = 0.0
            for mask, weight in enumerate(cold_patterns):
                if mask and weight:
                    cold = [k for k in range(top_k) if mask >> k & 1]
                    total += weight * layer_ms(sum(q + (k < r) for k in cold), len(cold))
            return total
        total = 0.0
        for a in range(r + 1):  # cold positions among the first r ...
            for b in range(top_k - r + 1):  # ... and among the others
                if a + b:
                    p = math.comb(r, a) * math.comb(top_k - r, b) * cold_share ** (a + b) \
                        * (1.0 - cold_share) ** (top_k - a - b)
                    total += p * layer_ms(a * (q + 1) + b * q, a + b)
        return total

    best_m, best_ms = 0, expected_ms(0)
    for m in range(1, chunks * top_k + 1):
        ms = expected_ms(m)
        if ms < best_ms * (1 - 1e-9):
            best_m, best_ms = m, ms
    return tuple(best_m // top_k + (k < best_m % top_k) for k in range(top_k))
