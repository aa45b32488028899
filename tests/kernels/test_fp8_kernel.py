"""The native FP8 block-scaled expert kernels (kernels/cpu/kernel_fp8_avx512.cpp, AVX512F/BW/VL)
against the fp32 oracle on the dequantized weights.

The kernel widens each e4m3 weight to fp32 exactly, multiplies it with the fp32-widened bf16
activations, applies each block's scale to the block's partial sums and keeps the SwiGLU
activation in fp32: it differs from the oracle (which scales every weight first) by fp32
summation order only, ~1e-6 of the output's scale here; 1e-5 leaves room for longer rows.
A wrong block scale, a mis-decoded exponent or a token routed to the wrong expert moves
outputs by percents or more.
"""

from __future__ import annotations

import pytest
import torch

from vllm_fiddler.kernels import cpu as cpu_kernels
from vllm_fiddler.kernels import quant, reference

pytestmark = pytest.mark.skipif(not cpu_kernels.fp8_available(), reason="needs AVX512F/BW/VL and a native build")


def experts(E, H, I, block, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=gen) * torch.rand(E, 2 * I, 1, generator=gen)
    w2 = torch.randn(E, H, I, generator=gen)
    q13, s13 = quant.quant_fp8_block(w13, block)
    q2, s2 = quant.quant_fp8_block(w2, block)
    return (q13, s13, q2, s2), (quant.dequant_fp8_block(q13, s13, block), quant.dequant_fp8_block(q2, s2, block))


def run(x, q, ids, weights, block):
    out = torch.zeros(x.shape[0], x.shape[1])
    assert cpu_kernels.moe_forward_fp8(x, *q[:2], *q[2:], ids.to(torch.int32), weights, out, block)
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
    with pytest.raises(RuntimeError, match="scales must be"):
        cpu_kernels.moe_forward_fp8(x, q[0], q[1][:, :1], q[2], q[3], ids, w, out, (32, 32))
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kernels.moe_forward_fp8(x, *q, torch.full((1, 1), 2, dtype=torch.int32), w, out, (32, 32))
    assert not cpu_kernels.moe_forward_fp8(x.float(), *q, ids, w, out, (32, 32))  # fp32 x: the torch path's
