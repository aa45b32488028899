"""Hybrid layers with quantized experts (moe/quantized.py) against the fp32 oracle on the
dequantized weights, and the formats' detection from vLLM's own quantization configs: FP8
block-scaled (DeepSeek-V3) and MXFP4 with biases and clamped SwiGLU (gpt-oss).

The layer dequantizes each routed expert exactly (fp8 value x fp32 block scale, or e2m1 value
x power of two, in fp32 here) and then computes as the oracle does, so in fp32 the two differ by
summation order only: 1e-5 of the output's scale. A wrong scale block, a gate/up swap, a
nibble-order swap or a misplaced expert moves outputs by whole percents.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from vllm_fiddler.config import FiddlerConfigError
from vllm_fiddler.kernels import cpu as cpu_kernels
from vllm_fiddler.kernels import quant, reference
from vllm_fiddler.moe import method as moe_method
from vllm_fiddler.moe.quantized import ExpertFormat, QuantizedHybridMoE
from vllm_fiddler.placement import MoEShape
from vllm_fiddler.runtime.cpu_experts import CPUExpertRuntime

E, K = 8, 2
# H = 80 is no multiple of the 48-column block (partial edge blocks along K of w13 and N of w2)
H, I = 80, 64
FMT = ExpertFormat("fp8_block", (32, 48))


def quantized_experts(seed: int = 0):
    """(w13 fp8 [E, 2I, H], s13 [E, 2I/32, 2], w2 fp8 [E, H, I], s2 [E, 3, 2]) and the dequantized
    fp32 (w13, w2) the oracle uses."""
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=gen) * torch.rand(E, 2 * I, 1, generator=gen)  # rows of every scale
    w2 = torch.randn(E, H, I, generator=gen)
    q13, s13 = quant.quant_fp8_block(w13, FMT.block)
    q2, s2 = quant.quant_fp8_block(w2, FMT.block)
    return (q13, s13, q2, s2), (quant.dequant_fp8_block(q13, s13, FMT.block), quant.dequant_fp8_block(q2, s2, FMT.block))


def layer(gpu_experts, dtype=torch.float32):
    return QuantizedHybridMoE(expert_format=FMT, num_experts=E, top_k=K, hidden_size=H, intermediate_size=I,
                              gpu_experts=tuple(gpu_experts), dtype=dtype, device=torch.device("cpu"),
                              cpu_runtime=CPUExpertRuntime(num_threads=1, inline=True), pin_memory=False,
                              math=reference.SILU)


def load_per_expert(m, tensors) -> None:
    """As vLLM's loaders call it: w1 / w3 / w2 and their scales, one expert at a time."""
    q13, s13, q2, s2 = tensors
    for e in range(E):
        m.load_expert(e, "w1", q13[e, :I])
        m.load_expert(e, "w3", q13[e, I:])
        m.load_expert(e, "w2", q2[e])
        m.load_expert(e, "s1", s13[e, :I // 32])
        m.load_expert(e, "s3", s13[e, I // 32:])
        m.load_expert(e, "s2", s2[e])


@pytest.mark.parametrize("gpu_experts", [(), tuple(range(E)), (0, 3, 5)], ids=["all-cpu", "all-gpu", "mixed"])
@pytest.mark.parametrize("tokens", [1, 2, 3, 7, 16, 33, 128])
def test_fp8_block_layer_matches_the_oracle(gpu_experts, tokens):
    tensors, (w13, w2) = quantized_experts()
    m = layer(gpu_experts)
    load_per_expert(m, tensors)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=gen)
    logits = torch.randn(tokens, E, generator=gen)
    logits[:, 7] = -1e9  # expert 7 is never routed: an empty expert on whichever side holds it
    weights, ids = reference.route(logits, K)
    out = m(x, weights, ids.to(torch.int32))
    ref = reference.moe(x, w13, w2, weights, ids, reference.SILU)
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)
    assert m.routed_to_gpu + m.routed_to_cpu == tokens * K
    assert m.routed_to_cpu == int(sum((ids == e).sum() for e in range(E) if e not in gpu_experts))


def test_bf16_model_dtype_dequantizes_to_bf16():
    """In a bf16 model the experts dequantize to bf16 (what vLLM's own FP8 kernels feed their
    bf16 activations): within bf16's rounding of the fp32 oracle (3 significant digits, ~1%
    of the output's scale after two matmuls)."""
    tensors, (w13, w2) = quantized_experts(1)
    m = layer((1, 2), torch.bfloat16)
    load_per_expert(m, tensors)
    x = torch.randn(9, H, generator=torch.Generator().manual_seed(2))
    weights, ids = reference.route(torch.randn(9, E, generator=torch.Generator().manual_seed(3)), K)
    out = m(x.bfloat16(), weights, ids.to(torch.int32)).float()
    ref = reference.moe(x, w13, w2, weights, ids, reference.SILU)
    torch.testing.assert_close(out, ref, atol=2e-2 * ref.abs().max().item(), rtol=2e-2)


def test_stand_ins_route_fp8_tensors_and_scales():
    """vLLM's per-expert loader calls (shard w1 / w3 / w2 of *_weight and *_weight_scale_inv) and a
    whole-tensor copy land as the oracle's weights; nothing is allocated in the stand-ins."""
    tensors, (w13, w2) = quantized_experts(4)
    q13, s13, q2, s2 = tensors
    m = layer((2, 6))
    method = moe_method.FiddlerMoEMethod.__new__(moe_method.FiddlerMoEMethod)
    method.prefix, method.hybrid, method.expert_format = "model.layers.0.mlp.experts", m, FMT
    loader = moe_method.FiddlerMoEMethod.weight_loader
    sinks = {n: moe_method.ExpertSink(torch.empty(E, 0), method, n)
             for n in ("w13_weight", "w2_weight", "w13_weight_scale_inv", "w2_weight_scale_inv")}
    for e in range(E):
        loader(method, sinks["w13_weight"], q13[e, :I], shard_id="w1", expert_id=e)
        loader(method, sinks["w13_weight"], q13[e, I:], shard_id="w3", expert_id=e)
        loader(method, sinks["w13_weight_scale_inv"], s13[e, :2], shard_id="w1", expert_id=e)
        loader(method, sinks["w13_weight_scale_inv"], s13[e, 2:], shard_id="w3", expert_id=e)
    sinks["w2_weight"].copy_(q2)
    sinks["w2_weight_scale_inv"].copy_(s2)
    assert all(s.numel() == 0 for s in sinks.values())
    for e in range(E):
        got13, got2 = m.expert_weights(e)
        assert torch.equal(got13, w13[e]) and torch.equal(got2, w2[e])


def test_scales_of_the_wrong_shape_are_refused():
    m = layer((0,))
    with pytest.raises(ValueError, match=r"expert 3's s2 .* has shape \[2, 3\].* expects \[3, 2\]"):
        m.load_expert(3, "s2", torch.ones(2, 3))
    with pytest.raises(ValueError, match="expert 0's w1"):
        m.load_expert(0, "w1", torch.zeros(I, H + 1, dtype=torch.float8_e4m3fn))


def test_expert_bytes_are_the_compressed_ones():
    """Placement and the budget count an expert as stored: one byte a weight plus its fp32
    block scales, not the model dtype's bytes."""
    m = layer(())
    scales = 4 * (2 * I // 32 * 2 + 3 * 2)  # w13: [4, 2] blocks, w2: [3, 2]
    assert m.expert_bytes == 3 * H * I + scales == FMT.expert_bytes(H, I)
    shape = MoEShape(num_layers=2, num_experts=E, hidden_size=H, intermediate_size=I, top_k=K, dtype_bytes=2,
                     non_expert_bytes=0, kv_bytes_per_token=0, expert_format=FMT)
    assert shape.expert_bytes == m.expert_bytes and shape.all_experts_bytes == 2 * E * m.expert_bytes


def test_intermediate_size_must_split_into_scale_blocks():
    with pytest.raises(ValueError, match="intermediate size 40 is not a multiple"):
        ExpertFormat("fp8_block", (32, 48)).check_layer("x", H, 40)


def test_dummy_weights_span_the_bf16_layers_range():
    """--load-format dummy: fp8 values over e4m3's range, scales 1e-3 / 448: dequantized
    weights uniform in (-1e-3, 1e-3), as a bf16 layer's, and experts differ."""
    m = layer((0, 4))
    m.init_random(seed=0, pool_size=1 << 12)
    weights = [m.expert_weights(e)[0] for e in range(E)]
    assert all(w.abs().max() <= 1e-3 and w.abs().max() > 5e-4 for w in weights)
    assert not torch.equal(weights[0], weights[1])


def fp8_config(**overrides):
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config

    return Fp8Config.from_config({"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128], **overrides})


def test_vllm_fp8_config_names_the_format():
    from vllm_fiddler import compat

    prefix = "model.layers.1.mlp.experts"
    assert compat.expert_quantization(fp8_config(), prefix) == ("fp8_block", (128, 128))
    assert compat.expert_quantization(fp8_config(ignored_layers=[prefix]), prefix) is None
    with pytest.raises(FiddlerConfigError, match="FP8 with per-tensor scales"):
        compat.expert_quantization(fp8_config(weight_block_size=None), prefix)
    bnb = types.SimpleNamespace(get_name=lambda: "bitsandbytes")
    with pytest.raises(FiddlerConfigError, match="quantized as 'bitsandbytes'.*FP8 with block scales"):
        compat.expert_quantization(bnb, prefix)


def test_layers_of_different_formats_are_refused():
    from vllm_fiddler.moe.model import _expert_format

    def method(index, fmt):
        return types.SimpleNamespace(expert_format=fmt, spec=types.SimpleNamespace(layer_index=index))

    assert _expert_format([method(0, FMT), method(1, FMT)]) == FMT
    assert _expert_format([method(0, None)]) is None
    with pytest.raises(FiddlerConfigError, match=r"layers \[0, 2\]: FP8 e4m3 .*layers \[1\]: unquantized"):
        _expert_format([method(0, FMT), method(1, None), method(2, FMT)])


# ---------------------------------------------------------------- MXFP4 (gpt-oss)
MX = ExpertFormat("mxfp4", (1, 32))
GPT_OSS = reference.ExpertMath(activation="swigluoai", has_bias=True)  # alpha 1.702, limit 7
H_MX = 96  # three scale groups


def mxfp4_checkpoint(seed: int = 0):
    """gpt-oss's expert tensors as vLLM's loader hands them to the layer (all experts at once,
    gate and up rows interleaved): w13 [E, 2I, H/2] bytes, s13 [E, 2I, H/32], w2 [E, H, I/2],
    s2 [E, H, I/32], b13 [E, 2I], b2 [E, H]; and the oracle's fp32 (w13, w2, b13, b2) with
    gate rows first. Rows scaled over four octaves, biases so the clamp at 7 bites."""
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H_MX, generator=gen) * 2.0 ** torch.randint(-2, 2, (E, 2 * I, 1), generator=gen)
    w2 = torch.randn(E, H_MX, I, generator=gen)
    b13, b2 = torch.randn(E, 2 * I, generator=gen) * 4, torch.randn(E, H_MX, generator=gen)
    blocks13, s13 = quant.quant_mxfp4(w13)
    blocks2, s2 = quant.quant_mxfp4(w2)
    d13, d2 = quant.dequant_mxfp4(blocks13, s13), quant.dequant_mxfp4(blocks2, s2)
    interleave = lambda t: torch.stack([t[:, :I], t[:, I:]], dim=2).flatten(1, 2)  # noqa: E731
    vllm = {"w13_weight": interleave(blocks13.flatten(-2)), "w13_weight_scale": interleave(s13),
            "w2_weight": blocks2.flatten(-2), "w2_weight_scale": s2, "w13_bias": interleave(b13), "w2_bias": b2}
    return vllm, (d13, d2, b13, b2)


def mx_layer(gpu_experts, dtype=torch.float32):
    return QuantizedHybridMoE(expert_format=MX, num_experts=E, top_k=K, hidden_size=H_MX, intermediate_size=I,
                              gpu_experts=tuple(gpu_experts), dtype=dtype, device=torch.device("cpu"),
                              cpu_runtime=CPUExpertRuntime(num_threads=1, inline=True), pin_memory=False,
                              math=GPT_OSS)


def load_as_gpt_oss(m, tensors) -> None:
    """vLLM's gpt-oss loader: each parameter whole (param.copy_ into the stand-in)."""
    method = types.SimpleNamespace(prefix="model.layers.0.mlp.experts", _hybrid=lambda: m)
    for name, full in tensors.items():
        sink = moe_method.ExpertSink(torch.empty(E, 0, dtype=MX.param_dtypes().get(name, torch.float32)),
                                     method, name)
        sink.copy_(full)
        assert sink.numel() == 0


@pytest.mark.parametrize("gpu_experts", [(), tuple(range(E)), (0, 3, 5)], ids=["all-cpu", "all-gpu", "mixed"])
@pytest.mark.parametrize("tokens", [1, 3, 16, 33])
def test_mxfp4_layer_with_biases_matches_the_oracle(gpu_experts, tokens):
    tensors, (w13, w2, b13, b2) = mxfp4_checkpoint()
    m = mx_layer(gpu_experts)
    load_as_gpt_oss(m, tensors)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H_MX, generator=gen)
    logits = torch.randn(tokens, E, generator=gen)
    logits[:, 6] = -1e9  # expert 6 is never routed
    weights, ids = reference.route(logits, K)
    out = m(x, weights, ids.to(torch.int32))
    ref = reference.moe(x, w13, w2, weights, ids, GPT_OSS, b13, b2)
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)
    assert m.routed_to_cpu == int(sum((ids == e).sum() for e in range(E) if e not in gpu_experts))


@pytest.mark.skipif(not cpu_kernels.quantized_available(), reason="needs AVX512F/BW/VL and a native build")
def test_device_waited_jobs_of_a_quantized_layer_run_on_the_native_job_thread():
    """What a CUDA step submits for the host experts of a gpt-oss layer (device-waited: the stream
    waits for the job's number) runs on the native job thread, with the layer's biases and
    clamped SwiGLU, bit-equal to the direct kernel call; the job's number reaches the word."""
    tensors, _ = mxfp4_checkpoint(2)
    runtime = CPUExpertRuntime(num_threads=1, inline=False, wait_on_device=True)
    signal = types.SimpleNamespace(word=torch.zeros(1, dtype=torch.int32), seq=0)
    signal.next_seq = lambda: setattr(signal, "seq", signal.seq + 1) or signal.seq
    runtime._device_signal = lambda: signal
    try:
        m = QuantizedHybridMoE(expert_format=MX, num_experts=E, top_k=K, hidden_size=H_MX, intermediate_size=I,
                               gpu_experts=(1, 4), dtype=torch.bfloat16, device=torch.device("cpu"),
                               cpu_runtime=runtime, pin_memory=False, math=GPT_OSS)
        load_as_gpt_oss(m, tensors)
        assert m.native_jobs
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(3, H_MX, generator=gen).bfloat16()
        weights, ids = reference.route(torch.randn(3, E, generator=gen), K)
        slots = m.cpu_slot_of_host[ids].to(torch.int32)  # [3, K] host slot or -1
        job = runtime.submit(x, m.w13_cpu_chunks, m.w2_cpu_chunks, slots, weights, device_wait=True, math=m.math,
                             biases=m.host_biases)
        assert job.future is None, "a quantized device-waited job should run on the native job thread"
        got = job.result().clone()
        want = torch.zeros(3, H_MX)
        assert cpu_kernels.moe_forward_quantized(x, m.w13_cpu_chunks, m.w2_cpu_chunks, slots, weights, want, m.math,
                                                 m.host_biases)
        assert torch.equal(got, want) and want.abs().sum() > 0
        assert int(signal.word) == job.seq
    finally:
        runtime.shutdown()


def test_mxfp4_experts_are_stored_compressed():
    """Half a byte a weight plus one exponent byte per 32: 17/64 of a byte a weight, a quarter of
    bf16's bytes and then some; placement counts that."""
    m = mx_layer((1,))
    assert m.expert_bytes == MX.expert_bytes(H_MX, I) == 3 * H_MX * I // 2 + 3 * H_MX * I // 32
    assert m.w13_cpu.nbytes == (E - 1) * 2 * I * H_MX * 17 // 32


def test_mxfp4_dummy_weights_span_the_bf16_layers_range():
    """Random bytes cover every e2m1 code; the exponent maps e2m1's 6 to about 1e-3 (2**-13 x 6
    = 7.3e-4, the nearest power of two), so weights stay within the bf16 layers' range."""
    m = mx_layer((0, 4))
    m.init_random(seed=0, pool_size=1 << 12)
    weights = [m.expert_weights(e)[0] for e in range(E)]
    assert all(w.abs().max() == 6 * 2.0 ** -13 for w in weights)
    assert len(torch.unique(weights[2])) == 15  # the 16 codes; +0 and -0 are one value
    assert not torch.equal(weights[0], weights[1])
    assert m.b13_cpu.abs().max() <= 1e-3 and m.b13_cpu.abs().max() > 0


def test_mxfp4_layer_sizes_must_hold_whole_scale_groups():
    with pytest.raises(ValueError, match="multiples of the 32-weight scale groups of MXFP4"):
        MX.check_layer("x", 80, 64)
    with pytest.raises(ValueError, match="MXFP4 scales cover 1 x 32"):
        ExpertFormat("mxfp4", (32, 32))


def test_vllm_mxfp4_configs_name_the_format():
    from vllm.model_executor.layers.quantization.mxfp4 import GptOssMxfp4Config, Mxfp4Config

    from vllm_fiddler import compat

    prefix = "model.layers.1.mlp.experts"
    assert compat.expert_quantization(GptOssMxfp4Config(), prefix) == ("mxfp4", (1, 32))
    assert compat.expert_quantization(Mxfp4Config(), prefix) == ("mxfp4", (1, 32))
    assert compat.expert_quantization(Mxfp4Config(ignored_layers=[prefix]), prefix) is None


# ---------------------------------------------------------------- INT4 groups (W4A16)
INT4 = ExpertFormat("int4_group", (1, 32))


def int4_layer(gpu_experts):
    return QuantizedHybridMoE(expert_format=INT4, num_experts=E, top_k=K, hidden_size=H_MX, intermediate_size=I,
                              gpu_experts=tuple(gpu_experts), dtype=torch.float32, device=torch.device("cpu"),
                              cpu_runtime=CPUExpertRuntime(num_threads=1, inline=True), pin_memory=False,
                              math=reference.SILU)


@pytest.mark.parametrize("gpu_experts", [(), tuple(range(E)), (1, 4)], ids=["all-cpu", "all-gpu", "mixed"])
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_int4_layer_matches_the_oracle(gpu_experts, tokens):
    """compressed-tensors' tensors as vLLM's per-expert loader hands them over: weight_packed,
    weight_scale (bf16) and weight_shape of each of w1 / w3 / w2."""
    gen = torch.Generator().manual_seed(tokens)
    w1, w3, w2 = (torch.randn(E, *shape, generator=gen) for shape in ((I, H_MX), (I, H_MX), (H_MX, I)))
    m = int4_layer(gpu_experts)
    oracle = {}
    for name, w in (("1", w1), ("3", w3), ("2", w2)):
        packed, scale = quant.quant_int4_group(w, 32)
        scale = scale.bfloat16()
        oracle[name] = quant.dequant_int4_group(packed, scale.float(), w.shape[-1], 32)
        for e in range(E):
            m.load_expert(e, "w" + name, packed[e])
            m.load_expert(e, "s" + name, scale[e])
            m.load_expert(e, "k" + name, torch.tensor(list(w.shape[1:])))
    x = torch.randn(tokens, H_MX, generator=gen)
    weights, ids = reference.route(torch.randn(tokens, E, generator=gen), K)
    out = m(x, weights, ids.to(torch.int32))
    ref = reference.moe(x, torch.cat([oracle["1"], oracle["3"]], dim=1), oracle["2"], weights, ids, reference.SILU)
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


def test_int4_weight_shapes_are_checked_and_bytes_compressed():
    m = int4_layer((0,))
    with pytest.raises(ValueError, match=r"expert 2's 2 projection is \[96, 96\] in the checkpoint, the layer's is "
                                         r"\[96, 64\]"):
        m.load_expert(2, "k2", torch.tensor([96, 96]))
    # half a byte a weight, a scale per 32 in the model's dtype (fp32 here; bf16 by default)
    assert m.expert_bytes == INT4.expert_bytes(H_MX, I, 4) == 3 * H_MX * I // 2 + 3 * H_MX * I // 32 * 4
    assert INT4.expert_bytes(H_MX, I) == 3 * H_MX * I // 2 + 3 * H_MX * I // 32 * 2
    with pytest.raises(ValueError, match="multiple of 8"):
        ExpertFormat("int4_group", (1, 12))


GPTQ = ExpertFormat("int4_group", (1, 32), "gptq")


def test_gptq_layout_loads_the_same_stored_experts_as_compressed_tensors():
    """AutoGPTQ's qweight [K/8, N] and fp16 scales [K/g, N] are compressed-tensors' words and
    scales transposed: a layer loaded from each holds the same bytes (scales rounded to the
    model dtype once, as vLLM's methods hold them), and computes the same output bit for bit."""
    gen = torch.Generator().manual_seed(5)
    ours = QuantizedHybridMoE(expert_format=GPTQ, num_experts=E, top_k=K, hidden_size=H_MX, intermediate_size=I,
                              gpu_experts=(1, 4), dtype=torch.bfloat16, device=torch.device("cpu"),
                              cpu_runtime=CPUExpertRuntime(num_threads=1, inline=True), pin_memory=False,
                              math=reference.SILU)
    ct = QuantizedHybridMoE(expert_format=INT4, num_experts=E, top_k=K, hidden_size=H_MX, intermediate_size=I,
                            gpu_experts=(1, 4), dtype=torch.bfloat16, device=torch.device("cpu"),
                            cpu_runtime=CPUExpertRuntime(num_threads=1, inline=True), pin_memory=False,
                            math=reference.SILU)
    for name, shape in (("1", (I, H_MX)), ("3", (I, H_MX)), ("2", (H_MX, I))):
        packed, scale = quant.quant_int4_group(torch.randn(E, *shape, generator=gen), 32)
        scale = scale.half()
        for e in range(E):
            ct.load_expert(e, "w" + name, packed[e])
            ct.load_expert(e, "s" + name, scale[e])
            ours.load_expert(e, "w" + name, packed[e].t().contiguous())  # [K/8, N]
            ours.load_expert(e, "s" + name, scale[e].t().contiguous())  # [K/g, N]
            ours.load_expert(e, "g" + name, torch.arange(shape[1], dtype=torch.int32) // 32)
            ours.load_expert(e, "z" + name, torch.full((shape[1] // 32, shape[0] // 8), 0x77777777))
    for a, b in ((ours.w13_cpu, ct.w13_cpu), (ours.w2_cpu, ct.w2_cpu), (ours.w13_gpu, ct.w13_gpu)):
        for key in ("weight_packed", "weight_scale"):
            assert torch.equal(a.tensors[key], b.tensors[key]), key
    assert ours.w13_cpu.tensors["weight_scale"].dtype == torch.bfloat16
    x = torch.randn(5, H_MX, generator=gen).bfloat16()
    weights, ids = reference.route(torch.randn(5, E, generator=gen), K)
    assert torch.equal(ours(x, weights, ids.to(torch.int32)), ct(x, weights, ids.to(torch.int32)))
    # an act-order g_idx (groups out of weight order) cannot be held in weight order
    with pytest.raises(ValueError, match="expert 3's 2 projection has a g_idx that is not its 64 inputs in groups "
                                         "of 32 in order"):
        ours.load_expert(3, "g2", torch.arange(I, dtype=torch.int32).flip(0) // 32)


def gptq_config(**overrides):
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig

    return AutoGPTQConfig.from_config({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
                                       "sym": True, **overrides})


def test_vllm_gptq_config_names_the_format():
    from vllm_fiddler import compat

    prefix = "model.layers.1.mlp.experts"
    assert compat.expert_quantization(gptq_config(), prefix) == ("int4_group", (1, 128), "gptq")
    # GPTQModel's per-module rules: a negative match leaves the layer unquantized, a positive
    # one overrides its groups
    assert compat.expert_quantization(gptq_config(dynamic={r"-:.*\.layers\.1\..*": {}}), prefix) is None
    assert compat.expert_quantization(gptq_config(dynamic={r"+:.*\.layers\.1\..*": {"group_size": 64}}),
                                      prefix) == ("int4_group", (1, 64), "gptq")
    for overrides, what in (({"desc_act": True}, "GPTQ 4-bit symmetric with act-order"),
                            ({"bits": 8}, "GPTQ 8-bit symmetric in groups of 128"),
                            ({"group_size": -1}, "GPTQ 4-bit symmetric per output channel")):
        try:
            config = gptq_config(**overrides)
        except ValueError as e:  # vLLM 0.32 refuses act-order itself, for every engine
            assert overrides == {"desc_act": True} and "desc_act=True) is no longer supported" in str(e)
            continue
        with pytest.raises(FiddlerConfigError, match=f"quantized as {what}.*AutoGPTQ's layout"):
            compat.expert_quantization(config, prefix)


def test_sinks_name_gptq_tensors():
    method = types.SimpleNamespace()
    kinds = {name: moe_method.ExpertSink(torch.empty(E, 0), method, name).kind()
             for name in ("w13_qweight", "w2_scales", "w13_qzeros", "w2_g_idx")}
    assert kinds == {"w13_qweight": "w13", "w2_scales": "s2", "w13_qzeros": "z13", "w2_g_idx": "g2"}
    assert set(GPTQ.param_dtypes()) == {f"{p}_{t}" for p in ("w13", "w2") for t in ("qweight", "scales", "qzeros",
                                                                                  "g_idx")}
    with pytest.raises(ValueError, match="gptq checkpoint layout holds int4_group experts, not mxfp4"):
        ExpertFormat("mxfp4", (1, 32), "gptq")
    with pytest.raises(ValueError, match="default checkpoint layout holds .* experts, not int4_zp"):
        ExpertFormat("int4_zp", (1, 32))


AWQ = ExpertFormat("int4_zp", (1, 32), "awq")


def awq_layer(gpu_experts, dtype=torch.bfloat16):
    return QuantizedHybridMoE(expert_format=AWQ, num_experts=E, top_k=K, hidden_size=H_MX, intermediate_size=I,
                              gpu_experts=tuple(gpu_experts), dtype=dtype, device=torch.device("cpu"),
                              cpu_runtime=CPUExpertRuntime(num_threads=1, inline=True), pin_memory=False,
                              math=reference.SILU)


def test_awq_packs_column_j_in_nibble_j_order():
    """AutoAWQ's GEMM packing: a word's nibble i holds column (0, 2, 4, 6, 1, 3, 5, 7)[i]."""
    codes = torch.zeros(1, 8, dtype=torch.int32)
    codes[0, 1], codes[0, 6] = 5, 9
    assert quant.awq_pack(codes).item() == 5 << 16 | 9 << 12
    assert torch.equal(quant.awq_unpack(torch.tensor([[5 << 16 | 9 << 12]], dtype=torch.int32)), codes)


@pytest.mark.parametrize("gpu_experts", [(), tuple(range(E)), (1, 4)], ids=["all-cpu", "all-gpu", "mixed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_awq_layer_matches_the_oracle(gpu_experts, dtype):
    """AutoAWQ's tensors as vLLM's per-expert loader hands them over (qweight [K, N/8], qzeros
    [K/g, N/8], fp16 scales [K/g, N]; zero points before scales for some experts, after for
    others): the layer computes the fp32 oracle on (q - z) * scale, the scale rounded to the
    model's 16-bit dtype as vLLM holds it."""
    gen = torch.Generator().manual_seed(11)
    m = awq_layer(gpu_experts, dtype)
    oracle = {}
    for name, shape in (("1", (I, H_MX)), ("3", (I, H_MX)), ("2", (H_MX, I))):
        w = torch.randn(E, *shape, generator=gen) + torch.randn(E, shape[0], 1, generator=gen)
        packed, scale, zero = quant.quant_int4_zp(w, 32)
        scale = scale.half()
        oracle[name] = quant.dequant_int4_zp(packed, quant.pack_scale_zero(scale.float(), zero, dtype), shape[1], 32,
                                             scale_dtype=quant.scale_zero_dtype(dtype))
        for e in range(E):
            qweight = quant.awq_pack(quant.unpack_int4(packed[e], shape[1]).t().contiguous())  # [K, N/8]
            qzeros = quant.awq_pack(zero[e].t().contiguous())  # [K/g, N/8]
            m.load_expert(e, "w" + name, qweight)
            order = [("s" + name, scale[e].t().contiguous()), ("z" + name, qzeros)]
            for tensor_name, t in (order if e % 2 else order[::-1]):
                m.load_expert(e, tensor_name, t)
    x = torch.randn(7, H_MX, generator=gen).to(dtype)
    weights, ids = reference.route(torch.randn(7, E, generator=gen), K)
    out = m(x, weights, ids.to(torch.int32))
    ref = reference.moe(x.float(), torch.cat([oracle["1"], oracle["3"]], dim=1), oracle["2"], weights, ids,
                        reference.SILU)
    # one rounding of the output to the model dtype (2^-8 relative for bf16) over fp32 sums
    torch.testing.assert_close(out.float(), ref, atol=8e-3 * ref.abs().max().item(), rtol=0)


def awq_config(**overrides):
    from vllm.model_executor.layers.quantization.auto_awq import AutoAWQConfig

    return AutoAWQConfig.from_config({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                      "version": "gemm", **overrides})


def test_vllm_awq_config_names_the_format():
    from vllm_fiddler import compat

    prefix = "model.layers.1.mlp.experts"
    assert compat.expert_quantization(awq_config(), prefix) == ("int4_zp", (1, 128), "awq")
    assert compat.expert_quantization(awq_config(modules_to_not_convert=["layers.1.mlp"]), prefix) is None
    for overrides, what in (({"zero_point": False}, "AWQ 4-bit without zero points in groups of 128"),
                            ({"group_size": -1}, "AWQ 4-bit with zero points per output channel")):
        with pytest.raises(FiddlerConfigError, match=f"quantized as {what}.*AutoAWQ's INT4 groups"):
            compat.expert_quantization(awq_config(**overrides), prefix)
    assert set(AWQ.param_dtypes()) == {f"{p}_{t}" for p in ("w13", "w2") for t in ("qweight", "scales", "qzeros")}
    # a scale / zero word per group of 32: 4 bytes
    assert AWQ.expert_bytes(H_MX, I) == 3 * H_MX * I // 2 + 3 * H_MX * I // 32 * 4


def test_re_placement_is_off_for_quantized_experts():
    from vllm_fiddler.config import FiddlerConfig
    from vllm_fiddler.placement import plan_even
    from vllm_fiddler.runtime.setup import decide_adaptation

    shape = MoEShape(num_layers=2, num_experts=E, hidden_size=H, intermediate_size=I, top_k=K, dtype_bytes=2,
                     non_expert_bytes=0, kv_bytes_per_token=0, expert_format=FMT)
    placement = plan_even(2, E, 6)
    assert decide_adaptation(FiddlerConfig(), shape, placement, on_cuda=True) == (
        False, "quantized experts: re-placement copies bf16 experts only")
    on = FiddlerConfig.from_additional_config({"fiddler": {"adaptation": {"enabled": True}}})
    with pytest.raises(FiddlerConfigError, match="adaptation.enabled is true"):
        decide_adaptation(on, shape, placement, on_cuda=True)


# ---------------------------------------------------------------- the device set on CUDA
def _hot_experts_worker() -> None:
    """Under TRITON_INTERPRET=1: each format's layer, a few experts on its device set, runs
    them with the Triton kernels reading the stored tensors (hot_experts, CUDA's path) and with
    torch's dequantize-per-expert path (the CPU platform's); prints one JSON line of
    {case: max error relative to the output's scale}."""
    import json

    gpu = (1, 4, 6)
    fp8 = layer(gpu)
    load_per_expert(fp8, quantized_experts()[0])
    mx = mx_layer(gpu)
    load_as_gpt_oss(mx, mxfp4_checkpoint()[0])
    int4 = int4_layer(gpu)
    gen = torch.Generator().manual_seed(3)
    for name, shape in (("1", (I, H_MX)), ("3", (I, H_MX)), ("2", (H_MX, I))):
        packed, scale = quant.quant_int4_group(torch.randn(E, *shape, generator=gen), 32)
        for e in range(E):
            int4.load_expert(e, "w" + name, packed[e])
            int4.load_expert(e, "s" + name, scale[e].bfloat16())
    errors = {}
    for name, m, hidden in (("fp8_block", fp8, H), ("mxfp4", mx, H_MX), ("int4_group", int4, H_MX)):
        for tokens in (1, 7, 33):
            x = torch.randn(tokens, hidden, generator=gen)
            logits = torch.randn(tokens, E, generator=gen)
            logits[0, 4] += 10  # the first token has a device expert
            weights, ids = reference.route(logits, K)
            out = torch.full((tokens, hidden), float("nan"))  # rows left unwritten stay NaN
            m.hot_experts(x, weights, ids, out)
            ref = torch.zeros(tokens, hidden)
            m._device_experts(x, m.gpu_slot_of[ids], weights, ref)
            errors[f"{name}-{tokens}"] = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    print("RESULTS " + json.dumps(errors))


def test_device_experts_read_as_stored_match_the_dequantized_ones():
    """CUDA's device set (the Triton MoE kernels on the stored format, with each layer's
    biases and activation) against the dequantize-per-expert path on the same layer, in
    fp32: summation order only (1e-5). Triton's interpreter runs the kernels here, in a
    process of its own (it must be chosen before triton is imported)."""
    pytest.importorskip("triton")
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--hot-experts-worker"], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    errors = json.loads(lines[-1][len("RESULTS "):])
    assert len(errors) == 9 and all(err <= 1e-5 for err in errors.values()), errors


if __name__ == "__main__" and "--hot-experts-worker" in sys.argv:
    _hot_experts_worker()


# ---------------------------------------------------------------- tensor parallelism
TP_FORMATS = {"fp8": ExpertFormat("fp8_block", (32, 32)), "int4": INT4, "gptq": GPTQ, "awq": AWQ}


def tp_checkpoint(fmt: str, inter: int, seed: int = 0) -> list[tuple[int, str, torch.Tensor]]:
    """(expert, tensor name, whole checkpoint tensor) of every expert, as vLLM's per-expert loader
    hands them over (the format's own layout and metadata), for intermediate size `inter`."""
    f = TP_FORMATS[fmt]
    gen = torch.Generator().manual_seed(seed)
    calls = []
    for name, shape in (("1", (inter, H_MX)), ("3", (inter, H_MX)), ("2", (H_MX, inter))):
        w = torch.randn(E, *shape, generator=gen) + torch.randn(E, shape[0], 1, generator=gen)
        for e in range(E):
            if fmt == "fp8":
                q, s = quant.quant_fp8_block(w[e], f.block)
                calls += [(e, "w" + name, q), (e, "s" + name, s)]
            elif fmt == "awq":
                packed, scale, zero = quant.quant_int4_zp(w[e], 32)
                calls += [(e, "w" + name, quant.awq_pack(quant.unpack_int4(packed, shape[1]).t().contiguous())),
                          (e, "s" + name, scale.half().t().contiguous()),
                          (e, "z" + name, quant.awq_pack(zero.t().contiguous()))]
            else:
                packed, scale = quant.quant_int4_group(w[e], 32)
                if fmt == "gptq":
                    calls += [(e, "w" + name, packed.t().contiguous()), (e, "s" + name, scale.half().t().contiguous()),
                              (e, "g" + name, torch.arange(shape[1], dtype=torch.int32) // 32)]
                else:
                    calls += [(e, "w" + name, packed), (e, "s" + name, scale.bfloat16()),
                              (e, "k" + name, torch.tensor(list(shape)))]
    return calls


@pytest.mark.parametrize("fmt", sorted(TP_FORMATS))
def test_tensor_parallel_ranks_load_their_share_of_each_quantized_expert(fmt):
    """Under tensor parallelism vLLM's per-expert loader hands each rank whole checkpoint
    tensors; rank r of 2 keeps gate and up rows r*I..(r+1)*I and those inputs of the down
    projection, values and scales alike (I: the rank's share), in each layout: the ranks'
    experts are exactly the slices of a one-rank layer's, so their outputs sum to its."""
    f = TP_FORMATS[fmt]

    def make(inter, tp):
        return QuantizedHybridMoE(expert_format=f, tp=tp, num_experts=E, top_k=K, hidden_size=H_MX,
                                  intermediate_size=inter, gpu_experts=(1, 4), dtype=torch.float32,
                                  device=torch.device("cpu"), cpu_runtime=CPUExpertRuntime(num_threads=1, inline=True),
                                  pin_memory=False, math=reference.SILU)

    calls = tp_checkpoint(fmt, 2 * I)
    whole, ranks = make(2 * I, (0, 1)), [make(I, (r, 2)) for r in range(2)]
    for m in (whole, *ranks):
        for e, name, t in calls:
            m.load_expert(e, name, t)
    for e in range(E):
        w13, w2 = whole.expert_weights(e)
        for r, m in enumerate(ranks):
            rows = slice(r * I, (r + 1) * I)
            got13, got2 = m.expert_weights(e)
            assert torch.equal(got13, torch.cat([w13[:2 * I][rows], w13[2 * I:][rows]])), (e, r)
            assert torch.equal(got2, w2[:, rows]), (e, r)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, H_MX, generator=gen)
    weights, ids = reference.route(torch.randn(5, E, generator=gen), K)
    ids = ids.to(torch.int32)
    ref = whole(x, weights, ids)
    torch.testing.assert_close(ranks[0](x, weights, ids) + ranks[1](x, weights, ids), ref,
                               atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


def test_tensor_parallel_shares_must_hold_whole_scale_blocks():
    with pytest.raises(ValueError, match="a tensor-parallel rank's intermediate size 64 is not a multiple of the FP8 "
                                         "scale block's 48 columns"):
        FMT.check_layer("layer", H, I, tp_size=2)
    FMT.check_layer("layer", H, I)  # one rank: partial blocks are fine
    with pytest.raises(ValueError, match=r"intermediate size 48 \(a tensor-parallel rank's share\) must be"):
        INT4.check_layer("layer", H_MX, 48, tp_size=2)
