"""Quantized expert weights as checkpoints ship them: dequantization (the reference) and the
quantizers test checkpoints are written with. Pure torch, any device.

Formats (a weight is [N, K]: N output rows, K inputs):
- **FP8 block** (DeepSeek-V3 / R1 / V3.1, Kimi-K2, Qwen3 FP8): ``weight`` float8_e4m3fn [N, K]
  and ``weight_scale_inv`` float32 [ceil(N / bn), ceil(K / bk)], a scale per bn x bk block
  (128 x 128 in those checkpoints; edge blocks are partial): W = weight * scale.
- **MXFP4** (gpt-oss, OCP microscaling): ``blocks`` uint8 [N, K / 32, 16], two e2m1 values a
  byte (low nibble first), and ``scales`` uint8 [N, K / 32], an e8m0 exponent (bias 127)
  per 32 inputs: W = e2m1 * 2 ** (scale - 127). gpt-oss stores its experts as
  ``*_blocks`` / ``*_scales`` with a leading expert dimension.

- **INT4 groups, W4A16** (compressed-tensors' ``pack-quantized``, what vLLM's
  ``compressed-tensors`` config loads for GPTQ-style symmetric int4): ``weight_packed``
  int32 [N, ceil(K / 8)], eight 4-bit values an int32 along K (value i of a word in bits
  4i..4i+3, stored plus 8), and ``weight_scale`` [N, ceil(K / g)] per group of g inputs:
  W = (nibble - 8) * scale.

- **INT4 groups with zero points, W4A16 asymmetric** (AutoAWQ's checkpoints, repacked at
  load): ``weight_packed`` as INT4 groups' words but each nibble an unsigned code q, and
  ``weight_scale_zero`` int32 [N, ceil(K / g)], each group's scale as the 16 bits of a bf16
  or fp16 number (the model's dtype; fp16 only for fp16 models) in bits 0..15 and its zero
  point z in bits 16..19: W = (q - z) * scale. One word a group (4 bytes for g inputs) keeps
  the kernels' argument list that of the symmetric format.

Shape legend: N rows, K inputs, G groups (of 32 for MXFP4), E experts.
"""

from __future__ import annotations

import math

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
# e2m1 values by 4-bit code: sign bit 3, then 2 exponent bits and 1 mantissa bit
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_GROUP = 32
E2M1_MAX = 6.0
E8M0_ONE = 127  # the e8m0 byte of scale 1 (2 ** (byte - 127))


# ---------------------------------------------------------------- FP8, block scales
def dequant_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., N, K] weights from fp8 [..., N, K] and scales [..., ceil(N/bn), ceil(K/bk)]."""
    bn, bk = block
    n, k = weight.shape[-2:]
    expect = (*weight.shape[:-2], math.ceil(n / bn), math.ceil(k / bk))
    if tuple(scale_inv.shape) != expect:
        raise ValueError(f"FP8 block scales: expected shape {list(expect)} for weights {list(weight.shape)} "
                         f"and {bn}x{bk} blocks, got {list(scale_inv.shape)}")
    rows, cols = expect[-2:]
    if rows * bn == n and cols * bk == k:  # whole blocks: each block times its scale, no [N, K] scale tensor
        blocks = weight.to(torch.float32).view(*weight.shape[:-2], rows, bn, cols, bk)
        return (blocks * scale_inv.to(torch.float32)[..., :, None, :, None]).view(weight.shape).to(dtype)
    scale = scale_inv.to(torch.float32).repeat_interleave(bn, dim=-2)[..., :n, :]
    scale = scale.repeat_interleave(bk, dim=-1)[..., :k]  # [..., N, K]
    return (weight.to(torch.float32) * scale).to(dtype)


def quant_fp8_block(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 [..., N, K], float32 scales [..., ceil(N/bn), ceil(K/bk)]): each block scaled so its
    largest magnitude is FP8_MAX, as DeepSeek's checkpoints are."""
    bn, bk = block
    n, k = w.shape[-2:]
    gn, gk = math.ceil(n / bn), math.ceil(k / bk)
    padded = torch.zeros(*w.shape[:-2], gn * bn, gk * bk, dtype=torch.float32, device=w.device)
    padded[..., :n, :k] = w.float()
    tiles = padded.unflatten(-2, (gn, bn)).unflatten(-1, (gk, bk))  # [..., gn, bn, gk, bk]
    amax = tiles.abs().amax(dim=(-3, -1))  # [..., gn, gk]
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-4, -3).flatten(-2, -1)[..., :n, :k].contiguous(), scale


# ---------------------------------------------------------------- MXFP4
def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., N, K] weights from blocks uint8 [..., N, G, 16] and e8m0 scales uint8 [..., N, G]
    (K = 32 G)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != MXFP4_GROUP // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4: blocks [..., N, G, 16] and scales [..., N, G] expected, got "
                         f"{list(blocks.shape)} and {list(scales.shape)}")
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1)  # [..., N, G, 16, 2]
    values = values.flatten(-2)  # [..., N, G, 32]
    out = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return out.flatten(-2).to(dtype)  # [..., N, K]


def quant_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks uint8 [..., N, K/32, 16], scales uint8 [..., N, K/32]): per 32 inputs the
    smallest power-of-two scale that keeps the group within e2m1's +-6, values rounded to the
    nearest e2m1 (ties to the lower magnitude)."""
    n, k = w.shape[-2:]
    if k % MXFP4_GROUP:
        raise ValueError(f"MXFP4 needs K a multiple of {MXFP4_GROUP}, got {k}")
    groups = w.float().unflatten(-1, (k // MXFP4_GROUP, MXFP4_GROUP))  # [..., N, G, 32]
    amax = groups.abs().amax(dim=-1)  # [..., N, G]
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.zeros_like(amax)).clamp(-127, 127)
    scaled = groups / torch.ldexp(torch.ones_like(exp), exp.to(torch.int32))[..., None]
    magnitudes = torch.tensor(E2M1_VALUES[:8], device=w.device)
    code = (scaled.abs()[..., None] - magnitudes).abs().argmin(dim=-1)  # [..., N, G, 32] in 0..7
    code = code | ((scaled < 0).long() << 3)
    pairs = code.unflatten(-1, (MXFP4_GROUP // 2, 2))
    blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    return blocks.contiguous(), (exp.to(torch.int32) + 127).to(torch.uint8)


# ---------------------------------------------------------------- INT4 groups (W4A16)
INT4_PER_WORD = 8


def dequant_int4_group(packed: torch.Tensor, scale: torch.Tensor, k: int, group: int,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., N, K] weights from int32 words [..., N, ceil(K/8)] and scales [..., N, ceil(K/g)]."""
    if packed.dtype != torch.int32:
        raise ValueError(f"INT4 weights must be packed in int32, got {packed.dtype}")
    _check_int4_shapes(packed, scale, k, group, "INT4 groups")
    q = unpack_int4(packed, k).float() - 8.0  # [..., N, K]
    per_input = scale.to(torch.float32).repeat_interleave(group, dim=-1)[..., :k]
    return (q * per_input).to(dtype)


def _check_int4_shapes(packed: torch.Tensor, scales: torch.Tensor, k: int, group: int, what: str) -> None:
    """Raises ValueError unless packed is [..., N, ceil(K/8)] words and scales [..., N, ceil(K/g)]."""
    n = packed.shape[-2]
    if packed.shape[-1] != math.ceil(k / INT4_PER_WORD) or tuple(scales.shape) != (
            *packed.shape[:-1], math.ceil(k / group)):
        raise ValueError(f"{what} of {group}: for K = {k} expected words [..., {n}, {math.ceil(k / 8)}] and "
                         f"scales [..., {n}, {math.ceil(k / group)}], got {list(packed.shape)} and "
                         f"{list(scales.shape)}")


def quant_int4_group(w: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 words [..., N, ceil(K/8)], float32 scales [..., N, ceil(K/g)]): symmetric, each
    group's largest magnitude at 7 (codes -8..7, stored plus 8)."""
    k = w.shape[-1]
    groups = math.ceil(k / group)
    padded = torch.zeros(*w.shape[:-1], groups * group, dtype=torch.float32, device=w.device)
    padded[..., :k] = w.float()
    amax = padded.unflatten(-1, (groups, group)).abs().amax(-1)  # [..., N, G]
    scale = torch.where(amax > 0, amax / 7.0, torch.ones_like(amax))
    q = torch.round(padded / scale.repeat_interleave(group, -1)).clamp(-8, 7)[..., :k] + 8
    return pack_int4(q), scale


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int32 words [..., ceil(K/8)] from 4-bit codes [..., K] (0..15): code i of a word in bits
    4i..4i+3; padding codes are 0."""
    k = codes.shape[-1]
    words = math.ceil(k / INT4_PER_WORD)
    q = torch.nn.functional.pad(codes.to(torch.int32), (0, words * INT4_PER_WORD - k))
    shifts = torch.arange(INT4_PER_WORD, dtype=torch.int32, device=codes.device) * 4
    packed = (q.unflatten(-1, (words, INT4_PER_WORD)) << shifts).sum(-1, dtype=torch.int64)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32).contiguous()  # the bits as int32


def unpack_int4(words: torch.Tensor, k: int) -> torch.Tensor:
    """int32 codes [..., K] (0..15) from pack_int4's words."""
    shifts = torch.arange(INT4_PER_WORD, dtype=torch.int32, device=words.device) * 4
    return ((words[..., None] >> shifts) & 0xF).flatten(-2)[..., :k]


# ---------------------------------------------------------------- INT4 groups with zero points
def scale_zero_dtype(dtype: torch.dtype) -> torch.dtype:
    """The 16-bit float a model of `dtype` keeps INT4 zero-point scales in: fp16 for fp16
    models, bf16 otherwise (an fp32 model's scales are rounded to bf16)."""
    return torch.float16 if dtype == torch.float16 else torch.bfloat16


def pack_scale_zero(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """int32 words [...]: `scale` rounded to scale_zero_dtype(dtype) in bits 0..15, `zero`
    (0..15) in bits 16..19."""
    bits = scale.to(scale_zero_dtype(dtype)).view(torch.int16).to(torch.int32) & 0xFFFF
    return bits | (zero.to(torch.int32) & 0xF) << 16


def unpack_scale_zero(words: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 scales, int32 zero points) from pack_scale_zero's words, their scale bits in
    `scale_dtype` (bf16 or fp16)."""
    bits = (words & 0xFFFF).to(torch.int16)  # wraps to the same 16 bits
    return bits.view(scale_dtype).float(), (words >> 16) & 0xF


def dequant_int4_zp(packed: torch.Tensor, scale_zero: torch.Tensor, k: int, group: int,
                    dtype: torch.dtype = torch.float32, scale_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """[..., N, K] weights from unsigned-code words [..., N, ceil(K/8)] and scale / zero words
    [..., N, ceil(K/g)] (pack_scale_zero; scale bits in `scale_dtype`, bf16 or fp16): (q - z) * scale."""
    if packed.dtype != torch.int32 or scale_zero.dtype != torch.int32:
        raise ValueError(f"INT4 zero-point weights and scales must be int32 words, got {packed.dtype} and "
                         f"{scale_zero.dtype}")
    _check_int4_shapes(packed, scale_zero, k, group, "INT4 zero-point groups")
    scale, zero = unpack_scale_zero(scale_zero, scale_dtype)
    q = unpack_int4(packed, k).float()  # [..., N, K] codes
    per_group = lambda t: t.float().repeat_interleave(group, dim=-1)[..., :k]  # noqa: E731
    return ((q - per_group(zero)) * per_group(scale)).to(dtype)


# AutoAWQ packs eight columns a word, column AWQ_ORDER[i] in nibble i; column j is nibble
# AWQ_NIBBLE[j]
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)


def awq_unpack(words: torch.Tensor) -> torch.Tensor:
    """int32 codes [..., 8 C] in column order from AutoAWQ's words [..., C] (qweight, qzeros)."""
    nibbles = unpack_int4(words, words.shape[-1] * INT4_PER_WORD).unflatten(-1, (-1, INT4_PER_WORD))
    return nibbles[..., list(AWQ_NIBBLE)].flatten(-2)


def awq_pack(codes: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's int32 words [..., C] from codes [..., 8 C] (0..15) in column order."""
    return pack_int4(codes.unflatten(-1, (-1, INT4_PER_WORD))[..., list(AWQ_ORDER)].flatten(-2))


def quant_int4_zp(w: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(words [..., N, ceil(K/8)], float32 scales, int32 zero points [..., N, ceil(K/g)]):
    asymmetric, as AutoAWQ quantizes: each group's range over the 16 codes, zero = round(-min /
    scale)."""
    k = w.shape[-1]
    groups = math.ceil(k / group)
    padded = torch.zeros(*w.shape[:-1], groups * group, dtype=torch.float32, device=w.device)
    padded[..., :k] = w.float()
    g = padded.unflatten(-1, (groups, group))
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = torch.where(hi > lo, (hi - lo) / 15.0, torch.ones_like(hi))
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = torch.round(padded / scale.repeat_interleave(group, -1)) + zero.repeat_interleave(group, -1)
    return pack_int4(q.clamp(0, 15)[..., :k]), scale, zero.to(torch.int32)


# ---------------------------------------------------------------- experts of one projection
class QuantizedExperts:
    """One projection's weights of Ex experts, kept in their checkpoint format; ``[e]`` is expert
    e dequantized [N, K] in ``dtype``. Stands where the grouped-expert code indexes a dense
    [Ex, N, K] tensor (kernels/torch_moe.py): only routed experts are expanded, one at a time.

    fmt "fp8_block": tensors ``weight`` [Ex, N, K] float8_e4m3fn, ``weight_scale_inv``
    [Ex, ceil(N/bn), ceil(K/bk)]; fmt "mxfp4": ``blocks`` [Ex, N, K/32, 16], ``scales``
    [Ex, N, K/32], both uint8; fmt "int4_group": ``weight_packed`` int32 [Ex, N, ceil(K/8)],
    ``weight_scale`` [Ex, N, ceil(K/group)], and ``k`` (K: the words may pad it); fmt
    "int4_zp": ``weight_packed`` likewise (unsigned codes) and ``weight_scale_zero`` int32 [Ex,
    N, ceil(K/group)] (pack_scale_zero for a model of ``dtype``).
    """

    FORMATS = ("fp8_block", "mxfp4", "int4_group", "int4_zp")

    def __init__(self, fmt: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16,
                 block: tuple[int, int] = (128, 128), group: int = 128, k: int | None = None,
                 scale_dtype: torch.dtype | None = None):
        if fmt not in self.FORMATS:
            raise ValueError(f"unknown expert format {fmt!r} (known: {', '.join(self.FORMATS)})")
        self.fmt, self.tensors, self.dtype, self.block, self.group = fmt, dict(tensors), dtype, tuple(block), group
        # int4_zp: the 16-bit float its scale bits are in, fixed when stored (pack_scale_zero)
        self.scale_dtype = scale_dtype or scale_zero_dtype(dtype)
        if fmt == "fp8_block":
            w = tensors["weight"]
            dequant_fp8_block(w[:1], tensors["weight_scale_inv"][:1], self.block)  # checks the scales' shape
            self.shape = tuple(w.shape)
        elif fmt in ("int4_group", "int4_zp"):
            packed = tensors["weight_packed"]
            self.k = k if k is not None else packed.shape[-1] * INT4_PER_WORD
            if fmt == "int4_group":  # checks the scales' shape
                dequant_int4_group(packed[:1], tensors["weight_scale"][:1], self.k, group)
            else:
                dequant_int4_zp(packed[:1], tensors["weight_scale_zero"][:1], self.k, group, torch.float32,
                                self.scale_dtype)
            self.shape = (packed.shape[0], packed.shape[1], self.k)
        else:
            b = tensors["blocks"]
            dequant_mxfp4(b[:1], tensors["scales"][:1])
            self.shape = (b.shape[0], b.shape[1], b.shape[2] * MXFP4_GROUP)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes as stored: what a token's read of these experts costs in host memory."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __getitem__(self, e: int) -> torch.Tensor:
        t = self.tensors
        if self.fmt == "fp8_block":
            return dequant_fp8_block(t["weight"][e], t["weight_scale_inv"][e], self.block, self.dtype)
        if self.fmt == "int4_group":
            return dequant_int4_group(t["weight_packed"][e], t["weight_scale"][e], self.k, self.group, self.dtype)
        if self.fmt == "int4_zp":
            return dequant_int4_zp(t["weight_packed"][e], t["weight_scale_zero"][e], self.k, self.group, self.dtype,
                                   self.scale_dtype)
        return dequant_mxfp4(t["blocks"][e], t["scales"][e], self.dtype)

    def dequantized(self) -> torch.Tensor:
        """[Ex, N, K] all experts (tests and references only)."""
        return torch.stack([self[e] for e in range(len(self))])

    def to_dtype(self, dtype: torch.dtype) -> "QuantizedExperts":
        """The same stored experts, dequantizing to `dtype`."""
        return QuantizedExperts(self.fmt, self.tensors, dtype, self.block, self.group, self.shape[2], self.scale_dtype)

    @classmethod
    def quantize(cls, fmt: str, w: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                 block: tuple[int, int] = (128, 128), group: int = 128) -> "QuantizedExperts":
        """[Ex, N, K] weights stored as `fmt` (benchmarks and tests): FP8 with `block` scales,
        MXFP4, INT4 in groups of `group` with 16-bit float scales (scale_zero_dtype(dtype): fp16
        in an fp16 model, as GPTQ checkpoints ship them, else bf16), or INT4 with zero points, as
        checkpoints store them."""
        w = w.float()
        if fmt == "fp8_block":
            values, scales = quant_fp8_block(w, block)
            return cls(fmt, {"weight": values, "weight_scale_inv": scales}, dtype, block=block)
        if fmt == "mxfp4":
            blocks, scales = quant_mxfp4(w)
            return cls(fmt, {"blocks": blocks, "scales": scales}, dtype)
        if fmt == "int4_zp":
            packed, scales, zeros = quant_int4_zp(w, group)
            return cls(fmt, {"weight_packed": packed, "weight_scale_zero": pack_scale_zero(scales, zeros, dtype)}, dtype,
                       group=group, k=w.shape[-1])
        packed, scales = quant_int4_group(w, group)
        return cls(fmt, {"weight_packed": packed, "weight_scale": scales.to(scale_zero_dtype(dtype))}, dtype,
                   group=group, k=w.shape[-1])
