"""Quantized expert formats (kernels/quant.py): dequantization against independent references
(an element-by-element loop for FP8 blocks, transformers' own gpt-oss MXFP4
converter), the quantizers' error bounds, and bad shapes refused."""

from __future__ import annotations

import itertools

import pytest
import torch

from vllm_fiddler.kernels import quant


def fp8_reference(weight: torch.Tensor, scale: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    """Element by element, in fp32 as every kernel multiplies (4 significant bits times 24)."""
    w = weight.float()
    out = torch.empty_like(w)
    for i, j in itertools.product(range(w.shape[0]), range(w.shape[1])):
        out[i, j] = w[i, j] * scale[i // bn, j // bk]
    return out


@pytest.mark.parametrize("n, k, block", [(1, 1, (128, 128)), (7, 129, (128, 128)), (130, 200, (128, 128)),
                                         (96, 80, (64, 32)), (33, 17, (16, 8)), (64, 96, (32, 48))])
def test_fp8_block_dequant_matches_an_elementwise_loop(n, k, block):
    gen = torch.Generator().manual_seed(n * 1000 + k)
    weight = (torch.randn(n, k, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(-(-n // block[0]), -(-k // block[1]), generator=gen) + 0.01
    got = quant.dequant_fp8_block(weight, scale, block)
    torch.testing.assert_close(got, fp8_reference(weight, scale, *block), rtol=0, atol=0)


@pytest.mark.parametrize("n, k", [(128, 128), (130, 257), (5, 3)])
def test_fp8_block_quantizer_error_is_e4m3_rounding(n, k):
    """e4m3 keeps 3 mantissa bits: a normal value is off by at most 2^-4 of itself, a subnormal
    one (below 2^-6 of the block's scale) by at most 2^-10 of the scale."""
    w = torch.randn(2, n, k, generator=torch.Generator().manual_seed(1)) * 0.05
    q, scale = quant.quant_fp8_block(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and scale.shape == (2, -(-n // 128), -(-k // 128))
    back = quant.dequant_fp8_block(q, scale, dtype=torch.float64)
    per_elem_scale = scale.double().repeat_interleave(128, -2)[:, :n].repeat_interleave(128, -1)[:, :, :k]
    bound = torch.maximum(w.double().abs() * 2**-4, per_elem_scale * 2**-10) * (1 + 1e-6)
    assert bool(((back - w.double()).abs() <= bound).all())
    assert torch.equal(quant.dequant_fp8_block(*quant.quant_fp8_block(back.float())), back.float())  # a fixed point


def test_fp8_block_scales_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"expected shape \[2, 2\]"):
        quant.dequant_fp8_block(torch.zeros(130, 200, dtype=torch.float8_e4m3fn), torch.ones(1, 2))


def test_mxfp4_dequant_matches_transformers_gpt_oss_converter():
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), generator=gen, dtype=torch.uint8)  # [E, N, G, 16]
    scales = torch.randint(118, 136, (3, 10, 4), generator=gen, dtype=torch.uint8)  # [E, N, G]
    ours = quant.dequant_mxfp4(blocks, scales)  # [E, N, K]
    theirs = _convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, K, N]: gpt-oss's layout
    torch.testing.assert_close(ours, theirs.transpose(1, 2), rtol=0, atol=0)


@pytest.mark.parametrize("n, k", [(1, 32), (9, 96), (64, 2880)])  # 2880: gpt-oss's hidden size (90 groups)
def test_mxfp4_quantizer_rounds_to_the_nearest_e2m1(n, k):
    """Within a group of 32 every value is the nearest e2m1 times the group's power of two:
    at most half the widest spacing (1, between 4 and 6) times that scale away."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(2)) * 3
    blocks, scales = quant.quant_mxfp4(w)
    assert blocks.shape == (n, k // 32, 16) and scales.shape == (n, k // 32)
    back = quant.dequant_mxfp4(blocks, scales)
    step = torch.ldexp(torch.ones(n, k // 32), scales.to(torch.int32) - 127).repeat_interleave(32, -1)
    assert bool(((back - w).abs() <= step * (1 + 1e-6)).all())
    assert bool((back.unflatten(-1, (k // 32, 32)).abs().amax(-1) <= 6 * step[:, ::32]).all())
    assert torch.equal(quant.dequant_mxfp4(*quant.quant_mxfp4(back)), back)  # representable: exact


def test_mxfp4_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        quant.dequant_mxfp4(torch.zeros(2, 1, 16, dtype=torch.int8), torch.zeros(2, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[\.\.\., N, G, 16\]"):
        quant.dequant_mxfp4(torch.zeros(2, 1, 8, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.quant_mxfp4(torch.zeros(4, 33))


TOKENS = [1, 2, 3, 7, 16, 33, 128]


def quantized_experts(fmt: str, E: int, H: int, I: int, dtype: torch.dtype, seed: int = 0):
    """(w13, w2) QuantizedExperts of random experts [E, 2I, H] and [E, H, I]."""
    gen = torch.Generator().manual_seed(seed)
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen) * 0.05, torch.randn(E, H, I, generator=gen) * 0.05
    if fmt == "int4_group":
        q13, q2 = quant.quant_int4_group(w13, 64), quant.quant_int4_group(w2, 64)
        return (quant.QuantizedExperts(fmt, dict(zip(("weight_packed", "weight_scale"), q13)), dtype, group=64, k=H),
                quant.QuantizedExperts(fmt, dict(zip(("weight_packed", "weight_scale"), q2)), dtype, group=64, k=I))
    if fmt == "int4_zp":
        return (quant.QuantizedExperts.quantize(fmt, w13, dtype, group=64),
                quant.QuantizedExperts.quantize(fmt, w2, dtype, group=64))
    if fmt == "fp8_block":
        make = lambda w: dict(zip(("weight", "weight_scale_inv"), quant.quant_fp8_block(w)))  # noqa: E731
    else:
        make = lambda w: dict(zip(("blocks", "scales"), quant.quant_mxfp4(w)))  # noqa: E731
    return quant.QuantizedExperts(fmt, make(w13), dtype), quant.QuantizedExperts(fmt, make(w2), dtype)


def f32(experts):
    """The same experts, dequantized to fp32."""
    return experts.to_dtype(torch.float32).dequantized()


# bf16 activations: 8-bit mantissa, relative rounding 2^-9 per operand; over sums of 64-200 terms and
# two GEMMs plus the activation, 2e-2 of the output's scale holds with margin; fp32 matches the
# oracle to summation order (1e-5).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("fmt, H, I", [("fp8_block", 200, 72), ("fp8_block", 256, 384), ("mxfp4", 96, 64),
                                       ("int4_group", 204, 72), ("int4_zp", 204, 72)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_experts_match_the_fp32_oracle(tokens, fmt, H, I, dtype):
    """torch's grouped experts on QuantizedExperts (each routed expert dequantized when used)
    against the fp32 oracle on the dequantized weights. FP8 shapes with partial edge blocks
    (200 = 128 + 72: odd group counts) and whole ones; an expert nobody routes to is never read."""
    from vllm_fiddler.kernels import reference, torch_moe

    E, K = 5, 2
    w13, w2 = quantized_experts(fmt, E, H, I, dtype, seed=tokens)
    gen = torch.Generator().manual_seed(100 + tokens)
    x = torch.randn(tokens, H, generator=gen)
    logits = torch.randn(tokens, E, generator=gen)
    logits[:, E - 1] = -1e9  # expert E-1: empty
    weights, ids = reference.route(logits, K)
    out = torch.zeros(tokens, H)
    seen = []
    w13_seen = type("Seen", (quant.QuantizedExperts,), {
        "__getitem__": lambda self, e: seen.append(int(e)) or quant.QuantizedExperts.__getitem__(self, e)})(
        w13.fmt, w13.tensors, dtype, w13.block, w13.group, getattr(w13, "k", None))
    torch_moe.moe_forward(x.to(dtype), w13_seen, w2, ids, weights, out)
    assert E - 1 not in seen and len(seen) == len(set(seen))  # each routed expert expanded once
    ref = reference.moe(x, f32(w13), f32(w2), weights, ids)
    scale = ref.abs().max().item()
    torch.testing.assert_close(out, ref, atol=TOL[dtype] * scale, rtol=TOL[dtype])


@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_mxfp4_experts_with_gpt_oss_math(tokens):
    """gpt-oss's experts: MXFP4 weights, per-expert biases, clamped SwiGLU (fp32)."""
    from vllm_fiddler.kernels import reference, torch_moe

    E, K, H, I = 4, 2, 64, 32
    w13, w2 = quantized_experts("mxfp4", E, H, I, torch.float32, seed=7)
    gen = torch.Generator().manual_seed(tokens)
    b13, b2 = torch.randn(E, 2 * I, generator=gen) * 0.1, torch.randn(E, H, generator=gen) * 0.1
    math = reference.ExpertMath(activation="swigluoai", has_bias=True)
    x = torch.randn(tokens, H, generator=gen) * 4
    weights, ids = reference.route(torch.randn(tokens, E, generator=gen), K)
    out = torch.zeros(tokens, H)
    torch_moe.moe_forward(x, w13, w2, ids, weights, out, math, b13, b2)
    ref = reference.moe(x, w13.dequantized(), w2.dequantized(), weights, ids, math, b13, b2)
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


def test_quantized_experts_report_their_stored_bytes_and_refuse_unknown_formats():
    w13, _ = quantized_experts("fp8_block", 2, 256, 128, torch.bfloat16)
    assert w13.nbytes == 2 * 256 * 256 + 2 * 2 * 2 * 4  # fp8 weights + 2x2 fp32 block scales per expert
    m13, _ = quantized_experts("mxfp4", 2, 64, 32, torch.bfloat16)
    assert m13.nbytes == 2 * 64 * (64 // 2) + 2 * 64 * 2  # half a byte a weight + a byte per 32
    with pytest.raises(ValueError, match="unknown expert format"):
        quant.QuantizedExperts("int3", {}, torch.bfloat16)
    with pytest.raises(ValueError, match="expected shape"):
        quant.QuantizedExperts("fp8_block", {"weight": torch.zeros(2, 256, 256, dtype=torch.float8_e4m3fn),
                                             "weight_scale_inv": torch.ones(2, 1, 2)})


@pytest.mark.parametrize("n, k, group", [(3, 8, 8), (5, 204, 64), (16, 256, 128), (2, 9, 4)])
def test_int4_groups_match_compressed_tensors_packing(n, k, group):
    """Words packed as compressed-tensors' pack-quantized packs them (its own pack_to_int32 and
    unpack_from_int32 are the reference), K not a multiple of 8 and a partial last group."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    gen = torch.Generator().manual_seed(n * k)
    codes = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    words = pack_to_int32(codes, 4)
    scale = torch.rand(n, -(-k // group), generator=gen) + 0.01
    ref = unpack_from_int32(words, 4, torch.Size((n, k))).float() * scale.repeat_interleave(group, -1)[:, :k]
    torch.testing.assert_close(quant.dequant_int4_group(words, scale, k, group), ref, rtol=0, atol=0)
    w = torch.randn(n, k, generator=gen)
    ours, s = quant.quant_int4_group(w, group)
    back = quant.dequant_int4_group(ours, s, k, group)
    assert torch.equal(ours, pack_to_int32((torch.round(back / s.repeat_interleave(group, -1)[:, :k])).to(torch.int8), 4))
    half_step = s.repeat_interleave(group, -1)[:, :k] / 2
    assert bool(((back - w).abs() <= half_step * (1 + 1e-6)).all())  # round to nearest, nothing clipped


def test_int4_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="int32"):
        quant.dequant_int4_group(torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1), 8, 8)
    with pytest.raises(ValueError, match="groups of 64"):
        quant.dequant_int4_group(torch.zeros(2, 2, dtype=torch.int32), torch.ones(2, 2), 16, 64)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_int4_zero_points_dequantize_to_code_minus_zero_times_scale(scale_dtype):
    """INT4 with zero points (AutoAWQ's, repacked): codes, zero points and scales drawn
    independently; the words round-trip and W = (q - z) * scale, the scale rounded once to the
    16-bit float its bits are kept in."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 16, 72), generator=gen)
    zero = torch.randint(0, 16, (3, 16, 3), generator=gen)
    scale = torch.rand(3, 16, 3, generator=gen) * 0.1 - 0.05
    words = quant.pack_int4(codes)
    assert words.shape == (3, 16, 9) and torch.equal(quant.unpack_int4(words, 72), codes.to(torch.int32))
    packed = quant.pack_scale_zero(scale, zero, scale_dtype)
    s, z = quant.unpack_scale_zero(packed, scale_dtype)
    assert torch.equal(z, zero.to(torch.int32)) and torch.equal(s, scale.to(scale_dtype).float())
    ref = (codes - zero.repeat_interleave(24, -1)).float() * scale.to(scale_dtype).float().repeat_interleave(24, -1)
    torch.testing.assert_close(quant.dequant_int4_zp(words, packed, 72, 24, scale_dtype=scale_dtype), ref,
                               rtol=0, atol=0)
