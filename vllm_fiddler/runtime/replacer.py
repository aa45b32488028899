"""Online re-placement: swaps GPU-resident experts for hotter host ones while serving.

The policy is pure (vllm_fiddler.adaptation: decaying heat, expected gain
against the copy, hysteresis, noise test, cooldown); this module runs it
between engine steps and executes its swaps. Timeline of one swap
(evict x from device slot s, admit y):

  step k (after the forward):  x is served from its host copy from now on;
                               copy stream: wait for step k's kernels, then
                               y's host chunks -> slot s (async)
  steps k+1 .. :               x and y both run from the host (no wait)
  first step boundary after the copy's event completed:
                               y is served from slot s; counted, logged

So a step never waits for a copy: the cost is the copy's PCIe traffic and,
for the steps it takes, x's and y's tokens on the CPU. At most
``max_swaps_in_flight`` copies run at once; when one lands and the last plan
had swaps it refused only for that limit, the policy plans again at that
step on the same rates, so a placement far from the routing converges at the
copy link's pace, not ``max_swaps_in_flight`` swaps per interval. Every
expert keeps a host copy (``HybridMoE.host_backing``), so evicting costs
nothing.

What feeds the policy: each layer's heat counter (``expert_heat``, on the
device, bumped by every forward): an expert's n tokens in a step count as
``adaptation.step_value_table``'s v(n), what serving them from the GPU saves
in units of the 1-token (decode) saving, from the cost model below. So a long
prompt's hundreds of tokens count for about one copy's worth, not for
hundreds of decode steps. Every ``interval_steps`` engine
steps the counters are snapshotted into pinned memory with an async copy,
read at the first later step whose event query finds the copy done (the
next one, unless the device is that far behind), so reading never syncs the
device. The first real step's snapshot is only the baseline (what warm-up
counted). Steps without attention metadata (vLLM's dummy runs:
memory profiling, warm-up, CUDA graph capture) are not steps here, and the
counts they add before the first real step are dropped.

The policy's prices, from the step planner's cost model (calibrated on the
machine on CUDA; the built-in prior on vLLM's CPU platform):
  copy_ms = one expert host -> device;
  saved_ms_per_token = CPU expert at 1 token - GPU expert at 1 token (decode:
  a host-served expert costs its weight read on the CPU per step it is hit).
"""

from __future__ import annotations

import dataclasses

import torch

from vllm_fiddler.adaptation import AdaptationPolicy, ExpertHeat, plan_swaps
from vllm_fiddler.config import AdaptationSettings
from vllm_fiddler.logger import logger


class ExpertCopier:
    """Copies one host expert (chunked layout) into a device slot (plain layout) on its own stream.

    The gate/up rows of a chunk are contiguous in both layouts (2C plain
    copies); the down projection's chunk is a column block of the plain
    [H, I], so it goes through a small contiguous bounce buffer ([H, I/C],
    15 MB for Mixtral, allocated once) and a device-side copy, never through
    a temporary the caching allocator would keep.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, chunks: int, dtype: torch.dtype,
                 device: torch.device):
        self.chunks = chunks
        self.stream = torch.cuda.Stream(device=device)
        self.bounce = torch.empty(hidden_size, intermediate_size // chunks, dtype=dtype, device=device)  # [H, Ic]
        self.bytes_copied = 0

    def copy_expert(self, w13_host: torch.Tensor, w2_host: torch.Tensor, w13_dst: torch.Tensor,
                    w2_dst: torch.Tensor) -> torch.cuda.Event:
        """w13_host [C, 2Ic, H], w2_host [C, H, Ic] (pinned) -> w13_dst [2I, H], w2_dst [H, I].
        Starts after the work queued so far on the current stream; returns the done event."""
        C = self.chunks
        Ic = w2_host.shape[-1]
        H = w13_host.shape[-1]
        queued = torch.cuda.Event()
        queued.record(torch.cuda.current_stream())
        gate_up = w13_dst.view(2, C, Ic, H)  # [2, C, Ic, H]: plain rows by (gate/up, chunk)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(queued)
            for c in range(C):
                gate_up[0, c].copy_(w13_host[c, :Ic], non_blocking=True)
                gate_up[1, c].copy_(w13_host[c, Ic:], non_blocking=True)
                self.bounce.copy_(w2_host[c], non_blocking=True)
                w2_dst[:, c * Ic:(c + 1) * Ic].copy_(self.bounce)  # in order on this stream
            done = torch.cuda.Event()
            done.record(self.stream)
        self.bytes_copied += w13_host.numel() * w13_host.element_size() + w2_host.numel() * w2_host.element_size()
        return done


# Step values are tabulated up to this many tokens per expert; a step with more takes the
# last value (by then one copy caps what residency can save).
HEAT_TABLE_TOKENS = 4096


@dataclasses.dataclass
class _InFlight:
    layer: int
    evict: int
    admit: int
    slot: int
    ready: "torch.cuda.Event | None"
    started_step: int
    text: str


class ExpertReplacer:
    """Runs the adaptation policy between steps over a model's HybridMoE layers."""

    def __init__(self, layers, settings: AdaptationSettings, copier: ExpertCopier | None = None):
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("no MoE layers to re-place")
        self.settings = settings
        self.copier = copier
        self.num_experts = self.layers[0].num_experts
        self.heat = ExpertHeat(len(self.layers), self.num_experts, settings.half_life_steps)
        self.policy: AdaptationPolicy | None = None  # priced at the first plan (the cost model calibrates first)
        self.step = 0  # real engine steps seen
        self.in_flight: list[_InFlight] = []
        self.last_moved: dict[tuple[int, int], int] = {}
        self.replacements = 0  # swaps landed (metrics)
        self._deferred = 0  # the last plan's swaps refused only by the copy limit
        self.bytes_copied = 0
        self._baseline: list[list[int]] | None = None  # [L][E] counters at _baseline_step
        self._baseline_step = 0
        self._snapshot: torch.Tensor | None = None  # [L, E] int64 (pinned on CUDA), taken at _snapshot_step
        self._snapshot_ready: "torch.cuda.Event | None" = None
        self._snapshot_step = 0
        self._snapshot_unread = False  # taken, not read yet

    # ---- the per-step hook --------------------------------------------------
    def on_step(self) -> None:
        """Call after each real engine step's forward (not during dummy runs or capture)."""
        self.step += 1
        landed = self._land()
        observed = False
        if self._snapshot is None:  # first real step: the counters so far (warm-up) are not evidence
            self._install_heat_tables()
            self._take_snapshot()
        elif self._snapshot_unread:
            observed = self._read_snapshot()
        elif self.step - self._snapshot_step >= self.settings.interval_steps:
            self._take_snapshot()
        # New evidence, or a copy slot came free while the last plan had swaps waiting for one:
        # those start now, on the rates already observed, not an interval later (H100 box, 8
        # layers, uniform dummy router: 2 swaps per 16-step interval left batch-1 decode
        # re-placing for its first ~100 steps, at 28-45 ms a step against 17.5 once settled).
        if observed or (landed and self._deferred):
            self._plan()

    # ---- counters -------------------------------------------------------------
    def _install_heat_tables(self) -> None:
        """Every layer counts expert_heat through the cost model's step values from now on."""
        from vllm_fiddler.adaptation import step_value_table

        cost = self._cost()
        table = step_value_table(cost.cpu_ms, cost.gpu_ms, cost.copy_ms, HEAT_TABLE_TOKENS)
        for m in self.layers:
            m.set_heat_table(table)

    def _take_snapshot(self) -> None:
        """Starts copying the counters to the host; read at a later step (_read_snapshot)."""
        counts = torch.stack([m.expert_heat for m in self.layers])  # [L, E]
        if counts.device.type == "cuda":
            if self._snapshot is None:
                self._snapshot = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            self._snapshot.copy_(counts, non_blocking=True)
            self._snapshot_ready = torch.cuda.Event()
            self._snapshot_ready.record()
        else:
            self._snapshot = counts.clone()
        self._snapshot_step = self.step
        self._snapshot_unread = True

    def _read_snapshot(self) -> bool:
        """Reads the snapshot if its copy has landed (never waits: else the next step tries
        again); the first one is the baseline, later ones go to the heat. Whether it observed."""
        if self._snapshot_ready is not None and not self._snapshot_ready.query():
            return False
        self._snapshot_unread = False
        counts = self._snapshot.tolist()
        baseline, since = self._baseline, self._baseline_step
        self._baseline, self._baseline_step = counts, self._snapshot_step
        if baseline is None:
            return False
        delta = [[max(0.0, n - b) for n, b in zip(row, base)] for row, base in zip(counts, baseline)]
        self.heat.observe_all(delta, steps=max(1, self._snapshot_step - since))
        return True

    # ---- planning and swaps ------------------------------------------------------
    def _cost(self):
        """The step planner's cost model (calibrated on CUDA); the machine-independent prior
        on vLLM's CPU platform, which has no copy path."""
        from vllm_fiddler.runtime import step_planner

        planner = step_planner._planner
        if planner is not None:
            return planner.cost
        from vllm_fiddler.cost_model import default_for_shape

        layer = self.layers[0]
        return default_for_shape(layer.hidden_size, layer.intermediate_size, layer.w13_cpu.element_size())

    def _price(self) -> AdaptationPolicy:
        return AdaptationPolicy.priced(self._cost(), self.settings)

    def resident(self) -> list[tuple[int, ...]]:
        """[L] GPU experts per layer once the copies in flight have landed."""
        out = [set(m.gpu_experts) for m in self.layers]
        for f in self.in_flight:
            out[f.layer].add(f.admit)
        return [tuple(sorted(r)) for r in out]

    def _plan(self) -> None:
        if self.policy is None:
            self.policy = self._price()
            logger.info("fiddler: online re-placement on: copy %.2f ms per expert, %.2f ms saved per "
                        "token served on the GPU, %s", self.policy.copy_ms, self.policy.saved_ms_per_token,
                        self.settings)
        plan = plan_swaps(self.heat.rates(), self.resident(), self.policy, step=self.step,
                          last_moved=self.last_moved, effective_steps=self.heat.effective_steps(),
                          in_flight=len(self.in_flight))
        self._deferred = plan.deferred
        for swap in plan.swaps:
            layer = self.layers[swap.layer]
            slot, ready = layer.begin_swap(swap.evict, swap.admit, self.copier)
            self.last_moved[(swap.layer, swap.evict)] = self.step
            self.last_moved[(swap.layer, swap.admit)] = self.step
            self.in_flight.append(_InFlight(swap.layer, swap.evict, swap.admit, slot, ready, self.step, swap.text()))

    def _land(self) -> int:
        """Serves each swap whose copy is done from its slot; returns how many landed."""
        still = []
        for f in self.in_flight:
            if f.ready is not None and not f.ready.query():
                still.append(f)
                continue
            self.layers[f.layer].finish_swap(f.admit, f.slot)
            self.replacements += 1
            self.bytes_copied += self.layers[f.layer].expert_bytes
            logger.info("fiddler re-placement (step %d, started %d): %s", self.step, f.started_step, f.text)
        landed = len(self.in_flight) - len(still)
        self.in_flight = still
        return landed
