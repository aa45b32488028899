"""The GPU waits for the CPU experts on the device (vllm_fiddler.runtime.device_wait), CUDA only.

Checked here: a stream holds its later work until the host signal, across the
32-bit counter's wrap; shutdown releases waiting streams; chained hybrid layers
whose host side returns before the CPU is done give the fp32 oracle's result
and the same bits as the host-waiting path; a failed CPU job releases the
stream and fails the next op.
"""

from __future__ import annotations

import time

import pytest
import torch

from test_hybrid_moe import E, H, I, K, TOLERANCE, load_experts, random_experts, routed
from vllm_fiddler.kernels import reference
from vllm_fiddler.moe.layer import HybridMoE
from vllm_fiddler.runtime import cpu_experts, device_wait, host_view
from vllm_fiddler.runtime.cpu_experts import CPUExpertRuntime

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

HELD_S = 0.2  # how long a test holds the signal back: far above a kernel's microseconds


def queued_after_wait(signal: device_wait.DeviceSignal, seq: int) -> tuple[torch.Tensor, torch.cuda.Event]:
    """Enqueues the wait for seq, then work that marks a device tensor; returns (tensor, done event).

    The marking kernel runs once before the wait: CUDA loads a kernel's module at its first
    launch (lazy loading), which waits for the whole context, so a first launch behind an
    unset wait would block until the signal, which this thread then could never set. In
    the engine another thread (the CPU worker) sets it, so a first launch only waits."""
    mark = torch.zeros(1, device="cuda")
    mark.add_(1)
    mark.zero_()
    signal.wait(seq)
    mark.add_(1)
    done = torch.cuda.Event()
    done.record()
    return mark, done


def test_stream_holds_its_work_until_the_host_signal():
    assert device_wait.available()
    signal = device_wait.DeviceSignal()
    seq = signal.next_seq()
    mark, done = queued_after_wait(signal, seq)
    time.sleep(HELD_S)
    assert not done.query(), "the stream ran past an unset signal"
    signal.set(seq)
    done.synchronize()
    assert mark.item() == 1


def test_counter_wraps_around():
    signal = device_wait.DeviceSignal()
    signal.last_seq = 0xFFFFFFFE
    signal.word.fill_(-2)  # as if 2^32 - 2 jobs had run (set() would take it for an older number)
    for _ in range(3):  # 0xFFFFFFFF, 0, 1: "greater or equal" compares cyclically
        seq = signal.next_seq()
        mark, done = queued_after_wait(signal, seq)
        time.sleep(0.02)
        assert not done.query()
        signal.set(seq)
        done.synchronize()
    assert signal.last_seq == 1
    signal.set(0xFFFFFFF0)  # an older number never moves the word back
    assert int(signal.word.item()) == 1


def test_shutdown_releases_a_waiting_stream():
    runtime = CPUExpertRuntime(num_threads=1, inline=False, pin_memory=True, wait_on_device=True)
    signal = runtime._device_signal()
    mark, done = queued_after_wait(signal, signal.next_seq())  # a job that will never run
    runtime.shutdown()
    done.synchronize()
    assert mark.item() == 1


def make_cuda_layer(runtime, seed):
    w1, w3, w2 = random_experts(torch.Generator().manual_seed(seed))
    layer = HybridMoE(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, gpu_experts=(1, 6),
                      dtype=torch.bfloat16, device=torch.device("cuda"), cpu_runtime=runtime, pin_memory=True)
    load_experts(layer, w1, w3, w2)
    return layer, torch.cat([w1, w3], dim=1).to(torch.bfloat16), w2.to(torch.bfloat16)


def slow_cpu(monkeypatch):
    """Every CPU job takes HELD_S longer: an op that waited for it on the host would too."""
    real = cpu_experts.cpu_moe_forward

    def slow(*args):
        time.sleep(HELD_S)
        real(*args)

    monkeypatch.setattr(cpu_experts, "cpu_moe_forward", slow)


@pytest.mark.parametrize("tokens", [1, 5, 37])
def test_chained_layers_match_oracle_and_the_host_wait(monkeypatch, tokens):
    """Three layers in a row (each one's output the next one's input, no host sync between)
    with slow CPU jobs: the ops return before the CPU is done, and the result equals the
    host-waiting path's bit for bit and the chained fp32 oracle within bf16's tolerance."""
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=gen).to(torch.bfloat16)
    logits = [torch.randn(tokens, E, generator=gen) for _ in range(3)]
    outs = {}
    for wait_on_device in (False, True):
        runtime = CPUExpertRuntime(num_threads=2, inline=False, pin_memory=True, wait_on_device=wait_on_device)
        try:
            layers = [make_cuda_layer(runtime, seed) for seed in range(3)]
            h = x.cuda()
            h = routed(layers[0][0], h, logits[0].cuda())  # compiles the kernels before the timed part
            torch.cuda.synchronize()
            h = x.cuda()
            slow_cpu(monkeypatch)
            start = time.perf_counter()
            for (layer, _, _), lg in zip(layers, logits):
                h = routed(layer, h, lg.cuda())
            returned_s = time.perf_counter() - start
            outs[wait_on_device] = h.cpu()
            monkeypatch.undo()
            if wait_on_device:
                # only the routing copies of layers 2 and 3 wait (for layers 1 and 2's CPU jobs)
                assert returned_s < 2.5 * HELD_S, returned_s
            else:
                assert returned_s >= 3 * HELD_S
        finally:
            runtime.shutdown()
    assert torch.equal(outs[True], outs[False])
    ref = x.float()
    for (_, w13, w2), lg in zip(layers, logits):
        weights, ids = reference.route(lg, K)
        ref = reference.moe(ref.to(torch.bfloat16), w13, w2, weights, ids)
    scale = ref.abs().max().item()
    # three bf16 layers: each rounds as in test_hybrid_moe, and feeds the next its rounded output
    torch.testing.assert_close(outs[True].float(), ref, atol=3 * TOLERANCE[torch.bfloat16] * scale,
                               rtol=3 * TOLERANCE[torch.bfloat16])


def test_failed_cpu_job_releases_the_stream_and_fails_the_next_op():
    runtime = CPUExpertRuntime(num_threads=2, inline=False, pin_memory=True, wait_on_device=True)
    try:
        layer, _, _ = make_cuda_layer(runtime, 0)
        x = torch.randn(4, H, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(4, E, device="cuda")
        logits[:, 1] = logits[:, 6] = -9.0  # every pair cold
        good = layer.w2_cpu_chunks
        layer.w2_cpu_chunks = good[:, :, :5]  # wrong shape: the CPU job raises
        routed(layer, x, logits)  # returns: the failure is on the worker
        torch.cuda.synchronize()  # the stream was released, not hung
        layer.w2_cpu_chunks = good
        with pytest.raises(RuntimeError):
            routed(layer, x, logits)
        torch.cuda.synchronize()
        routed(layer, x, logits)  # reported once; the layer works again
        torch.cuda.synchronize()
    finally:
        runtime.shutdown()


def test_device_view_reads_and_writes_host_memory_in_place():
    host = torch.randn(3, 5, 7).to(torch.bfloat16).pin_memory()
    view = host_view.device_view(host[1:])
    assert view.is_cuda and view.dtype == torch.bfloat16 and view.shape == (2, 5, 7)
    assert torch.equal(view.cpu(), host[1:])
    view[0, 0, 0] = 42.0  # a kernel's store lands in host memory
    torch.cuda.synchronize()
    assert host[1, 0, 0].item() == 42.0
    with pytest.raises(ValueError):
        host_view.device_view(torch.zeros(3))  # not pinned


def give_routed_graphs(layers, max_tokens: int) -> None:
    """The routed steps' CUDA graphs, as the model captures them: steps of up to max_tokens
    tokens hand the CPU their routing from the stream."""
    from vllm_fiddler.runtime.moe_graphs import MoEGraphs

    graphs = MoEGraphs(max_tokens, H, K, torch.bfloat16, torch.device("cuda"))
    graphs.capture(layers, None)
    graphs.capture_routed(layers, max_tokens, heat_table_len=4)
    for layer in layers:
        layer.graphs = graphs
        layer.routed_max_tokens = max_tokens


@pytest.mark.parametrize("tokens,streamed", [(1, (0, 0)), (3, (0, 0)), (1, (1, 0)), (3, (2, 1)), (2, (2, 2))])
def test_routed_steps_never_wait_on_the_host_and_match_the_synced_path(tokens, streamed):
    """Small steps hand the CPU job its routing from the stream (routed_max_tokens): with the
    stream held back by a long kernel, three chained layers return on the host at once (the
    synced path waits for each routing copy), and the result equals the synced path's bit for
    bit and the chained fp32 oracle; the routed pairs are counted on the side they ran. With
    `streamed[k]` chunks (of C = 2) of each cold expert at top-k position k computed on the GPU
    from host memory in place (the rest on the CPU), the sum is taken in another order: the
    oracle's tolerance, not bits."""
    assert device_wait.marks_available()
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=gen).to(torch.bfloat16)
    logits = [torch.randn(tokens, E, generator=gen) for _ in range(3)]
    outs, counted, streamed_bytes, cpu_bytes = {}, {}, {}, {}
    for routed_limit in (0, 4):
        runtime = CPUExpertRuntime(num_threads=2, inline=False, pin_memory=True, wait_on_device=True)
        try:
            layers = [make_cuda_layer(runtime, seed) for seed in range(3)]
            assert layers[0][0].chunks == 2  # I = 160
            for layer, _, _ in layers:
                layer.host_views = (host_view.device_view(layer.w13_cpu_chunks),
                                    host_view.device_view(layer.w2_cpu_chunks))
            if routed_limit:
                give_routed_graphs([layer for layer, _, _ in layers], routed_limit)
            for layer, _, _ in layers:
                layer.set_streamed_chunks(streamed)
            assert runtime.takes_routed_jobs()
            h = routed(layers[0][0], x.cuda(), logits[0].cuda())  # compiles the kernels before the timed part
            torch.cuda.synchronize()
            inputs = [lg.cuda() for lg in logits]
            h = x.cuda()
            torch.cuda._sleep(int(2e9 * HELD_S))  # ~HELD_S of GPU time at ~2 GHz
            start = time.perf_counter()
            for (layer, _, _), lg in zip(layers, inputs):
                h = routed(layer, h, lg)
            returned_s = time.perf_counter() - start
            outs[routed_limit] = h.cpu()
            if routed_limit:
                assert returned_s < 0.25 * HELD_S, returned_s
            else:
                assert returned_s >= 0.5 * HELD_S, returned_s
            runtime._finish_native()
            counted[routed_limit] = [(layer.routed_to_cpu, layer.routed_to_gpu) for layer, _, _ in layers]
            streamed_bytes[routed_limit] = sum(layer.streamed_weight_bytes for layer, _, _ in layers)
            cpu_bytes[routed_limit] = sum(layer.cpu_weight_bytes for layer, _, _ in layers)
            chunk_bytes = 2 * (layers[0][0].w13_cpu_chunks[0].numel() + layers[0][0].w2_cpu_chunks[0].numel())
        finally:
            runtime.shutdown()
    if not any(streamed):
        assert torch.equal(outs[4], outs[0])
    ref = x.float()
    for (_, w13, w2), lg in zip(layers, logits):
        weights, ids = reference.route(lg, K)
        ref = reference.moe(ref.to(torch.bfloat16), w13, w2, weights, ids)
    scale = ref.abs().max().item()
    torch.testing.assert_close(outs[4].float(), ref, atol=3 * TOLERANCE[torch.bfloat16] * scale,
                               rtol=3 * TOLERANCE[torch.bfloat16])
    # the synced path's counts (checked against the routing in test_hybrid_moe); layer 0 also
    # ran the warm-up call
    assert counted[4] == counted[0]
    assert [cpu + gpu for cpu, gpu in counted[4]] == [2 * tokens * K, tokens * K, tokens * K]
    assert sum(cpu for cpu, _ in counted[4]) > 0
    # streamed chunks are counted once per chunk-expert, at most once per cold pair and chunk
    cold = sum(cpu for cpu, _ in counted[4])
    assert streamed_bytes[0] == 0
    assert (0 < streamed_bytes[4] <= cold * max(streamed) * chunk_bytes) if any(streamed) else streamed_bytes[4] == 0
    # the CPU read each of its chunk-experts once a call: chunks streamed[k].. of each cold pair's
    # expert routed (all of them synced); layer 0 ran twice on the same routing

    def cpu_chunk_reads(first):
        reads = 0
        for i, ((layer, _, _), lg) in enumerate(zip(layers, logits)):
            ids = reference.route(lg, K)[1]
            reads += (2 if i == 0 else 1) * len({(int(e), c) for row in ids for k, e in enumerate(row)
                                                 if layer.device_slot[int(e)] < 0 for c in range(first[k], 2)})
        return reads

    assert cpu_bytes[0] == cpu_chunk_reads((0, 0)) * chunk_bytes > 0
    assert cpu_bytes[4] == cpu_chunk_reads(streamed) * chunk_bytes

def test_calibration_times_the_in_place_reads():
    """calibrate.measure times the GPU's kernels reading a cold expert in place from pinned
    host memory; the fitted cost model prices the streamed chunks with it."""
    from vllm_fiddler import cost_model
    from vllm_fiddler.runtime import calibrate
    from vllm_fiddler.runtime.weight_stager import WeightStager

    runtime = CPUExpertRuntime(num_threads=2, inline=False, pin_memory=True, wait_on_device=True)
    try:
        layer, _, _ = make_cuda_layer(runtime, 0)
        stager = WeightStager(2, H, I, layer.chunks, torch.bfloat16, torch.device("cuda"))
        m = calibrate.measure(layer, runtime, stager)
        assert m["stream_gb_s"] > 0
        m.pop("contention_detail")
        model = cost_model.fit_from_measurements(**m)
        assert model.stream_ms == pytest.approx(m["expert_bytes"] / m["stream_gb_s"] / 1e6)
        cut = cost_model.streamed_chunks(model, layer.chunks, K)
        assert len(cut) == K and all(0 <= n <= layer.chunks for n in cut)
    finally:
        runtime.shutdown()


def test_routed_steps_decide_their_cut_again_as_the_hit_rate_moves(monkeypatch):
    """The streamed cut is decided at the first routed step and again every
    STREAMED_DECISION_STEPS routed steps, from the routed tokens' cold positions since (the
    native jobs' mask counts); each decision is the cost model's for those, and the chained
    steps still match the fp32 oracle while the cut changes under them."""
    import dataclasses
    import types

    from vllm_fiddler import cost_model
    from vllm_fiddler.moe import layer as hybrid_moe
    from vllm_fiddler.moe.steps import routed as routed_steps

    # one of the 2 chunks of the first position's expert streamed while most pairs are cold,
    # none at a low share (test_hybrid_moe's planted model)
    cost = dataclasses.replace(cost_model.CostModel(cpu_points=((1, 2.5),), h2d_gb_s=1.0, copy_latency_ms=0.0,
                                                    expert_bytes=6_500_000, gpu_points=((1, 0.1),)),
                               cpu_contended_slowdown=1.1, h2d_contended_slowdown=1.1)
    monkeypatch.setattr(hybrid_moe, "get_step_planner", lambda layer: types.SimpleNamespace(cost=cost))
    monkeypatch.setattr(routed_steps, "STREAMED_DECISION_STEPS", 2)
    monkeypatch.setattr(routed_steps, "STREAMED_DECISION_MIN_PAIRS", 2)
    runtime = CPUExpertRuntime(num_threads=2, inline=False, pin_memory=True, wait_on_device=True)
    try:
        layer, w13, w2 = make_cuda_layer(runtime, 0)  # experts 1 and 6 on the GPU
        layer.stager = object()  # only its presence matters to the decision
        layer.host_views = (host_view.device_view(layer.w13_cpu_chunks), host_view.device_view(layer.w2_cpu_chunks))
        give_routed_graphs([layer], 4)
        decisions = []
        decide = layer._decide_streamed_chunks

        def spy():
            decide()
            decisions.append((layer._streamed_decision["cold_share"], layer._streamed_decision["cold_patterns"],
                              layer.routed_gpu_chunks))

        monkeypatch.setattr(layer, "_decide_streamed_chunks", spy)
        gen = torch.Generator().manual_seed(3)
        for step in range(6):
            x = torch.randn(1, H, generator=gen).to(torch.bfloat16)
            logits = torch.randn(1, E, generator=gen)
            if step >= 2:  # from the third step on, both of the token's experts are on the GPU
                logits[0, 1] = logits[0, 6] = 9.0
            got = routed(layer, x.cuda(), logits.cuda()).cpu()
            weights, ids = reference.route(logits, K)
            ref = reference.moe(x, w13, w2, weights, ids)
            scale = ref.abs().max().item()
            torch.testing.assert_close(got.float(), ref, atol=TOLERANCE[torch.bfloat16] * scale,
                                       rtol=TOLERANCE[torch.bfloat16])
        torch.cuda.synchronize()
        runtime._finish_native()
        # steps 1, 3 and 5 decide; the first from the experts on the host (6 of 8), the others
        # over the masks of the two routed tokens before them (each step's job has run: the
        # output's copy to the host waited for it)
        assert decisions[0][:2] == (0.75, None) and len(decisions) == 3
        assert all(sum(patterns) == 2 for _, patterns, _ in decisions[1:])
        assert decisions[2][1] == [2, 0, 0, 0]  # both of each token's experts on the GPU
        for share, patterns, cut in decisions:
            assert cut == (cost_model.streamed_chunks(cost, layer.chunks, K, cold_share=share, cold_patterns=patterns)
                           if share else (0, 0))
        assert decisions[0][2] == (1, 0) and decisions[-1][::2] == (0.0, (0, 0))  # the cut did change
    finally:
        runtime.shutdown()
