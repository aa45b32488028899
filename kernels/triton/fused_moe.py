"""Fused MoE for GPU-resident experts, in Triton.

The hybrid layer splits a Mixtral MoE block in two: the experts that live on
the GPU ("hot", `Eg` of them, stacked in `w13`/`w2` by LOCAL slot) and the
ones that live on the CPU ("cold"). This module computes the hot part:

    out[t] = sum_k topk_weights[t, k] * ffn_{topk_ids[t, k]}(x[t])

over the token-slots whose `topk_ids[t, k]` is a local slot in [0, Eg); a
slot of -1 (its expert is cold, the CPU computes it) contributes nothing.

The computation, as in vLLM's `fused_moe` (and written against the same idea,
with no vLLM code or compiled op):

1. **Routing metadata** (`moe_align_block_size`: one small Triton kernel,
   `_align_kernel`; `moe_align_block_size_torch` is the same with torch
   ops). The T*K token-slots are sorted by expert, and each expert's run of
   slots is padded to a multiple of BLOCK_M, so that every BLOCK_M-row tile of
   the sorted list belongs to ONE expert. `expert_ids[b]` says which. Padding
   entries hold the sentinel T*K and are masked off in the kernels.

2. **Grouped GEMM #1, gate/up with SwiGLU fused** (`_grouped_gemm_kernel`,
   FUSE_SWIGLU=True). Each program takes one BLOCK_M tile of sorted slots,
   gathers their token rows of `x`, and multiplies by the tile's expert's
   gate rows `w13[e, n]` AND up rows `w13[e, I + n]` (two accumulators that
   share the loads of `x`). The epilogue writes silu(gate) * up, so the
   [T*K, 2I] gate/up activation never goes to memory: only [T*K, I] does.

3. **Grouped GEMM #2, down projection** (the same kernel, FUSE_SWIGLU=False,
   MUL_ROUTED_WEIGHT=True): act[slot] @ w2[e]^T * topk_weights[slot] into a
   per-slot fp32 buffer [T*K, H].

4. **Top-k combine** (`_topk_sum_kernel`): out[t] = sum over the K slots of
   token t whose id is a valid local slot; a token with none gets zeros.
   Summing per token (rather than atomically adding into `out` in step 3)
   keeps the result deterministic.

Quantized experts (kernels.quant.QuantizedExperts: FP8 with block scales, MXFP4,
INT4 in groups) are read as stored: each B tile is loaded as its rows' bytes
or words ([BLOCK_N, BLOCK_K / PACK]) with the scales of its groups of G inputs,
widened to x's dtype in registers (`_dequantized_tile`) and transposed for
tl.dot; the same kernels take biases and gpt-oss's clamped SwiGLU (math).
Measured on an H100 (benchmarks/triton_moe.py, results/triton-moe-quant-h100.json):
DeepSeek-V3's FP8 experts stream at 1.06-1.25 TB/s of stored bytes at 1-16
tokens; the 4-bit formats at 0.15-0.65 TB/s, where the nibble unpacking and
the tile's transpose, not HBM, bound them (bf16 gpt-oss experts: 1.4-2.5 TB/s).

Host syncs: none (tests/kernels/test_triton_moe.py runs it under torch's
sync-debug mode "error"). The sorted list is allocated at its worst-case
length (T*K + min(Eg, T*K) * (BLOCK_M - 1)); the kernels read the padded total
from a device tensor and programs past it return at once. The op is also
CUDA-graph capturable (benchmarks/triton_moe.py --profile captures and
replays it), though it is meant to run outside graphs.

Tile configs: get_config() reads configs/E=..,N=..,device_name=..,dtype=...json
(token count -> tiles, tuned by benchmarks/tune_triton_moe.py), else
default_config(). Quantized experts have their own tables, named by format
(dtype=mxfp4, fp8_block, int4_group; config_kind).

Measured on an H100 80GB HBM3 (Mixtral-8x7B shapes, bf16, tuned configs;
benchmarks/triton_moe.py, do_bench medians): decode streams the experts'
weights at 2.7-3.0 TB/s (T=1, 2 experts: 0.26 ms; T=16..128, 8 experts:
0.84-0.97 ms), prefill reaches ~500 TFLOP/s (T=4096: 5.7 ms), 1.2-4.4x the
torch (cuBLAS) loop. Launching costs ~0.2-0.35 ms of host (Python) time per
call (4 Triton launches + a few allocations), which exceeds the GPU time when
only one or two experts are hit: there the op is launch-bound unless captured
in a CUDA graph.

Shape legend: T tokens, H hidden, I expert intermediate size, Eg GPU-resident
experts, K top-k, S = T*K token-slots, EM = padded sorted-slot count.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import torch
import triton
import triton.language as tl

from vllm_fiddler.kernels.quant import INT4_PER_WORD, MXFP4_GROUP
from vllm_fiddler.kernels.reference import SILU, ExpertMath


def _patch_interpreter_for_numpy2() -> None:
    """Makes triton's interpreter (TRITON_INTERPRET=1) run these kernels on numpy >= 2.5.

    The interpreter holds a scalar kernel argument as a 1-element 1-D numpy
    array and converts it with int() when it bounds a `range` loop; numpy
    2.5 refuses int() of a 1-D array (deprecated since 1.25). This re-binds
    the interpreter's `tensor.__index__` to take the single element instead.
    A no-op when not interpreting, or where the interpreter lacks the hook.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_fiddler_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._fiddler_patched = True
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_for_numpy2()


# Tokens per launch: bounds the workspaces ([S, I] activations and [S, H] fp32
# partial outputs) for long prefills; vLLM chunks the same way.
CHUNK_TOKENS = 16384

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# BLOCK_N_DOWN (optional, default BLOCK_N): GEMM #2's column tile. Decode with
# one or two experts hit launches few GEMM #2 programs (H / BLOCK_N per expert
# tile) for a long reduction (I); narrower tiles spread it over more SMs.
_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages", "BLOCK_N_DOWN")
# vLLM's spelling of the same keys, accepted when reading a file.
_VLLM_KEYS = {"BLOCK_SIZE_M": "BLOCK_M", "BLOCK_SIZE_N": "BLOCK_N", "BLOCK_SIZE_K": "BLOCK_K",
              "GROUP_SIZE_M": "GROUP_M"}


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------


# How the GEMMs' B operand (the experts' weights) is stored (W_FORMAT); the quantized
# layouts are kernels.quant.QuantizedExperts'.
DENSE, FP8_BLOCK, MXFP4, INT4_GROUP, INT4_ZP, INT4_ZP_F16 = 0, 1, 2, 3, 4, 5  # INT4_ZP*: scale bits bf16 / fp16
# The gate/up activation (ACTIVATION): kernels.reference.ExpertMath's.
ACT_SILU, ACT_SWIGLUOAI = 0, 1


@triton.jit
def _dequantized_tile(b_ptrs, bs_ptrs, b_mask, s_mask, dtype: tl.constexpr, W_FORMAT: tl.constexpr,
                      PACK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, G: tl.constexpr):
    """One [BLOCK_K, BLOCK_N] tile of B in `dtype`, from its stored form: b_ptrs [BLOCK_N,
    BLOCK_K / PACK] (each row contiguous in K: e4m3 bytes; MXFP4 bytes, two e2m1 codes each,
    low nibble first; INT4 int32 words, eight codes each, lowest nibble first) and bs_ptrs
    [BLOCK_N, BLOCK_K / G], the scale of each G consecutive inputs (INT4 with zero points: a
    word of the scale's 16 bits, bf16 for INT4_ZP and fp16 for INT4_ZP_F16, and the zero
    point in bits 16..19)."""
    raw = tl.load(b_ptrs, mask=b_mask, other=0)  # [BLOCK_N, BLOCK_K / PACK]
    scale = tl.load(bs_ptrs, mask=s_mask, other=0)  # [BLOCK_N, BLOCK_K / G]
    if PACK > 1:  # [BLOCK_N, BLOCK_K / PACK, PACK] 4-bit codes, in K order
        codes = (raw.to(tl.int32)[:, :, None] >> (tl.arange(0, PACK) * 4)[None, None, :]) & 0xF
    else:
        codes = raw
    codes = tl.reshape(codes, (BLOCK_N, BLOCK_K // G, G))
    scale = scale[:, :, None]
    if W_FORMAT == 1:  # e4m3 widened by the hardware (sm89+), times the block scale
        w = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale
    elif W_FORMAT == 2:  # e2m1 code s.e.e.m -> +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}; e8m0 scale 2^(s-127)
        e = (codes >> 1) & 3
        m = codes & 1
        normal = (((e + 126) << 23) | (m << 22)).to(tl.float32, bitcast=True)  # (1 + m/2) 2^(e-1)
        value = tl.where(e == 0, m.to(tl.float32) * 0.5, normal)
        value = tl.where((codes & 8) != 0, -value, value)
        s = scale.to(tl.int32)
        pow2 = tl.where(s == 0, 5.877471754111438e-39, (s << 23).to(tl.float32, bitcast=True))  # 2^-127
        w = value * pow2
    elif W_FORMAT == 3:  # INT4: code - 8, times the group's scale
        w = (codes - 8).to(tl.float32) * scale.to(tl.float32)
    else:  # INT4 with zero points: (code - zero) times the group's scale
        if W_FORMAT == 5:
            s = (scale & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        else:  # bf16 bits are an fp32's upper half
            s = ((scale & 0xFFFF) << 16).to(tl.float32, bitcast=True)
        w = (codes - ((scale >> 16) & 0xF)).to(tl.float32) * s
    return tl.trans(tl.reshape(w, (BLOCK_N, BLOCK_K)).to(dtype))


# EM and num_valid_slots change with T; not specialising them (on divisibility
# by 16) keeps one compiled kernel per tile config instead of two.
@triton.jit(do_not_specialize=["EM", "num_valid_slots"])
def _grouped_gemm_kernel(
    # Pointers
    a_ptr,  # [rows of A, Kd]: x [T, H] for GEMM #1, act [S, I] for GEMM #2
    b_ptr,  # [Eg, N_b, Kd / PACK]: w13 [Eg, 2I, H] or w2 [Eg, H, I], as stored (W_FORMAT)
    bs_ptr,  # quantized B: its scales [Eg, N_b / SCALE_BN, Kd / SCALE_BK]; unused when dense
    bias_ptr,  # HAS_BIAS: [Eg, N_b] (b13 or b2); unused otherwise
    c_ptr,  # [S, N]: act [S, I] (GEMM #1) or partial out [S, H] fp32 (GEMM #2)
    topk_weights_ptr,  # [S] fp32
    sorted_token_ids_ptr,  # [EM] int32: slot ids sorted by expert, padded with S
    expert_ids_ptr,  # [EM // BLOCK_M] int32: the expert of each BLOCK_M tile
    num_tokens_post_padded_ptr,  # [1] int32: how much of sorted_token_ids is used
    # Sizes
    N,  # output columns: I for GEMM #1, H for GEMM #2
    Kd,  # reduction size: H for GEMM #1, I for GEMM #2
    EM,  # allocated length of sorted_token_ids
    num_valid_slots,  # S = T*K; a sorted id >= S is padding
    up_offset,  # GEMM #1: the up rows start at w13[e, I]; unused otherwise
    alpha, limit,  # ACTIVATION swigluoai's constants
    # Strides
    stride_am, stride_ak,
    stride_be, stride_bn, stride_bk,
    stride_bse, stride_bsn, stride_bsk,
    stride_bias_e,
    stride_cm, stride_cn,
    # Meta-parameters
    A_ROW_DIV: tl.constexpr,  # A row = slot // A_ROW_DIV (K for GEMM #1: x is per token)
    FUSE_SWIGLU: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, "tf32" otherwise (ignored for 16-bit)
    W_FORMAT: tl.constexpr,  # DENSE, FP8_BLOCK, MXFP4, INT4_GROUP, INT4_ZP or INT4_ZP_F16
    PACK: tl.constexpr,  # weights per storage element of B: 1, 2 (MXFP4 bytes) or 8 (INT4 words)
    SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr,  # rows and inputs one scale covers
    G: tl.constexpr,  # inputs dequantized with one scale: a power of two dividing BLOCK_K and SCALE_BK
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # ACT_SILU or ACT_SWIGLUOAI (GEMM #1)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[slot, n] = epilogue(sum_k A[row(slot), k] * B[expert(tile), n, k]) for one tile.

    One program computes a [BLOCK_M, BLOCK_N] tile of C for BLOCK_M sorted
    slots that all route to the same expert. A quantized B is read as stored
    and widened in registers (_dequantized_tile) to A's dtype before each tl.dot.
    """
    # -- Which tile: grouped ordering, so that GROUP_M row tiles that read the
    # same B columns run close together in time (L2 reuse of B).
    pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(EM, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # -- Past the padded end of the sorted list: nothing to do. This is what
    # lets the grid be sized for the worst case without a host sync.
    num_tokens_post_padded = tl.load(num_tokens_post_padded_ptr)
    if pid_m * BLOCK_M >= num_tokens_post_padded:
        return

    offs_token_id = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_token = tl.load(sorted_token_ids_ptr + offs_token_id)  # [BLOCK_M] slot ids
    token_mask = offs_token < num_valid_slots  # [BLOCK_M]
    offs_token = offs_token.to(tl.int64)

    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)

    # Columns wrap modulo N, so B loads need no column mask (the wrapped
    # columns are computed and then dropped by the store mask).
    offs_bn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]

    a_rows = offs_token // A_ROW_DIV  # [BLOCK_M]
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    if W_FORMAT == 0:
        # B is read transposed: [BLOCK_K, BLOCK_N] from the row-major [N_b, Kd] weight.
        b_ptrs = (b_ptr + expert * stride_be
                  + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn)  # [BLOCK_K, BLOCK_N]
    else:
        # Stored rows, contiguous in K: [BLOCK_N, BLOCK_K / PACK] storage elements, and the
        # [BLOCK_N, BLOCK_K / G] scales of the tile's groups of G inputs.
        offs_kp = tl.arange(0, BLOCK_K // PACK)  # [BLOCK_K / PACK]
        offs_g = tl.arange(0, BLOCK_K // G) * G  # [BLOCK_K / G] first input of each group
        b_ptrs = (b_ptr + expert * stride_be
                  + offs_bn[:, None] * stride_bn + offs_kp[None, :] * stride_bk)  # [BLOCK_N, BLOCK_K / PACK]
        bs_ptrs = bs_ptr + expert * stride_bse + (offs_bn // SCALE_BN)[:, None] * stride_bsn  # [BLOCK_N, 1]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # gate (or the only) accumulator
    if FUSE_SWIGLU:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        b_up_ptrs = b_ptrs + up_offset * stride_bn  # the same columns of the up rows
        if W_FORMAT != 0:
            bs_up_ptrs = (bs_ptr + expert * stride_bse
                          + ((up_offset + offs_bn) // SCALE_BN)[:, None] * stride_bsn)  # [BLOCK_N, 1]

    for k in range(0, tl.cdiv(Kd, BLOCK_K)):
        k_remaining = Kd - k * BLOCK_K
        a = tl.load(a_ptrs, mask=token_mask[:, None] & (offs_k[None, :] < k_remaining), other=0.0)
        if W_FORMAT == 0:
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_remaining, other=0.0)
        else:
            b_mask = (offs_kp * PACK)[None, :] < k_remaining  # [1, BLOCK_K / PACK]
            s_mask = offs_g[None, :] < k_remaining  # [1, BLOCK_K / G]
            scale_k = ((k * BLOCK_K + offs_g) // SCALE_BK)[None, :] * stride_bsk  # [1, BLOCK_K / G]
            b = _dequantized_tile(b_ptrs, bs_ptrs + scale_k, b_mask, s_mask, a.dtype, W_FORMAT, PACK,
                                  BLOCK_N, BLOCK_K, G)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if FUSE_SWIGLU:
            if W_FORMAT == 0:
                b_up = tl.load(b_up_ptrs, mask=offs_k[:, None] < k_remaining, other=0.0)
            else:
                b_up = _dequantized_tile(b_up_ptrs, bs_up_ptrs + scale_k, b_mask, s_mask, a.dtype, W_FORMAT,
                                         PACK, BLOCK_N, BLOCK_K, G)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
            b_up_ptrs += (BLOCK_K // PACK) * stride_bk
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += (BLOCK_K // PACK) * stride_bk

    # -- Epilogue, in fp32.
    if HAS_BIAS:  # offs_bn is in range (wrapped)
        bias_row = bias_ptr + expert * stride_bias_e
        acc += tl.load(bias_row + offs_bn).to(tl.float32)[None, :]
        if FUSE_SWIGLU:
            acc_up += tl.load(bias_row + up_offset + offs_bn).to(tl.float32)[None, :]
    if FUSE_SWIGLU:
        if ACTIVATION == 0:
            acc = acc * tl.sigmoid(acc) * acc_up  # silu(gate) * up
        else:  # gpt-oss: clamped gate and up, (up + 1) * gate * sigmoid(alpha * gate)
            gate = tl.minimum(acc, limit)
            up = tl.minimum(tl.maximum(acc_up, -limit), limit)
            acc = (up + 1.0) * gate * tl.sigmoid(alpha * gate)
    if MUL_ROUTED_WEIGHT:
        w = tl.load(topk_weights_ptr + offs_token, mask=token_mask, other=0.0)  # [BLOCK_M]
        acc = acc * w[:, None]

    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N], unwrapped
    c_ptrs = c_ptr + offs_token[:, None] * stride_cm + offs_cn[None, :] * stride_cn
    c_mask = token_mask[:, None] & (offs_cn[None, :] < N)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit(do_not_specialize=["num_experts"])
def _topk_sum_kernel(
    partial_ptr,  # [T*K, H] fp32, weighted per-slot outputs
    topk_ids_ptr,  # [T, K] contiguous, int32/int64
    out_ptr,  # [T, H] x.dtype
    H, num_experts,
    stride_pm, stride_om, stride_on,
    TOP_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """out[t, h] = sum_k partial[t*K + k, h] over k with 0 <= topk_ids[t, k] < Eg."""
    t = tl.program_id(axis=0).to(tl.int64)
    offs_h = tl.program_id(axis=1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    h_mask = offs_h < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        # the id broadcast to [BLOCK_H] first: Triton 3.9's interpreter takes no mask made by
        # and-ing a scalar into a vector
        eid = tl.load(topk_ids_ptr + t * TOP_K + k) + tl.zeros((BLOCK_H,), dtype=tl.int32)  # [BLOCK_H]
        valid = h_mask & (eid >= 0) & (eid < num_experts)
        row = partial_ptr + (t * TOP_K + k) * stride_pm
        acc += tl.load(row + offs_h, mask=valid, other=0.0)
    tl.store(out_ptr + t * stride_om + offs_h * stride_on, acc.to(out_ptr.dtype.element_ty), mask=h_mask)


@triton.jit(do_not_specialize=["num_slots", "num_experts"])
def _align_kernel(
    topk_ids_ptr,  # [S] int32/int64, flattened [T, K]
    sorted_token_ids_ptr,  # [EM] int32 out
    expert_ids_ptr,  # [EM // BLOCK_M] int32 out
    num_tokens_post_padded_ptr,  # [1] int32 out
    num_slots,  # S
    num_experts,  # Eg
    BLOCK_M: tl.constexpr,
    E_POW2: tl.constexpr,  # next power of two >= Eg
    BLOCK_S: tl.constexpr,  # slots per step
):
    """moe_align_block_size in one launch: program e writes expert e's part.

    Every program counts all experts (it needs the padded sizes of the experts
    before it), then scatters its own slots in slot order, pads its run with
    the sentinel S and writes its tiles' expert id. Reads the ids 2*Eg times
    in all: nothing next to the GEMMs, and one launch instead of ~15 torch ops.
    """
    e = tl.program_id(axis=0)
    experts = tl.arange(0, E_POW2)  # [E_POW2]
    counts = tl.zeros((E_POW2,), dtype=tl.int32)
    for start in range(0, num_slots, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_slots, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)  # [E_POW2]
    counts = tl.where(experts < num_experts, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [E_POW2]
    start_e = tl.sum(tl.where(experts < e, padded, 0), axis=0)
    count_e = tl.sum(tl.where(experts == e, counts, 0), axis=0)
    padded_e = tl.sum(tl.where(experts == e, padded, 0), axis=0)
    if e == 0:
        tl.store(num_tokens_post_padded_ptr, tl.sum(padded, axis=0))

    # This expert's slots, in slot order (a stable sort).
    run = count_e * 0  # int32 scalar tensor, loop-carried
    for start in range(0, num_slots, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_slots, other=-1).to(tl.int32)
        mine = ids == e
        pos = run + tl.cumsum(mine.to(tl.int32), axis=0) - 1  # [BLOCK_S] rank within expert
        tl.store(sorted_token_ids_ptr + start_e + pos, offs.to(tl.int32), mask=mine)
        run += tl.sum(mine.to(tl.int32), axis=0)
    # Padding up to the next multiple of BLOCK_M (fewer than BLOCK_M entries).
    offs_pad = count_e + tl.arange(0, BLOCK_M)
    tl.store(sorted_token_ids_ptr + start_e + offs_pad, num_slots, mask=offs_pad < padded_e)
    # The expert id of each of this expert's tiles.
    first_block = start_e // BLOCK_M
    n_blocks = padded_e // BLOCK_M
    for b in range(0, n_blocks, BLOCK_S):
        offs_b = b + tl.arange(0, BLOCK_S)
        tl.store(expert_ids_ptr + first_block + offs_b, e, mask=offs_b < n_blocks)


# ----------------------------------------------------------------------------
# Routing metadata (no host sync)
# ----------------------------------------------------------------------------


def _align_size(num_slots: int, block_m: int, num_experts: int) -> int:
    """EM: the worst-case padded length, T*K + min(Eg, T*K) * (block_m - 1), rounded up to block_m."""
    em = num_slots + min(num_experts, num_slots) * (block_m - 1)
    return triton.cdiv(em, block_m) * block_m


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorts token-slots by expert and pads each expert's run to a multiple of block_m.

    One Triton launch (`_align_kernel`); the result is the same as
    moe_align_block_size_torch() on the used part (the first
    num_tokens_post_padded entries of sorted_token_ids, and the expert ids of
    those tiles); the rest of both buffers is left unwritten (no kernel reads it).
    topk_ids: [T, K] local expert slots; anything outside [0, num_experts)
    (-1 in particular) is dropped.
    """
    device = topk_ids.device
    num_slots = topk_ids.numel()
    em = _align_size(num_slots, block_m, num_experts)
    sorted_token_ids = torch.empty((em,), dtype=torch.int32, device=device)  # [EM]
    expert_ids = torch.empty((em // block_m,), dtype=torch.int32, device=device)  # [EM // BLOCK_M]
    num_tokens_post_padded = torch.empty((1,), dtype=torch.int32, device=device)  # [1]
    e_pow2 = triton.next_power_of_2(max(num_experts, 1))
    block_s = max(16, min(1024, 8192 // e_pow2))  # keeps the [BLOCK_S, E_POW2] compare small
    _align_kernel[(max(num_experts, 1),)](
        topk_ids.reshape(-1), sorted_token_ids, expert_ids, num_tokens_post_padded,
        num_slots, num_experts, BLOCK_M=block_m, E_POW2=e_pow2, BLOCK_S=block_s, num_warps=4)
    return sorted_token_ids, expert_ids, num_tokens_post_padded


def moe_align_block_size_torch(topk_ids: torch.Tensor, block_m: int, num_experts: int
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorts token-slots by expert and pads each expert's run to a multiple of block_m (torch ops).

    The readable version of `_align_kernel`, and its test reference; also
    sync-free (scatter_add_ rather than bincount), but ~15 launches.

    topk_ids: [T, K] local expert slots; anything outside [0, num_experts)
    (-1 in particular) is dropped.

    Returns
      sorted_token_ids [EM] int32: slot ids (t*K + k), grouped by expert in
          expert order, ascending slot id within an expert; padding = T*K.
      expert_ids [EM // block_m] int32: the expert of each block_m tile; -1
          for tiles past the used length.
      num_tokens_post_padded [1] int32: the used length (a multiple of block_m).
    EM = T*K + min(Eg, T*K) * (block_m - 1), rounded up to block_m: the worst
    case, so that nothing here needs the counts on the host.
    """
    device = topk_ids.device
    num_slots = topk_ids.numel()  # S = T*K
    flat = topk_ids.reshape(-1).to(torch.int64)  # [S]
    valid = (flat >= 0) & (flat < num_experts)
    bucket = torch.where(valid, flat, num_experts)  # [S]; invalid -> bucket Eg (dropped)

    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)  # [Eg+1]
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))  # (bincount would sync on CUDA)
    counts = counts[:num_experts]  # [Eg]
    padded = (counts + block_m - 1) // block_m * block_m  # [Eg]
    padded_end = torch.cumsum(padded, 0)  # [Eg] inclusive
    padded_start = padded_end - padded  # [Eg]
    count_start = torch.cumsum(counts, 0) - counts  # [Eg]

    em = _align_size(num_slots, block_m, num_experts)
    order = torch.argsort(bucket, stable=True)  # [S] slot ids by expert, stable within
    sorted_bucket = bucket[order]  # [S]
    e = sorted_bucket.clamp(max=num_experts - 1)
    rank = torch.arange(num_slots, device=device) - count_start[e]  # [S] rank within expert
    dest = torch.where(sorted_bucket < num_experts, padded_start[e] + rank, em)  # [S]; em = dump

    sorted_token_ids = torch.full((em + 1,), num_slots, dtype=torch.int32, device=device)
    sorted_token_ids.scatter_(0, dest, order.to(torch.int32))
    sorted_token_ids = sorted_token_ids[:em]  # [EM]

    block_start = torch.arange(0, em, block_m, device=device)  # [EM // block_m]
    expert_ids = torch.searchsorted(padded_end, block_start, right=True)  # [EM // block_m]
    expert_ids = torch.where(expert_ids < num_experts, expert_ids, -1).to(torch.int32)
    num_tokens_post_padded = padded_end[-1:].to(torch.int32)  # [1]
    return sorted_token_ids, expert_ids, num_tokens_post_padded


# ----------------------------------------------------------------------------
# Tile configs
# ----------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        return {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32",
                "float": "fp32"}.get(dtype, dtype)
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def device_name_for_config(device: torch.device | int | None = None) -> str:
    """The device part of a config file name, e.g. 'NVIDIA_H100_80GB_HBM3' (vLLM's spelling)."""
    if isinstance(device, torch.device):
        device = device.index
    return _device_name(torch.cuda.current_device() if device is None else device)


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index).replace(" ", "_")


def config_kind(w13, dtype: torch.dtype | str) -> str:
    """The `dtype` part of the config tables for experts w13 (a dense tensor or QuantizedExperts)
    computed in `dtype`: the format's name for quantized experts, whose tiles decode in
    registers and want other shapes than dense ones; else the dtype's ('bf16')."""
    return _dtype_name(dtype) if isinstance(w13, torch.Tensor) else w13.fmt


def config_file_name(E: int, N: int, device_name: str, dtype: torch.dtype | str) -> str:
    """'E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3,dtype=bf16.json' (N = intermediate size I;
    dtype: a dtype, or config_kind's name)."""
    return f"E={E},N={N},device_name={device_name.replace(' ', '_')},dtype={_dtype_name(dtype)}.json"


@functools.lru_cache(maxsize=None)
def _load_config_table(E: int, N: int, device_name: str, dtype_name: str
                       ) -> tuple[dict[int, dict[str, int]], str] | None:
    """The token-count -> config table for this shape, or the nearest E with the same N; None if none."""
    exact = os.path.join(CONFIG_DIR, config_file_name(E, N, device_name, dtype_name))
    candidates = [exact] if os.path.exists(exact) else []
    if not candidates and os.path.isdir(CONFIG_DIR):
        # Another Eg of the same model on the same device: tiles depend on Eg only
        # through tokens per expert, so the nearest E is a better start than the default.
        prefix, suffix = "E=", f",N={N},device_name={device_name.replace(' ', '_')},dtype={dtype_name}.json"
        others = []
        for name in os.listdir(CONFIG_DIR):
            if name.startswith(prefix) and name.endswith(suffix):
                try:
                    others.append((abs(int(name[len(prefix):-len(suffix)]) - E), name))
                except ValueError:
                    pass
        candidates = [os.path.join(CONFIG_DIR, min(others)[1])] if others else []
    if not candidates:
        return None
    with open(candidates[0]) as f:
        raw = json.load(f)
    table = {int(m): {_VLLM_KEYS.get(k, k): int(v) for k, v in cfg.items()
                      if _VLLM_KEYS.get(k, k) in _CONFIG_KEYS}
             for m, cfg in raw.items() if not m.startswith("_")}
    return (table, candidates[0]) if table else None


# Shared memory the software pipeline may use (H100: 227 KB per block; A100: 163 KB).
_SMEM_BUDGET = 160 * 1024


def fit_shared_memory(cfg: dict[str, int], elem_bytes: int) -> dict[str, int]:
    """Shrinks num_stages, then BLOCK_K, until GEMM #1's pipeline fits _SMEM_BUDGET.

    GEMM #1 (fused SwiGLU) holds, per stage, an A tile [BLOCK_M, BLOCK_K] and
    two B tiles [BLOCK_K, BLOCK_N]; Triton keeps num_stages - 1 stages in
    flight (observed: 3 x 80 KB for num_stages=4 in fp32).
    """
    cfg = dict(cfg)

    def smem(c):
        per_stage = (c["BLOCK_M"] * c["BLOCK_K"] + 2 * c["BLOCK_K"] * c["BLOCK_N"]) * elem_bytes
        return max(1, c.get("num_stages", 3) - 1) * per_stage

    while smem(cfg) > _SMEM_BUDGET and cfg.get("num_stages", 3) > 2:
        cfg["num_stages"] = cfg.get("num_stages", 3) - 1
    while smem(cfg) > _SMEM_BUDGET and cfg["BLOCK_K"] > 16:
        cfg["BLOCK_K"] //= 2
    return cfg


def default_config(T: int, Eg: int, K: int, elem_bytes: int = 2) -> dict[str, int]:
    """The tile config when no tuned file matches.

    Shaped after the H100 tuning of Mixtral (configs/E=8,N=14336,...): a row
    tile at least as tall as an expert's slots wins even while the op is
    weight-bandwidth bound, because each row tile re-reads the expert's
    weights; past ~64 slots per expert, 128x128 tiles and 8 warps.
    """
    slots_per_expert = T * K / max(Eg, 1)
    if slots_per_expert <= 16:  # decode: weight streaming; small M tiles, many N tiles
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    elif slots_per_expert <= 32:
        cfg = dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)
    elif slots_per_expert <= 48:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    return fit_shared_memory(cfg, elem_bytes)


def get_config(T: int, Eg: int, H: int, I: int, K: int, dtype: torch.dtype | str,
               device_name: str | None) -> dict[str, int]:
    """Tile config for this launch: BLOCK_M/N/K, GROUP_M, num_warps, num_stages (+ BLOCK_N_DOWN).

    Looks for kernels/triton/configs/E={Eg},N={I},device_name=...,dtype=....json
    (E = the GPU-resident experts, N = the intermediate size I; else the same
    file for the nearest E), and takes the entry whose token count is nearest
    T, over default_config(). H is not part of the file name (as in vLLM: a
    model's H is fixed by its I).
    """
    elem_bytes = 4 if _dtype_name(dtype) == "fp32" else 2  # quantized kinds: decoded to 16 bits
    cfg = default_config(T, Eg, K, elem_bytes)
    if device_name:
        found = _load_config_table(Eg, I, device_name.replace(" ", "_"), _dtype_name(dtype))
        if found is not None:
            table, _ = found
            best = min(table, key=lambda m: (abs(m - T), m))
            cfg.update(table[best])
    return cfg


def tile_configs(max_tokens: int, Eg: int, H: int, I: int, K: int, dtype: torch.dtype | str,
                 device_name: str | None) -> list[tuple[int, dict[str, int]]]:
    """Every distinct config get_config picks for 1..max_tokens tokens, each with the fewest
    tokens that pick it: [(T, config)] in T order.

    A config is a set of constexprs, so each one is a separate compilation of
    the kernels (0.2-1.3 s each on the H100, kernel-warmup-h100.json); the token
    count itself is not specialised on (EM and S are do_not_specialize), so one
    launch per config compiles all the variants a workload of up to max_tokens
    tokens per step can hit.
    """
    seen: dict[tuple, tuple[int, dict[str, int]]] = {}
    for T in range(1, max(1, min(max_tokens, CHUNK_TOKENS)) + 1):
        cfg = get_config(T, Eg, H, I, K, dtype, device_name)
        seen.setdefault(tuple(sorted(cfg.items())), (T, cfg))
    return list(seen.values())


def compiled_variants() -> int:
    """Kernel variants this process holds so far, over this module's kernels and devices
    (Triton's in-memory caches: compiled here or loaded from its disk cache)."""
    kernels = (_grouped_gemm_kernel, _align_kernel, _topk_sum_kernel)
    return sum(len(cache[0]) for kernel in kernels for cache in kernel.device_caches.values())


def warm_up(w13, w2, top_k: int, max_tokens: int, math: ExpertMath = SILU,
            b13: torch.Tensor | None = None, b2: torch.Tensor | None = None) -> int:
    """Compiles, before serving, each kernel variant fused_moe can launch on these weights
    (dense or QuantizedExperts; int32 ids, top_k slots per token; math and biases as the
    layer launches them) for steps of 1..max_tokens tokens; returns how many configs were
    launched.

    Without it, the first step of each new size class compiles mid-serving:
    a beam-search or serving step stalls for seconds the first time its token
    count falls in a new tile config. One token per config suffices (see
    tile_configs); the weights' values do not matter.
    """
    Eg, two_i, H = w13.shape
    if Eg == 0 or top_k == 0:
        return 0
    device = _weights(w13).values.device
    dev_name = device_name_for_config(device) if device.type == "cuda" else None
    configs = tile_configs(max_tokens, Eg, H, two_i // 2, top_k, config_kind(w13, w13.dtype), dev_name)
    x = torch.zeros((1, H), dtype=w13.dtype, device=device)  # [1, H]
    ids = (torch.arange(top_k, device=device) % Eg).to(torch.int32).view(1, top_k)  # [1, K]
    weights = torch.full((1, top_k), 1.0 / top_k, dtype=torch.float32, device=device)  # [1, K]
    for _, cfg in configs:
        fused_moe(x, w13, w2, weights, ids, config=cfg, math=math, b13=b13, b2=b2)
    return len(configs)


# ----------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Weights:
    """One projection's experts as the GEMM kernel reads them: dense [Eg, N, K] in x's dtype, or
    a kernels.quant.QuantizedExperts' stored values and scales."""

    values: torch.Tensor  # [Eg, N, K / pack]
    scales: torch.Tensor | None  # [Eg, N / scale_bn, K / scale_bk]
    shape: tuple[int, int, int]  # [Eg, N, K] in weights
    fmt: int = DENSE
    pack: int = 1
    scale_bn: int = 1
    scale_bk: int = 1

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def strides(self) -> tuple[int, ...]:
        """The kernel's stride_be, bn, bk, bse, bsn, bsk."""
        scales = self.scales if self.scales is not None else self.values
        return (*self.values.stride(), *scales.stride())


def _weights(w) -> _Weights:
    """A dense [Eg, N, K] tensor or a QuantizedExperts, as the kernel reads it."""
    if isinstance(w, torch.Tensor):
        assert w.dim() == 3 and w.stride(-1) == 1, "weights must be [Eg, N, K], row-major in K"
        return _Weights(w, None, tuple(w.shape))
    t = w.tensors
    E, N, K = w.shape
    if w.fmt == "fp8_block":
        bn, bk = w.block
        return _Weights(t["weight"].view(torch.uint8), t["weight_scale_inv"], (E, N, K), FP8_BLOCK, 1, bn, bk)
    if w.fmt == "mxfp4":  # [Eg, N, K/32, 16] bytes as [Eg, N, K/2]
        return _Weights(t["blocks"].view(E, N, K // 2), t["scales"], (E, N, K), MXFP4, 2, 1, MXFP4_GROUP)
    if w.fmt == "int4_zp":
        fmt = INT4_ZP_F16 if w.scale_dtype == torch.float16 else INT4_ZP
        return _Weights(t["weight_packed"], t["weight_scale_zero"], (E, N, K), fmt, INT4_PER_WORD, 1, w.group)
    return _Weights(t["weight_packed"], t["weight_scale"], (E, N, K), INT4_GROUP, INT4_PER_WORD, 1, w.group)


def _check_inputs(x, w13: _Weights, w2: _Weights, topk_weights, topk_ids, dtype: torch.dtype, b13, b2):
    assert x.dim() == 2, f"x must be [T, H], got {tuple(x.shape)}"
    T, H = x.shape
    Eg, two_i, H13 = w13.shape
    assert H13 == H and two_i % 2 == 0, f"w13 {w13.shape} does not match x {tuple(x.shape)}"
    I = two_i // 2
    assert tuple(w2.shape) == (Eg, H, I), f"w2 {w2.shape} must be {(Eg, H, I)}"
    assert dtype == x.dtype, "x and the (dequantized) weights must share a dtype"
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32), f"unsupported dtype {x.dtype}"
    assert topk_ids.dim() == 2 and topk_ids.shape[0] == T, "topk_ids must be [T, K]"
    assert tuple(topk_weights.shape) == tuple(topk_ids.shape), "topk_weights must match topk_ids"
    assert (b13 is None) == (b2 is None), "biases come as a pair"
    if b13 is not None:
        assert tuple(b13.shape) == (Eg, 2 * I) and tuple(b2.shape) == (Eg, H), "b13 must be [Eg, 2I], b2 [Eg, H]"
        assert b13.stride(-1) == 1 and b2.stride(-1) == 1, "biases must be row-major"
    return T, H, Eg, I, topk_ids.shape[1]


def fused_moe(x: torch.Tensor, w13, w2, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, out: torch.Tensor | None = None,
              config: dict[str, Any] | None = None, math: ExpertMath = SILU,
              b13: torch.Tensor | None = None, b2: torch.Tensor | None = None) -> torch.Tensor:
    """MoE over GPU-resident experts: out[t] = sum_k w[t,k] * ffn_{ids[t,k]}(x[t]).

    x [T, H] bf16/fp16/fp32; w13 [Eg, 2I, H] and w2 [Eg, H, I] in x's dtype, or
    kernels.quant.QuantizedExperts (FP8 block-scaled, MXFP4, INT4 groups) that dequantize
    to x's dtype, read as stored and widened in registers;
    topk_weights [T, K] (cast to fp32); topk_ids [T, K] int32/int64 LOCAL slots
    in [0, Eg), or -1 for a slot computed elsewhere (it contributes nothing).
    math: the experts' activation (SiLU, or gpt-oss's clamped SwiGLU); b13 [Eg, 2I] and
    b2 [Eg, H]: biases, or None.
    Writes and returns out [T, H] (x.dtype; zeros for a token with no valid slot).
    config: a get_config()-style dict (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
    num_warps, num_stages, optional BLOCK_N_DOWN for the down projection);
    None picks one for this shape and device (get_config).
    Accumulation is fp32; the activation is rounded to x.dtype before the
    down projection (the tensor cores' input), the per-slot outputs stay fp32.
    """
    dtype = w13.dtype  # of a dense tensor, or what QuantizedExperts dequantize to
    kind = config_kind(w13, x.dtype)
    w13, w2 = _weights(w13), _weights(w2)
    T, H, Eg, I, K = _check_inputs(x, w13, w2, topk_weights, topk_ids, dtype, b13, b2)
    assert x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1", \
        "fused_moe needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
    if out is None:
        out = torch.empty((T, H), dtype=x.dtype, device=x.device)
    else:
        assert tuple(out.shape) == (T, H) and out.dtype == x.dtype, "out must be [T, H] in x.dtype"
    if T == 0:
        return out
    if Eg == 0 or K == 0:
        return out.zero_()
    if config is None:
        dev_name = device_name_for_config(x.device) if x.is_cuda else None
        config = get_config(T, Eg, H, I, K, kind, dev_name)
    for start in range(0, T, CHUNK_TOKENS):
        end = min(T, start + CHUNK_TOKENS)
        _fused_moe_chunk(x[start:end], w13, w2, topk_weights[start:end], topk_ids[start:end],
                         out[start:end], config, math, b13, b2)
    return out


def _gemm(a, w: _Weights, bias, c, topk_weights, routing, N, Kd, up_offset, a_row_div, fuse_swiglu,
          math: ExpertMath, config, block_n):
    """One grouped GEMM launch: GEMM #1 (fused_swiglu) or #2 (routed weights applied)."""
    sorted_token_ids, expert_ids, num_post_padded, S = routing
    EM = sorted_token_ids.numel()
    BM, BK = config["BLOCK_M"], config["BLOCK_K"]
    # the largest power of two dividing the scale block, up to the tile: every group of G
    # inputs lies in one scale block (FP8 blocks of 48 inputs: G = 16)
    G = min(BK, w.scale_bk & -w.scale_bk)
    grid = (triton.cdiv(EM, BM) * triton.cdiv(N, block_n),)
    _grouped_gemm_kernel[grid](
        a, w.values, w.scales if w.scales is not None else w.values, bias if bias is not None else a, c,
        topk_weights, sorted_token_ids, expert_ids, num_post_padded,
        N, Kd, EM, S, up_offset, math.alpha, math.limit,
        a.stride(0), a.stride(1),
        *w.strides(),
        bias.stride(0) if bias is not None else 0,
        c.stride(0), c.stride(1),
        A_ROW_DIV=a_row_div, FUSE_SWIGLU=fuse_swiglu, MUL_ROUTED_WEIGHT=not fuse_swiglu,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",  # fp32 matches the oracle closely
        W_FORMAT=w.fmt, PACK=w.pack, SCALE_BN=w.scale_bn, SCALE_BK=w.scale_bk, G=G, HAS_BIAS=bias is not None,
        ACTIVATION=ACT_SWIGLUOAI if math.activation == "swigluoai" else ACT_SILU,
        BLOCK_M=BM, BLOCK_N=block_n, BLOCK_K=BK, GROUP_M=config.get("GROUP_M", 8),
        num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3),
    )


def _fused_moe_chunk(x, w13: _Weights, w2: _Weights, topk_weights, topk_ids, out, config, math, b13, b2):
    T, H = x.shape
    Eg, I, K = w13.shape[0], w13.shape[1] // 2, topk_ids.shape[1]
    S = T * K
    topk_ids = topk_ids.contiguous()  # [T, K]
    topk_weights = topk_weights.to(torch.float32).reshape(-1).contiguous()  # [S]
    routing = (*moe_align_block_size(topk_ids, config["BLOCK_M"], Eg), S)

    act = torch.empty((S, I), dtype=x.dtype, device=x.device)  # [S, I] act(gate, up)
    partial = torch.empty((S, H), dtype=torch.float32, device=x.device)  # [S, H] weighted

    # GEMM #1: act = act(x w1^T + b1, x w3^T + b3), per slot.
    _gemm(x, w13, b13, act, topk_weights, routing, I, H, I, K, True, math, config, config["BLOCK_N"])
    # GEMM #2: partial = topk_weight * (act w2^T + b2), per slot.
    _gemm(act, w2, b2, partial, topk_weights, routing, H, I, 0, 1, False, math, config,
          config.get("BLOCK_N_DOWN", config["BLOCK_N"]))
    # Combine: out[t] = sum over valid k of partial[t*K + k].
    BLOCK_H = min(1024, triton.next_power_of_2(H))
    _topk_sum_kernel[(T, triton.cdiv(H, BLOCK_H))](
        partial, topk_ids, out, H, Eg,
        partial.stride(0), out.stride(0), out.stride(1),
        TOP_K=K, BLOCK_H=BLOCK_H, num_warps=4,
    )
