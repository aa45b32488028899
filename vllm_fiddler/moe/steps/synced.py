"""The synced CUDA step: the routing comes down to the host in one copy, the host plans the
cold work (CPU job, weight copies, chunks cut between the two), the CPU's job runs on the
native job thread while the GPU computes the hot and the copied experts, and the stream
waits for the CPU's result on the device (runtime.device_wait)."""

from __future__ import annotations

import time

import torch

from vllm_fiddler.moe.steps import trace

# Steps with at most this many (token, k) pairs plan their cold work in plain
# Python lists (small_chunk_ids): ~20 torch ops on tiny host tensors took
# ~90 us a layer on the dev box, before the CPU could start.
SMALL_STEP_PAIRS = 32


class SyncedSteps:
    """HybridMoE's synced CUDA step (a mixin of moe.layer.HybridMoE)."""

    def hot_experts(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
        """out [T, H] = the device-served experts' share of x [T, H] (CUDA; topk_ids global)."""
        from vllm_fiddler.kernels.triton import fused_moe

        return fused_moe(x, self.w13_gpu, self.w2_gpu, topk_weights, self.gpu_slot_of[topk_ids], out=out,
                         math=self.math, b13=self.b13_gpu, b2=self.b2_gpu)

    def _forward_cuda(self, x, topk_weights, topk_ids, out, op_start: float) -> None:
        T, K = topk_ids.shape
        if not self.cpu_experts:  # all device-resident: no host round trip at all
            self.hot_experts(x, topk_weights, topk_ids, out)
            self._to_gpu += T * K
            return
        # 1. What the host needs, in one D2H on the compute stream: ids,
        #    weights and the activations (KB per token).
        host = self.cpu_runtime.host_buffers(T, K, self.hidden_size, x.dtype)
        host.ids.copy_(topk_ids.to(torch.int32), non_blocking=True)
        host.weights.copy_(topk_weights, non_blocking=True)
        host.x.copy_(x, non_blocking=True)
        # When the device waits for the CPU experts, this wait covers the previous layer's
        # CPU work (ms): a blocking event sleeps through it, where the default one spins
        # a core the CPU experts use (H100 box: their time rose 31.5 -> 39.2 ms a step).
        d2h_done = torch.cuda.Event(blocking=self.cpu_runtime.wait_on_device)
        d2h_done.record()
        sync_start = time.perf_counter()
        d2h_done.synchronize()
        sync_end = time.perf_counter()
        self.sync_wait_s += sync_end - sync_start
        # 2. Per cold expert: compute on the CPU, copy its weights and compute
        #    here, or both for one expert cut in two (chunks). The CPU gets its
        #    work first: its queue is the step's critical path at decode, and
        #    the GPU, idle since the routing copy, loses only the host's planning
        #    time (launching the hot experts first delayed the CPU by ~0.25 ms a
        #    layer of Triton launch overhead).
        self._last_cpu_pairs, copies, cpu_args = self._plan_cold(host)
        cold = None
        submitted = None
        if cpu_args is not None:
            cold = self.cpu_runtime.submit(host.x, self.w13_cpu_chunks, self.w2_cpu_chunks, *cpu_args,
                                           device_wait=True, math=self.math, biases=self.host_biases)
            submitted = time.perf_counter()
            self.to_cpu_submit_s += submitted - op_start
        # 3. Hot experts, then the copied ones, on the GPU while the CPU works.
        graphs = self._hot_share(x, topk_weights, topk_ids, out)
        if copies:
            self._copied_experts(x, topk_weights, topk_ids, copies, out, graphs)
        # 4. The CPU's share comes back (pinned, async) and is added. By default the
        #    stream waits for it on the device and this thread returns at once, to
        #    launch the next attention block while the CPU computes (device_wait).
        if cold is not None:
            start = time.perf_counter()
            result = self.cpu_runtime.result_on_device(cold, x.device, x.dtype)
            self.cpu_wait_s += time.perf_counter() - start
            out.add_(result)
        if trace.OP_TRACE is not None:
            trace.trace_op(self, op_start, sync_start, sync_end, submitted)

    def _hot_share(self, x, topk_weights, topk_ids, out: torch.Tensor):
        """out [T, H] = the device-resident experts' share (zeros without any). Small steps
        replay CUDA graphs (a fraction of the launches' host time); returns the MoEGraphs
        loaded with this op's inputs (for the copied experts), or None if launched eagerly."""
        graphs = self.graphs
        if graphs is not None and not graphs.load(x, topk_weights, topk_ids):
            graphs = None
        if not self.gpu_experts:
            out.zero_()
            return graphs
        hot = graphs.hot(self) if graphs is not None else None
        if hot is not None:
            out.copy_(hot)
        else:
            self.hot_experts(x, topk_weights, topk_ids, out)
        return graphs

    def _plan_cold(self, host) -> tuple[int, list[tuple[int, int]], tuple[torch.Tensor, torch.Tensor] | None]:
        """From the step's routing on the host: (cold (token, k) pairs, copies [(host slot,
        chunks copied)] in copy order, the CPU's (chunk ids, weights) or None if it has nothing)."""
        T, K = host.ids.shape
        C = self.chunks
        small = T * K <= SMALL_STEP_PAIRS  # decode: plain Python beats ~20 tiny torch ops
        if small:
            slot_of = self.cpu_slot_of_host.tolist()
            rows = [[slot_of[e] for e in row] for row in host.ids.tolist()]  # [T][K] host slot or -1
            counts: dict[int, int] = {}
            for row in rows:
                for slot in row:
                    if slot >= 0:
                        counts[slot] = counts.get(slot, 0) + 1
            n_cpu = self._count_pairs(sum(counts.values()), T * K)
        else:
            cpu_ids = self.cpu_slot_of_host[host.ids.long()]  # [T, K] host-set slot or -1
            n_cpu = self._count(cpu_ids)
            counts = cold_token_counts(cpu_ids, self.num_host_slots) if n_cpu else {}
        if n_cpu == 0:
            return 0, [], None
        planner = self.step_planner() if self.stager is not None else None
        copies = planner.plan_counts(counts, C, hot_tokens=T * K - n_cpu) if planner else []
        first = dict(copies)
        on_cpu = sum(C - first.get(slot, 0) for slot in counts)  # chunk-experts left to the CPU
        if not on_cpu:
            return n_cpu, copies, None
        self._cpu_chunk_reads += on_cpu
        if small:
            return n_cpu, copies, small_chunk_ids(rows, host.weights.tolist(), C, first)
        first_cpu_chunk = None
        if copies:
            first_cpu_chunk = torch.zeros(self.num_host_slots, dtype=cpu_ids.dtype)
            for slot, n in copies:
                first_cpu_chunk[slot] = n
        return n_cpu, copies, self.cpu_chunk_ids(cpu_ids, host.weights, first_cpu_chunk)

    def _copied_experts(self, x, topk_weights, topk_ids, copies, out, graphs=None) -> None:
        """Copies the first n chunks of each (slot, n) through the stager and computes them here
        (with `graphs`, MoEGraphs loaded with this op's inputs, from its staged graph)."""
        stager = self.stager

        def stage(slot_n):
            slot, n = slot_n
            return (slot, n, *stager.stage(self.w13_cpu[slot, :n], self.w2_cpu[slot, :n]))

        staged = [stage(c) for c in copies[:stager.num_slots]]
        pending = list(copies[stager.num_slots:])
        partial = weights = None
        while staged:
            cold_slot, n, staging_slot, ready = staged.pop(0)
            torch.cuda.current_stream().wait_event(ready)
            expert = self.host_experts[cold_slot]
            part = graphs.staged(expert, stager.chunk_row(staging_slot, n)) if graphs is not None else None
            if part is None:
                if partial is None:
                    partial, weights = torch.empty_like(out), chunk_weights(topk_weights, stager.chunks)
                part = staged_expert(stager, x, topk_ids, weights, expert, stager.chunk_ids(staging_slot, n),
                                     partial)
            out.add_(part)
            stager.release(staging_slot)
            if pending:
                staged.append(stage(pending.pop(0)))


def cold_token_counts(cpu_ids: torch.Tensor, num_slots: int) -> dict[int, int]:
    """cpu_ids [T, K] (host slot or -1) -> {host slot: (token, k) pairs routed to it}, slots
    with none left out: the step planner's input. Beams of one request that chose the same
    cold expert add up here, so the planner prices one larger CPU call or copy for them."""
    per_slot = torch.bincount(cpu_ids[cpu_ids >= 0].long(), minlength=num_slots).tolist()
    return {slot: n for slot, n in enumerate(per_slot) if n}


def chunk_weights(topk_weights: torch.Tensor, chunks: int) -> torch.Tensor:
    """[T, K] -> [T, K*C]: each routing weight once per chunk slot (staged_expert's weights)."""
    T, K = topk_weights.shape
    return topk_weights.unsqueeze(-1).expand(T, K, chunks).reshape(T, K * chunks)


def staged_expert(stager, x: torch.Tensor, topk_ids: torch.Tensor, weights: torch.Tensor, expert,
                  chunk_ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [T, H] = `expert`'s (token, k) pairs of x [T, H] over the staging slots' chunk-experts
    chunk_ids ([C] or [1, C], -1 past the chunks copied); topk_ids [T, K] global ids, weights
    [T, K*C] (chunk_weights); expert an int or a [1] device tensor (CUDA graphs).

    Every launch has K*C slots per token, -1 beyond the n chunks copied: the slot count per
    token is a constexpr of the kernels, so K*n would compile a variant per split size
    (kernel_warmup compiles the one width ahead)."""
    from vllm_fiddler.kernels.triton import fused_moe

    T, K = topk_ids.shape
    mine = (topk_ids == expert).unsqueeze(-1)  # [T, K, 1] only this expert
    ids = torch.where(mine, chunk_ids, -1).view(T, K * stager.chunks)  # [T, K*C]
    return fused_moe(x, stager.w13_chunks, stager.w2_chunks, weights, ids, out=out)




def small_chunk_ids(cpu_ids: list[list[int]], weights: list[list[float]], chunks: int,
                    first_cpu_chunk: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """HybridMoE.cpu_chunk_ids on Python lists: cpu_ids [T][K] host slot or -1, weights [T][K],
    first_cpu_chunk {host slot: chunks computed elsewhere} -> (ids [T, K*C] int32 chunk-expert
    or -1, weights [T, K*C] fp32), the dtypes the CPU kernel takes (no conversion on submit)."""
    C = chunks
    ids: list[list[int]] = []
    ws: list[list[float]] = []
    for slots, row_w in zip(cpu_ids, weights):
        row_ids: list[int] = []
        row_ws: list[float] = []
        for slot, w in zip(slots, row_w):
            first = first_cpu_chunk.get(slot, 0) if slot >= 0 else C
            row_ids += [slot * C + c if c >= first else -1 for c in range(C)]
            row_ws += [w] * C
        ids.append(row_ids)
        ws.append(row_ws)
    return torch.tensor(ids, dtype=torch.int32), torch.tensor(ws, dtype=torch.float32)
