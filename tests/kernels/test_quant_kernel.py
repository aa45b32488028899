"""The native quantized-expert kernels (kernels/cpu/kernel_quant_avx512.cpp, AVX512F/BW/VL)
against the fp32 oracle on the dequantized weights: FP8 block-scaled experts (DeepSeek-V3),
MXFP4 ones with biases and gpt-oss's clamped SwiGLU, and INT4 groups (W4A16).

The kernel widens each weight to fp32 exactly (an e4m3 value, or an e2m1 value times its
group's power of two), multiplies it with the fp32-widened bf16 activations, applies FP8
block scales to the blocks' partial sums and keeps biases and the activation in fp32: it
differs from the oracle (which scales every weight first) by fp32 summation order only,
~1e-6 of the output's scale here; 1e-5 leaves room for longer rows. A wrong block scale, a
mis-decoded code or exponent, a nibble-order swap, a missing bias or a token routed to the
wrong expert moves outputs by percents or more.
"""

from __future__ import annotations

import pytest
import torch

from vllm_fiddler.kernels import cpu as cpu_kernels
from vllm_fiddler.kernels import quant, reference

pytestmark = pytest.mark.skipif(not cpu_kernels.quantized_available(), reason="needs AVX512F/BW/VL and a native build")


def experts(E, H, I, block, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=gen) * torch.rand(E, 2 * I, 1, generator=gen)
    w2 = torch.randn(E, H, I, generator=gen)
    q13, s13 = quant.quant_fp8_block(w13, block)
    q2, s2 = quant.quant_fp8_block(w2, block)
    return (q13, s13, q2, s2), (quant.dequant_fp8_block(q13, s13, block), quant.dequant_fp8_block(q2, s2, block))


def fp8_experts(q13, s13, q2, s2, block):
    make = lambda q, s: quant.QuantizedExperts("fp8_block", {"weight": q, "weight_scale_inv": s}, block=block)  # noqa: E731
    return make(q13, s13), make(q2, s2)


def run(x, q, ids, weights, block):
    out = torch.zeros(x.shape[0], x.shape[1])
    assert cpu_kernels.moe_forward_quantized(x, *fp8_experts(*q, block), ids.to(torch.int32), weights, out)
    return out


def check(out, ref):
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 2, 3, 7, 16, 33, 128])
@pytest.mark.parametrize("H, I, block", [(256, 128, (128, 128)), (80, 96, (32, 48)), (200, 64, (16, 24))],
                         ids=["128x128", "partial-blocks", "odd-rows"])
def test_fp8_kernel_matches_the_oracle(tokens, H, I, block):
    """128x128 blocks as DeepSeek-V3 ships them; blocks cut short at the row's end (H = 80 over
    48 columns); rows that are no multiple of 16 (H = 200: masked tails) and blocks of 24."""
    E, K = 8, 2
    q, (w13, w2) = experts(E, H, I, block, seed=tokens)
    gen = torch.Generator().manual_seed(tokens + 1)
    x = torch.randn(tokens, H, generator=gen).bfloat16()
    logits = torch.randn(tokens, E, generator=gen)
    logits[:, 5] = -1e9  # an expert no token chose: never read
    weights, ids = reference.route(logits, K)
    ids[0, 0] = -1  # a pair served elsewhere (the GPU): skipped
    check(run(x, q, ids, weights, block), reference.moe(x.float(), w13, w2, weights, ids.clamp(min=0), reference.SILU,
                                                         ) - _skipped(x, w13, w2, weights, ids))


def _skipped(x, w13, w2, weights, ids):
    """The oracle's share of the pairs with id -1 (the test routes them to expert 0 and takes it back)."""
    mask = ids < 0
    return reference.moe(x.float(), w13, w2, weights * mask, ids.clamp(min=0), reference.SILU)


def test_every_e4m3_code_decodes_exactly():
    """All 254 finite e4m3fn codes (subnormals, zero of both signs, 448) as the weights of one
    expert, scale 1: the kernel's register decode against torch's."""
    H, I, block = 256, 16, (16, 128)
    codes = torch.arange(256, dtype=torch.int32)
    codes = torch.where((codes & 0x7F) == 0x7F, 0, codes).to(torch.uint8)  # the two NaN codes -> 0
    gen = torch.Generator().manual_seed(3)
    rows = torch.stack([codes[torch.randperm(256, generator=gen)] for _ in range(2 * I)])  # [2I, 256]
    q13 = rows[:, :H].contiguous().view(torch.float8_e4m3fn)[None]  # [1, 2I, H]
    q2 = torch.stack([codes[torch.randperm(256, generator=gen)][:I] for _ in range(H)]).view(torch.float8_e4m3fn)[None]
    s13 = torch.full((1, 2 * I // 16, 2), 1e-3)
    s2 = torch.full((1, H // 16, 1), 1e-3)
    x = torch.randn(3, H, generator=gen).bfloat16()
    weights, ids = torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.int64)
    w13 = quant.dequant_fp8_block(q13, s13, block)
    w2 = quant.dequant_fp8_block(q2, s2, block)
    check(run(x, (q13, s13, q2, s2), ids, weights, block), reference.moe(x.float(), w13, w2, weights, ids, reference.SILU))


def test_bad_inputs_are_refused():
    q, _ = experts(2, 64, 64, (32, 32))
    x, ids, w = torch.randn(1, 64).bfloat16(), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1)
    out = torch.zeros(1, 64)
    wrong = quant.QuantizedExperts("fp8_block", {"weight": q[0], "weight_scale_inv": q[1]}, block=(32, 32))
    wrong.tensors["weight_scale_inv"] = q[1][:, :1]
    with pytest.raises(RuntimeError, match="scales must be"):
        cpu_kernels.moe_forward_quantized(x, wrong, fp8_experts(*q, (32, 32))[1], ids, w, out)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kernels.moe_forward_quantized(x, *fp8_experts(*q, (32, 32)), torch.full((1, 1), 2, dtype=torch.int32), w,
                                          out)
    assert not cpu_kernels.moe_forward_quantized(x.float(), *fp8_experts(*q, (32, 32)), ids, w, out)  # torch's path


# ---------------------------------------------------------------- MXFP4 (gpt-oss)
GPT_OSS = reference.ExpertMath(activation="swigluoai", has_bias=True)


def mxfp4_experts(E, H, I, seed=0):
    """(QuantizedExperts w13, w2), bf16 biases (b13, b2), and the oracle's fp32 (w13, w2, b13, b2).
    Rows over four octaves of scale; biases large enough that the clamp at 7 bites."""
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=gen) * 2.0 ** torch.randint(-2, 2, (E, 2 * I, 1), generator=gen)
    w2 = torch.randn(E, H, I, generator=gen)
    (bl13, e13), (bl2, e2) = quant.quant_mxfp4(w13), quant.quant_mxfp4(w2)
    b13 = (torch.randn(E, 2 * I, generator=gen) * 4).bfloat16()
    b2 = torch.randn(E, H, generator=gen).bfloat16()
    make = lambda b, e: quant.QuantizedExperts("mxfp4", {"blocks": b, "scales": e}, block=(1, 32))  # noqa: E731
    oracle = (quant.dequant_mxfp4(bl13, e13), quant.dequant_mxfp4(bl2, e2), b13.float(), b2.float())
    return (make(bl13, e13), make(bl2, e2)), (b13, b2), oracle


@pytest.mark.parametrize("tokens", [1, 2, 5, 16, 33])
@pytest.mark.parametrize("H, I", [(96, 64), (2880 // 10, 96)], ids=["small", "gpt-oss-groups"])
@pytest.mark.parametrize("math", [GPT_OSS, reference.ExpertMath(activation="silu", has_bias=True)],
                         ids=["swigluoai", "silu-bias"])
def test_mxfp4_kernel_matches_the_oracle(tokens, H, I, math):
    """H = 288: nine scale groups (gpt-oss's 2880 has 90); an expert no token chose and a pair
    served elsewhere (-1) are skipped."""
    E, K = 6, 2
    (w13, w2), biases, (d13, d2, b13, b2) = mxfp4_experts(E, H, I, seed=tokens)
    gen = torch.Generator().manual_seed(tokens + 1)
    x = torch.randn(tokens, H, generator=gen).bfloat16()
    logits = torch.randn(tokens, E, generator=gen)
    logits[:, 4] = -1e9
    weights, ids = reference.route(logits, K)
    ids[0, 1] = -1
    out = torch.zeros(tokens, H)
    assert cpu_kernels.moe_forward_quantized(x, w13, w2, ids.to(torch.int32), weights, out, math, biases)
    served = weights * (ids >= 0)
    ref = reference.moe(x.float(), d13, d2, served, ids.clamp(min=0), math, b13, b2)
    check(out, ref)


def test_every_e2m1_code_and_a_wide_exponent_range_decode_exactly():
    """All 256 byte values (both nibbles over all 16 codes, -0 included) under exponents from
    2^-20 to 2^+5, SiLU without biases so every weight reaches the output linearly enough."""
    H, I = 256, 32
    gen = torch.Generator().manual_seed(5)
    bl13 = torch.stack([torch.randperm(256, generator=gen)[:H // 2] for _ in range(2 * I)]).to(torch.uint8)
    bl13 = bl13.view(1, 2 * I, H // 32, 16)
    e13 = torch.randint(107, 133, (1, 2 * I, H // 32), generator=gen, dtype=torch.uint8)
    bl2 = torch.randint(0, 256, (1, H, I // 32, 16), generator=gen, dtype=torch.uint8)
    e2 = torch.full((1, H, I // 32), 120, dtype=torch.uint8)
    make = lambda b, e: quant.QuantizedExperts("mxfp4", {"blocks": b, "scales": e}, block=(1, 32))  # noqa: E731
    x = torch.randn(3, H, generator=gen).bfloat16() * 1e-2
    weights, ids = torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.int64)
    out = torch.zeros(3, H)
    assert cpu_kernels.moe_forward_quantized(x, make(bl13, e13), make(bl2, e2), ids.to(torch.int32), weights, out,
                                             reference.SILU)
    ref = reference.moe(x.float(), quant.dequant_mxfp4(bl13, e13), quant.dequant_mxfp4(bl2, e2), weights, ids,
                        reference.SILU)
    check(out, ref)


def test_mxfp4_shapes_and_biases_are_checked():
    (w13, w2), (b13, b2), _ = mxfp4_experts(2, 96, 64)
    x, ids, w = torch.randn(1, 96).bfloat16(), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1)
    out = torch.zeros(1, 96)
    with pytest.raises(RuntimeError, match="biases must be contiguous bf16"):
        cpu_kernels.moe_forward_quantized(x, w13, w2, ids, w, out, GPT_OSS, (b13[:, :10], b2))
    # biases in another dtype, or a math that wants biases without them: torch's path
    assert not cpu_kernels.moe_forward_quantized(x, w13, w2, ids, w, out, GPT_OSS, (b13.float(), b2.float()))
    assert not cpu_kernels.moe_forward_quantized(x, w13, w2, ids, w, out, GPT_OSS, None)


# ---------------------------------------------------------------- INT4 groups (W4A16)
@pytest.mark.parametrize("tokens", [1, 2, 3, 7, 16, 33, 128])
@pytest.mark.parametrize("H, I, group", [(128, 96, 32), (384, 128, 128), (160, 224, 32)],
                         ids=["g32", "g128", "odd-groups"])
def test_int4_kernel_matches_the_oracle(tokens, H, I, group):
    """Groups of 32 and 128 (GPTQ's usual), odd group counts (5 and 7 a row); bf16 scales as
    checkpoints store them."""
    E, K = 6, 2
    gen = torch.Generator().manual_seed(tokens)
    w13 = torch.randn(E, 2 * I, H, generator=gen) * torch.rand(E, 2 * I, 1, generator=gen)
    w2 = torch.randn(E, H, I, generator=gen)
    (p13, s13), (p2, s2) = quant.quant_int4_group(w13, group), quant.quant_int4_group(w2, group)
    s13, s2 = s13.bfloat16(), s2.bfloat16()
    make = lambda p, s, k: quant.QuantizedExperts("int4_group", {"weight_packed": p, "weight_scale": s},  # noqa: E731
                                                  group=group, k=k)
    x = torch.randn(tokens, H, generator=gen).bfloat16()
    logits = torch.randn(tokens, E, generator=gen)
    logits[:, 3] = -1e9
    weights, ids = reference.route(logits, K)
    out = torch.zeros(tokens, H)
    assert cpu_kernels.moe_forward_quantized(x, make(p13, s13, H), make(p2, s2, I), ids.to(torch.int32), weights, out)
    ref = reference.moe(x.float(), quant.dequant_int4_group(p13, s13.float(), H, group),
                        quant.dequant_int4_group(p2, s2.float(), I, group), weights, ids, reference.SILU)
    check(out, ref)


@pytest.mark.parametrize("tokens", [1, 2, 3, 7, 16, 33, 128])
@pytest.mark.parametrize("H, I, group", [(128, 96, 32), (384, 128, 128), (160, 224, 32)],
                         ids=["g32", "g128", "odd-groups"])
def test_int4_zero_point_kernel_matches_the_oracle(tokens, H, I, group):
    """INT4 with zero points (AutoAWQ's asymmetric groups): every zero point 0..15 occurs
    (weights shifted per row so some groups are all positive or all negative), bf16 scales."""
    E, K = 6, 2
    gen = torch.Generator().manual_seed(100 + tokens)
    w13 = torch.randn(E, 2 * I, H, generator=gen) + torch.randn(E, 2 * I, 1, generator=gen) * 2
    w2 = torch.randn(E, H, I, generator=gen) + torch.randn(E, H, 1, generator=gen) * 2
    w13e = quant.QuantizedExperts.quantize("int4_zp", w13, group=group)
    w2e = quant.QuantizedExperts.quantize("int4_zp", w2, group=group)
    zeros = quant.unpack_scale_zero(w13e.tensors["weight_scale_zero"])[1]
    assert set(zeros.unique().tolist()) == set(range(16))
    x = torch.randn(tokens, H, generator=gen).bfloat16()
    logits = torch.randn(tokens, E, generator=gen)
    logits[:, 3] = -1e9
    weights, ids = reference.route(logits, K)
    out = torch.zeros(tokens, H)
    assert cpu_kernels.moe_forward_quantized(x, w13e, w2e, ids.to(torch.int32), weights, out)
    ref = reference.moe(x.float(), w13e.to_dtype(torch.float32).dequantized(), w2e.to_dtype(torch.float32).dequantized(),
                        weights, ids, reference.SILU)
    check(out, ref)


def test_int4_groups_the_kernel_does_not_take_go_to_torch():
    """Groups of 8 or 16 (no multiple of the kernel's 32-weight steps) and fp32 scales: False,
    nothing done (kernels.quant's torch path computes them)."""
    p, s = quant.quant_int4_group(torch.randn(2, 64, 64), 16)
    experts = quant.QuantizedExperts("int4_group", {"weight_packed": p, "weight_scale": s.bfloat16()}, group=16, k=64)
    x, ids, w = torch.randn(1, 64).bfloat16(), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1)
    out = torch.zeros(1, 64)
    assert not cpu_kernels.moe_forward_quantized(x, experts, experts, ids, w, out)
    p, s = quant.quant_int4_group(torch.randn(2, 64, 64), 32)
    fp32 = quant.QuantizedExperts("int4_group", {"weight_packed": p, "weight_scale": s}, group=32, k=64)
    assert not cpu_kernels.moe_forward_quantized(x, fp32, fp32, ids, w, out)
    assert not out.any()


# ---------------------------------------------------------------- fp16 models (GPTQ, AWQ)
FORMAT_SPECS = {
    "fp8_block": dict(block=(32, 48)),
    "mxfp4": dict(math=GPT_OSS),
    "int4_group": dict(group=32),
    "int4_zp": dict(group=32),
}


def fp16_model_experts(fmt, E, H, I, seed):
    """(w13, w2) of `fmt` as an fp16 model holds them (INT4 scales in fp16, zero-point words
    with fp16 scale bits), math, fp16 biases where math has them, and the oracle's fp32
    (w13, w2, b13, b2)."""
    spec = FORMAT_SPECS[fmt]
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=gen) + torch.randn(E, 2 * I, 1, generator=gen)
    w2 = torch.randn(E, H, I, generator=gen)
    make = lambda w: quant.QuantizedExperts.quantize(fmt, w, torch.float16, block=spec.get("block", (128, 128)),  # noqa: E731
                                                     group=spec.get("group", 128))
    w13q, w2q = make(w13), make(w2)
    math = spec.get("math", reference.SILU)
    biases = None
    if math.has_bias:
        biases = ((torch.randn(E, 2 * I, generator=gen) * 4).half(), torch.randn(E, H, generator=gen).half())
    oracle = (w13q.to_dtype(torch.float32).dequantized(), w2q.to_dtype(torch.float32).dequantized(),
              *(b.float() for b in biases or ()))
    return w13q, w2q, math, biases, oracle


@pytest.mark.parametrize("tokens", [1, 3, 16, 33])
@pytest.mark.parametrize("fmt", sorted(FORMAT_SPECS))
def test_fp16_models_run_natively(fmt, tokens):
    """An fp16 model (GPTQ and AWQ checkpoints' dtype): x, biases and INT4 scales in fp16,
    widened exactly, so the kernels match the fp32 oracle as tightly as in bf16."""
    E, H, I, K = 5, 96, 64, 2
    w13, w2, math, biases, oracle = fp16_model_experts(fmt, E, H, I, seed=tokens)
    if fmt.startswith("int4"):
        assert {w13.tensors.get("weight_scale", torch.empty(0, dtype=torch.float16)).dtype, w13.scale_dtype} == \
            {torch.float16}
    gen = torch.Generator().manual_seed(tokens + 1)
    x = torch.randn(tokens, H, generator=gen).half()
    weights, ids = reference.route(torch.randn(tokens, E, generator=gen), K)
    out = torch.zeros(tokens, H)
    assert cpu_kernels.moe_forward_quantized(x, w13, w2, ids.to(torch.int32), weights, out, math, biases)
    check(out, reference.moe(x.float(), oracle[0], oracle[1], weights, ids, math, *oracle[2:]))


@pytest.mark.parametrize("fmt", sorted(FORMAT_SPECS))
def test_x_in_another_dtype_than_the_experts_goes_to_torch(fmt):
    """fp16 scales or biases with bf16 x, or fp32 x: False, nothing done; the op itself
    refuses where the dtypes are in its tensors, naming x's."""
    w13, w2, math, biases, _ = fp16_model_experts(fmt, 3, 64, 32, seed=0)
    ids, w = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1)
    out = torch.zeros(1, 64)
    # the job thread: the layer asks for its model's dtype
    assert cpu_kernels.takes_jobs(w13, w2, math, biases, x_dtype=torch.float16)
    assert not cpu_kernels.takes_jobs(w13, w2, math, biases, x_dtype=torch.float32)
    assert cpu_kernels.takes_jobs(w13, w2, math, biases, x_dtype=torch.bfloat16) == \
        (not fmt.startswith("int4") and biases is None)
    assert not cpu_kernels.moe_forward_quantized(torch.randn(1, 64), w13, w2, ids, w, out, math, biases)
    if fmt.startswith("int4") or biases is not None:
        assert not cpu_kernels.moe_forward_quantized(torch.randn(1, 64).bfloat16(), w13, w2, ids, w, out, math, biases)
        w13_values, w2_values, s13, s2, b13, b2, *spec = cpu_kernels._quantized_set(w13, w2, math, biases)
        if fmt == "int4_zp":  # the words hold a scale's bits, not its dtype: only the Python side knows
            assert not out.any()
            return
        with pytest.raises(RuntimeError, match=r"dtype must be x's \(x is BFloat16\)"):
            torch.ops.fiddler_cpu.moe_forward_quant(torch.randn(1, 64).bfloat16(), w13_values, s13, w2_values, s2, b13,
                                                    b2, ids, w, out, *spec)
    else:  # FP8 without biases: either dtype
        assert cpu_kernels.moe_forward_quantized(torch.randn(1, 64).bfloat16(), w13, w2, ids, w, out, math, biases)
        out.zero_()
    assert not out.any()


# ---------------------------------------------------------------- on the native job thread
# Device-waited jobs, routed jobs and graph steps (vllm_fiddler.runtime.graph_jobs) run
# quantized experts on the native job thread as bf16 ones. Same kernels, same threads, same
# per-output-row summation order: bit-equal to moe_forward_quantized called directly.


def job_experts(fmt, E=5, H=96, I=64, seed=0, dtype=torch.bfloat16):
    """(w13, w2) QuantizedExperts of `fmt` for a model of `dtype`, math, biases (in `dtype`
    where math has them)."""
    spec = FORMAT_SPECS[fmt]
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=gen)
    w2 = torch.randn(E, H, I, generator=gen)
    make = lambda w: quant.QuantizedExperts.quantize(fmt, w, dtype, block=spec.get("block", (128, 128)),  # noqa: E731
                                                     group=spec.get("group", 128))
    math = spec.get("math", reference.SILU)
    biases = None
    if math.has_bias:
        biases = ((torch.randn(E, 2 * I, generator=gen) * 4).to(dtype), torch.randn(E, H, generator=gen).to(dtype))
    return make(w13), make(w2), math, biases


def direct(x, w13, w2, ids, weights, math, biases):
    want = torch.zeros(x.shape[0], x.shape[1])
    assert cpu_kernels.moe_forward_quantized(x, w13, w2, ids, weights, want, math, biases)
    return want


def routing(tokens, E, K, seed):
    gen = torch.Generator().manual_seed(seed)
    weights, ids = reference.route(torch.randn(tokens, E, generator=gen), K)
    return weights, ids.to(torch.int32)


@pytest.mark.parametrize("fmt", sorted(FORMAT_SPECS))
def test_quantized_jobs_on_the_job_thread_match_the_direct_call(fmt):
    import time

    w13, w2, math, biases = job_experts(fmt)
    assert cpu_kernels.takes_jobs(w13, w2, math, biases)
    assert cpu_kernels.takes_jobs(w13, w2, math, biases, x_dtype=torch.bfloat16)
    if biases is not None:  # gpt-oss's math without its biases: not the kernels' (torch's path)
        assert not cpu_kernels.takes_jobs(w13, w2, math, None)
    H, E, K = 96, 5, 2
    word = torch.zeros(1, dtype=torch.int32)
    cpu_kernels.async_take_error()
    jobs = []
    for seq, tokens in enumerate((1, 3, 16), start=1):
        x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(seq)).bfloat16()
        weights, ids = routing(tokens, E, K, seq)
        ids[0, 1] = -1  # a pair the GPU serves
        out = torch.full((tokens, H), 7.0)  # zeroed by the job
        assert cpu_kernels.moe_forward_async(x, w13, w2, ids, weights, out, word, seq, math=math, biases=biases)
        jobs.append((x, ids, weights, out))
    deadline = time.monotonic() + 10
    while int(word) != len(jobs):
        assert time.monotonic() < deadline, "the job thread never signalled"
    cpu_kernels.async_wait_idle()
    assert cpu_kernels.async_take_error() == ""
    for x, ids, weights, out in jobs:
        assert torch.equal(out, direct(x, w13, w2, ids, weights, math, biases))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("fmt", sorted(FORMAT_SPECS))
def test_quantized_routed_jobs_and_graph_steps_match_the_direct_call(fmt, dtype):
    """A routed job reads host slots once its ready word lands; a graph step (a Python thread
    playing the graph's memory operations) runs a layer slot's quantized experts; in either
    model dtype (the graph's x buffer is the model's)."""
    import time

    w13, w2, math, biases = job_experts(fmt, seed=1, dtype=dtype)
    H, E, K, T = 96, 5, 2, 3
    weights, slots = routing(T, E, K, 11)
    slots[1, 0] = -1
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(12)).to(dtype)
    want = direct(x, w13, w2, slots, weights, math, biases)
    cpu_kernels.async_take_error()

    # routed: buffers filled after the submit, before the ready word
    xb, sb, wb = torch.zeros_like(x), torch.full_like(slots, -1), torch.zeros_like(weights)
    ready, done, out = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), torch.zeros(T, H)
    counts = torch.zeros(3, dtype=torch.int64)
    assert cpu_kernels.moe_forward_routed_async(xb, w13, w2, sb, wb, 1, out, ready, done, 1, counts, math=math,
                                                biases=biases)
    time.sleep(0.01)
    xb.copy_(x), sb.copy_(slots), wb.copy_(weights)
    ready.fill_(1)
    cpu_kernels.async_wait_idle()
    assert cpu_kernels.async_take_error() == "" and int(done) == 1
    assert torch.equal(out, want)
    assert counts.tolist() == [int((slots >= 0).sum()), 0, len(set(slots[slots >= 0].tolist()))]

    # a graph step
    N = 4
    bufs = dict(x=torch.zeros(N, H, dtype=dtype), slots=torch.full((N, K), -1, dtype=torch.int32),
                weights=torch.zeros(N, K), first=torch.zeros(K, dtype=torch.int32), out=torch.zeros(N, H))
    mark, done = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    assert cpu_kernels.graph_jobs_attach(bufs["x"], bufs["slots"], bufs["weights"], bufs["first"], bufs["out"],
                                         mark, done)
    try:
        counts, pairs = torch.zeros(3, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
        cpu_kernels.graph_jobs_add_layer(0, w13, w2, 1, counts, pairs, math=math, biases=biases)
        bufs["x"][:T], bufs["slots"][:T], bufs["weights"][:T] = x, slots, weights
        mark.fill_((1 << 16) | T)  # layer slot 0, T rows
        deadline = time.monotonic() + 10
        while int(done) != 1:
            assert time.monotonic() < deadline, "the job thread never served the graph step"
        assert cpu_kernels.async_take_error() == ""
        assert torch.equal(bufs["out"][:T], want) and int(pairs) == T * K
    finally:
        cpu_kernels.graph_jobs_detach()


def test_quantized_jobs_with_bad_experts_fail_at_submit():
    """A job whose experts the kernels cannot read fails where it is submitted, with the op's
    message; nothing is queued (no stream could be left waiting for it)."""
    w13, w2, math, biases = job_experts("mxfp4")
    x, ids, weights = torch.randn(1, 96).bfloat16(), torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, 2)
    word, out = torch.zeros(1, dtype=torch.int32), torch.zeros(1, 96)
    short = (biases[0][:, :10].contiguous(), biases[1])
    with pytest.raises(RuntimeError, match="moe_forward_async: biases must be contiguous bf16"):
        cpu_kernels.moe_forward_async(x, w13, w2, ids, weights, out, word, 1, math=math, biases=short)
    bad = quant.QuantizedExperts("mxfp4", dict(w13.tensors))
    bad.tensors["scales"] = bad.tensors["scales"][:, :8].contiguous()  # past the constructor's own check
    with pytest.raises(RuntimeError, match="MXFP4 scales must be"):
        cpu_kernels.graph_jobs_add_layer(0, bad, w2, 1, torch.zeros(3, dtype=torch.int64),
                                         torch.zeros(1, dtype=torch.int64), math=math, biases=biases)
    cpu_kernels.async_wait_idle()
    assert int(word) == 0 and cpu_kernels.async_take_error() == ""
