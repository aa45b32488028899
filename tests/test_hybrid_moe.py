"""HybridMoE alone against the fp32 oracle of an MoE block's routed experts.

Tolerances, per dtype, relative to the output's scale (max |ref|):
- fp32: same math in another order; 1e-5 covers fp32 summation order.
- bf16: the expert computes in bf16 (8-bit mantissa): gate/up, the SiLU
  product and the down projection are each rounded once (<= 2^-8 relative
  each), the fp32 top-k sum then rounds once more to bf16. Four roundings:
  2e-2 of scale, with margin. The oracle sees the same bf16-rounded inputs.
- fp16: the same four roundings at 2^-11: 4e-3.
"""

from __future__ import annotations

import time

import pytest
import torch

from vllm_fiddler.kernels import reference
from vllm_fiddler.moe.layer import HybridMoE
from vllm_fiddler.moe.steps import synced, trace
from vllm_fiddler.moe.steps.synced import cold_token_counts
from vllm_fiddler.runtime.cpu_experts import CPUExpertRuntime


def cpu_kernel_isas() -> list[str]:
    from vllm_fiddler.kernels import cpu as cpu_kernels

    return [i for i in cpu_kernels.available_isas() if i != "torch"]

E, K, H, I = 8, 2, 96, 160  # odd-ish sizes on purpose (not powers of two)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
PLACEMENTS = {
    "all_gpu": tuple(range(E)),
    "all_cpu": (),
    "mixed": (0, 3, 5),
    "one_gpu": (6,),
    "one_cpu": tuple(e for e in range(E) if e != 2),
}


def random_experts(gen: torch.Generator):
    """(w1 [E, I, H], w3 [E, I, H], w2 [E, H, I]) fp32, scaled to keep activations O(1)."""
    w1 = torch.randn(E, I, H, generator=gen) * H**-0.5
    w3 = torch.randn(E, I, H, generator=gen) * H**-0.5
    w2 = torch.randn(E, H, I, generator=gen) * I**-0.5
    return w1, w3, w2


def load_experts(layer, w1, w3, w2) -> None:
    """Each expert's tensors as vLLM's loaders hand them over (FiddlerMoEMethod.weight_loader)."""
    for e in range(E):
        for name, w in (("w1", w1), ("w2", w2), ("w3", w3)):
            layer.load_expert(e, name, w[e])


def make_layer(gpu_experts, dtype, runtime=None, seed=0, host_backing=False):
    layer = HybridMoE(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I,
                      gpu_experts=gpu_experts, dtype=dtype, device=torch.device("cpu"),
                      cpu_runtime=runtime or CPUExpertRuntime(num_threads=1, inline=True),
                      pin_memory=False, host_backing=host_backing)
    w1, w3, w2 = random_experts(torch.Generator().manual_seed(seed))
    load_experts(layer, w1, w3, w2)
    w13 = torch.cat([w1, w3], dim=1).to(dtype)  # the weights as the layer stores them
    return layer, w13, w2.to(dtype)


def routed(layer, x, logits):
    """The layer on Mixtral's routing of `logits` (vLLM's router does this in a model)."""
    weights, ids = reference.route(logits, layer.top_k)
    return layer(x, weights, ids.to(torch.int32))


def check(layer, w13, w2, x, logits, dtype):
    out = routed(layer, x, logits)
    weights, ids = reference.route(logits, K)
    ref = reference.moe(x, w13, w2, weights, ids)
    assert out.dtype == dtype and out.shape == x.shape
    scale = max(ref.abs().max().item(), 1e-6) if ref.numel() else 1.0
    torch.testing.assert_close(out.float(), ref, atol=TOLERANCE[dtype] * scale, rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("tokens", [0, 1, 7, 64])
def test_matches_oracle(tokens, placement, dtype):
    layer, w13, w2 = make_layer(PLACEMENTS[placement], dtype)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=gen).to(dtype)
    logits = torch.randn(tokens, E, generator=gen).to(dtype)
    check(layer, w13, w2, x, logits, dtype)


@pytest.mark.parametrize("placement", ["mixed", "all_cpu", "all_gpu"])
def test_empty_experts(placement):
    """Routing that hits only experts 3 and 4: every other expert gets no token."""
    layer, w13, w2 = make_layer(PLACEMENTS[placement], torch.float32)
    x = torch.randn(33, H)
    logits = torch.full((33, E), -10.0)
    logits[:, 3], logits[:, 4] = 5.0, 4.0
    check(layer, w13, w2, x, logits, torch.float32)


def test_threaded_runtime_matches_inline():
    pool = CPUExpertRuntime(num_threads=1, inline=False)
    try:
        layer, w13, w2 = make_layer(PLACEMENTS["mixed"], torch.float32, runtime=pool)
        x, logits = torch.randn(64, H), torch.randn(64, E)
        check(layer, w13, w2, x, logits, torch.float32)
    finally:
        pool.shutdown()


def test_every_pair_runs_on_exactly_one_side(monkeypatch):
    """The dispatch claim: each (token, k) pair is computed once, on the side where its expert lives."""
    layer, _, _ = make_layer(PLACEMENTS["mixed"], torch.float32)
    seen = {"cpu": [], "gpu": []}
    original_submit = layer.cpu_runtime.submit

    def spy_submit(x, w13, w2, ids, weights, **kw):
        seen["cpu"].append(ids.clone())
        return original_submit(x, w13, w2, ids, weights, **kw)

    original_device = layer._device_experts

    def spy_device(x, ids, weights, acc):
        seen["gpu"].append(ids.clone())
        return original_device(x, ids, weights, acc)

    monkeypatch.setattr(layer.cpu_runtime, "submit", spy_submit)
    monkeypatch.setattr(layer, "_device_experts", spy_device)
    logits = torch.randn(50, E)
    routed(layer, torch.randn(50, H), logits)
    _, ids = reference.route(logits, K)
    chunk_ids, gpu_ids = seen["cpu"][0], seen["gpu"][0]
    C = layer.chunks
    assert C == 2 and chunk_ids.shape == (50, K * C)  # I = 160: two chunks of 80 rows
    chunk_ids = chunk_ids.view(50, K, C)
    # a host expert's pair runs as all of its chunks (c = 0..C-1 of its slot), or not at all
    assert torch.equal((chunk_ids >= 0).all(-1), (chunk_ids >= 0).any(-1))
    cpu_ids = torch.where(chunk_ids[..., 0] >= 0, chunk_ids[..., 0] // C, -1)
    assert torch.equal(chunk_ids[chunk_ids[..., 0] >= 0] % C, torch.arange(C).expand(int((cpu_ids >= 0).sum()), C))
    on_gpu = torch.isin(ids, torch.tensor(PLACEMENTS["mixed"]))
    assert torch.equal(gpu_ids >= 0, on_gpu) and torch.equal(cpu_ids >= 0, ~on_gpu)
    # local slots point back at the right global experts
    assert torch.equal(torch.tensor(layer.gpu_experts)[gpu_ids[on_gpu].long()], ids[on_gpu])
    assert torch.equal(torch.tensor(layer.cpu_experts)[cpu_ids[~on_gpu].long()], ids[~on_gpu])
    assert layer.routed_to_gpu == int(on_gpu.sum()) and layer.routed_to_cpu == int((~on_gpu).sum())
    # the CPU read each chunk-expert it was given once, however many tokens chose it
    assert layer.cpu_weight_bytes == layer.chunk_bytes * chunk_ids[chunk_ids >= 0].unique().numel() > 0
    assert layer.chunk_bytes * C == layer.expert_bytes
    assert layer.expert_tokens.tolist() == torch.bincount(ids.flatten(), minlength=E).tolist()


def test_all_gpu_never_calls_cpu(monkeypatch):
    layer, _, _ = make_layer(PLACEMENTS["all_gpu"], torch.float32)
    monkeypatch.setattr(layer.cpu_runtime, "submit", lambda *a: pytest.fail("CPU path used"))
    routed(layer, torch.randn(9, H), torch.randn(9, E))


def test_cpu_fault_fails_the_step():
    """An exception in the CPU worker thread reaches the caller, not a hang."""
    pool = CPUExpertRuntime(num_threads=1, inline=False)
    try:
        layer, _, _ = make_layer(PLACEMENTS["all_cpu"], torch.float32, runtime=pool)
        layer.w2_cpu_chunks = layer.w2_cpu_chunks[:, :, :5]  # wrong shape: the worker's matmul raises
        with pytest.raises(RuntimeError):
            routed(layer, torch.randn(4, H), torch.randn(4, E))
    finally:
        pool.shutdown()


class RecordingSignal:
    """device_wait.DeviceSignal's host half, without CUDA: hands out numbers, records the
    Python worker's sets; the native job thread stores into `word` directly."""

    def __init__(self):
        self.last_seq, self.sets = 0, []
        self.word = torch.zeros(1, dtype=torch.int32)

    def next_seq(self):
        self.last_seq += 1
        return self.last_seq

    def set(self, seq):
        self.sets.append(seq)
        self.word.fill_(seq)

    def release_all(self):
        self.set(self.last_seq)


def test_device_waited_job_signals_even_when_it_fails(monkeypatch):
    """A job the device waits for sets its signal whatever happens (else the stream would hang),
    and its failure, which nobody reads on the host, fails the next submit instead."""
    pool = CPUExpertRuntime(num_threads=1, inline=False, wait_on_device=True)
    signal = RecordingSignal()
    monkeypatch.setattr(pool, "_device_signal", lambda: signal)
    try:
        layer, w13, w2 = make_layer(PLACEMENTS["all_cpu"], torch.float32, runtime=pool)
        x = torch.randn(4, H)
        ids = torch.zeros(4, 1, dtype=torch.int32)
        wts = torch.ones(4, 1)
        ok = pool.submit(x, layer.w13_cpu_chunks, layer.w2_cpu_chunks, ids, wts, device_wait=True)
        assert ok.seq == 1
        ok.result()
        bad = pool.submit(x, layer.w13_cpu_chunks, layer.w2_cpu_chunks[:, :, :5], ids, wts, device_wait=True)
        assert bad.seq == 2
        with pytest.raises(RuntimeError):
            bad.result()
        assert signal.sets == [1, 2]
        with pytest.raises(RuntimeError):  # the unread failure surfaces at the next submit
            pool.submit(x, layer.w13_cpu_chunks, layer.w2_cpu_chunks, ids, wts, device_wait=True)
        again = pool.submit(x, layer.w13_cpu_chunks, layer.w2_cpu_chunks, ids, wts)  # reported once
        assert again.seq is None and again.result().shape == (4, H)
        host_only = CPUExpertRuntime(num_threads=1, inline=False, wait_on_device=False)
        try:
            assert host_only.submit(x, layer.w13_cpu_chunks, layer.w2_cpu_chunks, ids, wts,
                                    device_wait=True).seq is None
        finally:
            host_only.shutdown()
        pool.shutdown()
        assert signal.sets[-1] == signal.last_seq  # shutdown releases whatever still waits
    finally:
        pool.shutdown()


@pytest.mark.skipif(not cpu_kernel_isas(), reason="no native CPU kernel on this machine")
def test_native_device_waited_jobs_run_in_order_and_signal(monkeypatch):
    """bf16 device-waited jobs go to the native job thread (no GIL): each matches the
    synchronous kernel, the word ends at the last job's number, and a failed job still
    stores its number (its stream goes on) and fails the next submit."""
    from vllm_fiddler.kernels import cpu as cpu_kernels

    pool = CPUExpertRuntime(num_threads=2, inline=False, wait_on_device=True)
    signal = RecordingSignal()
    monkeypatch.setattr(pool, "_device_signal", lambda: signal)
    try:
        cpu_kernels.async_trace()  # drops earlier tests' jobs
        before_ns = time.perf_counter_ns()
        layer, _, _ = make_layer(PLACEMENTS["all_cpu"], torch.bfloat16, runtime=pool)
        w13, w2 = layer.w13_cpu_chunks, layer.w2_cpu_chunks
        gen = torch.Generator().manual_seed(3)
        for tokens in (1, 3, 17):
            x = torch.randn(tokens, H, generator=gen).to(torch.bfloat16)
            ids = torch.randint(-1, w13.shape[0], (tokens, 4), generator=gen, dtype=torch.int32)
            wts = torch.rand(tokens, 4, generator=gen)
            job = pool.submit(x, w13, w2, ids, wts, device_wait=True)
            assert job.future is None, "a bf16 job should run on the native job thread"
            got = job.result().clone()
            want = torch.zeros(tokens, H)
            cpu_kernels.moe_forward(x, w13, w2, ids, wts, want)
            assert torch.equal(got, want)  # same kernel, same order: same bits
            assert int(signal.word) == job.seq
        bad = pool.submit(x, w13, w2[:, :, :5], ids, wts, device_wait=True)
        cpu_kernels.async_wait_idle()
        assert int(signal.word) == bad.seq and signal.sets == []  # stored by the native thread
        with pytest.raises(RuntimeError, match="fiddler CPU experts failed"):
            pool.submit(x, w13, w2, ids, wts, device_wait=True)
        assert pool.submit(x, w13, w2, ids, wts, device_wait=True).result().shape == (tokens, H)
        assert pool.calls >= 5 and pool.busy_s > 0
        # the job trace (benchmarks' timelines): every job above, in order, on perf_counter's clock
        trace = cpu_kernels.async_trace()
        assert len(trace) == 5 and cpu_kernels.async_trace() == []
        assert before_ns <= trace[0][0] and trace[-1][2] <= time.perf_counter_ns()
        assert all(len(job) == len(cpu_kernels.ASYNC_TRACE_FIELDS) for job in trace)
        for (submitted, started, done, picked, chunks), following in zip(trace, trace[1:] + [None]):
            assert submitted <= picked <= started <= done
            assert following is None or done <= following[3]  # one job thread: in order
            assert chunks == 0  # planned jobs: the routed counter's share is theirs only
    finally:
        pool.shutdown()


@pytest.mark.skipif(not cpu_kernel_isas(), reason="no native CPU kernel on this machine")
def test_native_jobs_run_while_python_holds_the_gil():
    """The job thread never waits for the GIL: dropping its references to tensors Python also
    holds decrefs their PyObjects in torch 2.11, and the engine thread holds the GIL while it
    launches the next layers. With the GIL held (and not handed over: a 30 s switch interval),
    every queued job must still finish; the thread used to stall after the first one."""
    import sys

    from vllm_fiddler.kernels import cpu as cpu_kernels

    gen = torch.Generator().manual_seed(11)
    w13 = torch.randn(3, 2 * 64, H, generator=gen).to(torch.bfloat16)
    w2 = torch.randn(3, H, 64, generator=gen).to(torch.bfloat16)
    word = torch.zeros(1, dtype=torch.int32)
    jobs = [(torch.randn(1, H, generator=gen).to(torch.bfloat16), torch.tensor([[0, 2]], dtype=torch.int32),
             torch.rand(1, 2, generator=gen), torch.zeros(1, H)) for _ in range(6)]
    seen = word.numpy()  # read without torch ops, which may release the GIL
    switch = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    try:
        for seq, (x, ids, wts, out) in enumerate(jobs, start=1):
            assert cpu_kernels.moe_forward_async(x, w13, w2, ids, wts, out, word, seq)
        deadline = time.perf_counter() + 5.0
        while seen[0] != len(jobs) and time.perf_counter() < deadline:
            pass  # holds the GIL
        finished = int(seen[0])
    finally:
        sys.setswitchinterval(switch)
        cpu_kernels.async_wait_idle()
    assert finished == len(jobs), f"the job thread stalled after job {finished} while Python held the GIL"
    for x, ids, wts, out in jobs:
        want = torch.zeros(1, H)
        cpu_kernels.moe_forward(x, w13, w2, ids, wts, want)
        assert torch.equal(out, want)


class DeferredMark:
    """device_wait.StreamMark without CUDA: records the number a stream would write once
    the routing copy lands; the test writes it into `word` when it has 'landed'."""

    def __init__(self):
        self.word = torch.zeros(1, dtype=torch.int32)
        self.marked = []

    def mark(self, seq):
        self.marked.append(seq)

    def land(self):
        self.word.fill_(self.marked[-1])


@pytest.mark.skipif(not cpu_kernel_isas(), reason="no native CPU kernel on this machine")
def test_routed_jobs_wait_for_their_routing_then_match_the_planned_kernel():
    """A routed job (submit_routed) reads its routing only once the stream's mark says it has
    landed: buffers rewritten after the submit are what it computes with. Its result is bit-equal
    to the engine thread's chunk-id path (cpu_chunk_ids + moe_forward), it counts the pairs it ran
    on the CPU and its tokens per cold-position mask (with counts of 3 + 2^K; 3 count no masks),
    stores its number for the stream, and a job whose routing never comes is cancelled at
    shutdown instead of hanging it."""
    from vllm_fiddler.kernels import cpu as cpu_kernels

    pool = CPUExpertRuntime(num_threads=2, inline=False, wait_on_device=True)
    signal, mark = RecordingSignal(), DeferredMark()
    pool._signal, pool._routing_mark = signal, mark
    try:
        cpu_kernels.async_take_error()
        layer, _, _ = make_layer(PLACEMENTS["mixed"], torch.bfloat16, runtime=pool)
        assert layer.chunks > 1  # the job expands slots into several chunk-experts
        # cold pairs, streamed and CPU chunk-experts, then tokens per cold-position mask
        counts = torch.zeros(3 + (1 << K), dtype=torch.int64)
        expected_masks = [0] * (1 << K)
        gen = torch.Generator().manual_seed(5)
        expected_pairs = expected_streamed = expected_on_cpu = 0
        C = layer.chunks
        waited_before = pool.queue_s + pool.routing_wait_s
        cpu_kernels.async_trace()  # drops earlier jobs
        on_cpu_per_job = []
        for tokens, first in ((1, (0, 0)), (2, (2, 2)), (5, (0, 1)), (13, (1, 0)), (3, (C, C)), (4, (C, 1))):
            x_buf = torch.zeros(tokens, H, dtype=torch.bfloat16)
            slots_buf = torch.full((tokens, K), -1, dtype=torch.int32)
            wts_buf = torch.zeros(tokens, K)
            job = pool.submit_routed(x_buf, layer.w13_cpu_chunks, layer.w2_cpu_chunks, slots_buf, wts_buf,
                                     layer.chunks, counts, first_chunks=first)
            assert job is not None and mark.marked[-1] == job.seq
            time.sleep(0.02)
            assert int(signal.word) != job.seq, "the job ran before its routing landed"
            # the "copy" lands: routing of this step, with some pairs on the GPU (-1)
            logits = torch.randn(tokens, E, generator=gen)
            weights, ids = reference.route(logits, K)
            slots = layer.cpu_slot_of_host[ids]
            x = torch.randn(tokens, H, generator=gen).to(torch.bfloat16)
            x_buf.copy_(x)
            slots_buf.copy_(slots)
            wts_buf.copy_(weights)
            mark.land()
            got = job.result().clone()
            assert int(signal.word) == job.seq
            expected_pairs += int((slots >= 0).sum())
            # the GPU streams chunks below first[k] of each cold pair, each chunk-expert once
            expected_streamed += len({int(s) * C + c for row in slots for k, s in enumerate(row)
                                      if s >= 0 for c in range(first[k])})
            on_cpu_per_job.append(len({int(s) * C + c for row in slots for k, s in enumerate(row)
                                       if s >= 0 for c in range(first[k], C)}))
            expected_on_cpu += on_cpu_per_job[-1]
            for row in slots.tolist():
                expected_masks[sum(1 << k for k, slot in enumerate(row) if slot >= 0)] += 1
            assert counts.tolist() == [expected_pairs, expected_streamed, expected_on_cpu, *expected_masks]
            # the chunks below first[k] are the GPU's: the engine thread's chunk ids without them
            ids_c, wts_c = layer.cpu_chunk_ids(slots, weights)  # [T, K*C]
            gpu_side = torch.arange(C) < torch.tensor(first).view(K, 1)  # [K, C]
            ids_c = ids_c.view(tokens, K, C).masked_fill(gpu_side, -1).view(tokens, K * C)
            want = torch.zeros(tokens, H)
            cpu_kernels.moe_forward(x, layer.w13_cpu_chunks, layer.w2_cpu_chunks, ids_c, wts_c, want)
            assert torch.equal(got, want)
        # each job above waited >= 20 ms for its routing (the sleep), in the queue or, once its
        # thread took it, for the word: the latter is routing_wait_s, not queue_s
        assert pool.queue_s + pool.routing_wait_s - waited_before >= 6 * 0.02 and pool.routing_wait_s > 0
        # the job trace: each job's CPU chunk-experts, and its wait for the routing after being picked
        trace = cpu_kernels.async_trace()
        assert [job[4] for job in trace] == on_cpu_per_job
        assert all(picked <= started <= done for _, started, done, picked, _ in trace)
        waited = sum(started - picked for _, started, _, picked, _ in trace) * 1e-9
        assert waited <= pool.routing_wait_s + 1e-6
        # every pair on the GPU: nothing to compute, the job still signals with a zero result
        slots_buf.fill_(-1)
        job = pool.submit_routed(x_buf, layer.w13_cpu_chunks, layer.w2_cpu_chunks, slots_buf, wts_buf,
                                 layer.chunks, counts)
        mark.land()
        expected_masks[0] += slots_buf.shape[0]
        assert not job.result().any()
        assert counts.tolist() == [expected_pairs, expected_streamed, expected_on_cpu, *expected_masks]
        assert 0 < expected_masks[0] < sum(expected_masks) and expected_masks[(1 << K) - 1] > 0
        # three counts: the same sums, no masks
        three = torch.zeros(3, dtype=torch.int64)
        slots_buf[0, 0] = 1
        job = pool.submit_routed(x_buf, layer.w13_cpu_chunks, layer.w2_cpu_chunks, slots_buf, wts_buf,
                                 layer.chunks, three)
        mark.land()
        job.result()
        assert three.tolist() == [1, 0, C]
        with pytest.raises(RuntimeError, match="counts"):
            pool.submit_routed(x_buf, layer.w13_cpu_chunks, layer.w2_cpu_chunks, slots_buf, wts_buf,
                               layer.chunks, torch.zeros(4, dtype=torch.int64))
        # a mark past the job's number releases it too (the compare is cyclic, like the GPU's)
        job = pool.submit_routed(x_buf, layer.w13_cpu_chunks, layer.w2_cpu_chunks, slots_buf, wts_buf,
                                 layer.chunks, counts)
        mark.word.fill_(job.seq + 3)
        job.result()
        # a routing that never lands: shutdown cancels the wait, the job signals and reports
        mark.word.fill_(job.seq)
        stuck = pool.submit_routed(x_buf, layer.w13_cpu_chunks, layer.w2_cpu_chunks, slots_buf, wts_buf,
                                   layer.chunks, counts)
        time.sleep(0.01)
        assert int(signal.word) != stuck.seq
    finally:
        pool.shutdown()
    assert int(signal.word) == stuck.seq
    assert "cancelled" in cpu_kernels.async_take_error()


def test_dummy_init_is_placement_independent():
    a, _, _ = make_layer(PLACEMENTS["mixed"], torch.bfloat16)
    b, _, _ = make_layer(PLACEMENTS["one_gpu"], torch.bfloat16)
    a.init_random(seed=7)
    b.init_random(seed=7)
    for e in range(E):
        for wa, wb in zip(a.expert_weights(e), b.expert_weights(e)):
            assert torch.equal(wa, wb) and wa.abs().max() <= 1e-3 and wa.abs().max() > 0


@pytest.mark.parametrize("inter,chunks", [(14336, 8), (160, 2), (192, 4), (96, 2), (48, 1), (100, 1), (64, 2)])
def test_expert_chunks(inter, chunks):
    from vllm_fiddler.moe.layer import expert_chunks

    assert expert_chunks(inter) == chunks


def test_chunked_host_layout_round_trips():
    """Host experts are stored in chunks; the plain layout comes back bit for bit."""
    layer, w13, w2 = make_layer(PLACEMENTS["mixed"], torch.bfloat16)
    for e in layer.cpu_experts:
        a13, a2 = layer.expert_weights(e)
        assert torch.equal(a13, w13[e]) and torch.equal(a2, w2[e])
    # chunk c of a host expert is itself an expert: gate rows, up rows, down columns of chunk c
    slot, e = 1, layer.cpu_experts[1]
    Ic = I // layer.chunks
    for c in range(layer.chunks):
        chunk13, chunk2 = layer.w13_cpu_chunks[slot * layer.chunks + c], layer.w2_cpu_chunks[slot * layer.chunks + c]
        assert torch.equal(chunk13[:Ic], w13[e, c * Ic:(c + 1) * Ic])
        assert torch.equal(chunk13[Ic:], w13[e, I + c * Ic:I + (c + 1) * Ic])
        assert torch.equal(chunk2, w2[e, :, c * Ic:(c + 1) * Ic])


@pytest.mark.parametrize("gpu_chunks", [0, 1, 2])
@pytest.mark.parametrize("tokens", [1, 9])
def test_split_expert_parts_add_up(gpu_chunks, tokens):
    """An expert cut in two: the CPU computes its chunks from `gpu_chunks` on (cpu_chunk_ids), the
    rest runs as staged chunk-experts (what the GPU computes after a partial copy); the sum is
    the oracle's."""
    from vllm_fiddler.kernels.torch_moe import moe_forward
    from vllm_fiddler.runtime.cpu_experts import cpu_moe_forward

    layer, w13, w2 = make_layer(PLACEMENTS["all_cpu"], torch.float32)
    C = layer.chunks
    gen = torch.Generator().manual_seed(tokens)
    x, logits = torch.randn(tokens, H, generator=gen), torch.randn(tokens, E, generator=gen)
    weights, ids = reference.route(logits, K)
    split = int(ids[0, 0])  # the expert cut in two; all_cpu: host slot == expert id
    cpu_ids = layer.cpu_slot_of[ids]
    first = torch.zeros(E, dtype=cpu_ids.dtype)
    first[split] = gpu_chunks
    acc = torch.zeros(tokens, H)
    cpu_moe_forward(x, layer.w13_cpu_chunks, layer.w2_cpu_chunks, *layer.cpu_chunk_ids(cpu_ids, weights, first), acc)
    staged = torch.arange(gpu_chunks) + split * C  # the split expert's first chunks, as experts
    part_ids = torch.where((ids == split).unsqueeze(-1), staged, -1).view(tokens, K * gpu_chunks)
    part_w = weights.unsqueeze(-1).expand(tokens, K, gpu_chunks).reshape(tokens, K * gpu_chunks)
    if gpu_chunks:
        moe_forward(x, layer.w13_cpu_chunks, layer.w2_cpu_chunks, part_ids, part_w, acc)
    ref = reference.moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(acc, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the copy path)")
@pytest.mark.parametrize("plan", ["none", "whole", "split", "whole+split", "more_than_slots"])
@pytest.mark.parametrize("tokens", [1, 40])
def test_cuda_copy_and_split_paths_match_oracle(monkeypatch, plan, tokens):
    """HybridMoE on CUDA with the planner forced: whole copies, a split expert, more copies than
    staging slots (slots reused within the step); against the fp32 oracle."""
    from vllm_fiddler.moe import layer as hybrid_moe
    from vllm_fiddler.runtime.weight_stager import WeightStager

    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(tokens)
    w1, w3, w2 = random_experts(gen)
    runtime = CPUExpertRuntime(num_threads=2, inline=False, pin_memory=True)
    layer = HybridMoE(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, gpu_experts=(0, 3),
                      dtype=dtype, device=torch.device("cuda"), cpu_runtime=runtime, pin_memory=True)
    load_experts(layer, w1, w3, w2)
    layer.stager = WeightStager(2, H, I, layer.chunks, dtype, torch.device("cuda"))
    C = layer.chunks

    class ForcedPlanner:
        def plan_counts(self, token_counts, chunks, hot_tokens=0):
            hit = sorted(token_counts)
            forced = {"none": [], "whole": [(s, C) for s in hit[:1]], "split": [(s, 1) for s in hit[:1]],
                      "whole+split": [(s, C) for s in hit[:1]] + [(s, 1) for s in hit[1:2]],
                      "more_than_slots": [(s, C) for s in hit[:3]] + [(s, 1) for s in hit[3:4]]}[plan]
            return forced

    monkeypatch.setattr(hybrid_moe, "get_step_planner", lambda layer: ForcedPlanner())
    try:
        x = torch.randn(tokens, H, generator=gen).to(dtype)
        logits = torch.randn(tokens, E, generator=gen)
        logits[:, 0] = logits[:, 3] = -9.0  # every pair cold: the copy paths see all of them
        out = routed(layer, x.cuda(), logits.cuda()).cpu()
        weights, ids = reference.route(logits, K)
        w13 = torch.cat([w1, w3], dim=1).to(dtype)
        ref = reference.moe(x, w13, w2.to(dtype), weights, ids)
        scale = ref.abs().max().item()
        torch.testing.assert_close(out.float(), ref, atol=TOLERANCE[dtype] * scale, rtol=TOLERANCE[dtype])
    finally:
        runtime.shutdown()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the copy path)")
def test_cuda_split_sizes_share_compiled_kernels(monkeypatch):
    """Every split size n (the first n of C chunks copied) launches the same kernel variants,
    which warm_up_kernels compiles at load: no step compiles, and each n matches the oracle."""
    from vllm_fiddler.kernels.triton import compiled_variants
    from vllm_fiddler.moe import layer as hybrid_moe
    from vllm_fiddler.runtime.kernel_warmup import warm_up_kernels
    from vllm_fiddler.runtime.weight_stager import WeightStager

    dtype, inter, tokens = torch.bfloat16, 256, 24  # 8 chunks of 32 rows
    gen = torch.Generator().manual_seed(5)
    w1 = torch.randn(E, inter, H, generator=gen) * H**-0.5
    w3 = torch.randn(E, inter, H, generator=gen) * H**-0.5
    w2 = torch.randn(E, H, inter, generator=gen) * inter**-0.5
    runtime = CPUExpertRuntime(num_threads=2, inline=False, pin_memory=True)
    layer = HybridMoE(num_experts=E, top_k=K, hidden_size=H, intermediate_size=inter, gpu_experts=(0, 3),
                      dtype=dtype, device=torch.device("cuda"), cpu_runtime=runtime, pin_memory=True)
    load_experts(layer, w1, w3, w2)
    C = layer.chunks
    assert C == 8
    layer.stager = WeightStager(2, H, inter, C, dtype, torch.device("cuda"))
    split = {"n": 1}

    class ForcedPlanner:
        def plan_counts(self, token_counts, chunks, hot_tokens=0):
            return [(min(token_counts), split["n"])]

    monkeypatch.setattr(hybrid_moe, "get_step_planner", lambda layer: ForcedPlanner())
    try:
        warm_up_kernels([layer], layer.stager, max_tokens=tokens)
        before = compiled_variants()
        w13 = torch.cat([w1, w3], dim=1).to(dtype)
        for n in range(1, C + 1):
            split["n"] = n
            x = torch.randn(tokens, H, generator=gen).to(dtype)
            logits = torch.randn(tokens, E, generator=gen)
            out = routed(layer, x.cuda(), logits.cuda()).cpu()
            weights, ids = reference.route(logits, K)
            ref = reference.moe(x, w13, w2.to(dtype), weights, ids)
            scale = ref.abs().max().item()
            torch.testing.assert_close(out.float(), ref, atol=TOLERANCE[dtype] * scale, rtol=TOLERANCE[dtype])
        torch.cuda.synchronize()
        assert compiled_variants() == before, "a split size compiled a kernel variant of its own"
    finally:
        runtime.shutdown()


@pytest.mark.parametrize("beams", [4, 8, 16])
def test_beams_batch_into_one_call_per_cold_expert(monkeypatch, beams):
    """Beam search: the beams of one request mostly pick the same experts. Their tokens reach
    the CPU in one call per layer-step (each cold expert's weights read once for all beams),
    and the copy planner sees each cold expert's summed token count, so a cold expert that
    all beams hit is priced as one expert with `beams` tokens (where a copy can pay), not
    `beams` experts with one token each."""
    from vllm_fiddler.cost_model import default_for_shape, plan_cold_chunks
    from vllm_fiddler.runtime.step_planner import StepPlanner

    layer, w13, w2 = make_layer(PLACEMENTS["mixed"], torch.float32)  # 0, 3, 5 on the "GPU"
    calls = []
    original_submit = layer.cpu_runtime.submit

    def spy_submit(x, w13_, w2_, ids, weights, **kw):
        calls.append(ids.clone())
        return original_submit(x, w13_, w2_, ids, weights, **kw)

    monkeypatch.setattr(layer.cpu_runtime, "submit", spy_submit)
    x = torch.randn(beams, H)
    logits = torch.full((beams, E), -5.0)
    logits[:, 6] = 4.0  # every beam: cold expert 6 ...
    logits[:, 1] = 3.0  # ... and cold expert 1
    logits[0, 7] = 9.0  # one beam strays to 7 instead of 1
    check(layer, w13, w2, x, logits, torch.float32)
    assert len(calls) == 1  # one CPU call for the layer-step, all beams in it
    C = layer.chunks
    slot6 = layer.cpu_experts.index(6)
    assert int((calls[0] // C == slot6).sum()) == beams * C  # expert 6's chunks once per beam, one call

    cost = default_for_shape(H, I, 4)
    planner = StepPlanner(cost, max_copies=None)
    cpu_ids = layer.cpu_slot_of_host[reference.route(logits, K)[1]]
    got = planner.plan_counts(cold_token_counts(cpu_ids, layer.num_host_slots), C)
    slot1, slot7 = layer.cpu_experts.index(1), layer.cpu_experts.index(7)
    want = plan_cold_chunks({slot6: beams, slot1: beams - 1, slot7: 1}, cost, C, gpu_busy_ms=0.0, max_copies=None)
    assert got == [(s, want.on_gpu(s)) for s in want.copy]


def test_step_planner_remembers_plans_and_still_counts(monkeypatch):
    """A repeated step's plan comes from the planner's memo: the same copies as planning anew,
    a list the caller may change, the copy and split counters advanced every time, and the
    memo emptied when full."""
    from vllm_fiddler.cost_model import default_for_shape, plan_cold_chunks
    from vllm_fiddler.runtime import step_planner
    from vllm_fiddler.runtime.step_planner import StepPlanner

    cost = default_for_shape(H, I, 4)
    planner = StepPlanner(cost, max_copies=None)
    counts = {3: 4096, 9: 4000}  # enough tokens that copying pays: one whole copy and a split
    want = plan_cold_chunks(counts, cost, 8)
    assert want.copy, "the test needs a plan that copies"
    first = planner.plan_counts(counts, 8)
    assert first == [(s, want.on_gpu(s)) for s in want.copy]
    first.clear()  # the caller's list, not the memo's
    again = planner.plan_counts(dict(reversed(counts.items())), 8)
    assert again == [(s, want.on_gpu(s)) for s in want.copy]
    assert planner.copies == 2 * len(want.whole.copy) and planner.splits == 2 * (want.split is not None)
    monkeypatch.setattr(step_planner, "MEMO_ENTRIES", 2)
    for n in range(1, 6):
        planner.plan_counts({1: n}, 8)
        assert len(planner._memo) <= 2


def test_routed_steps_decide_their_streamed_chunks_from_the_pairs_the_host_served(monkeypatch):
    """The streamed cut (cost_model.streamed_chunks) takes each top-k position's chance of a
    cold expert from the layer's own (token, k) pairs since its last decision: at the first,
    the share of experts on the host, whatever ran before; with too few since, that share
    again; with none on the host, nothing streamed."""
    import dataclasses
    import types

    from vllm_fiddler import cost_model as cm
    from vllm_fiddler.moe import layer as hybrid_moe

    layer, _, _ = make_layer(PLACEMENTS["mixed"], torch.float32)  # 5 of 8 experts on the host
    # CPU 2.5 ms an expert, 6.5 ms to read it over PCIe: one of the 2 chunks of the first
    # position's expert streamed while both positions are mostly cold, none at a 30% share
    cost = dataclasses.replace(cm.CostModel(cpu_points=((1, 2.5),), h2d_gb_s=1.0, copy_latency_ms=0.0,
                                            expert_bytes=6_500_000, gpu_points=((1, 0.1),)),
                               cpu_contended_slowdown=1.1, h2d_contended_slowdown=1.1)
    monkeypatch.setattr(hybrid_moe, "get_step_planner", lambda layer: types.SimpleNamespace(cost=cost))
    layer.stager, layer.host_views = object(), (None, None)  # only their presence matters here
    C, resident_share = layer.chunks, len(layer.cpu_experts) / E

    def decide(to_cpu=0, to_gpu=0):
        layer._to_cpu += to_cpu
        layer._to_gpu += to_gpu
        layer._decide_streamed_chunks()
        return layer._streamed_decision["cold_share"], layer.routed_gpu_chunks

    layer._to_cpu += 100  # before the first decision (vLLM's profiling run, say): not gone by
    assert decide() == (resident_share, cm.streamed_chunks(cost, C, K, cold_share=resident_share)) == (0.625, (1, 0))
    assert decide(30, 70) == (0.3, cm.streamed_chunks(cost, C, K, cold_share=0.3)) == (0.3, (0, 0))
    assert decide(10, 0) == (resident_share, (1, 0))  # 10 pairs: too few to go by
    assert decide(0, 100)[1] == (0, 0)  # the host served none
    assert layer._streamed_decision["steps"] == 0
    layer.host_views = None  # no host views: the GPU cannot stream
    assert decide(100, 0) == (1.0, (0, 0))


def test_routed_steps_price_their_streamed_chunks_over_the_tokens_cold_patterns(monkeypatch):
    """With enough routed tokens since the last decision, the cut is priced over how those
    tokens had their top-k positions on the host (the native jobs' mask counts), not over
    independent positions at the share: exactly one cold expert a token on a slow CPU streams
    (2, 2) where a 50% share independently would take (3, 2). Too few routed tokens: the pairs'
    share, as before."""
    import dataclasses
    import types

    from vllm_fiddler import cost_model as cm
    from vllm_fiddler.moe import layer as hybrid_moe

    layer, _, _ = make_layer(PLACEMENTS["mixed"], torch.float32)
    assert layer.routed_cold_patterns == [0] * (1 << K)
    # CPU 3.3 ms an expert, in-place reads 7.12 ms, contention 1.22x / 1.25x: a slow host
    slow = dataclasses.replace(cm.CostModel(cpu_points=((1, 3.3),), h2d_gb_s=1.0, copy_latency_ms=0.0,
                                            expert_bytes=6_500_000, gpu_points=((1, 0.1),)),
                               cpu_contended_slowdown=1.22, h2d_contended_slowdown=1.25,
                               stream_gb_s=6.5 / 7.12)
    monkeypatch.setattr(hybrid_moe, "get_step_planner", lambda layer: types.SimpleNamespace(cost=slow))
    layer.stager, layer.host_views = object(), (None, None)
    C = layer.chunks = 8  # the cut's grain as Mixtral's (the test layer's weights are not read)

    def routed(masks, pairs_cold=None):
        """`masks` routed tokens' cold-position masks, counted as the native jobs count them."""
        for mask in masks:
            layer._routed_counts[3 + mask] += 1
            cold = bin(mask).count("1")
            layer._routed_counts[0] += cold
            layer._routed_pairs += K
        layer._decide_streamed_chunks()
        return layer.routed_gpu_chunks

    routed([])  # the first decision: the share of experts on the host
    assert layer.streamed_cold_patterns is None
    assert routed([0b01, 0b10] * 20) == (2, 2) == cm.streamed_chunks(slow, C, K, cold_patterns=[0, 20, 20, 0])
    assert layer.streamed_cold_share == 0.5 and layer.streamed_cold_patterns == [0.0, 0.5, 0.5, 0.0]
    assert cm.streamed_chunks(slow, C, K, cold_share=0.5) == (3, 2)  # what independence would stream
    assert routed([0b11] * 40) == cm.streamed_chunks(slow, C, K, cold_patterns=[0, 0, 0, 1])  # only since the last
    assert layer.streamed_cold_share == 1.0
    # 10 routed tokens (20 pairs) since: too few to price patterns over; the pairs' share (with
    # 100 more host pairs from a prefill, say) instead
    layer._to_cpu += 100
    routed([0b01] * 10)
    assert layer.streamed_cold_patterns is None and layer.streamed_cold_share == pytest.approx(110 / 120)


@pytest.mark.parametrize("tokens", [1, 2, 5, 16])
@pytest.mark.parametrize("copy_gb_s", [1e-3, 0.05, 1e3])  # never copy / some / copy all
def test_small_step_host_plan_matches_tensor_path(monkeypatch, tokens, copy_gb_s):
    """Decode-sized steps plan their cold work in plain Python (SMALL_STEP_PAIRS); it must give
    the tensor path's pair count, copies and CPU chunk ids exactly, whole and split plans alike."""
    import dataclasses

    from vllm_fiddler.cost_model import default_for_shape
    from vllm_fiddler.moe import layer as hybrid_moe
    from vllm_fiddler.runtime.cpu_experts import HostBuffers
    from vllm_fiddler.runtime.step_planner import StepPlanner

    layer, _, _ = make_layer(PLACEMENTS["mixed"], torch.float32)
    cost = dataclasses.replace(default_for_shape(H, I, 4), h2d_gb_s=copy_gb_s)
    monkeypatch.setattr(hybrid_moe, "get_step_planner", lambda layer: StepPlanner(cost, max_copies=None))
    layer.stager = object()  # only its presence matters to the planning
    gen = torch.Generator().manual_seed(tokens)
    for trial in range(20):
        ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(tokens)]).to(torch.int32)
        host = HostBuffers(x=torch.empty(tokens, H), ids=ids, weights=torch.rand(tokens, K, generator=gen))
        assert tokens * K <= synced.SMALL_STEP_PAIRS
        read_before = layer.cpu_weight_bytes
        small = layer._plan_cold(host)
        read_small = layer.cpu_weight_bytes
        monkeypatch.setattr(synced, "SMALL_STEP_PAIRS", 0)
        tensor = layer._plan_cold(host)
        monkeypatch.undo()
        # both count the distinct chunk-experts they hand the CPU (none when it gets nothing)
        given = 0 if small[2] is None else small[2][0][small[2][0] >= 0].unique().numel()
        assert read_small - read_before == layer.cpu_weight_bytes - read_small == given * layer.chunk_bytes
        monkeypatch.setattr(hybrid_moe, "get_step_planner", lambda layer: StepPlanner(cost, max_copies=None))
        assert small[:2] == tensor[:2]
        assert (small[2] is None) == (tensor[2] is None)
        if small[2] is not None:
            assert small[2][0].dtype == tensor[2][0].dtype == torch.int32  # what the CPU kernel takes
            assert torch.equal(small[2][0], tensor[2][0])
            assert torch.equal(small[2][1], tensor[2][1])
    assert layer.routed_to_cpu + layer.routed_to_gpu == 2 * 20 * tokens * K  # both paths counted


def test_small_chunk_ids_matches_tensor_version():
    from vllm_fiddler.moe.steps.synced import small_chunk_ids

    layer, _, _ = make_layer(PLACEMENTS["mixed"], torch.float32)
    C = layer.chunks
    cpu_ids = torch.tensor([[0, -1], [2, 4], [-1, -1], [4, 0]])
    weights = torch.rand(4, K)
    for first in ({}, {0: 3}, {4: C, 2: 1}, {0: C, 2: C, 4: C}):
        table = torch.zeros(layer.num_host_slots, dtype=cpu_ids.dtype)
        for slot, n in first.items():
            table[slot] = n
        ids, w = layer.cpu_chunk_ids(cpu_ids, weights, table)
        got_ids, got_w = small_chunk_ids(cpu_ids.tolist(), weights.tolist(), C, first)
        assert got_ids.dtype == torch.int32 and torch.equal(got_ids.long(), ids) and torch.equal(got_w, w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the host-time counters)")
def test_cuda_gap_counters_time_the_work_between_ops(monkeypatch):
    """gap_before_s: host time from the previous MoE op's end (any layer's) to this op's start,
    so the first layer's counts the step's edge and the others' their attention; a gap longer
    than IDLE_GAP_S is idle time and is not counted."""
    import time

    from vllm_fiddler.moe import layer as hybrid_moe

    monkeypatch.setattr(hybrid_moe, "IDLE_GAP_S", 0.2)
    monkeypatch.setattr(HybridMoE, "_last_op_end", None)
    runtime = CPUExpertRuntime(num_threads=2, inline=False, pin_memory=True)
    try:
        first, second = (HybridMoE(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I,
                                   gpu_experts=(0, 3), dtype=torch.bfloat16, device=torch.device("cuda"),
                                   cpu_runtime=runtime, pin_memory=True) for _ in range(2))
        x = torch.randn(3, H, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(3, E, device="cuda")
        routed(first, x, logits)  # nothing before it: no gap
        time.sleep(0.05)  # "attention"
        routed(second, x, logits)
        assert first.gap_before_s == 0.0
        assert 0.05 <= second.gap_before_s < 0.2
        time.sleep(0.25)  # idle: longer than IDLE_GAP_S
        routed(first, x, logits)
        assert first.gap_before_s == 0.0
        time.sleep(0.02)  # the next step's edge
        routed(first, x, logits)
        assert 0.02 <= first.gap_before_s < 0.2
        assert first.op_s > 0 and second.op_s > 0
    finally:
        runtime.shutdown()


def test_trace_op_writes_the_engine_trace(tmp_path, monkeypatch):
    """FIDDLER_TRACE_DIR's writer: every TRACE_FLUSH_OPS ops, a JSON file of the ops (layers
    numbered by first appearance) and the CPU jobs done meanwhile, which
    benchmarks/investigations/engine_trace.py loads."""
    import os
    import types

    from conftest import load_benchmark

    monkeypatch.setattr(trace, "TRACE_DIR", str(tmp_path))
    monkeypatch.setattr(trace, "TRACE_FLUSH_OPS", 3)
    monkeypatch.setattr(trace, "OP_TRACE", [])
    monkeypatch.setattr(trace, "_trace_layers", {})
    layers = [types.SimpleNamespace(chunk_bytes=64, cpu_runtime=types.SimpleNamespace(num_threads=5))
              for _ in range(2)]
    for step in range(3):  # 6 ops: two files
        for layer in layers:
            t = time.perf_counter()
            trace.trace_op(layer, t, None, None, t)
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and trace.OP_TRACE == []
    loaded = load_benchmark("investigations/engine_trace").load(str(tmp_path))
    assert [op[0] for op in loaded["ops"]] == [0, 1] * 3
    assert loaded["chunk_bytes"] == 64 and loaded["cpu_threads"] == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("placement", ["all_gpu", "all_cpu", "mixed"])
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_gpt_oss_experts_match_oracle(tokens, placement, dtype):
    """gpt-oss's experts: clamped SwiGLU (alpha 1.702, limit 7) with per-expert biases, loaded as
    vLLM hands them over (w13 and b13 with gate and up interleaved, all experts at once). Biases
    scaled so the clamp bites; b2 counts once per expert although host experts are chunked."""
    math = reference.ExpertMath(activation="swigluoai", has_bias=True)
    gen = torch.Generator().manual_seed(tokens)
    w1, w3, w2 = random_experts(gen)
    b1, b3, b2 = (torch.randn(E, n, generator=gen) * 4 for n in (I, I, H))
    layer = HybridMoE(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I,
                      gpu_experts=PLACEMENTS[placement], dtype=dtype, device=torch.device("cpu"),
                      cpu_runtime=CPUExpertRuntime(num_threads=1, inline=True), pin_memory=False, math=math)
    assert layer.chunks > 1
    interleave = lambda g, u: torch.stack([g, u], dim=2).flatten(1, 2)  # [E, 2I, ...] gate, up, gate, ...
    for e in range(E):
        layer.load_expert(e, "w13", interleave(w1, w3)[e])
        layer.load_expert(e, "b13", interleave(b1.unsqueeze(-1), b3.unsqueeze(-1))[e].squeeze(-1))
        layer.load_expert(e, "w2", w2[e])
        layer.load_expert(e, "b2", b2[e])
    x = torch.randn(tokens, H, generator=gen).to(dtype)
    logits = torch.randn(tokens, E, generator=gen)
    out = routed(layer, x, logits)
    weights, ids = reference.route(logits, K)
    ref = reference.moe(x, torch.cat([w1, w3], dim=1).to(dtype), w2.to(dtype), weights, ids, math,
                        torch.cat([b1, b3], dim=1).to(dtype), b2.to(dtype))
    scale = ref.abs().max().item()
    torch.testing.assert_close(out.float(), ref, atol=TOLERANCE[dtype] * scale, rtol=TOLERANCE[dtype])


def test_swigluoai_clamps_as_vllm_does():
    """The oracle's activation against vLLM's own reference for gpt-oss (interleaved input)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.activation import SwigluOAIAndMul

    with set_current_vllm_config(VllmConfig()):
        vllm_act = SwigluOAIAndMul()  # alpha 1.702, limit 7, as gpt-oss's layers build it
    gate_up = torch.randn(5, 2 * 16) * 6  # past the clamp at 7
    interleaved = torch.stack([gate_up[:, :16], gate_up[:, 16:]], dim=2).flatten(1)
    ours = reference.ExpertMath(activation="swigluoai", has_bias=True).act(gate_up)
    torch.testing.assert_close(ours, vllm_act.forward_native(interleaved))


def test_quantized_host_experts_in_torch_say_so_once(monkeypatch):
    """Host experts the native kernels do not take (here x in fp32) dequantize in torch, two
    orders of magnitude slower: one warning per format says so and why, the result is still
    right."""
    from vllm_fiddler.kernels import quant
    from vllm_fiddler.runtime import cpu_experts

    gen = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(2, 128, 64, generator=gen), torch.randn(2, 64, 64, generator=gen)
    (b13, e13), (b2, e2) = quant.quant_mxfp4(w13), quant.quant_mxfp4(w2)
    make = lambda b, e: quant.QuantizedExperts("mxfp4", {"blocks": b, "scales": e}, block=(1, 32))  # noqa: E731
    q13, q2 = make(b13, e13), make(b2, e2)
    warnings = []
    monkeypatch.setattr(cpu_experts, "_warned_torch_formats", set())
    monkeypatch.setattr(cpu_experts.logger, "warning", lambda msg, *args: warnings.append(msg % args))
    x = torch.randn(3, 64, generator=gen)  # fp32: not what the native kernels take
    ids, weights = torch.tensor([[0], [1], [-1]]), torch.ones(3, 1)
    for _ in range(2):
        out = torch.zeros(3, 64)
        cpu_experts.cpu_moe_forward(x, q13, q2, ids, weights, out)
    ref = reference.moe(x, quant.dequant_mxfp4(b13, e13), quant.dequant_mxfp4(b2, e2), weights * (ids >= 0),
                        ids.clamp(min=0))
    # torch's path multiplies in the experts' dtype (bf16): ~2^-8 relative per operand
    torch.testing.assert_close(out, ref, atol=2e-2 * ref.abs().max().item(), rtol=0)
    assert len(warnings) == 1 and "mxfp4 experts dequantize in torch" in warnings[0] and "float32" in warnings[0]
