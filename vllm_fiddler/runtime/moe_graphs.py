"""CUDA graphs for the hybrid op's GPU expert launches at small token counts (CUDA).

At batch-1 decode the engine thread's Python is on the step's critical path:
each layer's op must queue its GPU work before the next attention block, and
the CPU experts of the next layer wait for that block's routing. One eager
`fused_moe` is 4 Triton launches and ~15 torch calls, ~0.5 ms of host time
on the H100 box, and a decode layer launches two (the hot experts, and the
copied chunks of an expert split between the CPU and a copy):
benchmarks/decode_op_host.py timed 18.1 ms a step of host time in the ops
against 33 ms of CPU expert work. Replaying a graph captured at load, with
its input copies, takes a few launches instead: 7.9 ms a step, and the
engine thread reached the next layer's routing after its CPU job was done
0.24 ms a layer on average instead of 0.71 (23.96 -> 26.80 tok/s in that
benchmark; benchmarks/results/decode-host-h100.json).

For each token count T in 1..max_tokens, captured while the model loads:

  inputs (per T, shared):  x [T, H], ids [T, K] (global expert ids), weights [T, K],
                           expert [1], row [1]   (copied / filled per op)
  hot graph (per layer):   hot_out    = fused_moe(x, w13_gpu, w2_gpu, weights, gpu_slot_of[ids])
  staged graph (one):      staged_out = fused_moe over the staging slots' chunk-experts,
                           of `expert`'s (token, k) pairs only, chunks from stager row `row`
  streamed graph (per layer with host views, T <= streamed_max_tokens):
                           streamed_out = a routed step's leading chunks of its host experts,
                           read from host memory in place (HybridMoE.streamed_share; how many
                           chunks: the layer's streamed_below, a device tensor)

The streamed graphs took the last eager `fused_moe` off routed (decode) steps:
~0.55 ms of the engine thread's time a layer, which in vLLM's eager mode kept
that thread busy for the whole step (benchmarks/results/e2e-h100.json,
lease W: engine thread 28.9 ms of CPU time in a 29.1 ms step).

Graphs read the layer's weights and routing maps where they live, so online
re-placement (which rewrites them in place) needs no new capture. All graphs
replay on the compute stream one after another and share one memory pool.
They compute what the eager launches compute, bit for bit (same kernels,
same configs, same inputs).
"""

from __future__ import annotations

import time

import torch

from vllm_fiddler.layers.hybrid_moe import chunk_weights, staged_expert
from vllm_fiddler.logger import logger


class _Inputs:
    """Static input and output buffers of one token count."""

    def __init__(self, T: int, H: int, K: int, dtype: torch.dtype, device: torch.device):
        self.x = torch.zeros(T, H, dtype=dtype, device=device)  # [T, H]
        self.ids = torch.zeros(T, K, dtype=torch.int64, device=device)  # [T, K] global expert ids
        self.weights = torch.zeros(T, K, dtype=torch.float32, device=device)  # [T, K]
        self.expert = torch.zeros(1, dtype=torch.int64, device=device)  # the staged graph's expert
        self.row = torch.zeros(1, dtype=torch.int64, device=device)  # ... and its stager chunk-id row
        self.hot_out = torch.zeros(T, H, dtype=dtype, device=device)  # [T, H]
        self.staged_out = torch.zeros(T, H, dtype=dtype, device=device)  # [T, H]
        self.streamed_out = torch.zeros(T, H, dtype=dtype, device=device)  # [T, H]


class MoEGraphs:
    def __init__(self, max_tokens: int, hidden_size: int, top_k: int, dtype: torch.dtype,
                 device: torch.device):
        self.max_tokens = max_tokens
        self._inputs = {T: _Inputs(T, hidden_size, top_k, dtype, device) for T in range(1, max_tokens + 1)}
        self._hot: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (id(layer), T)
        self._staged: dict[int, torch.cuda.CUDAGraph] = {}  # T
        self._streamed: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (id(layer), T)
        self._pool = torch.cuda.graph_pool_handle()
        self._loaded: _Inputs | None = None
        self.replays = 0

    # -- capture (model load) --------------------------------------------
    def capture(self, layers, stager, streamed_max_tokens: int = 0) -> dict:
        """Captures for each token count the hot graph of every layer with device expert slots,
        the staged graph (when there is a stager), and up to `streamed_max_tokens` (the routed
        steps' limit) the streamed graph of every layer with host views; returns {"graphs",
        "seconds"}."""
        start = time.perf_counter()
        for T, s in self._inputs.items():
            for layer in layers:
                if layer.w13_gpu.shape[0]:
                    self._hot[(id(layer), T)] = self._capture(lambda: _hot_launch(layer, s))
                if T <= streamed_max_tokens and layer.host_views is not None:
                    self._streamed[(id(layer), T)] = self._capture(lambda: _streamed_launch(layer, s))
            if stager is not None:
                self._staged[T] = self._capture(lambda: _staged_launch(stager, s))
        seconds = time.perf_counter() - start
        graphs = len(self._hot) + len(self._staged) + len(self._streamed)
        logger.info("fiddler: GPU expert launches of steps of 1-%d tokens replay CUDA graphs: %d captured "
                    "in %.1f s", self.max_tokens, graphs, seconds)
        return {"graphs": graphs, "seconds": seconds}

    def _capture(self, launch) -> torch.cuda.CUDAGraph:
        launch()  # eager first: compiles the Triton variants and loads every kernel's module
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the CPU experts' threads make no CUDA calls, but nothing else may break it
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            launch()
        return graph

    # -- per op ------------------------------------------------------------
    def load(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> bool:
        """Copies one op's inputs into the static buffers of its token count, on the current
        stream; False (nothing done) if no graph covers it: the caller launches eagerly."""
        T = x.shape[0]
        if T > self.max_tokens or torch.cuda.is_current_stream_capturing():
            self._loaded = None
            return False
        s = self._loaded = self._inputs[T]
        s.x.copy_(x)
        s.ids.copy_(topk_ids)
        s.weights.copy_(topk_weights)
        return True

    def hot(self, layer) -> torch.Tensor | None:
        """The loaded op's hot experts (layer's device slots) [T, H], or None without a graph."""
        return self._replay(self._hot.get((id(layer), self._loaded.x.shape[0])), self._loaded.hot_out)

    def streamed(self, layer) -> torch.Tensor | None:
        """The loaded op's streamed chunks (HybridMoE.streamed_share) [T, H], or None without a graph."""
        return self._replay(self._streamed.get((id(layer), self._loaded.x.shape[0])), self._loaded.streamed_out)

    def _replay(self, graph: torch.cuda.CUDAGraph | None, out: torch.Tensor) -> torch.Tensor | None:
        if graph is None:
            return None
        graph.replay()
        self.replays += 1
        return out

    def staged(self, expert: int, stager_row: int) -> torch.Tensor | None:
        """The loaded op's (token, k) pairs of `expert` over the stager's chunk-experts of row
        `stager_row` (WeightStager.chunk_row) [T, H], or None without a graph."""
        s = self._loaded
        graph = self._staged.get(s.x.shape[0])
        if graph is None:
            return None
        s.expert.fill_(expert)
        s.row.fill_(stager_row)
        return self._replay(graph, s.staged_out)


def _hot_launch(layer, s: _Inputs) -> None:
    layer.hot_experts(s.x, s.weights, s.ids, s.hot_out)


def _streamed_launch(layer, s: _Inputs) -> None:
    # the routing map read in place: re-placement rewrites it, the graph follows
    layer.streamed_share(s.x, s.weights, layer.cpu_slot_of[s.ids], s.streamed_out)


def _staged_launch(stager, s: _Inputs) -> None:
    """HybridMoE._copied_experts' launch for one staged expert, from device-side parameters."""
    chunk_ids = stager.chunk_id_rows.index_select(0, s.row)  # [1, C] chunk-experts, -1 past the copied ones
    weights = chunk_weights(s.weights, stager.chunks)  # [T, K*C]
    staged_expert(stager, s.x, s.ids, weights, s.expert, chunk_ids, s.staged_out)
