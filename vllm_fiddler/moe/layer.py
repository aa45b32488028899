"""HybridMoE: one MoE layer's experts split between device and host memory.

Architecture (per step, inside the layer's opaque custom op, vllm_fiddler.moe.ops):
  vLLM's router gives topk_weights / topk_ids [T, K]
    -> cold part: tokens routed to host-resident experts go to the CPU
       expert runtime (submit; runs while the GPU works)
    -> hot part: device-resident experts on the device (Triton on CUDA,
       torch elsewhere)
    -> wait for the cold part, add it, cast once to the model dtype (on CUDA
       the stream waits for it on the device, so the engine thread goes on
       to the next layer's attention while the CPU computes:
       vllm_fiddler.runtime.device_wait).
Every (token, k) pair is computed on exactly one side: the slot maps send
an expert id to a local slot in its own set and to -1 in the other.

On vLLM's CPU platform both sets live in host memory but still run through
the two code paths, so CPU CI exercises the split.

Host-resident experts are stored in C chunks along the intermediate
dimension (``expert_chunks``): chunk c of expert e holds gate rows
[c*Ic, (c+1)*Ic), the matching up rows, and the matching columns of the down
projection, each chunk contiguous. A chunk is itself a SwiGLU expert of
intermediate size Ic, and an expert's output is the sum of its chunks', so
the CPU kernel and the Triton kernel both take chunks as experts, and one
expert can be cut between the CPU (its last chunks) and a copy to the GPU
(its first chunks): at decode this keeps DRAM and PCIe busy together
(cost_model.plan_cold_chunks). Device-resident experts keep the plain layout.

Shape legend: T = tokens, H = hidden, I = expert intermediate, E = experts,
Eg / Ec = device- / host-resident experts, K = top-k, C = chunks per host
expert, Ic = I / C.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from vllm_fiddler.compat import num_actual_tokens
from vllm_fiddler.kernels.reference import SILU, ExpertMath
from vllm_fiddler.moe.steps.host import HostSteps
from vllm_fiddler.moe.steps.routed import RoutedSteps
from vllm_fiddler.moe.steps.synced import SyncedSteps
from vllm_fiddler.runtime.cpu_experts import CPUExpertRuntime
from vllm_fiddler.runtime.step_planner import get_step_planner

# Expert tensors as vLLM's loaders name them: w1 (gate) and w3 (up) fill w13, w2 is down;
# b1 / b3 / b2 their biases; w13 / b13 gate and up together, in vLLM's layout.
_W1, _W2, _W3 = "w1", "w2", "w3"


def expert_chunks(intermediate_size: int, most: int = 8, min_rows: int = 32) -> int:
    """Chunks per host-resident expert: the most (<= `most`, a power of two) that divide I into
    parts of >= `min_rows` rows, a multiple of 16 (the CPU kernels' row blocks).

    8 for Mixtral-8x7B (Ic = 1792: 44 MB per chunk, 1/8 of an expert is the
    split's granularity); 1 when I cannot be cut (the whole-expert plan).
    """
    c = most
    while c > 1:
        ic = intermediate_size // c
        if intermediate_size % c == 0 and ic >= min_rows and ic % 16 == 0:
            return c
        c //= 2
    return 1


# Routed jobs count their tokens per cold-position mask (2^top_k counters) up to this top-k,
# the native kernels' limit (kMaxPatternTopK in kernels/cpu/ops.cpp).
COLD_PATTERN_MAX_TOP_K = 12
# A gap between two MoE ops longer than this is idle time (no request), not a step's work.
IDLE_GAP_S = 0.5


class HybridMoE(HostSteps, SyncedSteps, RoutedSteps, nn.Module):
    """The layer's state (expert sets, slot maps, counters) and forward, which picks a step's
    path: vLLM's CPU platform (steps.host), a CUDA graph capture or a routed step
    (steps.routed), or the synced CUDA step (steps.synced)."""

    # the end of the last MoE op in this process, any layer's (gap_before_s)
    _last_op_end: float | None = None

    def __init__(self, *, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 gpu_experts: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 cpu_runtime: CPUExpertRuntime, pin_memory: bool, host_backing: bool = False,
                 math: ExpertMath = SILU):
        """math: the expert activation and biases (kernels.reference.ExpertMath).
        host_backing: host memory keeps every expert (host slot e = expert e), not only the cold ones, so a device-resident expert can be evicted at no cost and any expert can be
        copied in (online re-placement, vllm_fiddler.runtime.replacer); otherwise host slot s
        holds the s-th cold expert."""
        super().__init__()
        E, H, I = num_experts, hidden_size, intermediate_size
        self.num_experts, self.top_k, self.hidden_size, self.intermediate_size = E, top_k, H, I
        self.math = math
        self.dtype = dtype  # the model's: activations, and the native kernels' x
        gpu_experts = tuple(sorted(gpu_experts))
        cold = tuple(e for e in range(E) if e not in set(gpu_experts))
        self.device = torch.device(device)
        self.cpu_runtime = cpu_runtime
        self.host_backing = host_backing
        # Which expert each host slot holds (fixed for the module's life).
        self.host_experts = tuple(range(E)) if host_backing else cold
        self.host_slot = [-1] * E  # [E] host slot of each expert, or -1 (device-only)
        for s, e in enumerate(self.host_experts):
            self.host_slot[e] = s
        # Where each expert is SERVED from, which re-placement changes between
        # steps: its device slot (>= 0) or -1, in which case it runs from its
        # host slot. Mirrored in device tensors indexed by the routing.
        self.device_slot = [-1] * E  # [E]
        for s, e in enumerate(gpu_experts):
            self.device_slot[e] = s
        # device="cpu" explicitly: vLLM builds the model under `with torch.device(cuda)`.
        self.cpu_slot_of_host = torch.tensor(self._cpu_slots(), dtype=torch.int32, device="cpu")  # [E]
        self.gpu_slot_of = torch.tensor(self.device_slot, dtype=torch.int32, device="cpu").to(self.device)  # [E]
        self.cpu_slot_of = self.cpu_slot_of_host.to(self.device)  # [E] host slot if served there, or -1
        self.stager = None  # WeightStager on CUDA (set by the model), else no copy path
        self.graphs = None  # MoEGraphs on CUDA (set by the model): small steps' GPU launches replay graphs
        # steps of up to this many tokens hand the CPU its routing from the stream (_forward_routed_graphs)
        self.routed_max_tokens = 0
        # CUDA views of the host chunks (runtime.host_view, set by the model) and, per top-k
        # position, how many of a cold expert's chunks a routed step computes on the GPU
        # straight from host memory (cost_model.streamed_chunks), the CPU taking the rest
        self.host_views: tuple[torch.Tensor, torch.Tensor] | None = None
        self.routed_gpu_chunks: tuple[int, ...] | None = None  # None: decided at the first routed step
        # set by _decide_streamed_chunks: it decides again every STREAMED_DECISION_STEPS routed
        # steps from the pairs the host served since (a cut set from outside stays)
        self._streamed_decision: dict | None = None
        # [routed_gpu_chunks as set, the same as a [K, 1] device tensor] (streamed_below)
        self._streamed_below: list | None = None
        # (token, k) pairs of routed steps, and the native jobs' counts: of those pairs, the ones
        # of host experts, and the chunk-experts of theirs the GPU streamed from host memory
        # and the CPU read; then (top_k <= COLD_PATTERN_MAX_TOP_K) the routed tokens per
        # cold-position mask, [2^K], which the streamed cut is priced over
        self._routed_pairs = 0
        # (token, k) pairs of routed steps inside FULL CUDA graphs, counted by the native job
        # thread (runtime.graph_jobs); graph_jobs: set by the model where those graphs are on
        self.graph_pairs = torch.zeros(1, dtype=torch.int64, device="cpu")
        self.graph_jobs = None
        patterns = 1 << top_k if top_k <= COLD_PATTERN_MAX_TOP_K else 0
        self._routed_counts = torch.zeros(3 + patterns, dtype=torch.int64, device="cpu")
        # chunk-experts the CPU read in the other steps (each once a step)
        self._cpu_chunk_reads = 0
        self._last_cpu_pairs = 0
        self._allocate_experts(len(gpu_experts), len(self.host_experts), dtype, pin_memory)
        # Counters for metrics and tests: (token, k) pairs computed on each side (routed
        # steps' pairs are added in the properties below).
        self._to_gpu = 0
        self._to_cpu = 0
        self.steps = 0  # forward calls with at least one token
        # Where a CUDA step's time goes (host seconds, for benchmarks): in this op,
        # blocked on the device->host copy of the routing (i.e. on the GPU work
        # queued before it, which includes the stream's wait for the previous
        # layer's CPU experts when the device waits for them), and blocked on the
        # CPU experts' result (only when the host waits for it); and from the
        # op's start to handing the CPU its work (the CPU idles until then).
        self.op_s = 0.0
        self.sync_wait_s = 0.0
        self.cpu_wait_s = 0.0
        self.to_cpu_submit_s = 0.0
        # host time from the previous MoE op's end (any layer's) to this one's start:
        # for the first layer the step's edge (sampler, scheduler, IPC, embedding,
        # its attention), for the others their attention block; both include this
        # layer's routing and counting below (~0.12 ms on the H100 box)
        self.gap_before_s = 0.0
        # tokens routed to each expert so far ([E], on the device: no sync per step);
        # read by profiling (vllm_fiddler.profile), placement and re-placement
        self.expert_tokens = torch.zeros(E, dtype=torch.int64, device=self.device)
        # what re-placement reads instead (vllm_fiddler.runtime.replacer): each step's
        # count per expert through heat_table (adaptation.step_value_table), once the
        # replacer has set one; float64, so a long-running server's sums stay exact
        self.expert_heat = torch.zeros(E, dtype=torch.float64, device=self.device)
        self.heat_table: torch.Tensor | None = None  # [N + 1] value of n tokens in a step

    def _allocate_experts(self, Eg: int, Eh: int, dtype: torch.dtype, pin_memory: bool) -> None:
        """The device set's experts in the plain layout, the host set's in chunks (module docstring)."""
        H, I = self.hidden_size, self.intermediate_size
        self.chunks = C = expert_chunks(I)
        Ic = I // C
        self.w13_gpu = torch.empty(Eg, 2 * I, H, dtype=dtype, device=self.device)  # [Eg, 2I, H]
        self.w2_gpu = torch.empty(Eg, H, I, dtype=dtype, device=self.device)  # [Eg, H, I]
        self.w13_cpu = torch.empty(Eh, C, 2 * Ic, H, dtype=dtype, device="cpu", pin_memory=pin_memory)
        self.w2_cpu = torch.empty(Eh, C, H, Ic, dtype=dtype, device="cpu", pin_memory=pin_memory)
        # the host experts' chunks as experts: slot s chunk c is chunk-expert s * C + c
        self.w13_cpu_chunks = self.w13_cpu.view(Eh * C, 2 * Ic, H)  # [Eh*C, 2Ic, H]
        self.w2_cpu_chunks = self.w2_cpu.view(Eh * C, H, Ic)  # [Eh*C, H, Ic]
        # biases (math.has_bias): a host chunk-expert's b13 chunk, and b2 in chunk 0 only (an
        # expert's output is the sum of its chunks')
        self.b13_gpu = self.b2_gpu = self.b13_cpu = self.b2_cpu = None
        if self.math.has_bias:
            self.b13_gpu = torch.zeros(Eg, 2 * I, dtype=dtype, device=self.device)  # [Eg, 2I]
            self.b2_gpu = torch.zeros(Eg, H, dtype=dtype, device=self.device)  # [Eg, H]
            self.b13_cpu = torch.zeros(Eh, C, 2 * Ic, dtype=dtype, device="cpu", pin_memory=pin_memory)
            self.b2_cpu = torch.zeros(Eh, C, H, dtype=dtype, device="cpu", pin_memory=pin_memory)

    @property
    def routed_to_cpu(self) -> int:
        """(token, k) pairs computed from host memory so far (a routed step's, once its job ran)."""
        return self._to_cpu + int(self._routed_counts[0])

    @property
    def routed_to_gpu(self) -> int:
        """(token, k) pairs computed from device memory so far."""
        return self._to_gpu + self._routed_pairs + int(self.graph_pairs[0]) - int(self._routed_counts[0])

    @property
    def routed_cold_patterns(self) -> list[int] | None:
        """[2^K] routed tokens so far whose host-served top-k positions were exactly those of
        the mask (bit k: position k), or None where top_k is too large to count them."""
        return self._routed_counts[3:].tolist() if self._routed_counts.numel() > 3 else None

    @property
    def streamed_weight_bytes(self) -> int:
        """Bytes of host weights routed steps' GPU kernels read in place over PCIe so far."""
        return int(self._routed_counts[1]) * self.chunk_bytes

    @property
    def cpu_weight_bytes(self) -> int:
        """Bytes of host weights the CPU experts read so far (a chunk-expert once a step,
        however many of the step's tokens chose it): over the CPU's busy time, the DRAM
        bandwidth its kernels got, to hold against the host's measured roofline."""
        return (self._cpu_chunk_reads + int(self._routed_counts[2])) * self.chunk_bytes

    @property
    def chunk_bytes(self) -> int:
        """w13 + w2 of one chunk-expert (an expert's bytes / chunks)."""
        return self.expert_bytes // self.chunks

    def _cpu_slots(self) -> list[int]:
        """[E] host slot of each expert served from the host, -1 for device-served ones."""
        return [self.host_slot[e] if self.device_slot[e] < 0 else -1 for e in range(self.num_experts)]

    @property
    def gpu_experts(self) -> tuple[int, ...]:
        """Experts served from device memory now (sorted)."""
        return tuple(e for e in range(self.num_experts) if self.device_slot[e] >= 0)

    @property
    def cpu_experts(self) -> tuple[int, ...]:
        """Experts served from host memory now (sorted)."""
        return tuple(e for e in range(self.num_experts) if self.device_slot[e] < 0)

    @property
    def expert_bytes(self) -> int:
        """w13 + w2 of one expert."""
        return 3 * self.hidden_size * self.intermediate_size * self.w13_cpu.element_size()

    @property
    def num_host_slots(self) -> int:
        return len(self.host_experts)

    # ---- weights -------------------------------------------------------
    def store_cold(self, slot: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Writes one host expert from the plain layout (w13 [2I, H], w2 [H, I]) into its chunks."""
        C, H, I = self.chunks, self.hidden_size, self.intermediate_size
        Ic = I // C
        self.w13_cpu[slot].view(C, 2, Ic, H).copy_(w13.view(2, C, Ic, H).transpose(0, 1))
        self.w2_cpu[slot].copy_(w2.view(H, C, Ic).transpose(0, 1))

    def cold_expert_plain(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One host expert in the plain layout (copies): (w13 [2I, H], w2 [H, I])."""
        C, H, I = self.chunks, self.hidden_size, self.intermediate_size
        w13 = self.w13_cpu[slot].view(C, 2, I // C, H).transpose(0, 1).reshape(2 * I, H)
        w2 = self.w2_cpu[slot].transpose(0, 1).reshape(H, I)
        return w13, w2

    def expert_weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [2I, H], w2 [H, I]) of one expert in the plain layout: views of a device-served
        expert, copies of a host-served one."""
        slot = self.device_slot[expert]
        if slot >= 0:
            return self.w13_gpu[slot], self.w2_gpu[slot]
        return self.cold_expert_plain(self.host_slot[expert])

    @property
    def native_jobs(self) -> bool:
        """Whether the native job thread runs this layer's host experts (routed steps, graph
        steps, device-waited jobs without the GIL) on activations in the model's dtype."""
        from vllm_fiddler.kernels import cpu as cpu_kernels

        return cpu_kernels.takes_jobs(self.w13_cpu_chunks, self.w2_cpu_chunks, self.math, self.host_biases,
                                      x_dtype=self.dtype)

    @property
    def host_biases(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The host chunk-experts' biases (b13 [Eh*C, 2Ic], b2 [Eh*C, H]), or None."""
        if self.b13_cpu is None:
            return None
        return self.b13_cpu.view(-1, self.b13_cpu.shape[-1]), self.b2_cpu.view(-1, self.hidden_size)

    def load_expert(self, expert: int, name: str, weight: torch.Tensor) -> None:
        """Writes one of `expert`'s tensors, as vLLM's loaders name them (w1 / w3 [I, H], w2
        [H, I], w13 [2I, H] in vLLM's layout, and biases b1 / b3 [I], b2 [H], b13 [2I]), into its
        device slot and/or its host slot."""
        if name in ("w13", "b13"):
            gate, up = self.math.split_w13(weight)
            self.load_expert(expert, name[0] + "1", gate)
            self.load_expert(expert, name[0] + "3", up)
            return
        if name not in (_W1, _W2, _W3, "b1", "b2", "b3"):
            raise KeyError(f"unknown expert tensor {name!r}")
        if name[0] == "b" and self.b13_cpu is None:
            raise ValueError(f"expert bias {name!r} given to a layer without biases")
        C, H, I = self.chunks, self.hidden_size, self.intermediate_size
        Ic = I // C
        slot = self.device_slot[expert]
        if slot >= 0:
            if name[0] == "w":
                w13, w2 = self.w13_gpu[slot], self.w2_gpu[slot]
            else:
                w13, w2 = self.b13_gpu[slot], self.b2_gpu[slot]
            dst = {"1": w13[:I], "3": w13[I:], "2": w2}[name[1]]
            dst.copy_(weight)
        slot = self.host_slot[expert]
        if slot >= 0:
            if name == _W2:
                self.w2_cpu[slot].copy_(weight.reshape(H, C, Ic).transpose(0, 1))
            elif name == "b2":
                self.b2_cpu[slot, 0].copy_(weight)  # chunk 0 only: an expert's output sums its chunks'
            else:  # gate rows go first in each chunk, up rows after them
                chunked = (self.w13_cpu if name[0] == "w" else self.b13_cpu)[slot]  # [C, 2Ic, H] / [C, 2Ic]
                half = slice(None, Ic) if name[1] == "1" else slice(Ic, None)
                chunked[:, half].copy_(weight.reshape(C, Ic, *weight.shape[1:]))

    def init_random(self, seed: int, scale: float = 1e-3, pool_size: int = 1 << 24) -> None:
        """uniform(-scale, scale)-valued weights for --load-format dummy.

        Drawing 90 GB one value at a time runs at ~0.4 GB/s on the host (torch's
        CPU generator is serial): minutes for Mixtral. Instead one pool of
        `pool_size` random values per layer is tiled into every expert at copy
        speed, starting at an offset per (expert, tensor) so experts differ. The
        values depend on (seed, expert) only, never on the placement.
        """
        gen = torch.Generator(device="cpu").manual_seed(seed)
        dtype = self.w13_cpu.dtype
        pool = torch.empty(pool_size, dtype=torch.float32, device="cpu")
        pool = pool.uniform_(-scale, scale, generator=gen).to(dtype)
        pools = {torch.device("cpu"): torch.cat([pool, pool])}  # [2N]: any window of N is a view

        def fill(dst: torch.Tensor, shift: int) -> None:
            twice = pools.get(dst.device)
            if twice is None:
                twice = pools[dst.device] = pools[torch.device("cpu")].to(dst.device)
            flat = dst.view(-1)
            n = flat.numel()
            if n <= pool_size:
                flat.copy_(twice[shift:shift + n])
                return
            rolled = twice[shift:shift + pool_size]
            whole = n // pool_size * pool_size
            flat[:whole].view(-1, pool_size).copy_(rolled.expand(whole // pool_size, pool_size))
            flat[whole:].copy_(rolled[:n - whole])

        H, I = self.hidden_size, self.intermediate_size
        plain = None  # host staging of one expert in the plain layout
        for e in range(self.num_experts):
            if self.device_slot[e] >= 0:
                dsts = self.expert_weights(e)
            else:
                if plain is None:
                    plain = (torch.empty(2 * I, H, dtype=dtype), torch.empty(H, I, dtype=dtype))
                dsts = plain
            for j, dst in enumerate(dsts):
                fill(dst, (2 * e + j) * 104729 % pool_size)
            if self.host_slot[e] >= 0:
                if self.device_slot[e] >= 0:  # host backing of a device-resident expert
                    self.store_cold(self.host_slot[e], *(d.cpu() for d in dsts))
                else:
                    self.store_cold(self.host_slot[e], *plain)
        if self.math.has_bias:  # small: straight from the pool
            for e in range(self.num_experts):
                for j, (name, n) in enumerate((("b1", I), ("b3", I), ("b2", H))):
                    shift = (3 * e + j) * 7919 % (pool_size - n)
                    self.load_expert(e, name, pool[shift:shift + n])

    # ---- re-placement (vllm_fiddler.runtime.replacer) --------------------
    def set_heat_table(self, values) -> None:
        """Starts counting expert_heat: each step adds values[min(n, len - 1)] for an expert's n tokens.
        A table of the same length is rewritten in place, on the current stream: the routed
        steps' CUDA graphs (MoEGraphs.capture_routed) read it where it was at capture."""
        table = torch.tensor(values, dtype=torch.float64)
        if self.heat_table is not None and self.heat_table.numel() == table.numel():
            self.heat_table.copy_(table)
        else:
            self.heat_table = table.to(self.device)

    def begin_swap(self, evict: int, admit: int, copier=None):
        """Between steps: serve `evict` from its host copy from now on, and start copying
        `admit` into the device slot `evict` leaves. Returns (slot, ready event or None);
        call finish_swap(admit, slot) once the copy is done.

        Needs host backing: evicting is then free (no device->host copy), and until
        finish_swap both experts run from the host, so no step ever waits for the copy.
        The slot is overwritten only after the work already queued on the compute stream
        (which may still read the evicted expert) is done: ``copier`` orders that on CUDA;
        without one (vLLM's CPU platform) the copy is synchronous.
        """
        if not self.host_backing:
            raise RuntimeError("re-placement needs host backing (a host copy of every expert)")
        slot = self.device_slot[evict]
        if slot < 0 or self.device_slot[admit] >= 0:
            raise ValueError(f"swap {evict} -> {admit}: expert {evict} must be device-served "
                             f"and expert {admit} host-served")
        self._serve(evict, -1)
        host = self.host_slot[admit]
        self._copy_biases_in(host, slot)
        if copier is not None:
            return slot, copier.copy_expert(self.w13_cpu[host], self.w2_cpu[host],
                                            self.w13_gpu[slot], self.w2_gpu[slot])
        w13, w2 = self.cold_expert_plain(host)
        self.w13_gpu[slot].copy_(w13)
        self.w2_gpu[slot].copy_(w2)
        return slot, None

    def _copy_biases_in(self, host: int, slot: int) -> None:
        """Device slot `slot`'s biases from host slot `host` (small: copied in stream order)."""
        if self.b13_cpu is None:
            return
        I = self.intermediate_size
        Ic = I // self.chunks
        chunked = self.b13_cpu[host]  # [C, 2Ic]
        self.b13_gpu[slot, :I].copy_(chunked[:, :Ic].reshape(I), non_blocking=True)
        self.b13_gpu[slot, I:].copy_(chunked[:, Ic:].reshape(I), non_blocking=True)
        self.b2_gpu[slot].copy_(self.b2_cpu[host, 0], non_blocking=True)

    def finish_swap(self, admit: int, slot: int) -> None:
        """Serve `admit` from device slot `slot` (its copy has landed)."""
        self._serve(admit, slot)

    def _serve(self, expert: int, device_slot: int) -> None:
        """Points the routing maps at `device_slot` (>= 0) or the expert's host slot (-1).
        The device tensors change in order on the current stream, after the work queued so far."""
        self.device_slot[expert] = device_slot
        cpu = self.host_slot[expert] if device_slot < 0 else -1
        self.cpu_slot_of_host[expert] = cpu
        self.gpu_slot_of[expert] = device_slot
        self.cpu_slot_of[expert] = cpu

    def cpu_chunk_ids(self, cpu_ids: torch.Tensor, topk_weights: torch.Tensor,
                      first_cpu_chunk: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Host-side routing in chunk-experts: cpu_ids [T, K] (host slot or -1) ->
        (ids [T, K*C] chunk-expert or -1, weights [T, K*C]).

        first_cpu_chunk [host slots]: chunks below it run elsewhere (the GPU); None: all on the CPU.
        """
        C = self.chunks
        T, K = cpu_ids.shape
        if C == 1 and first_cpu_chunk is None:
            return cpu_ids, topk_weights
        c = torch.arange(C, dtype=cpu_ids.dtype, device=cpu_ids.device)  # [C]
        slot = cpu_ids.unsqueeze(-1)  # [T, K, 1]
        keep = slot >= 0
        if first_cpu_chunk is not None:
            keep = keep & (c >= first_cpu_chunk[slot.clamp(min=0)])
        ids = torch.where(keep, slot * C + c, -1).view(T, K * C)
        return ids, topk_weights.unsqueeze(-1).expand(T, K, C).reshape(T, K * C)

    def step_planner(self):
        """The per-step planner of this layer's shape (runtime.step_planner): cost model and plans."""
        return get_step_planner(self)

    # ---- compute -------------------------------------------------------
    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], topk_weights [T, K], topk_ids [T, K] (vLLM's router) -> [T, H] in x.dtype."""
        out = torch.empty_like(x)
        self.forward_into(x, topk_weights, topk_ids, out)
        return out

    def forward_into(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     out: torch.Tensor) -> None:
        T = num_actual_tokens(x.shape[0])
        if T < x.shape[0]:  # CUDA-graph padding: no expert work for padded rows
            out[T:].zero_()
            x, topk_weights, topk_ids, out = x[:T], topk_weights[:T], topk_ids[:T], out[:T]
        if T == 0:
            return
        self.steps += 1
        topk_weights = topk_weights.float()
        if self.device.type == "cuda":
            start = time.perf_counter()
            last_end = HybridMoE._last_op_end
            if last_end is not None and start - last_end < IDLE_GAP_S:
                self.gap_before_s += start - last_end
            graph_step = torch.cuda.is_current_stream_capturing() and self._capture_graph_step(
                x, topk_weights, topk_ids, out)
            if not graph_step and not self._forward_routed_graphs(x, topk_weights, topk_ids, out, start):
                self.count(topk_ids)
                self._forward_cuda(x, topk_weights, topk_ids, out, start)
            HybridMoE._last_op_end = end = time.perf_counter()
            self.op_s += end - start
        else:
            self.count(topk_ids)
            self._forward_host(x, topk_weights, topk_ids, out)

    def count(self, topk_ids: torch.Tensor) -> None:
        """Counts a step's routing [T, K] into expert_tokens and (once the replacer set a heat
        table) expert_heat."""
        # [E]; not torch.bincount, which syncs with the device to size its output (~33 us a
        # layer of host time on the H100 box; benchmarks/investigations/routing_overhead.py)
        flat = topk_ids.flatten()
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=flat.device).index_add_(
            0, flat, flat.new_ones((), dtype=torch.int64).expand_as(flat))
        self.expert_tokens += counts
        if self.heat_table is not None:
            self.expert_heat += self.heat_table[counts.clamp(max=self.heat_table.numel() - 1)]

    def _count(self, cpu_ids: torch.Tensor) -> int:
        return self._count_pairs(int((cpu_ids >= 0).sum()), cpu_ids.numel())

    def _count_pairs(self, n_cpu: int, n_pairs: int) -> int:
        self._to_cpu += n_cpu
        self._to_gpu += n_pairs - n_cpu
        return n_cpu
