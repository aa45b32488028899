"""Graph steps (vllm_fiddler.runtime.graph_jobs): routed steps inside CUDA graphs that hand the
native job thread its work themselves.

On the CPU (CI): the native side of the protocol, with a Python thread playing the graph
(fill the buffers, write the mark code, wait for done == 1, clear it): each job's result is
bit-equal to the chunk-id path's kernel, the counts are the routed jobs', a queued routed job
that waits for its routing does not block a graph job queued before it in stream order, and
bad codes fail the job without hanging the "stream". On CUDA: several layers' graph steps
captured into one graph, as vLLM's FULL decode graphs capture them, replayed against the
eager routed steps, across re-placement and a changing streamed cut.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from test_hybrid_moe import E, H, I, K, PLACEMENTS, load_experts, make_layer, random_experts, routed
from vllm_fiddler.kernels import reference
from vllm_fiddler.runtime.cpu_experts import CPUExpertRuntime
from vllm_fiddler.runtime.graph_jobs import mark_code

N = 4  # graph steps of up to 4 tokens


def native_or_skip():
    from vllm_fiddler.kernels import cpu as cpu_kernels

    if cpu_kernels.isa() == "torch":
        pytest.skip("needs the native CPU kernels")
    return cpu_kernels


class FakeGraph:
    """What a replayed graph step does to the host words and buffers, from a Python thread."""

    def __init__(self, cpu_kernels):
        self.x = torch.zeros(N, H, dtype=torch.bfloat16)
        self.slots = torch.full((N, K), -1, dtype=torch.int32)
        self.weights = torch.zeros(N, K)
        self.first = torch.zeros(K, dtype=torch.int32)
        self.result = torch.zeros(N, H)
        self.mark = torch.zeros(1, dtype=torch.int32)
        self.done = torch.zeros(1, dtype=torch.int32)
        assert cpu_kernels.graph_jobs_attach(self.x, self.slots, self.weights, self.first, self.result,
                                             self.mark, self.done)

    def step(self, code: int, x, slots, weights, first, timeout: float = 10.0) -> torch.Tensor:
        T = x.shape[0]
        self.x[:T] = x
        self.slots[:T] = slots
        self.weights[:T] = weights
        self.first.copy_(torch.tensor(first, dtype=torch.int32))
        self.mark.fill_(code)  # the stream's write, after its copies
        deadline = time.monotonic() + timeout
        while int(self.done) != 1:  # the stream's wait
            assert time.monotonic() < deadline, "the job thread never served the graph step"
        assert int(self.mark) == 0  # cleared by the job thread before it set done
        self.done.fill_(0)  # the stream's clear
        return self.result[:T].clone()


def expected(layer, x, slots, weights, first, cpu_kernels) -> torch.Tensor:
    """The engine thread's chunk-id path without the chunks below first[k] (the GPU's)."""
    T, C = x.shape[0], layer.chunks
    ids_c, wts_c = layer.cpu_chunk_ids(slots, weights)  # [T, K*C]
    gpu_side = torch.arange(C) < torch.tensor(first).view(K, 1)  # [K, C]
    ids_c = ids_c.view(T, K, C).masked_fill(gpu_side, -1).view(T, K * C)
    want = torch.zeros(T, H)
    cpu_kernels.moe_forward(x, layer.w13_cpu_chunks, layer.w2_cpu_chunks, ids_c, wts_c, want)
    return want


def test_native_thread_serves_graph_steps_without_python():
    cpu_kernels = native_or_skip()
    pool = CPUExpertRuntime(num_threads=2, inline=False, wait_on_device=True)
    try:
        cpu_kernels.async_take_error()
        layers = [make_layer(PLACEMENTS[p], torch.bfloat16, runtime=pool, seed=i)[0]
                  for i, p in enumerate(("mixed", "all_cpu"))]
        graph = FakeGraph(cpu_kernels)
        for slot, layer in enumerate(layers):
            cpu_kernels.graph_jobs_add_layer(slot, layer.w13_cpu_chunks, layer.w2_cpu_chunks, layer.chunks,
                                             layer._routed_counts, layer.graph_pairs)
        served = cpu_kernels.graph_jobs_served()
        gen = torch.Generator().manual_seed(3)
        C = layers[0].chunks
        masks = [[0] * (1 << K) for _ in layers]
        cold_pairs = [0, 0]
        steps = 0
        for tokens, first in ((1, (0, 0)), (3, (2, 1)), (N, (C, 0)), (2, (C, C)), (1, (1, 1))):
            for slot, layer in enumerate(layers):  # a decode step: the layers in turn
                logits = torch.randn(tokens, E, generator=gen)
                weights, ids = reference.route(logits, K)
                slots = layer.cpu_slot_of_host[ids]
                x = torch.randn(tokens, H, generator=gen).to(torch.bfloat16)
                got = graph.step(mark_code(slot, tokens), x, slots, weights, first)
                assert torch.equal(got, expected(layer, x, slots, weights, first, cpu_kernels))
                for row in slots.tolist():
                    masks[slot][sum(1 << k for k, s in enumerate(row) if s >= 0)] += 1
                cold_pairs[slot] += int((slots >= 0).sum())
                steps += 1
        for slot, layer in enumerate(layers):
            assert int(layer._routed_counts[0]) == cold_pairs[slot]
            assert layer.routed_cold_patterns == masks[slot]
            assert int(layer.graph_pairs[0]) == K * sum(masks[slot])
        assert cold_pairs[1] == K * sum(masks[1])  # all on the host
        assert cpu_kernels.graph_jobs_served() - served == steps
        assert cpu_kernels.async_take_error() == ""
        # an unknown layer, or more rows than the buffers: the job fails, the stream still goes on
        for code in (mark_code(5, 1), mark_code(0, N + 1)):
            graph.step(code, torch.zeros(1, H, dtype=torch.bfloat16), torch.full((1, K), -1, dtype=torch.int32),
                       torch.zeros(1, K), (0, 0))
            assert "unknown layer or token count" in cpu_kernels.async_take_error()
    finally:
        pool.shutdown()


def test_graph_step_before_a_waiting_routed_job_is_served_first():
    """Stream order: a graph step (replayed FULL graph) and then an eager step whose routed job the
    engine thread already queued. The job thread, waiting for that job's routing, must serve the
    graph step in the meantime, or the stream (stuck at the graph step) never reaches the routing."""
    cpu_kernels = native_or_skip()
    from test_hybrid_moe import DeferredMark, RecordingSignal

    pool = CPUExpertRuntime(num_threads=2, inline=False, wait_on_device=True)
    signal, mark = RecordingSignal(), DeferredMark()
    pool._signal, pool._routing_mark = signal, mark
    try:
        layer, _, _ = make_layer(PLACEMENTS["mixed"], torch.bfloat16, runtime=pool)
        graph = FakeGraph(cpu_kernels)
        cpu_kernels.graph_jobs_add_layer(0, layer.w13_cpu_chunks, layer.w2_cpu_chunks, layer.chunks,
                                         layer._routed_counts, layer.graph_pairs)
        x_buf = torch.zeros(1, H, dtype=torch.bfloat16)
        slots_buf = torch.full((1, K), -1, dtype=torch.int32)
        wts_buf = torch.zeros(1, K)
        job = pool.submit_routed(x_buf, layer.w13_cpu_chunks, layer.w2_cpu_chunks, slots_buf, wts_buf,
                                 layer.chunks, torch.zeros(3, dtype=torch.int64))
        time.sleep(0.01)  # the job thread took the job and waits for its routing
        gen = torch.Generator().manual_seed(9)
        logits = torch.randn(2, E, generator=gen)
        weights, ids = reference.route(logits, K)
        slots = layer.cpu_slot_of_host[ids]
        x = torch.randn(2, H, generator=gen).to(torch.bfloat16)
        got = graph.step(mark_code(0, 2), x, slots, weights, (0, 0), timeout=5.0)
        assert torch.equal(got, expected(layer, x, slots, weights, (0, 0), cpu_kernels))
        assert int(signal.word) != job.seq  # the routed job still waits for its own routing
        mark.land()
        job.result()
    finally:
        pool.shutdown()


def test_idle_job_thread_serves_a_graph_step_after_a_pause():
    """After a long pause (an idle server) the job thread polls slowly, yet still serves."""
    cpu_kernels = native_or_skip()
    pool = CPUExpertRuntime(num_threads=1, inline=False, wait_on_device=True)
    try:
        layer, _, _ = make_layer(PLACEMENTS["all_cpu"], torch.bfloat16, runtime=pool)
        graph = FakeGraph(cpu_kernels)
        cpu_kernels.graph_jobs_add_layer(0, layer.w13_cpu_chunks, layer.w2_cpu_chunks, layer.chunks,
                                         layer._routed_counts, layer.graph_pairs)
        time.sleep(0.3)  # past the thread's idle threshold
        x = torch.randn(1, H).to(torch.bfloat16)
        slots = torch.tensor([[0, 1]], dtype=torch.int32)
        weights = torch.tensor([[0.6, 0.4]])
        got = graph.step(mark_code(0, 1), x, slots, weights, (0, 0))
        assert torch.equal(got, expected(layer, x, slots, weights, (0, 0), cpu_kernels))
        cpu_kernels.graph_jobs_detach()
        graph.done.fill_(0)
        graph.mark.fill_(mark_code(0, 1))  # detached: nobody serves it any more
        time.sleep(0.05)
        assert int(graph.mark) == mark_code(0, 1)
    finally:
        pool.shutdown()


# ------------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def cuda_layers(runtime, n_layers: int, host_backing: bool):
    from vllm_fiddler.moe.layer import HybridMoE
    from vllm_fiddler.runtime.host_view import device_view

    gen = torch.Generator().manual_seed(21)
    layers, experts = [], []
    for i in range(n_layers):
        w1, w3, w2 = random_experts(gen)
        layer = HybridMoE(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I,
                          gpu_experts=((0, 3), (), (5,))[i % 3], dtype=torch.bfloat16,
                          device=torch.device("cuda"), cpu_runtime=runtime, pin_memory=True,
                          host_backing=host_backing)
        load_experts(layer, w1, w3, w2)
        layer.routed_max_tokens = N
        layer.host_views = (device_view(layer.w13_cpu_chunks), device_view(layer.w2_cpu_chunks))
        layer.set_heat_table([0.0, 1.0, 1.5, 2.0])
        layer.streamed_below()
        layers.append(layer)
        experts.append((w1, w3, w2))
    return layers, experts


def graph_step_runtime() -> CPUExpertRuntime:
    """A CPU runtime that takes routed jobs and graph steps here; skips the test otherwise."""
    from vllm_fiddler.runtime import graph_jobs

    if not graph_jobs.available():
        pytest.skip("CUDA graphs here cannot capture stream memory operations")
    runtime = CPUExpertRuntime(num_threads=2, inline=False, pin_memory=True, wait_on_device=True)
    if not runtime.takes_routed_jobs():
        runtime.shutdown()
        pytest.skip("routed jobs need stream memory operations and the native kernels")
    return runtime


def chain(layers, x, logits_w):
    """A toy decode step: each layer's MoE of the previous one's output, its router logits a
    fixed projection of that (as attention and the gate would make them, on the device)."""
    h = x
    for layer, w in zip(layers, logits_w):
        h = routed(layer, h, (h.float() @ w).to(torch.bfloat16))
    return h


@cuda
@pytest.mark.parametrize("host_backing", [False, True])
@pytest.mark.parametrize("tokens", [1, 3, N])
def test_full_graph_of_graph_steps_matches_the_synced_steps_and_the_oracle(host_backing, tokens):
    """Three layers' graph steps captured into one CUDA graph and replayed across five streamed
    cuts and a re-placement: bit-equal to the synced steps where both compute the same chunks
    on the same side, within the oracle's bf16 tolerance everywhere, counting every pair."""
    from vllm_fiddler.runtime import graph_jobs

    runtime = graph_step_runtime()
    jobs = None
    try:
        layers, experts = cuda_layers(runtime, 3, host_backing)
        gen = torch.Generator().manual_seed(tokens)
        logits_w = [torch.randn(H, E, generator=gen).cuda() for _ in layers]
        jobs = graph_jobs.GraphJobs(N, H, K)
        static_x = torch.zeros(tokens, H, dtype=torch.bfloat16, device="cuda")
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            chain(layers, static_x, logits_w)  # warm-up, as vLLM runs before capturing (cuBLAS, Triton)
        torch.cuda.synchronize()
        for layer in layers:
            layer.graph_jobs = jobs
        with torch.cuda.stream(stream):
            counters = [(m.expert_tokens.clone(), m.expert_heat.clone()) for m in layers]
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                static_out = chain(layers, static_x, logits_w)
        torch.cuda.synchronize()
        for m, (tok, heat) in zip(layers, counters):  # capturing ran nothing
            assert torch.equal(m.expert_tokens, tok) and torch.equal(m.expert_heat, heat)
        served = jobs_served()
        C = layers[0].chunks
        assert C > 1
        for step, cut in enumerate([(0, 0), (1, 0), (0, 0), (C, C), (1, 1)]):
            for m in layers:  # what the model does between replays (after_graph_step)
                m.set_streamed_chunks(cut)
                m.streamed_below(cut)
            if step == 2 and host_backing:  # re-placement between steps: graphs follow the maps
                slot, _ = layers[0].begin_swap(evict=0, admit=6)
                layers[0].finish_swap(6, slot)
            x = torch.randn(tokens, H, generator=gen).to(torch.bfloat16).cuda()
            static_x.copy_(x)
            before = [(m.expert_tokens.clone(), m.routed_to_cpu, m.routed_to_gpu) for m in layers]
            graph.replay()
            graphed = static_out.clone()
            torch.cuda.synchronize()
            after = [(m.expert_tokens.clone(), m.routed_to_cpu, m.routed_to_gpu) for m in layers]
            for m in layers:
                m.graph_jobs = None
            synced = chain(layers, x, logits_w)  # the host plans each layer (no graphs)
            torch.cuda.synchronize()
            for m in layers:
                m.graph_jobs = jobs
            if not any(cut):  # the same kernels on the same sides
                assert torch.equal(graphed, synced), f"step {step} cut {cut}"
            assert_chain_matches_oracle(graphed, experts, x, logits_w)
            for b, a in zip(before, after):  # the graph counted its tokens and pairs
                assert int((a[0] - b[0]).sum()) == tokens * K
                assert (a[1] - b[1]) + (a[2] - b[2]) == tokens * K
        assert jobs_served() - served == 5 * len(layers)
    finally:
        if jobs is not None:
            jobs.close()
        runtime.shutdown()


def assert_chain_matches_oracle(out, experts, x, logits_w) -> None:
    """chain() in the fp32 oracle, each layer's experts on bf16-rounded inputs. The oracle
    routes from its own activations, which differ from the graph's by bf16 rounding, so a
    near-tied router choice in a later layer can flip for a token (seen on the H100 for one of
    4 tokens): every token but one must match within the bf16 tolerance, row by row."""
    from test_hybrid_moe import TOLERANCE

    from vllm_fiddler.kernels import reference

    h = x.float().cpu()
    for (w1, w3, w2), w in zip(experts, logits_w):
        hb = h.to(torch.bfloat16)
        logits = (hb.cuda().float() @ w).to(torch.bfloat16).cpu()
        weights, ids = reference.route(logits, K)
        h = reference.moe(hb, torch.cat([w1, w3], dim=1).to(torch.bfloat16), w2.to(torch.bfloat16), weights, ids)
    scale = h.abs().max().item()
    tol = 3 * TOLERANCE[torch.bfloat16]
    close = [torch.allclose(o, r, atol=tol * scale, rtol=tol) for o, r in zip(out.float().cpu(), h)]
    assert sum(close) >= len(close) - 1, f"tokens matching the oracle: {close}"


def jobs_served() -> int:
    from vllm_fiddler.kernels import cpu as cpu_kernels

    return cpu_kernels.graph_jobs_served()


@cuda
def test_graph_step_refuses_what_a_graph_cannot_replay():
    from vllm_fiddler.runtime import graph_jobs

    runtime = CPUExpertRuntime(num_threads=1, inline=False, pin_memory=True, wait_on_device=True)
    try:
        layers, _ = cuda_layers(runtime, 1, host_backing=False)
        layer = layers[0]
        x = torch.zeros(N + 1, H, dtype=torch.bfloat16, device="cuda")
        logits = torch.zeros(N + 1, E, dtype=torch.bfloat16, device="cuda")
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="graph steps of up to"):
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                routed(layer, x, logits)
        assert graph_jobs.mark_code(0, 1) == 0x10001
    finally:
        runtime.shutdown()


def mxfp4_cuda_layers(runtime, n_layers: int):
    """gpt-oss-style MXFP4 layers (biases, clamped SwiGLU) on the GPU, loaded expert by expert as
    vLLM's loaders hand them over; and the oracle's fp32 (w13, w2, b13, b2) of each."""
    from vllm_fiddler.kernels import quant, reference
    from vllm_fiddler.moe.quantized import ExpertFormat, QuantizedHybridMoE

    gen = torch.Generator().manual_seed(31)
    layers, oracle = [], []
    for i in range(n_layers):
        w1, w3, w2 = random_experts(gen)
        b13, b2 = torch.randn(E, 2 * I, generator=gen) * 0.5, torch.randn(E, H, generator=gen) * 0.5
        layer = QuantizedHybridMoE(expert_format=ExpertFormat("mxfp4", (1, 32)), num_experts=E, top_k=K,
                                   hidden_size=H, intermediate_size=I, gpu_experts=((0, 3), (), (5,))[i % 3],
                                   dtype=torch.bfloat16, device=torch.device("cuda"), cpu_runtime=runtime,
                                   pin_memory=True, math=reference.ExpertMath(activation="swigluoai", has_bias=True))
        dequant = {}
        for name, w in (("1", w1), ("3", w3), ("2", w2)):
            blocks, scales = quant.quant_mxfp4(w)  # [E, N, K/32, 16], [E, N, K/32]
            dequant[name] = quant.dequant_mxfp4(blocks, scales)
            for e in range(E):
                layer.load_expert(e, "w" + name, blocks[e])
                layer.load_expert(e, "s" + name, scales[e])
        b13, b2 = b13.bfloat16(), b2.bfloat16()
        for e in range(E):
            layer.load_expert(e, "b1", b13[e, :I])
            layer.load_expert(e, "b3", b13[e, I:])
            layer.load_expert(e, "b2", b2[e])
        layers.append(layer)
        oracle.append((torch.cat([dequant["1"], dequant["3"]], dim=1), dequant["2"], b13.float(), b2.float()))
    return layers, oracle


@cuda
@pytest.mark.parametrize("tokens", [1, 3])
def test_quantized_layers_take_the_routed_and_graph_step_paths(tokens):
    """MXFP4 layers with gpt-oss's math through each CUDA path: the synced step (host plans,
    device-waited native job), the routed step (MoEGraphs.capture_routed: the job thread reads
    the routing the stream copied down) and graph steps captured in one CUDA graph. The same
    Triton and CPU kernels on the same sides: the same bits; and the fp32 oracle on the
    dequantized weights within bf16's tolerance."""
    from test_hybrid_moe import TOLERANCE

    from vllm_fiddler.kernels import reference
    from vllm_fiddler.runtime import graph_jobs
    from vllm_fiddler.runtime.moe_graphs import MoEGraphs

    runtime = graph_step_runtime()
    jobs = None
    try:
        layers, oracle = mxfp4_cuda_layers(runtime, 3)
        assert all(m.native_jobs for m in layers)
        gen = torch.Generator().manual_seed(tokens)
        logits_w = [torch.randn(H, E, generator=gen).cuda() for _ in layers]
        x = torch.randn(tokens, H, generator=gen).to(torch.bfloat16).cuda()

        synced = chain(layers, x, logits_w)
        graphs = MoEGraphs(N, H, K, torch.bfloat16, torch.device("cuda"))
        graphs.capture(layers, None)
        assert graphs.capture_routed(layers, N, 4)["graphs"] > 0
        for m in layers:
            m.graphs, m.routed_max_tokens = graphs, N
        pairs = [m._routed_pairs for m in layers]
        routed_out = chain(layers, x, logits_w)
        assert [m._routed_pairs - p for m, p in zip(layers, pairs)] == [tokens * K] * len(layers)

        jobs = graph_jobs.GraphJobs(N, H, K)
        for m in layers:
            m.graph_jobs = jobs
        static_x = x.clone()
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            static_out = chain(layers, static_x, logits_w)
        served = jobs_served()
        graph.replay()
        torch.cuda.synchronize()
        assert jobs_served() - served == len(layers)
        assert torch.equal(routed_out, synced) and torch.equal(static_out, synced)

        h = x.float().cpu()  # the oracle, each layer on bf16-rounded inputs
        for (w13, w2, b13, b2), w in zip(oracle, logits_w):
            hb = h.to(torch.bfloat16)
            weights, ids = reference.route((hb.cuda().float() @ w).to(torch.bfloat16).cpu(), K)
            h = reference.moe(hb.float(), w13, w2, weights, ids, layers[0].math, b13, b2)
        tol = 3 * TOLERANCE[torch.bfloat16]
        close = [torch.allclose(o, r, atol=tol * h.abs().max().item(), rtol=tol) for o, r in zip(synced.float().cpu(), h)]
        assert sum(close) >= len(close) - 1, f"tokens matching the oracle: {close}"  # a near-tied router may flip one
    finally:
        if jobs is not None:
            jobs.close()
        runtime.shutdown()
