"""Hybrid layers whose experts stay in their checkpoint's quantized format, on both sides.

A checkpoint's expert format comes from vLLM's own quantization config
(``compat.expert_quantization``); the experts keep it in device and host memory
alike: a host expert is never expanded into a bf16 copy, and the bytes a
token's read costs are the compressed ones (``expert_bytes``, which placement
and the budget count).

Compute: host experts run the native quantized kernels
(kernels/cpu/kernel_quant_avx512.cpp: values widened to fp32 in registers, scales on the
groups' partial sums) where the CPU has AVX512F/BW/VL, else dequantize each routed expert in
torch (kernels/torch_moe.py); on CUDA the device experts run the Triton MoE kernels, which read
the stored tensors and widen each tile in registers (kernels/triton/fused_moe.py). Steps go
through HybridMoE's CUDA paths as bf16 layers' do: decode-sized ones as routed steps and
inside vLLM's FULL decode graphs (graph steps), larger ones eagerly, the host's job on the
native job thread (no GIL) in every case. Weight copies, streamed chunks and online
re-placement are bf16-only, so a quantized layer runs without them
(``vllm_fiddler.moe.model`` logs it).

Formats (kernels/quant.py has the layouts):
  fp8_block   float8_e4m3fn weights, float32 scales per bn x bk block (vLLM's
              ``fp8`` config with ``weight_block_size``: DeepSeek-V3/R1, Kimi-K2,
              Qwen3 FP8); vLLM names the scales ``*_weight_scale_inv``.
  int4_group  eight 4-bit values an int32 word (value + 8), a scale per group of
              inputs in the model's dtype, as vLLM's methods hold them. Two checkpoint
              layouts: vLLM's ``compressed-tensors`` config (pack-quantized W4A16
              symmetric groups, as llm-compressor writes them): ``*_weight_packed``
              [N, K/8], ``*_weight_scale`` [N, K/g] and ``*_weight_shape`` (checked);
              and AutoGPTQ's (vLLM's ``auto_gptq`` config, checkpoint ``gptq``):
              ``*_qweight`` [K/8, N] words packed along K in the same nibble order and
              ``*_scales`` [K/g, N], stored transposed (a transpose is the repack),
              ``*_g_idx`` (checked: groups in weight order) and ``*_qzeros``
              (symmetric: ignored, as vLLM's uint4b8 kernels ignore them).
  int4_zp     INT4 groups with zero points (W4A16 asymmetric), from AutoAWQ's layout
              (vLLM's ``awq`` / ``auto_awq`` config, checkpoint ``awq``): ``*_qweight``
              [K, N/8] and ``*_qzeros`` [K/g, N/8], eight columns a word in AWQ's
              nibble order, and fp16 ``*_scales`` [K/g, N]; repacked at load (per
              expert, 4-bit to 4-bit) into int4_group's [N, K/8] words of unsigned
              codes and one int32 a group holding its scale (16 bits, in the model's
              dtype: fp16 for fp16 models, else bf16) and zero point.
  mxfp4       two e2m1 values a byte, an e8m0 exponent per 32 inputs (vLLM's
              ``gpt_oss_mxfp4`` / ``mxfp4`` configs: gpt-oss-20b and -120b,
              whose experts also carry bf16 biases); vLLM names the values
              ``*_weight`` ([E, N, K/2] bytes) and the scales ``*_weight_scale``.

Shape legend: E experts, Ex experts of one set, H hidden, I intermediate,
bn x bk scale blocks.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from vllm_fiddler.kernels.quant import (E2M1_MAX, E8M0_ONE, FP8_MAX, INT4_PER_WORD, MXFP4_GROUP, QuantizedExperts,
                                        awq_unpack, pack_int4, pack_scale_zero)
from vllm_fiddler.moe.layer import HybridMoE

@dataclasses.dataclass(frozen=True)
class _Layout:
    """How one format stores an [N, K] weight, and what vLLM's method for it names the tensors."""

    values: torch.dtype  # storage dtype of the values
    scales: torch.dtype
    values_per_byte: int
    value_name: str  # vLLM's parameter suffixes: w13_<value_name>, w13_<scale_name>
    scale_name: str
    keys: tuple[str, str]  # kernels.quant.QuantizedExperts' keys: values, scales


LAYOUTS = {
    "fp8_block": _Layout(torch.float8_e4m3fn, torch.float32, 1, "weight", "weight_scale_inv",
                         ("weight", "weight_scale_inv")),
    "mxfp4": _Layout(torch.uint8, torch.uint8, 2, "weight", "weight_scale", ("blocks", "scales")),
    # eight 4-bit values an int32 word; scales in the model's dtype (the bf16 here sizes them)
    "int4_group": _Layout(torch.int32, torch.bfloat16, 2, "weight_packed", "weight_scale",
                          ("weight_packed", "weight_scale")),
    "int4_group/gptq": _Layout(torch.int32, torch.bfloat16, 2, "qweight", "scales",
                               ("weight_packed", "weight_scale")),
    # unsigned codes as int4_group's words; a scale / zero-point int32 a group
    "int4_zp/awq": _Layout(torch.int32, torch.int32, 2, "qweight", "scales", ("weight_packed", "weight_scale_zero")),
}
FORMATS = ("fp8_block", "mxfp4", "int4_group", "int4_zp")
# ExpertFormat.checkpoint: vLLM's own layout for the format, AutoGPTQ's (int4_group) or
# AutoAWQ's (int4_zp, its only one)
CHECKPOINTS = {"": ("fp8_block", "mxfp4", "int4_group"), "gptq": ("int4_group",), "awq": ("int4_zp",)}


@dataclasses.dataclass(frozen=True)
class ExpertFormat:
    """One quantized expert format and its parameters: ``block`` is the (rows, inputs) a scale
    covers, 128 x 128 for DeepSeek's FP8, 1 x 32 for MXFP4 and 1 x group for INT4;
    ``checkpoint`` the layout the checkpoint stores it in ("": vLLM's own for the format,
    "gptq": AutoGPTQ's for int4_group, "awq": AutoAWQ's for int4_zp)."""

    name: str  # "fp8_block", "mxfp4", "int4_group" or "int4_zp"
    block: tuple[int, int] = (128, 128)
    checkpoint: str = ""

    def __post_init__(self) -> None:
        if self.name not in FORMATS or self.checkpoint not in CHECKPOINTS:
            raise ValueError(f"unknown expert format {self.name!r} (checkpoint layout {self.checkpoint!r})")
        if self.name not in CHECKPOINTS[self.checkpoint]:
            raise ValueError(f"the {self.checkpoint or 'default'} checkpoint layout holds "
                             f"{' or '.join(CHECKPOINTS[self.checkpoint])} experts, not {self.name}")
        if self.name == "mxfp4" and tuple(self.block) != (1, MXFP4_GROUP):
            raise ValueError(f"MXFP4 scales cover 1 x {MXFP4_GROUP} weights, not {self.block}")
        if self.name in ("int4_group", "int4_zp") and (self.block[0] != 1 or self.block[1] % INT4_PER_WORD):
            raise ValueError(f"INT4 scales cover 1 x group weights, the group a multiple of {INT4_PER_WORD}; "
                             f"got {self.block}")

    @property
    def layout(self) -> _Layout:
        return LAYOUTS[f"{self.name}/{self.checkpoint}" if self.checkpoint else self.name]

    def describe(self) -> str:
        if self.name == "mxfp4":
            return f"MXFP4 (e2m1 with an e8m0 scale per {MXFP4_GROUP} weights)"
        if self.name == "int4_group":
            layout = ", AutoGPTQ's layout" if self.checkpoint == "gptq" else ""
            return f"INT4 W4A16 (symmetric, a scale per {self.block[1]} weights{layout})"
        if self.name == "int4_zp":
            return f"INT4 W4A16 (a scale and zero point per {self.block[1]} weights, AutoAWQ's layout)"
        return f"FP8 e4m3 with {self.block[0]}x{self.block[1]} block scales"

    def scale_shape(self, n: int, k: int) -> tuple[int, int]:
        """[ceil(N/bn), ceil(K/bk)] scales of one [N, K] weight."""
        bn, bk = self.block
        return math.ceil(n / bn), math.ceil(k / bk)

    def projection_bytes(self, n: int, k: int, dtype_bytes: int = 2) -> int:
        """Bytes of one expert's [N, K] weight as stored: values and scales (INT4's in the
        model's dtype, of `dtype_bytes`)."""
        rows, cols = self.scale_shape(n, k)
        lay = self.layout
        scale_bytes = dtype_bytes if self.name == "int4_group" else lay.scales.itemsize
        return n * k // lay.values_per_byte + rows * cols * scale_bytes

    def expert_bytes(self, hidden: int, inter: int, dtype_bytes: int = 2) -> int:
        """w13 [2I, H] and w2 [H, I] of one expert as stored."""
        return self.projection_bytes(2 * inter, hidden, dtype_bytes) + self.projection_bytes(hidden, inter, dtype_bytes)

    def param_dtypes(self) -> dict[str, torch.dtype]:
        """The expert tensors vLLM's method for this format registers, by name."""
        lay = self.layout
        names = {f"w13_{lay.value_name}": lay.values, f"w2_{lay.value_name}": lay.values,
                 f"w13_{lay.scale_name}": lay.scales, f"w2_{lay.scale_name}": lay.scales}
        if self.checkpoint == "gptq":  # zero points and group indices of each projection, checked at load
            names.update(w13_qzeros=torch.int32, w2_qzeros=torch.int32, w13_g_idx=torch.int32, w2_g_idx=torch.int32)
        elif self.checkpoint == "awq":  # zero points of each projection
            names.update(w13_qzeros=torch.int32, w2_qzeros=torch.int32)
        elif self.name == "int4_group":  # compressed-tensors' [N, K] of each projection, checked at load
            names.update(w13_weight_shape=torch.int64, w2_weight_shape=torch.int64)
        return names

    def check_layer(self, prefix: str, hidden: int, inter: int, tp_size: int = 1) -> None:
        """Raises ValueError for a layer the format cannot store or split into gate and up; `inter`
        is one tensor-parallel rank's share of tp_size, which must hold whole scale blocks."""
        if self.name in ("mxfp4", "int4_group", "int4_zp"):
            group = self.block[1]
            share = " (a tensor-parallel rank's share)" if tp_size > 1 else ""
            if hidden % group or inter % group:
                raise ValueError(f"{prefix}: hidden size {hidden} and intermediate size {inter}{share} must be "
                                 f"multiples of the {group}-weight scale groups of {self.describe()}")
        elif inter % self.block[0]:
            raise ValueError(f"{prefix}: intermediate size {inter} is not a multiple of the FP8 scale block's "
                             f"{self.block[0]} rows, so gate and up scales cannot be told apart")
        elif tp_size > 1 and inter % self.block[1]:
            raise ValueError(f"{prefix}: a tensor-parallel rank's intermediate size {inter} is not a multiple of the "
                             f"FP8 scale block's {self.block[1]} columns, so the down projection's scales cannot be "
                             f"split between {tp_size} ranks")

    def empty(self, count: int, n: int, k: int, device: torch.device | str, pin_memory: bool,
              dtype: torch.dtype) -> QuantizedExperts:
        """Storage for `count` experts' [N, K] weights; `dtype` is what they dequantize to."""
        pin = pin_memory and torch.device(device).type == "cpu"
        lay = self.layout
        if self.name == "mxfp4":  # [count, N, K/32, 16] two values a byte, [count, N, K/32] exponents
            values = torch.empty(count, n, k // MXFP4_GROUP, MXFP4_GROUP // 2, dtype=torch.uint8, device=device,
                                 pin_memory=pin)
            scales = torch.full((count, n, k // MXFP4_GROUP), E8M0_ONE, dtype=torch.uint8, device=device)
            scales = scales.pin_memory() if pin else scales
        elif self.name in ("int4_group", "int4_zp"):
            # [count, N, K/8] words; [count, N, K/group] scales in the model dtype, or scale / zero words
            values = torch.empty(count, n, math.ceil(k / INT4_PER_WORD), dtype=lay.values, device=device,
                                 pin_memory=pin)
            one = self.scale_for(1.0, dtype) if self.name == "int4_zp" else 1.0
            scales = torch.full((count, *self.scale_shape(n, k)), one, dtype=dtype if self.name == "int4_group"
                                else torch.int32, device=device)
            return QuantizedExperts(self.name, dict(zip(lay.keys, (values, scales.pin_memory() if pin else scales))),
                                    dtype=dtype, group=self.block[1], k=k)
        else:
            values = torch.empty(count, n, k, dtype=lay.values, device=device, pin_memory=pin)
            scales = torch.ones(count, *self.scale_shape(n, k), dtype=lay.scales, device=device, pin_memory=pin)
        return QuantizedExperts(self.name, dict(zip(lay.keys, (values, scales))), dtype=dtype, block=self.block)

    def random_values(self, count: int, gen: torch.Generator) -> torch.Tensor:
        """`count` random stored bytes: FP8 values uniform over e4m3's range, or MXFP4 bytes
        uniform over every pair of e2m1 codes."""
        if self.name in ("mxfp4", "int4_group", "int4_zp"):  # every pair of 4-bit codes
            return torch.randint(0, 256, (count,), dtype=torch.uint8, generator=gen)
        pool = torch.empty(count, dtype=torch.float32).uniform_(-FP8_MAX, FP8_MAX, generator=gen)
        return pool.to(torch.float8_e4m3fn).view(torch.uint8)

    def scale_for(self, magnitude: float, dtype: torch.dtype = torch.bfloat16) -> float | int:
        """The scale that maps the format's largest value to about `magnitude` (INT4 with zero
        points: the word of that scale and zero point 8, for a model of `dtype`)."""
        if self.name == "mxfp4":  # an e8m0 exponent: 2 ** (byte - 127)
            return E8M0_ONE + round(math.log2(magnitude / E2M1_MAX))
        if self.name == "int4_group":  # codes -8..7
            return magnitude / 8
        if self.name == "int4_zp":  # codes 0..15 about zero point 8
            return int(pack_scale_zero(torch.tensor(magnitude / 8), torch.tensor(8), dtype))
        return magnitude / FP8_MAX


class QuantizedHybridMoE(HybridMoE):
    """HybridMoE with both expert sets in a quantized format (module docstring). Expert tensors
    load by vLLM's names: w1 / w3 / w2 (values) and s1 / s3 / s2 (their scales), w13 / s13
    fused; biases (b1 / b3 / b2, b13) stay in the model's dtype, as HybridMoE's."""

    def __init__(self, *, expert_format: ExpertFormat, tp: tuple[int, int] = (0, 1), **kwargs):
        """tp: (rank, ranks) of tensor parallelism: this layer holds the rank's 1/ranks of every
        expert's intermediate size (intermediate_size is the rank's), and loads it from whole
        checkpoint tensors as vLLM's loader would shard them (_store)."""
        if kwargs.get("host_backing"):
            raise ValueError("quantized layers keep no host backing (no online re-placement)")
        self.expert_format = expert_format
        self.tp_rank, self.tp_size = tp
        expert_format.check_layer("layer", kwargs["hidden_size"], kwargs["intermediate_size"], self.tp_size)
        super().__init__(**kwargs)

    def _allocate_experts(self, Eg: int, Eh: int, dtype: torch.dtype, pin_memory: bool) -> None:
        f, H, I = self.expert_format, self.hidden_size, self.intermediate_size
        self.chunks = 1  # one chunk per host expert: host slot s is chunk-expert s
        self.w13_gpu = f.empty(Eg, 2 * I, H, self.device, False, dtype)  # [Eg, 2I, H]
        self.w2_gpu = f.empty(Eg, H, I, self.device, False, dtype)  # [Eg, H, I]
        self.w13_cpu = self.w13_cpu_chunks = f.empty(Eh, 2 * I, H, "cpu", pin_memory, dtype)  # [Eh, 2I, H]
        self.w2_cpu = self.w2_cpu_chunks = f.empty(Eh, H, I, "cpu", pin_memory, dtype)  # [Eh, H, I]
        self.b13_gpu = self.b2_gpu = self.b13_cpu = self.b2_cpu = None
        if self.math.has_bias:  # HybridMoE's layout with one chunk
            self.b13_gpu = torch.zeros(Eg, 2 * I, dtype=dtype, device=self.device)  # [Eg, 2I]
            self.b2_gpu = torch.zeros(Eg, H, dtype=dtype, device=self.device)  # [Eg, H]
            self.b13_cpu = torch.zeros(Eh, 1, 2 * I, dtype=dtype, device="cpu", pin_memory=pin_memory)
            self.b2_cpu = torch.zeros(Eh, 1, H, dtype=dtype, device="cpu", pin_memory=pin_memory)

    @property
    def expert_bytes(self) -> int:
        return self.expert_format.expert_bytes(self.hidden_size, self.intermediate_size,
                                               self.w13_cpu.dtype.itemsize)

    def _sets(self, expert: int):
        """(w13, w2, slot) of each set holding `expert`."""
        if self.device_slot[expert] >= 0:
            yield self.w13_gpu, self.w2_gpu, self.device_slot[expert]
        if self.host_slot[expert] >= 0:
            yield self.w13_cpu, self.w2_cpu, self.host_slot[expert]

    def load_expert(self, expert: int, name: str, weight: torch.Tensor) -> None:
        """One of `expert`'s tensors as vLLM's loaders name them: w1 / w3 [I, H] and w2 [H, I] in
        the format's storage (MXFP4: [I, H/2] bytes; AutoGPTQ: transposed), s1 / s3 / s2 their
        scales, w13 / s13 gate and up together, biases, AutoAWQ's zero points (z1 / z3 / z2,
        z13), and the checked-only tensors (k: compressed-tensors' shapes; z, g: AutoGPTQ's zero
        points and group indices)."""
        checkpoint = self.expert_format.checkpoint
        if name[0] == "b":
            super().load_expert(expert, name, weight)
            return
        if name[0] in "kg" or (name[0] == "z" and checkpoint != "awq"):
            self._check_metadata(expert, name, weight)
            return
        if name not in ("w1", "w2", "w3", "s1", "s2", "s3", "w13", "s13", "z1", "z2", "z3", "z13"):
            raise KeyError(f"unknown expert tensor {name!r} of a {self.expert_format.name} layer")
        if checkpoint == "gptq":  # [K/8, N] words, [K/g, N] scales
            weight = weight.t()
        elif checkpoint == "awq":  # [K, N/8] and [K/g, N/8] words of columns, [K/g, N] scales
            if name[0] == "s":
                weight = weight.t()
            else:
                codes = awq_unpack(weight.to(torch.int32)).t()  # [N, K] codes, [N, K/g] zero points
                weight = pack_int4(codes) if name[0] == "w" else codes
        if name in ("w13", "s13", "z13"):
            gate, up = self.math.split_w13(weight)
            self._store(expert, name[0] + "1", gate)
            self._store(expert, name[0] + "3", up)
        else:
            self._store(expert, name, weight)

    def _merge_scale_zero(self, dst: torch.Tensor, name: str, weight: torch.Tensor, scale_dtype: torch.dtype) -> None:
        """Writes groups' scales (s, rounded to `scale_dtype`) or zero points (z) into their INT4
        zero-point words in `dst`, keeping the other half (they load in either order)."""
        weight = weight.reshape(dst.shape).to(dst.device)
        if name[0] == "s":
            dst.copy_((dst & ~0xFFFF) | pack_scale_zero(weight, torch.zeros_like(dst), scale_dtype))
        else:
            dst.copy_((dst & 0xFFFF) | ((weight.to(torch.int32) & 0xF) << 16))

    def _check_metadata(self, expert: int, name: str, weight: torch.Tensor) -> None:
        """Checks what a checkpoint stores beside the values and scales: compressed-tensors'
        [N, K] of a projection (k), AutoGPTQ's group index of each input (g: groups in weight
        order; act-order checkpoints are refused at build) and zero points (z: a symmetric
        checkpoint's, ignored as vLLM's uint4b8 kernels ignore them)."""
        H, I = self.hidden_size, self.intermediate_size * self.tp_size  # the checkpoint's, all ranks'
        if name[0] == "z":
            return
        if name[0] == "g":
            k = {"g1": H, "g3": H, "g13": H, "g2": I}[name]
            expect = torch.arange(k, dtype=torch.int64) // self.expert_format.block[1]
            if weight.numel() != k or not torch.equal(weight.flatten().to(torch.int64), expect):
                raise ValueError(f"fiddler: expert {expert}'s {name[1:]} projection has a g_idx that is not "
                                 f"its {k} inputs in groups of {self.expert_format.block[1]} in order; fiddler "
                                 "loads GPTQ checkpoints without act-order")
            return
        expect = {"k1": (I, H), "k3": (I, H), "k2": (H, I), "k13": (2 * I, H)}[name]
        if tuple(int(v) for v in weight.flatten().tolist()) != expect:
            raise ValueError(f"fiddler: expert {expert}'s {name[1:]} projection is {weight.tolist()} in the "
                             f"checkpoint, the layer's is {list(expect)}")

    def _store(self, expert: int, name: str, weight: torch.Tensor) -> None:
        """w1 / w3 / w2 values or s1 / s3 / s2 scales, in storage layout, into each set holding
        `expert`. Under tensor parallelism a whole checkpoint tensor gives this rank's share of
        the intermediate size, as vLLM's loader splits it: w1 / w3 and their scales by rows,
        w2 and its scales by the columns of its inputs (each share whole scale groups:
        check_layer); a tensor already of the share's size is taken as is."""
        values, scales = self.expert_format.layout.keys
        key = values if name[0] == "w" else scales  # s and z share int4_zp's scale / zero words
        I = self.intermediate_size
        for w13, w2, slot in self._sets(expert):
            if name[1] == "2":
                dst = w2.tensors[key][slot]
            else:
                rows = I if key == values else I // self.expert_format.block[0]
                full = w13.tensors[key][slot]
                dst = full[:rows] if name[1] == "1" else full[rows:]
            weight = self._tp_share(weight, dst, 1 if name[1] == "2" else 0)
            if dst.numel() != weight.numel() or dst.shape[0] != weight.shape[0]:
                raise ValueError(f"fiddler: expert {expert}'s {name} ({key}) has shape {list(weight.shape)}, the "
                                 f"layer's {self.expert_format.describe()} expects {list(dst.shape)}")
            if key == "weight_scale_zero":
                self._merge_scale_zero(dst, name, weight, w13.scale_dtype)
            else:
                dst.copy_(weight.reshape(dst.shape))  # MXFP4 values: [rows, K/2] bytes as [rows, K/32, 16]

    def _tp_share(self, weight: torch.Tensor, dst: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's share of `weight` along `dim` (its intermediate axis) where `weight` holds
        every rank's (tp_size x dst's extent there); `weight` otherwise. [N, K/2] MXFP4 bytes
        are compared as dst's [N, K/32, 16]."""
        if self.tp_size == 1:
            return weight
        shaped = weight.reshape(weight.shape[0], -1, *dst.shape[2:])
        if shaped.shape[dim] != dst.shape[dim] * self.tp_size:
            return weight
        share = dst.shape[dim]
        return shaped.narrow(dim, self.tp_rank * share, share)

    def expert_weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [2I, H], w2 [H, I]) of one expert, dequantized (copies)."""
        w13, w2, slot = next(self._sets(expert))
        return w13[slot], w2[slot]

    def init_random(self, seed: int, scale: float = 1e-3, pool_size: int = 1 << 24) -> None:
        """--load-format dummy: stored values drawn from one pool per layer and tiled (as
        HybridMoE.init_random), every scale mapping the format's largest value to `scale`, so
        weights lie in (-scale, scale) as the bf16 layers'; biases uniform in the same range."""
        f = self.expert_format
        values, scales = f.layout.keys
        gen = torch.Generator(device="cpu").manual_seed(seed)
        pool = f.random_values(pool_size, gen)
        twice = {torch.device("cpu"): torch.cat([pool, pool])}

        def fill(dst: torch.Tensor, shift: int) -> None:
            src = twice.setdefault(dst.device, twice[torch.device("cpu")].to(dst.device))
            flat = dst.view(torch.uint8).view(-1)
            for start in range(0, flat.numel(), pool_size):
                n = min(pool_size, flat.numel() - start)
                flat[start:start + n].copy_(src[shift:shift + n])

        for e in range(self.num_experts):
            for w13, w2, slot in self._sets(e):
                for j, experts in enumerate((w13, w2)):
                    fill(experts.tensors[values][slot], (2 * e + j) * 104729 % pool_size)
                    experts.tensors[scales][slot].fill_(f.scale_for(scale, experts.dtype))
        if self.math.has_bias:
            H, I = self.hidden_size, self.intermediate_size
            for e in range(self.num_experts):
                for name, n in (("b1", I), ("b3", I), ("b2", H)):
                    self.load_expert(e, name, torch.empty(n).uniform_(-scale, scale, generator=gen))
