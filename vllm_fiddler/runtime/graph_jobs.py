"""Routed steps inside CUDA graphs the engine thread replays whole (CUDA).

Why: at batch-1 decode the engine thread's Python was the step's critical path
in every mode we had. Eager, vLLM's attention blocks take ~1.3 ms a layer of
host time and our op ~0.4 ms (H100 box, Mixtral shapes: 16.8 ms of engine-thread
CPU time against 12.7 ms of CPU expert work a step, 75.8% of the roofline);
piecewise CUDA graphs replay the pieces between the splitting ops but still run
every attention op and every MoE op eagerly (~1.0 ms of pieces between two ops,
4.7 ms at the step's edge). vLLM's FULL decode graphs take all of that
off the engine thread, but they capture our op too, and its CPU work was
handed over by the engine thread per layer (CPUExpertRuntime.submit_routed).

Here nothing on the engine thread hands the CPU its job. The graph does:

  routing:  route and count, then copy into this object's pinned buffers
            (CUDA views): host slots [T, K], weights [T, K], x [T, H] and the
            streamed cut [K] (the layer's streamed_below, read on the device)
  mark:     cuStreamWriteValue32(mark, ((layer slot + 1) << 16) | T)
  experts:  hot [+ the streamed chunks read from host memory in place]
  wait:     cuStreamWaitValue32(done == 1), then cuStreamWriteValue32(done, 0)
  result:   out += the CPU's fp32 result, from its pinned buffer

and the native job thread (kernels/cpu/ops.cpp, GraphJobs) polls `mark`,
clears it, runs the layer's cold chunk-experts from the buffers and sets
`done`. Every value in the graph is fixed at capture, so the captured memory
operations replay unchanged; why the two words cannot race is in ops.cpp.
One job is in flight at a time (each layer waits for its own before the next
marks), so one set of buffers serves every layer and token count.

What the engine thread still does between steps (HybridMoE.after_graph_step):
the cost model's streamed cut (written into streamed_below on the device, in
stream order), re-placement, stats. Rows padded by vLLM up to a captured size
are computed like real ones (a FULL graph cannot see the real count), so only
sizes up to `routed_max_tokens` are captured FULL (vllm_fiddler.plugin).
"""

from __future__ import annotations

import ctypes
import dataclasses

import torch

from vllm_fiddler.logger import logger
from vllm_fiddler.runtime import device_wait
from vllm_fiddler.runtime.host_view import device_view
from vllm_fiddler.runtime.moe_graphs import add_host_result, routed_device_experts

CU_STREAM_WAIT_VALUE_EQ = 0x1
MAX_LAYER_SLOTS = 0x7FFE  # the mark's high half holds slot + 1


def mark_code(slot: int, tokens: int) -> int:
    """The mark word's value for a job of layer slot `slot` over `tokens` rows."""
    return ((slot + 1) << 16) | tokens


@dataclasses.dataclass
class _Buffers:
    x: torch.Tensor  # [N, H] the model's dtype
    slots: torch.Tensor  # [N, K] int32 host slot or -1
    weights: torch.Tensor  # [N, K] fp32
    first: torch.Tensor  # [K] int32 streamed chunks per top-k position
    result: torch.Tensor  # [N, H] fp32 the CPU's share


class GraphJobs:
    def __init__(self, max_tokens: int, hidden_size: int, top_k: int, dtype: torch.dtype = torch.bfloat16):
        from vllm_fiddler.kernels import cpu as cpu_kernels

        def pinned(shape, dtype):
            return torch.zeros(shape, dtype=dtype, device="cpu", pin_memory=True)

        N, H, K = max_tokens, hidden_size, top_k
        self.max_tokens, self.top_k, self.dtype = N, K, dtype
        self.host = _Buffers(pinned((N, H), dtype), pinned((N, K), torch.int32),
                             pinned((N, K), torch.float32), pinned((K,), torch.int32),
                             pinned((N, H), torch.float32))
        self.views = _Buffers(*(device_view(getattr(self.host, f.name)) for f in dataclasses.fields(_Buffers)))
        self.mark = pinned((1,), torch.int32)
        self.done = pinned((1,), torch.int32)
        self._driver = device_wait._Driver()
        if self._driver.write_value32 is None:
            raise RuntimeError("this CUDA driver has no cuStreamWriteValue32")
        self._mark_ptr = self._driver.device_pointer(self.mark.data_ptr())
        self._done_ptr = self._driver.device_pointer(self.done.data_ptr())
        h = self.host
        if not cpu_kernels.graph_jobs_attach(h.x, h.slots, h.weights, h.first, h.result, self.mark, self.done):
            raise RuntimeError(f"no native CPU kernel takes {dtype} activations here")
        self._slot_of: dict[int, int] = {}  # id(layer) -> its slot
        self._layers: list = []  # keeps them (and their tensors) alive as long as the native table

    # -- layers ----------------------------------------------------------------
    def slot(self, layer) -> int:
        """The layer's slot in the native table (added at its first job)."""
        from vllm_fiddler.kernels import cpu as cpu_kernels

        slot = self._slot_of.get(id(layer))
        if slot is None:
            slot = len(self._layers)
            if slot >= MAX_LAYER_SLOTS:
                raise RuntimeError(f"fiddler: more than {MAX_LAYER_SLOTS} layers in graph steps")
            cpu_kernels.graph_jobs_add_layer(slot, layer.w13_cpu_chunks, layer.w2_cpu_chunks, layer.chunks,
                                             layer._routed_counts, layer.graph_pairs, math=layer.math,
                                             biases=layer.host_biases)
            self._slot_of[id(layer)] = slot
            self._layers.append(layer)
        return slot

    # -- one layer's step, queued on the current stream (captured, or eager in tests) ---------
    def queue(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              out: torch.Tensor) -> None:
        """out [T, H] = the layer's routed experts of x [T, H] (bf16, T <= max_tokens) for vLLM's
        routing topk_weights / topk_ids [T, K], all on the stream: the CPU's share comes from
        the native job thread without the engine thread."""
        T, K = x.shape[0], self.top_k
        if not 1 <= T <= self.max_tokens:
            raise ValueError(f"fiddler: a graph step of {T} tokens (1..{self.max_tokens} captured)")
        code = mark_code(self.slot(layer), T)
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        layer.count(topk_ids)
        v = self.views
        v.slots[:T].copy_(layer.cpu_slot_of[topk_ids])  # [T, K] the map read in place: re-placement follows
        v.weights[:T].copy_(topk_weights)
        v.x[:T].copy_(x)
        v.first.copy_(layer.streamed_below().view(K))
        self._check(self._driver.write_value32(stream, self._mark_ptr, code, 0), "cuStreamWriteValue32")
        # streamed whenever the layer can: the cut, rewritten between replays, may be none
        routed_device_experts(layer, x, topk_weights, topk_ids, out, streamed=layer.host_views is not None)
        self._check(self._driver.wait_value32(stream, self._done_ptr, 1, CU_STREAM_WAIT_VALUE_EQ),
                    "cuStreamWaitValue32")
        self._check(self._driver.write_value32(stream, self._done_ptr, 0, 0), "cuStreamWriteValue32")
        add_host_result(out, v.result[:T])

    @staticmethod
    def _check(rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"{what} failed: CUresult {rc}")

    def close(self) -> None:
        """The native thread stops serving (a stream still waiting goes on)."""
        from vllm_fiddler.kernels import cpu as cpu_kernels

        cpu_kernels.graph_jobs_detach()


# Steps of up to this many tokens run as graph steps in this process's model (0: none, or no
# model yet): vLLM's dispatcher keeps FULL graphs of those sizes only (vllm_fiddler.plugin).
_full_graph_max_tokens = 0


def full_graph_max_tokens() -> int:
    return _full_graph_max_tokens


def set_full_graph_max_tokens(n: int) -> None:
    global _full_graph_max_tokens
    _full_graph_max_tokens = n


_checked: bool | None = None


def available() -> bool:
    """Whether CUDA graphs here can capture the stream memory operations graph steps use and
    replay them against a host thread (checked once, on a side stream, without the native thread)."""
    global _checked
    if _checked is None:
        _checked = _self_test()
    return _checked


def _self_test() -> bool:
    if not (torch.cuda.is_available() and device_wait.available() and device_wait.marks_available()):
        return False
    import threading

    try:
        driver = device_wait._Driver()
        words = torch.zeros(2, dtype=torch.int32, device="cpu", pin_memory=True)
        mark, done = (driver.device_pointer(words[i:].data_ptr()) for i in range(2))
        stream = torch.cuda.Stream()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            s = ctypes.c_void_p(stream.cuda_stream)
            for rc in (driver.write_value32(s, mark, 7, 0), driver.wait_value32(s, done, 1, CU_STREAM_WAIT_VALUE_EQ),
                       driver.write_value32(s, done, 0, 0)):
                GraphJobs._check(rc, "a stream memory operation under capture")
        seen = []

        def host():  # what the native thread does, twice
            w = words.numpy()
            for _ in range(2):
                while w[0] == 0:
                    pass
                seen.append(int(w[0]))
                w[0] = 0
                w[1] = 1

        thread = threading.Thread(target=host, daemon=True)
        thread.start()
        for _ in range(2):
            graph.replay()
        stream.synchronize()
        thread.join(timeout=5)
        if seen != [7, 7] or words.tolist() != [0, 0]:
            raise RuntimeError(f"replayed memory operations misbehaved: saw {seen}, words {words.tolist()}")
        return True
    except (OSError, AttributeError, RuntimeError) as e:
        logger.warning("fiddler: CUDA graphs here cannot hand the CPU experts their jobs (%s); the MoE op "
                       "stays out of FULL CUDA graphs", e)
        return False
