"""FiddlerMoEMethod's pieces without an engine: the expert stand-ins vLLM's loaders write into,
and the choice of method while a model is built."""

from __future__ import annotations

import types

import pytest
import torch

from vllm_fiddler.kernels import reference
from vllm_fiddler.moe import method as moe_method
from vllm_fiddler.moe.layer import HybridMoE
from vllm_fiddler.runtime.cpu_experts import CPUExpertRuntime

E, K, H, I = 4, 2, 64, 96


def hybrid(math, gpu_experts=(1,)):
    return HybridMoE(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I, gpu_experts=gpu_experts,
                     dtype=torch.float32, device=torch.device("cpu"),
                     cpu_runtime=CPUExpertRuntime(num_threads=1, inline=True), pin_memory=False, math=math)


def sinks(layer):
    owner = types.SimpleNamespace(prefix="model.layers.0.mlp.experts", _hybrid=lambda: layer)
    return {name: moe_method.ExpertSink(torch.empty(E, 0), owner, name)
            for name in ("w13_weight", "w2_weight", "w13_bias", "w2_bias")}


def test_whole_tensor_copies_land_in_both_expert_sets():
    """gpt-oss's loader copies every expert at once (param.copy_), w13 and b13 with gate and up
    interleaved: the stand-ins catch the copy, de-interleave and place each expert."""
    math = reference.ExpertMath(activation="swigluoai", has_bias=True)
    layer = hybrid(math)
    gen = torch.Generator().manual_seed(0)
    w13 = torch.randn(E, 2 * I, H, generator=gen)  # interleaved rows: gate, up, gate, up, ...
    w2 = torch.randn(E, H, I, generator=gen)
    b13 = torch.randn(E, 2 * I, generator=gen)
    b2 = torch.randn(E, H, generator=gen)
    s = sinks(layer)
    for name, full in (("w13_weight", w13), ("w2_weight", w2), ("w13_bias", b13), ("w2_bias", b2)):
        assert s[name].copy_(full) is s[name]
        assert s[name].numel() == 0  # nothing was allocated in the stand-in
    x = torch.randn(5, H, generator=gen)
    weights, ids = reference.route(torch.randn(5, E, generator=gen), K)
    out = layer(x, weights, ids.to(torch.int32))
    plain_w13 = torch.cat([w13[:, 0::2], w13[:, 1::2]], dim=1)
    plain_b13 = torch.cat([b13[:, 0::2], b13[:, 1::2]], dim=1)
    ref = reference.moe(x, plain_w13, w2, weights, ids, math, plain_b13, b2)
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


def test_stand_ins_take_vllms_per_expert_loader_calls():
    """RoutedExperts.load_weights calls param.weight_loader(param, w, name, shard_id=, expert_id=)
    once per expert and shard (w1 / w3 [I, H], w2 [H, I]); fused checkpoints arrive the same way."""
    layer = hybrid(reference.SILU, gpu_experts=(0, 3))
    method = moe_method.FiddlerMoEMethod.__new__(moe_method.FiddlerMoEMethod)
    method.prefix, method.hybrid = "model.layers.0.mlp.experts", layer
    s = {n: moe_method.ExpertSink(torch.empty(E, 0), method, n) for n in ("w13_weight", "w2_weight")}
    gen = torch.Generator().manual_seed(1)
    w1, w3, w2 = torch.randn(E, I, H, generator=gen), torch.randn(E, I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    for e in range(E):
        for shard, w, param in (("w1", w1, "w13_weight"), ("w3", w3, "w13_weight"), ("w2", w2, "w2_weight")):
            assert method.weight_loader(s[param], w[e], "experts.w13_weight", shard_id=shard, expert_id=e,
                                        return_success=True) is True
    for e in range(E):
        got13, got2 = layer.expert_weights(e)
        assert torch.equal(got13, torch.cat([w1[e], w3[e]])) and torch.equal(got2, w2[e])


def test_a_shard_of_every_expert_at_once_loads_each_expert():
    """Llama-4's fused checkpoints: vLLM's loader hands w1 / w3 [E, I, H] and w2 [E, H, I]
    over once, with expert id 0 (its mapping for fused tensors has one expert), as FusedMoE
    takes such a tensor whole: every expert gets its own slice, under tensor parallelism its
    share of it."""
    gen = torch.Generator().manual_seed(3)
    w1, w3 = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, 2 * I, H, generator=gen)
    w2 = torch.randn(E, H, 2 * I, generator=gen)
    for rank, size in ((0, 1), (1, 2)):
        inter = 2 * I // size
        layer = HybridMoE(num_experts=E, top_k=K, hidden_size=H, intermediate_size=inter, gpu_experts=(0, 3),
                          dtype=torch.float32, device=torch.device("cpu"),
                          cpu_runtime=CPUExpertRuntime(num_threads=1, inline=True), pin_memory=False,
                          math=reference.SILU)
        method = moe_method.FiddlerMoEMethod.__new__(moe_method.FiddlerMoEMethod)
        method.prefix, method.hybrid, method.tp_rank, method.tp_size = "model.layers.0.mlp.experts", layer, rank, size
        method.spec = types.SimpleNamespace(intermediate_size=inter)
        s = {n: moe_method.ExpertSink(torch.empty(E, 0), method, n) for n in ("w13_weight", "w2_weight")}
        for shard, w, param in (("w1", w1, "w13_weight"), ("w3", w3, "w13_weight"), ("w2", w2, "w2_weight")):
            method.weight_loader(s[param], w, "experts.w13_weight", shard_id=shard, expert_id=0)
        rows = slice(rank * inter, (rank + 1) * inter)
        for e in range(E):
            got13, got2 = layer.expert_weights(e)
            assert torch.equal(got13, torch.cat([w1[e, rows], w3[e, rows]])) and torch.equal(got2, w2[e, :, rows])


def test_tensor_parallel_ranks_load_their_share_of_each_expert():
    """Under tensor parallelism vLLM's per-expert loader hands each rank the whole checkpoint
    tensor; rank r of 2 keeps rows r*I..(r+1)*I of w1 / w3 and those columns of w2 (I: the
    layer's share), as vLLM's FusedMoE loader splits them, and b2 on rank 0 only (the ranks'
    outputs are summed). A tensor of the share's size passes as is; any other size fails."""
    gen = torch.Generator().manual_seed(2)
    w1, w3 = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, 2 * I, H, generator=gen)
    w2, b2 = torch.randn(E, H, 2 * I, generator=gen), torch.randn(E, H, generator=gen)
    for rank in (0, 1):
        layer = hybrid(reference.SILU, gpu_experts=(0, 3))
        method = moe_method.FiddlerMoEMethod.__new__(moe_method.FiddlerMoEMethod)
        method.prefix, method.hybrid, method.tp_rank, method.tp_size = "model.layers.0.mlp.experts", layer, rank, 2
        method.spec = types.SimpleNamespace(intermediate_size=I)
        s = {n: moe_method.ExpertSink(torch.empty(E, 0), method, n) for n in ("w13_weight", "w2_weight")}
        for e in range(E):
            for shard, w, param in (("w1", w1, "w13_weight"), ("w3", w3, "w13_weight"), ("w2", w2, "w2_weight")):
                method.weight_loader(s[param], w[e], "experts.w13_weight", shard_id=shard, expert_id=e)
        rows = slice(rank * I, (rank + 1) * I)
        for e in range(E):
            got13, got2 = layer.expert_weights(e)
            assert torch.equal(got13, torch.cat([w1[e, rows], w3[e, rows]])) and torch.equal(got2, w2[e, :, rows])
        assert torch.equal(method._tp_share("b2", b2[0]), b2[0] if rank == 0 else torch.zeros(H))
        assert torch.equal(method._tp_share("w1", w1[0, rows]), w1[0, rows])  # already this rank's share
        with pytest.raises(ValueError, match="intermediate rows"):
            method._tp_share("w2", torch.zeros(H, 3 * I))


def test_no_method_outside_a_fiddler_build():
    assert moe_method.choose_method(object(), "p", None, object()) is None
    with moe_method.building() as build:
        bnb = types.SimpleNamespace(get_name=lambda: "bitsandbytes")
        with pytest.raises(Exception, match="experts quantized as 'bitsandbytes'"):
            moe_method.choose_method(object(), "model.layers.0.mlp.experts", bnb, object())
        assert build.methods == []
    assert moe_method.choose_method(object(), "p", None, object()) is None


def test_moe_layout_reads_every_family(tmp_path):
    """The frontend's view of a model's MoE layers (placement files are checked against it)."""
    from helpers.families import FAMILIES

    from vllm_fiddler.placement import moe_layout

    for name, fam in FAMILIES.items():
        layer_ids, experts, top_k = moe_layout(fam.make_config())
        assert layer_ids == fam.moe_layers and experts == fam.num_experts, name
