"""The hybrid op's GPU expert launches replayed from CUDA graphs (vllm_fiddler.runtime.moe_graphs), CUDA only.

Checked here: with graphs the op gives the eager launches' result bit for bit
(hot experts, a whole copy and a split expert, one and several staged
experts per op) at every captured token count, and matches the fp32 oracle;
token counts above the captured ones launch eagerly; after online
re-placement rewrites a device slot and the routing maps in place, the same
graphs compute the new expert.
"""

from __future__ import annotations

import pytest
import torch

from test_hybrid_moe import E, H, I, K, TOLERANCE, load_experts, random_experts, routed
from vllm_fiddler.kernels import reference
from vllm_fiddler.moe import layer as hybrid_moe
from vllm_fiddler.moe.layer import HybridMoE
from vllm_fiddler.runtime.cpu_experts import CPUExpertRuntime
from vllm_fiddler.runtime.moe_graphs import MoEGraphs
from vllm_fiddler.runtime.weight_stager import WeightStager

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

MAX_TOKENS = 4


class ForcedPlanner:
    """Copies the lowest hit cold slots whole and splits the next one (1 chunk on the GPU)."""

    def __init__(self, whole: int, split: bool):
        self.whole, self.split = whole, split

    def plan_counts(self, token_counts, chunks, hot_tokens=0):
        hit = sorted(token_counts)
        plan = [(s, chunks) for s in hit[:self.whole]]
        if self.split and len(hit) > self.whole:
            plan.append((hit[self.whole], 1))
        return plan


@pytest.fixture
def setup():
    runtime = CPUExpertRuntime(num_threads=2, inline=False, pin_memory=True, wait_on_device=True)
    gen = torch.Generator().manual_seed(0)
    weights = random_experts(gen)
    layers = []
    for host_backing in (False, True):
        layer = HybridMoE(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, gpu_experts=(0, 3),
                          dtype=torch.bfloat16, device=torch.device("cuda"), cpu_runtime=runtime,
                          pin_memory=True, host_backing=host_backing)
        load_experts(layer, *weights)
        layers.append(layer)
    stager = WeightStager(2, H, I, layers[0].chunks, torch.bfloat16, torch.device("cuda"))
    for layer in layers:
        layer.stager = stager
    graphs = MoEGraphs(MAX_TOKENS, H, K, torch.bfloat16, torch.device("cuda"))
    info = graphs.capture(layers, stager)
    assert info["graphs"] == MAX_TOKENS * (len(layers) + 1)
    yield layers, graphs, weights
    runtime.shutdown()


def run(layer, graphs, x, logits):
    layer.graphs = graphs
    try:
        return routed(layer, x.cuda(), logits.cuda()).cpu()
    finally:
        layer.graphs = None


@pytest.mark.parametrize("whole, split", [(0, False), (1, False), (0, True), (1, True), (2, True)])
@pytest.mark.parametrize("tokens", [1, 3, MAX_TOKENS, MAX_TOKENS + 3])
def test_graphs_equal_the_eager_launches(monkeypatch, setup, whole, split, tokens):
    layers, graphs, (w1, w3, w2) = setup
    monkeypatch.setattr(hybrid_moe, "get_step_planner", lambda layer: ForcedPlanner(whole, split))
    gen = torch.Generator().manual_seed(tokens * 10 + whole)
    x = torch.randn(tokens, H, generator=gen).to(torch.bfloat16)
    logits = torch.randn(tokens, E, generator=gen)
    logits[0, 0] = logits[0, 1] = 9.0  # a hot and a cold expert for the first token, at least
    layer = layers[0]
    eager = run(layer, None, x, logits)
    before = graphs.replays
    graphed = run(layer, graphs, x, logits)
    replays = graphs.replays - before
    assert torch.equal(graphed, eager)
    if tokens > MAX_TOKENS:
        assert replays == 0
    else:
        staged = min(whole + split, len({int(e) for e in reference.route(logits, K)[1].flatten()} - {0, 3}))
        assert replays == 1 + staged  # the hot graph, and the staged graph once per staged expert
    weights, ids = reference.route(logits, K)
    ref = reference.moe(x, torch.cat([w1, w3], dim=1).to(torch.bfloat16), w2.to(torch.bfloat16), weights, ids)
    scale = ref.abs().max().item()
    torch.testing.assert_close(graphed.float(), ref, atol=TOLERANCE[torch.bfloat16] * scale,
                               rtol=TOLERANCE[torch.bfloat16])


def test_graphs_follow_re_placement(monkeypatch, setup):
    """A swap rewrites a device slot and the routing maps in place: the graphs captured before
    compute the admitted expert from the slot and the evicted one on the CPU."""
    layers, graphs, (w1, w3, w2) = setup
    layer = layers[1]  # host backing
    monkeypatch.setattr(hybrid_moe, "get_step_planner", lambda layer: ForcedPlanner(0, False))
    slot, _ = layer.begin_swap(evict=0, admit=5)
    layer.finish_swap(5, slot)
    assert layer.gpu_experts == (3, 5)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, H, generator=gen).to(torch.bfloat16)
    logits = torch.randn(2, E, generator=gen)
    logits[:, 5] = logits[:, 0] = 9.0  # both tokens: the admitted expert (GPU) and the evicted one (CPU)
    before = graphs.replays
    graphed = run(layer, graphs, x, logits)
    assert graphs.replays == before + 1
    assert torch.equal(graphed, run(layer, None, x, logits))
    weights, ids = reference.route(logits, K)
    ref = reference.moe(x, torch.cat([w1, w3], dim=1).to(torch.bfloat16), w2.to(torch.bfloat16), weights, ids)
    scale = ref.abs().max().item()
    torch.testing.assert_close(graphed.float(), ref, atol=TOLERANCE[torch.bfloat16] * scale,
                               rtol=TOLERANCE[torch.bfloat16])


def routed_layer(runtime, gen, host_backing: bool):
    w1, w3, w2 = random_experts(gen)
    from vllm_fiddler.runtime.host_view import device_view

    layer = HybridMoE(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, gpu_experts=(0, 3),
                      dtype=torch.bfloat16, device=torch.device("cuda"), cpu_runtime=runtime,
                      pin_memory=True, host_backing=host_backing)
    load_experts(layer, w1, w3, w2)
    layer.routed_max_tokens = MAX_TOKENS
    layer.host_views = (device_view(layer.w13_cpu_chunks), device_view(layer.w2_cpu_chunks))
    return layer, (w1, w3, w2)


def routed_counters(layer) -> list:
    torch.cuda.synchronize()  # the stream waited for the job, which counted before it signalled
    return [layer.expert_tokens.cpu(), layer.expert_heat.cpu(), layer._routed_counts.clone(),
            layer.routed_to_cpu, layer.routed_to_gpu]


@pytest.mark.parametrize("host_backing", [False, True])
@pytest.mark.parametrize("streamed", [(0, 0), (1, 0), (2, 1)])
@pytest.mark.parametrize("tokens", [1, 3, MAX_TOKENS])
def test_routed_graphs_match_the_oracle_and_the_synced_step(host_backing, streamed, tokens):
    """A routed step replaying its whole GPU side (routing graph, experts graph with or without
    streaming, result graph) matches the fp32 oracle and the synced step (the host plans, no
    graphs), counts the same tokens, heat and (token, k) pairs; capturing counts nothing."""
    runtime = CPUExpertRuntime(num_threads=2, inline=False, pin_memory=True, wait_on_device=True)
    try:
        if not runtime.takes_routed_jobs():
            pytest.skip("routed jobs need stream memory operations and the native kernels")
        gen = torch.Generator().manual_seed(tokens * 100 + sum(streamed))
        layer, (w1, w3, w2) = routed_layer(runtime, gen, host_backing)
        graphs = MoEGraphs(MAX_TOKENS, H, K, torch.bfloat16, torch.device("cuda"))
        graphs.capture([layer], None)
        info = graphs.capture_routed([layer], MAX_TOKENS, heat_table_len=4)
        assert info["graphs"] == MAX_TOKENS * 4  # routing, experts with and without streaming, result
        assert not layer.expert_tokens.any() and not layer.expert_heat.any()
        layer.set_heat_table([0.0, 1.0, 1.5, 2.0])  # after capture: rewritten in place, the graph follows
        layer.set_streamed_chunks(streamed)
        x = torch.randn(tokens, H, generator=gen).to(torch.bfloat16)
        logits = torch.randn(tokens, E, generator=gen).to(torch.bfloat16)
        logits[0, 1], logits[0, 2] = 9.0, 8.5  # two cold experts for the first token (no ties:
        if tokens > 1:  # the oracle routes on the host, whose top-k may break them otherwise)
            logits[-1, 0] = 9.0  # and a hot one for the last
        before = routed_counters(layer)
        synced = run(layer, None, x, logits)
        after_synced = routed_counters(layer)
        replays = graphs.replays
        graphed = run(layer, graphs, x, logits)
        after_graphed = routed_counters(layer)
        assert graphs.replays - replays == 3
        for i in (0, 1, 3):  # tokens, heat, host pairs: the same whichever path
            assert torch.equal(torch.as_tensor(after_graphed[i] - after_synced[i]),
                               torch.as_tensor(after_synced[i] - before[i]))
        assert after_synced[1].sum() > 0  # the heat table counted
        assert after_graphed[2][0] > before[2][0]  # the routed job counted its host pairs
        assert_matches_oracle(graphed, x, logits, (w1, w3, w2))
        assert_matches_oracle(synced, x, logits, (w1, w3, w2))
    finally:
        runtime.shutdown()


def assert_matches_oracle(out, x, logits, experts) -> None:
    w1, w3, w2 = experts
    weights, ids = reference.route(logits, K)
    ref = reference.moe(x, torch.cat([w1, w3], dim=1).to(torch.bfloat16), w2.to(torch.bfloat16), weights, ids)
    scale = ref.abs().max().item()
    torch.testing.assert_close(out.float(), ref, atol=TOLERANCE[torch.bfloat16] * scale,
                               rtol=TOLERANCE[torch.bfloat16])


def test_routed_graphs_follow_re_placement_and_fall_back():
    """After a swap the routed graphs serve the admitted expert from its slot and the evicted one
    from the host; steps above the routed limit take the synced path; repeated graphed steps
    agree bit for bit."""
    runtime = CPUExpertRuntime(num_threads=2, inline=False, pin_memory=True, wait_on_device=True)
    try:
        if not runtime.takes_routed_jobs():
            pytest.skip("routed jobs need stream memory operations and the native kernels")
        gen = torch.Generator().manual_seed(11)
        layer, (w1, w3, w2) = routed_layer(runtime, gen, host_backing=True)
        graphs = MoEGraphs(MAX_TOKENS, H, K, torch.bfloat16, torch.device("cuda"))
        graphs.capture([layer], None)
        graphs.capture_routed([layer], MAX_TOKENS, heat_table_len=4)
        layer.set_streamed_chunks((1, 1))
        slot, _ = layer.begin_swap(evict=0, admit=5)
        layer.finish_swap(5, slot)
        x = torch.randn(2, H, generator=gen).to(torch.bfloat16)
        logits = torch.randn(2, E, generator=gen).to(torch.bfloat16)
        logits[:, 5] = logits[:, 0] = 9.0  # both tokens: the admitted expert (GPU) and the evicted one (host)
        replays = graphs.replays
        outs = [run(layer, graphs, x, logits) for _ in range(3)]  # the pinned buffers reused in turn
        assert graphs.replays - replays == 9
        assert all(torch.equal(o, outs[0]) for o in outs)
        assert_matches_oracle(outs[0], x, logits, (w1, w3, w2))
        replays = graphs.replays
        tokens = MAX_TOKENS + 1
        run(layer, graphs, torch.randn(tokens, H, generator=gen).to(torch.bfloat16),
            torch.randn(tokens, E, generator=gen).to(torch.bfloat16))
        assert graphs.replays == replays  # above the captured sizes: no graph
    finally:
        runtime.shutdown()
