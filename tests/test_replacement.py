"""Online re-placement on the CPU platform: HybridMoE's swap and the ExpertReplacer driving it.

Correctness: every forward, before, during (copy in flight: both experts
served from the host) and after swaps, matches the fp32 oracle with the
tolerances of tests/test_hybrid_moe.py. Policy behaviour (planted hot
experts get admitted; uniform routing does not thrash; warm-up routing is not
evidence; copies in flight are bounded and a swap lands only once its copy
has) is checked through the real runtime object, with a fake copy event
standing in for CUDA's.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from test_hybrid_moe import E, H, I, K, check, load_experts, make_layer, random_experts, routed
from vllm_fiddler.config import AdaptationSettings
from vllm_fiddler.moe.layer import HybridMoE
from vllm_fiddler.runtime.cpu_experts import CPUExpertRuntime
from vllm_fiddler.runtime.replacer import ExpertReplacer


def make_backed_layer(gpu_experts, dtype=torch.float32, seed=0, host_backing=True):
    return make_layer(gpu_experts, dtype, seed=seed, host_backing=host_backing)


def biased_logits(tokens: int, hot: tuple[int, ...], gen: torch.Generator, bias: float = 3.0) -> torch.Tensor:
    logits = torch.randn(tokens, E, generator=gen)
    logits[:, list(hot)] += bias
    return logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_swap_keeps_every_step_exact(dtype):
    layer, w13, w2 = make_backed_layer((0, 3, 5), dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, H, generator=gen).to(dtype)
    logits = torch.randn(40, E, generator=gen).to(dtype)
    check(layer, w13, w2, x, logits, dtype)
    slot, ready = layer.begin_swap(evict=3, admit=6)
    assert ready is None and layer.gpu_experts == (0, 5) and 3 in layer.cpu_experts and 6 in layer.cpu_experts
    check(layer, w13, w2, x, logits, dtype)  # in flight: 3 and 6 both from their host copies
    layer.finish_swap(6, slot)
    assert layer.gpu_experts == (0, 5, 6) and layer.device_slot[6] == slot
    check(layer, w13, w2, x, logits, dtype)
    # the admitted expert's device copy is its plain weights, bit for bit
    torch.testing.assert_close(layer.w13_gpu[slot], w13[6], rtol=0, atol=0)
    torch.testing.assert_close(layer.w2_gpu[slot], w2[6], rtol=0, atol=0)
    # and back: the evicted expert's host copy was never touched
    slot, _ = layer.begin_swap(evict=6, admit=3)
    layer.finish_swap(3, slot)
    assert layer.gpu_experts == (0, 3, 5)
    check(layer, w13, w2, x, logits, dtype)


def test_host_backing_holds_every_expert():
    layer, w13, w2 = make_backed_layer((1, 2))
    assert layer.w13_cpu.shape[0] == E and layer.num_host_slots == E
    for e in range(E):
        h13, h2 = layer.cold_expert_plain(layer.host_slot[e])
        torch.testing.assert_close(h13, w13[e], rtol=0, atol=0)
        torch.testing.assert_close(h2, w2[e], rtol=0, atol=0)


def test_dummy_init_host_copy_equals_device_copy():
    layer, _, _ = make_backed_layer((1, 2))
    layer.init_random(seed=7)
    for e in (1, 2):
        d13, d2 = layer.expert_weights(e)
        h13, h2 = layer.cold_expert_plain(layer.host_slot[e])
        assert torch.equal(d13, h13) and torch.equal(d2, h2)


def test_swap_errors():
    plain, _, _ = make_backed_layer((0,), host_backing=False)
    with pytest.raises(RuntimeError, match="host backing"):
        plain.begin_swap(evict=0, admit=1)
    layer, _, _ = make_backed_layer((0, 1))
    with pytest.raises(ValueError, match="device-served"):
        layer.begin_swap(evict=4, admit=5)  # 4 is not on the device
    with pytest.raises(ValueError, match="device-served"):
        layer.begin_swap(evict=0, admit=1)  # 1 already is


class FakeEvent:
    def __init__(self):
        self.done = False

    def query(self) -> bool:
        return self.done


class FakeCopier:
    """Copies at once (host memory) but reports completion only when told: a slow PCIe link."""

    def __init__(self):
        self.events: list[FakeEvent] = []

    def copy_expert(self, w13_host, w2_host, w13_dst, w2_dst):
        C, Ic = w13_host.shape[0], w2_host.shape[-1]
        w13_dst.view(2, C, Ic, -1).copy_(w13_host.view(C, 2, Ic, -1).transpose(0, 1))
        w2_dst.copy_(w2_host.transpose(0, 1).reshape(w2_dst.shape))
        self.events.append(FakeEvent())
        return self.events[-1]


FAST = AdaptationSettings(enabled=True, interval_steps=2, half_life_steps=16, horizon_steps=64,
                          cooldown_steps=8, noise_z=4.0)


def run_steps(replacer, layers, oracle, steps, tokens, hot_by_layer, gen, warm=None, bias=3.0):
    for _ in range(steps):
        for l, layer in enumerate(layers):
            logits = (biased_logits(tokens, hot_by_layer[l], gen, bias) if hot_by_layer[l]
                      else torch.randn(tokens, E, generator=gen))
            x = torch.randn(tokens, H, generator=gen)
            check(layer, *oracle[l], x, logits, torch.float32)
        replacer.on_step()


def test_planted_hot_experts_are_admitted():
    layers, oracle = [], []
    for l in range(2):
        layer, w13, w2 = make_backed_layer((0, 1), seed=l)
        layers.append(layer)
        oracle.append((w13, w2))
    replacer = ExpertReplacer(layers, FAST)
    gen = torch.Generator().manual_seed(0)
    hot = [(6, 7), (4, 5)]
    run_steps(replacer, layers, oracle, steps=80, tokens=8, hot_by_layer=hot, gen=gen)
    assert [m.gpu_experts for m in layers] == [(6, 7), (4, 5)]
    assert replacer.replacements == 4 and not replacer.in_flight
    assert replacer.bytes_copied == 4 * layers[0].expert_bytes
    # settled: more of the same routing moves nothing
    run_steps(replacer, layers, oracle, steps=40, tokens=8, hot_by_layer=hot, gen=gen)
    assert replacer.replacements == 4


def test_uniform_routing_does_not_thrash():
    layer, w13, w2 = make_backed_layer((0, 1, 2, 3))
    replacer = ExpertReplacer([layer], FAST)
    gen = torch.Generator().manual_seed(3)
    run_steps(replacer, [layer], [(w13, w2)], steps=300, tokens=4, hot_by_layer=[()], gen=gen)
    assert replacer.replacements <= 1


def test_warm_up_routing_is_not_evidence():
    """Counts added before the first real step (vLLM's dummy runs) must not move anything."""
    layer, w13, w2 = make_backed_layer((0, 1, 2, 3))
    layer.expert_tokens[7] += 10**6  # a profile run that hammered expert 7 ...
    layer.expert_heat[7] += 10**6  # ... (and the counter re-placement reads)
    replacer = ExpertReplacer([layer], FAST)
    gen = torch.Generator().manual_seed(4)
    run_steps(replacer, [layer], [(w13, w2)], steps=60, tokens=4, hot_by_layer=[()], gen=gen)
    assert 7 not in layer.gpu_experts and replacer.replacements <= 1


@pytest.mark.parametrize("count", ["step_value", "raw_tokens"])
def test_long_prompts_do_not_outweigh_decode(monkeypatch, count):
    """Expert 7 (resident) gets nearly every token of a 512-token prompt every 32 steps; host
    expert 6 gets every decode token in between. Raw tokens rate 7 at ~16 a step against 6's
    ~1, but residency saves far more on 6: each decode hit of a cold expert costs a CPU read
    of its weights, while the prompt's hundreds of tokens on 7 would cost at most one copy.
    Counting steps by adaptation.step_value_table swaps 7 for 6; raw tokens (the control)
    keep 7."""
    from vllm_fiddler import adaptation

    if count == "raw_tokens":
        monkeypatch.setattr(adaptation, "step_value_table",
                            lambda cpu_ms, gpu_ms, copy_ms, n: tuple(float(i) for i in range(n + 1)))
    layer, w13, w2 = make_backed_layer((7,))
    settings = AdaptationSettings(enabled=True, interval_steps=2, half_life_steps=64, horizon_steps=256,
                                  cooldown_steps=8, noise_z=4.0)
    replacer = ExpertReplacer([layer], settings)
    gen = torch.Generator().manual_seed(5)
    # the first real step's counts are the baseline, not evidence: start with a decode step
    run_steps(replacer, [layer], [(w13, w2)], steps=1, tokens=1, hot_by_layer=[(6,)], gen=gen, bias=12.0)
    for _ in range(8):
        run_steps(replacer, [layer], [(w13, w2)], steps=1, tokens=512, hot_by_layer=[(7,)], gen=gen, bias=12.0)
        run_steps(replacer, [layer], [(w13, w2)], steps=31, tokens=1, hot_by_layer=[(6,)], gen=gen, bias=12.0)
    if count == "step_value":
        assert layer.gpu_experts == (6,) and replacer.replacements == 1
    else:  # the prompts keep (or bring back) 7
        assert layer.gpu_experts == (7,)


def test_copies_in_flight_are_bounded_and_land_only_when_done():
    layer, w13, w2 = make_backed_layer((0, 1, 2))
    copier = FakeCopier()
    settings = dataclasses.replace(FAST, max_swaps_in_flight=1)
    replacer = ExpertReplacer([layer], settings, copier=copier)
    gen = torch.Generator().manual_seed(5)
    run_steps(replacer, [layer], [(w13, w2)], steps=40, tokens=8, hot_by_layer=[(5, 6, 7)], gen=gen)
    assert len(copier.events) == 1 and len(replacer.in_flight) == 1  # one copy, never landed
    f = replacer.in_flight[0]
    assert f.admit in (5, 6, 7) and f.admit not in layer.gpu_experts and len(layer.gpu_experts) == 2
    copier.events[0].done = True
    run_steps(replacer, [layer], [(w13, w2)], steps=1, tokens=8, hot_by_layer=[(5, 6, 7)], gen=gen)
    assert f.admit in layer.gpu_experts and replacer.replacements == 1
    for _ in range(60):  # the rest, one copy at a time
        for ev in copier.events:
            ev.done = True
        run_steps(replacer, [layer], [(w13, w2)], steps=1, tokens=8, hot_by_layer=[(5, 6, 7)], gen=gen)
        assert len(replacer.in_flight) <= 1
    assert layer.gpu_experts == (5, 6, 7) and replacer.replacements == 3


def test_first_evidence_at_once_and_a_landing_starts_the_next_copy():
    """Counters read every 16 steps, one copy at a time, 3 hot host experts. The first real step's
    snapshot is the baseline, read at the next step: the first interval of evidence ends at step
    18 (it used to take a whole interval to read the baseline: 33). Each later copy starts at the
    step its predecessor landed, not at the next read of the counters."""
    layer, w13, w2 = make_backed_layer((0, 1, 2))
    copier = FakeCopier()
    settings = AdaptationSettings(enabled=True, interval_steps=16, half_life_steps=64, horizon_steps=64,
                                  cooldown_steps=8, noise_z=2.0, max_swaps_in_flight=1)
    replacer = ExpertReplacer([layer], settings, copier=copier)
    gen = torch.Generator().manual_seed(6)
    started = []  # step at which each copy started
    for _ in range(40):
        for ev in copier.events:  # each copy lands one step after it started
            ev.done = True
        run_steps(replacer, [layer], [(w13, w2)], steps=1, tokens=8, hot_by_layer=[(5, 6, 7)], gen=gen,
                  bias=6.0)
        started += [replacer.step] * (len(copier.events) - len(started))
    assert started == [18, 19, 20]
    assert layer.gpu_experts == (5, 6, 7) and replacer.replacements == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (ExpertCopier, the copy path)")
@pytest.mark.parametrize("tokens", [1, 40])
def test_cuda_swap_with_copier_and_copy_path(monkeypatch, tokens):
    """On CUDA with host backing: the step's copy path (a whole copy and a split) indexes host slots
    by expert id, the copier's async chunked -> plain copy lands bit for bit, and every forward
    before, during and after the swap matches the oracle."""
    from test_hybrid_moe import TOLERANCE
    from vllm_fiddler.kernels import reference
    from vllm_fiddler.moe import layer as hybrid_moe
    from vllm_fiddler.runtime.replacer import ExpertCopier
    from vllm_fiddler.runtime.weight_stager import WeightStager

    dtype, cuda = torch.bfloat16, torch.device("cuda")
    gen = torch.Generator().manual_seed(tokens)
    w1, w3, w2 = random_experts(gen)
    runtime = CPUExpertRuntime(num_threads=2, inline=False, pin_memory=True)
    layer = HybridMoE(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, gpu_experts=(0, 3),
                      dtype=dtype, device=cuda, cpu_runtime=runtime, pin_memory=True, host_backing=True)
    load_experts(layer, w1, w3, w2)
    layer.stager = WeightStager(2, H, I, layer.chunks, dtype, cuda)
    C = layer.chunks

    class ForcedPlanner:  # first hit host slot copied whole, the second split
        def plan_counts(self, token_counts, chunks, hot_tokens=0):
            assert max(token_counts) < E  # host backing: host slot = expert id
            hit = sorted(token_counts)
            return [(s, C) for s in hit[:1]] + [(s, 1) for s in hit[1:2]]

    monkeypatch.setattr(hybrid_moe, "get_step_planner", lambda layer: ForcedPlanner())
    w13_ref, w2_ref = torch.cat([w1, w3], dim=1).to(dtype), w2.to(dtype)
    x = torch.randn(tokens, H, generator=gen).to(dtype)
    logits = torch.randn(tokens, E, generator=gen)
    weights, ids = reference.route(logits, K)
    ref = reference.moe(x, w13_ref, w2_ref, weights, ids)
    scale = ref.abs().max().item()

    def forward_matches():
        out = routed(layer, x.to(cuda), logits.to(cuda)).cpu()
        torch.testing.assert_close(out.float(), ref, atol=TOLERANCE[dtype] * scale, rtol=TOLERANCE[dtype])

    target = int(ids[0, 0]) if int(ids[0, 0]) not in (0, 3) else 7  # a routed host expert
    try:
        forward_matches()
        copier = ExpertCopier(H, I, C, dtype, cuda)
        slot, ready = layer.begin_swap(evict=3, admit=target, copier=copier)
        assert layer.gpu_experts == (0,) and copier.bytes_copied == layer.expert_bytes
        forward_matches()  # copy in flight: 3 and target both served from the host
        ready.synchronize()
        layer.finish_swap(target, slot)
        assert layer.gpu_experts == tuple(sorted((0, target)))
        assert torch.equal(layer.w13_gpu[slot].cpu(), w13_ref[target])
        assert torch.equal(layer.w2_gpu[slot].cpu(), w2_ref[target])
        forward_matches()
    finally:
        runtime.shutdown()


def test_heat_counts_each_step_through_the_table():
    """expert_heat adds table[min(n, last)] per expert and step once a table is set (nothing before);
    expert_tokens keeps raw tokens for profiling either way."""
    layer, w13, w2 = make_backed_layer((0, 1))
    x = torch.randn(6, H)
    logits = torch.full((6, E), -9.0)
    logits[:, 2] = 5.0  # all 6 tokens: experts 2 and 3
    logits[:, 3] = 4.0
    logits[0, 4] = 6.0  # token 0: experts 4 and 2 instead
    check(layer, w13, w2, x, logits, torch.float32)
    assert layer.expert_heat.tolist() == [0.0] * E
    layer.set_heat_table([0.0, 1.0, 1.5, 2.0])  # 3 or more tokens in a step: 2.0
    check(layer, w13, w2, x, logits, torch.float32)
    check(layer, w13, w2, x[:1], logits[:1], torch.float32)
    # step 1: 2 -> 6 tokens, 3 -> 5, 4 -> 1; step 2: 2 and 4 -> 1 token each
    assert layer.expert_heat.tolist() == [0.0, 0.0, 3.0, 2.0, 2.0, 0.0, 0.0, 0.0]
    assert layer.expert_tokens.tolist() == [0, 0, 13, 10, 3, 0, 0, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_heat_counts_on_cuda():
    """The per-step heat update on device tensors (the engine's path), all experts on the GPU."""
    w1, w3, w2 = random_experts(torch.Generator().manual_seed(9))
    layer = HybridMoE(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, gpu_experts=tuple(range(E)),
                      dtype=torch.float32, device=torch.device("cuda"),
                      cpu_runtime=CPUExpertRuntime(num_threads=1, inline=True), pin_memory=False)
    load_experts(layer, w1, w3, w2)
    layer.set_heat_table([0.0, 1.0, 1.5, 2.0])
    logits = torch.full((6, E), -9.0)
    logits[:, 2], logits[:, 3], logits[0, 4] = 5.0, 4.0, 6.0
    routed(layer, torch.randn(6, H).cuda(), logits.cuda())
    assert layer.expert_heat.cpu().tolist() == [0.0, 0.0, 2.0, 2.0, 1.0, 0.0, 0.0, 0.0]
