"""Routed steps: decode-sized steps whose routing the stream hands the native job thread
(HybridMoE._forward_routed_graphs, the GPU side replayed from CUDA graphs), and graph steps,
the same inside vLLM's FULL decode graphs (runtime.graph_jobs); and the streamed cut, the
leading chunks of each cold expert the GPU computes from host memory in place."""

from __future__ import annotations

import time

import torch

from vllm_fiddler.logger import logger
from vllm_fiddler.moe.steps import trace
from vllm_fiddler.moe.steps.synced import chunk_weights

# Routed steps decide their streamed chunks again this often (a layer's; ~6 s of decode at
# ~40 tok/s), from at least this many of the layer's (token, k) pairs since the last time
# (fewer: the share of experts on the host).
STREAMED_DECISION_STEPS = 256
STREAMED_DECISION_MIN_PAIRS = 64


class RoutedSteps:
    """HybridMoE's routed and graph steps (a mixin of moe.layer.HybridMoE)."""

    _routed_logged = False  # the routed steps' streamed chunks were logged (_decide_streamed_chunks)

    def _capture_graph_step(self, x, topk_weights, topk_ids, out) -> bool:
        """Under a CUDA graph capture (vLLM's FULL decode graphs): the whole routed step on the
        stream, the CPU's job handed over by the graph itself (runtime.graph_jobs). False for a
        layer the capture may take as is (every expert on the device for good). Raises for what
        a graph cannot replay: its host-side planning would be frozen at capture."""
        if not self.cpu_experts and not self.host_backing:
            return False
        jobs = self.graph_jobs
        if jobs is None or x.shape[0] > jobs.max_tokens or x.dtype != jobs.dtype:
            raise RuntimeError(
                f"fiddler: a CUDA graph is capturing the hybrid MoE op for {x.shape[0]} {x.dtype} tokens, which "
                f"only graph steps of up to {jobs.max_tokens if jobs else 0} tokens in the model's dtype can replay; "
                "the plugin limits vLLM's FULL graphs to those (vllm_fiddler.plugin), so some other capture reached "
                "the op")
        jobs.queue(self, x, topk_weights, topk_ids, out)
        return True

    def after_graph_step(self) -> None:
        """Between two replays of a FULL graph holding this layer's routed step: the streamed
        cut, decided as a routed step decides it (_routed_streamed_cut), written where the
        graph reads it (streamed_below, on the device, in stream order)."""
        if self.graph_jobs is None:
            return
        self.steps += 1  # the op's Python did not run for it
        if not (self.cpu_experts or self.host_backing):
            return
        cut = self._routed_streamed_cut()
        self.streamed_below(cut or (0,) * self.top_k)

    def _routed_streamed_cut(self) -> tuple[int, ...] | None:
        """This routed step's streamed chunks per top-k position (None: the CPU takes every
        chunk), decided again every STREAMED_DECISION_STEPS routed steps."""
        decision = self._streamed_decision
        if self.routed_gpu_chunks is None or (decision is not None
                                              and decision["steps"] >= STREAMED_DECISION_STEPS):
            self._decide_streamed_chunks()
            decision = self._streamed_decision
        if decision is not None:
            decision["steps"] += 1
        return self.routed_gpu_chunks if self.host_views is not None and any(self.routed_gpu_chunks) else None

    def _forward_routed_graphs(self, x, topk_weights, topk_ids, out, op_start: float) -> bool:
        """A routed step: the stream copies the routing (host slot or -1 per (token, k), mapped on
        the device, so it follows re-placement in stream order) and the activations down and
        marks a word; the native job thread waits for the word, runs the cold experts and
        signals; the stream waits for that and adds the result, and the host never waits. Its
        GPU work replays three CUDA graphs captured at
        load (MoEGraphs.capture_routed): counting and the copies down; the hot and
        streamed experts; the CPU's result added. The engine thread copies the inputs in,
        replays, queues the routing mark and the CPU job, and copies the output out: ~10
        host calls a layer against ~30 torch calls eagerly, whose ~0.6 ms a layer made the
        engine thread, not the CPU experts, a compiled batch-1 step's critical path (H100
        box: 16 ms of engine-thread CPU time in a 17 ms step). False (nothing done)
        where no graph covers the step."""
        graphs = self.graphs
        T, K = x.shape[0], self.top_k
        if (graphs is None or T > self.routed_max_tokens
                or not graphs.has_routed(self, T)
                or not self.cpu_experts or not self.cpu_runtime.takes_routed_jobs()):
            return False
        streamed = self._routed_streamed_cut()
        if streamed:
            self.streamed_below(streamed)  # before the experts' graph, which reads it
        host = graphs.route(self, x, topk_weights, topk_ids)  # [T, ...] pinned, filled in stream order
        cold = self.cpu_runtime.submit_routed(host.x, self.w13_cpu_chunks, self.w2_cpu_chunks, host.ids,
                                              host.weights, self.chunks, self._routed_counts,
                                              first_chunks=streamed, out=host.result, math=self.math,
                                              biases=self.host_biases)
        if cold is None:  # capture_routed checked that the native kernels take these buffers
            raise RuntimeError("fiddler: the native CPU kernels refused a graphed routed job")
        self._routed_pairs += T * K
        submitted = time.perf_counter()
        self.to_cpu_submit_s += submitted - op_start
        graphs.experts(self, streamed is not None)
        self.cpu_runtime.wait_on_stream(cold)
        out.copy_(graphs.add_result())
        if trace.OP_TRACE is not None:
            trace.trace_op(self, op_start, None, None, submitted)
        return True

    @property
    def streamed_cold_share(self) -> float | None:
        """The share of (token, k) pairs on the host behind the current streamed cut (None:
        not decided by the cost model)."""
        return self._streamed_decision["cold_share"] if self._streamed_decision else None

    @property
    def streamed_cold_patterns(self) -> list[float] | None:
        """The share of routed tokens per cold-position mask behind the current streamed cut
        ([2^K]; None: priced from cold_share alone, or not decided by the cost model)."""
        shares = self._streamed_decision.get("cold_patterns") if self._streamed_decision else None
        return [round(n / sum(shares), 4) for n in shares] if shares else None

    def set_streamed_chunks(self, cut: tuple[int, ...] | None) -> None:
        """Fixes the routed steps' streamed cut (chunks per top-k position; benchmarks and
        tests), or None: the cost model decides at the next routed step, and keeps deciding."""
        self.routed_gpu_chunks = cut
        self._streamed_decision = None

    def _decide_streamed_chunks(self) -> None:
        """routed_gpu_chunks from the cost model (cost_model.streamed_chunks), priced over how
        this layer's routed tokens since the last decision had their top-k positions on the
        host (routed_cold_patterns: settled batch-1 decode has a fixed number of cold experts
        a token, not independent positions). With too few routed tokens since, over the share
        of the layer's (token, k) pairs the host served since (prefill's included), each
        position cold that often; at the first decision, and with too few pairs since, the
        share of experts on the host. Placement and re-placement move these (H100 box, uniform
        router: 17% of the experts resident, a 57% hit rate after 512 decode tokens). The first
        decision does not go by the pairs before it: those are mostly vLLM's profiling run,
        whose dummy tokens all pick the same experts."""
        K = self.top_k
        to_cpu, to_gpu, patterns = self.routed_to_cpu, self.routed_to_gpu, self.routed_cold_patterns
        last = self._streamed_decision
        pairs = to_cpu - last["to_cpu"] + to_gpu - last["to_gpu"] if last else 0
        since = [n - b for n, b in zip(patterns, last["patterns"])] if last and patterns else None
        weights = None  # tokens per cold-position mask, when enough to price the cut over
        if since is not None and sum(since) * K >= STREAMED_DECISION_MIN_PAIRS:
            weights = since
            cold_share = sum(bin(mask).count("1") * n for mask, n in enumerate(since)) / (sum(since) * K)
        elif pairs >= STREAMED_DECISION_MIN_PAIRS:
            cold_share = (to_cpu - last["to_cpu"]) / pairs
        else:
            cold_share = len(self.cpu_experts) / self.num_experts
        cut = (0,) * K
        if self.host_views is not None and self.stager is not None and cold_share > 0:
            from vllm_fiddler.cost_model import streamed_chunks

            cut = streamed_chunks(self.step_planner().cost, self.chunks, K, cold_share=cold_share,
                                  cold_patterns=weights)
        self._streamed_decision = {"to_cpu": to_cpu, "to_gpu": to_gpu, "patterns": patterns, "steps": 0,
                                   "cold_share": cold_share, "cold_patterns": weights}
        if cut != self.routed_gpu_chunks:
            first = self.routed_gpu_chunks is None
            self.routed_gpu_chunks = cut
            # every layer decides alike at first: say it once; later changes per layer, quietly
            if first and not RoutedSteps._routed_logged:
                RoutedSteps._routed_logged = True
                logger.info("fiddler: steps of up to %d tokens hand the CPU their routing from the stream; "
                            "the GPU computes %s of the %d chunks of each cold expert (per top-k position) "
                            "from host memory in place (%.0f%% of the pairs on the host; decided again every "
                            "%d such steps)", self.routed_max_tokens, cut, self.chunks, 100 * cold_share,
                            STREAMED_DECISION_STEPS)
            elif not first:
                logger.debug("fiddler: a layer's routed steps now stream %s of %d chunks (%.0f%% of the "
                             "pairs on the host)", cut, self.chunks, 100 * cold_share)

    def streamed_below(self, n: tuple[int, ...] | None = None) -> torch.Tensor:
        """[K, 1] int32 on the device: per top-k position, how many leading chunks of each
        cold expert a routed step's GPU kernels stream (zeros until set); `n` sets it, in
        place, so the graphs captured reading it (MoEGraphs.streamed) follow."""
        if self._streamed_below is None:
            self._streamed_below = [(0,) * self.top_k,
                                    torch.zeros(self.top_k, 1, dtype=torch.int32, device=self.device)]
        below = self._streamed_below[1]
        if n is not None and self._streamed_below[0] != n:
            # filled on the device: a copy from pageable host memory would wait for the stream
            for k, n_k in enumerate(n):
                below[k].fill_(n_k)
            self._streamed_below[0] = n
        return below

    def streamed_share(self, x: torch.Tensor, topk_weights: torch.Tensor, slots: torch.Tensor,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """[T, H]: the leading chunks (streamed_below) of each host-served (token, k) pair,
        computed on the GPU from the host chunks in place (slots [T, K] host slot or -1, on
        the device). K*C slots per token, -1 past the streamed chunks, as the staged path
        launches (one compiled variant)."""
        from vllm_fiddler.kernels.triton import fused_moe

        T, K = slots.shape
        C = self.chunks
        c = torch.arange(C, dtype=slots.dtype, device=slots.device)  # [C]
        slot = slots.unsqueeze(-1)  # [T, K, 1]
        below = self.streamed_below()  # [K, 1]
        ids = torch.where((slot >= 0) & (c < below), slot * C + c, -1).view(T, K * C)  # [T, K*C]
        w13, w2 = self.host_views
        return fused_moe(x, w13, w2, chunk_weights(topk_weights, C), ids, out=out)
