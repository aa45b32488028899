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

And for each token count up to the routed steps' limit (HybridMoE._forward_routed_graphs,
capture_routed), the whole GPU side of a routed step, in three graphs between which the
engine thread queues the CPU job (its routing mark) and the stream's wait for its result:

  inputs (per T, shared):  x [T, H], ids [T, K], weights [T, K]   (vLLM's routing, copied per op)
  routing graph (per layer): count (expert_tokens, expert_heat), then copy the host slots,
                           weights and x down into pinned buffers of their own
  experts graph (per layer, with / without streaming): routed_out = hot [+ streamed]
  result graph (one):      routed_out += the CPU's result, read from its pinned buffer

The pinned buffers are the graphs' own (the runtime's shared ones grow, and a graph keeps
the addresses it was captured with); the graphs reach them through CUDA views (plain device
copies, nothing host-side to capture). Eagerly the routed step was ~30 torch calls, ~0.6 ms of
the engine thread a layer; in a compiled batch-1 engine that thread, not the CPU experts,
was the step's critical path (H100 box: 16 ms of engine-thread CPU time in a 17 ms step).

The streamed graphs took the last eager `fused_moe` off routed (decode) steps:
~0.55 ms of the engine thread's time a layer, which in vLLM's eager mode kept
that thread busy for the whole step (benchmarks/results/e2e-h100.json:
engine thread 28.9 ms of CPU time in a 29.1 ms step).

Graphs read the layer's weights and routing maps where they live, so online
re-placement (which rewrites them in place) needs no new capture. All graphs
replay on the compute stream one after another and share one memory pool.
They compute what the eager launches compute, bit for bit (same kernels,
same configs, same inputs).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from vllm_fiddler.moe.steps.synced import chunk_weights, staged_expert
from vllm_fiddler.logger import logger
from vllm_fiddler.runtime.host_view import device_view


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
        self.routed_out: torch.Tensor | None = None  # [T, H] routed steps' output


@dataclasses.dataclass
class _RoutedHost:
    """The graphed routed steps' pinned buffers and CUDA views of them (`views`, by name)."""

    x: torch.Tensor  # [T, H] the activations, for the CPU
    ids: torch.Tensor  # [T, K] int32 host slot or -1
    weights: torch.Tensor  # [T, K] fp32
    result: torch.Tensor  # [T, H] fp32 the CPU's share
    views: dict[str, torch.Tensor]

    @classmethod
    def pinned(cls, T: int, H: int, K: int, dtype: torch.dtype) -> "_RoutedHost":
        def buffer(shape, dt):
            return torch.zeros(shape, dtype=dt, device="cpu", pin_memory=True)

        host = {"x": buffer((T, H), dtype), "ids": buffer((T, K), torch.int32),
                "weights": buffer((T, K), torch.float32), "result": buffer((T, H), torch.float32)}
        return cls(**host, views={name: device_view(t) for name, t in host.items()})

    def rows(self, T: int) -> "_RoutedHost":
        """The first T rows (host tensors, which the native job reads, and their views)."""
        return _RoutedHost(self.x[:T], self.ids[:T], self.weights[:T], self.result[:T],
                           {name: v[:T] for name, v in self.views.items()})


class MoEGraphs:
    def __init__(self, max_tokens: int, hidden_size: int, top_k: int, dtype: torch.dtype,
                 device: torch.device):
        self.max_tokens = max_tokens
        self._inputs = {T: _Inputs(T, hidden_size, top_k, dtype, device) for T in range(1, max_tokens + 1)}
        self._hot: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (id(layer), T)
        self._staged: dict[int, torch.cuda.CUDAGraph] = {}  # T
        self._pool = torch.cuda.graph_pool_handle()
        self._loaded: _Inputs | None = None
        self.replays = 0
        # routed steps (capture_routed): (id(layer), T) / (id(layer), T, streamed) / T
        self._routing: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._routed_experts: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}
        self._routed_result: dict[int, torch.cuda.CUDAGraph] = {}
        self._routed_rows: dict[int, _RoutedHost] = {}  # T -> the first T rows of the pinned buffers
        self._top_k = top_k
        self._dtype = dtype

    # -- capture (model load) --------------------------------------------
    def capture(self, layers, stager) -> dict:
        """Captures for each token count the hot graph of every layer with device expert slots
        and the staged graph (when there is a stager); returns {"graphs", "seconds"}."""
        start = time.perf_counter()
        for T, s in self._inputs.items():
            for layer in layers:
                if layer.w13_gpu.shape[0]:
                    self._hot[(id(layer), T)] = self._capture(lambda: _hot_launch(layer, s))
            if stager is not None:
                self._staged[T] = self._capture(lambda: _staged_launch(stager, s))
        seconds = time.perf_counter() - start
        graphs = len(self._hot) + len(self._staged)
        logger.info("fiddler: GPU expert launches of steps of 1-%d tokens replay CUDA graphs: %d captured "
                    "in %.1f s", self.max_tokens, graphs, seconds)
        return {"graphs": graphs, "seconds": seconds}

    def capture_routed(self, layers, max_tokens: int, heat_table_len: int) -> dict:
        """Captures the routed steps' graphs (module docstring) for token counts up to
        max_tokens (and this object's max_tokens), if the CPU runtime takes routed jobs and the
        native kernels the model's dtype; returns {"graphs", "seconds"}. Layers without a heat
        table get a zero one of heat_table_len entries, which the replacer rewrites in place."""
        from vllm_fiddler.kernels import cpu as cpu_kernels

        layers = [m for m in layers if m.cpu_experts or m.host_backing]
        max_tokens = min(max_tokens, self.max_tokens)
        if (not layers or max_tokens < 1 or not layers[0].native_jobs or cpu_kernels.isa() == "torch"
                or not layers[0].cpu_runtime.takes_routed_jobs()):
            return {"graphs": 0, "seconds": 0.0}
        start = time.perf_counter()
        first = layers[0]
        pinned = _RoutedHost.pinned(max_tokens, first.hidden_size, self._top_k, self._dtype)
        for T in range(1, max_tokens + 1):
            s = self._inputs[T]
            s.routed_out = torch.zeros_like(s.x)  # [T, H]
            host = self._routed_rows[T] = pinned.rows(T)
            for layer in layers:
                if layer.heat_table is None:
                    layer.set_heat_table([0.0] * heat_table_len)
                # the eager warm-up launch counts its routing: give the counters back
                counters = (layer.expert_tokens.clone(), layer.expert_heat.clone())
                self._routing[(id(layer), T)] = self._capture(lambda: _routing_launch(layer, s, host))
                layer.expert_tokens.copy_(counters[0])
                layer.expert_heat.copy_(counters[1])
                for streamed in (False, True) if layer.host_views is not None else (False,):
                    self._routed_experts[(id(layer), T, streamed)] = self._capture(
                        lambda: _routed_experts_launch(layer, s, streamed))
            self._routed_result[T] = self._capture(lambda: _result_launch(s, host))
        seconds = time.perf_counter() - start
        graphs = len(self._routing) + len(self._routed_experts) + len(self._routed_result)
        logger.info("fiddler: routed steps of 1-%d tokens replay their whole GPU side from CUDA graphs: "
                    "%d captured in %.1f s", max_tokens, graphs, seconds)
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

    def has_routed(self, layer, T: int) -> bool:
        """Whether capture_routed covers this layer's routed steps of T tokens."""
        return (id(layer), T) in self._routing

    def route(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> _RoutedHost:
        """Copies a routed op's inputs in and replays its routing graph; returns the pinned
        rows the stream fills (x, ids, weights) and the CPU's result goes to (result)."""
        T = x.shape[0]
        s = self._loaded = self._inputs[T]
        s.x.copy_(x)
        s.ids.copy_(topk_ids)
        s.weights.copy_(topk_weights)
        self._replay(self._routing[(id(layer), T)], s.routed_out)
        return self._routed_rows[T]

    def experts(self, layer, streamed: bool) -> None:
        """The routed op's hot [+ streamed] experts into routed_out (after route)."""
        s = self._loaded
        self._replay(self._routed_experts[(id(layer), s.x.shape[0], streamed)], s.routed_out)

    def add_result(self) -> torch.Tensor:
        """routed_out [T, H] += the CPU's result (queue after the stream's wait for the job)."""
        s = self._loaded
        return self._replay(self._routed_result[s.x.shape[0]], s.routed_out)

    def hot(self, layer) -> torch.Tensor | None:
        """The loaded op's hot experts (layer's device slots) [T, H], or None without a graph."""
        return self._replay(self._hot.get((id(layer), self._loaded.x.shape[0])), self._loaded.hot_out)

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


def _routing_launch(layer, s: _Inputs, host: _RoutedHost) -> None:
    """HybridMoE.count and the routed step's copies down, into the graphs' buffers."""
    layer.count(s.ids)
    v = host.views
    # the routing map read in place: re-placement rewrites it, the graph follows
    v["ids"].copy_(layer.cpu_slot_of[s.ids])
    v["weights"].copy_(s.weights)
    v["x"].copy_(s.x)


def _routed_experts_launch(layer, s: _Inputs, streamed: bool) -> None:
    routed_device_experts(layer, s.x, s.weights, s.ids, s.routed_out, streamed, s.streamed_out)


def routed_device_experts(layer, x, topk_weights, topk_ids, out, streamed: bool, streamed_out=None) -> None:
    """A routed step's GPU experts into out [T, H]: the hot ones (zeros without device
    slots), plus the leading chunks of the host ones read in place when streaming (how many:
    streamed_below). Also a graph step's (runtime.graph_jobs)."""
    if layer.w13_gpu.shape[0]:
        layer.hot_experts(x, topk_weights, topk_ids, out)
    else:
        out.zero_()
    if streamed:
        out.add_(layer.streamed_share(x, topk_weights, layer.cpu_slot_of[topk_ids], streamed_out))


def _result_launch(s: _Inputs, host: _RoutedHost) -> None:
    add_host_result(s.routed_out, host.views["result"])


def add_host_result(out: torch.Tensor, result_view: torch.Tensor) -> None:
    """out [T, H] += the CPU's fp32 result, read through a CUDA view of its pinned buffer:
    CPUExpertRuntime.result_on_device's copy up and cast, added as the synced path adds it."""
    result = torch.empty(result_view.shape, dtype=torch.float32, device=out.device)
    result.copy_(result_view)
    out.add_(result.to(out.dtype))


def _staged_launch(stager, s: _Inputs) -> None:
    """HybridMoE._copied_experts' launch for one staged expert, from device-side parameters."""
    chunk_ids = stager.chunk_id_rows.index_select(0, s.row)  # [1, C] chunk-experts, -1 past the copied ones
    weights = chunk_weights(s.weights, stager.chunks)  # [T, K*C]
    staged_expert(stager, s.x, s.ids, weights, s.expert, chunk_ids, s.staged_out)
