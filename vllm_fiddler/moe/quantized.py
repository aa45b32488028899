"""Hybrid layers whose experts stay in their checkpoint's quantized format, on both sides.

A checkpoint's expert format comes from vLLM's own quantization config
(``compat.expert_format``); the experts keep it in device and host memory
alike: a host expert is never expanded into a bf16 copy, and the bytes a
token's read costs are the compressed ones (``expert_bytes``, which placement
and the budget count).

Compute: host experts run the native FP8 kernels (kernels/cpu/kernel_fp8_avx512.cpp:
FP8 widened to fp32 in registers, block scales on the blocks' partial sums)
where the CPU has AVX512F/BW/VL, else each routed expert is dequantized when
it is used (kernels/quant.py through kernels/torch_moe.py), as device experts
are for now (vLLM's FP8 MoE kernels are not wired in yet). Weight copies, streamed chunks, routed CUDA-graph steps and online re-placement are
bf16-only, so a quantized layer runs without them (``vllm_fiddler.moe.model``
logs it).

Formats (kernels/quant.py has the layouts):
  fp8_block   float8_e4m3fn weights, float32 scales per bn x bk block (vLLM's
              ``fp8`` config with ``weight_block_size``: DeepSeek-V3/R1, Kimi-K2,
              Qwen3 FP8); vLLM names the scales ``*_weight_scale_inv``.

Shape legend: E experts, Ex experts of one set, H hidden, I intermediate,
bn x bk scale blocks.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from vllm_fiddler.kernels.quant import FP8_MAX, QuantizedExperts
from vllm_fiddler.moe.layer import HybridMoE, cold_token_counts

# the checkpoint tensors of one projection, by vLLM's parameter suffix: values, then scales
FP8_BLOCK_TENSORS = {"weight": "weight", "weight_scale_inv": "weight_scale_inv"}


@dataclasses.dataclass(frozen=True)
class ExpertFormat:
    """One quantized expert format and its parameters."""

    name: str  # "fp8_block"
    block: tuple[int, int] = (128, 128)  # (bn, bk) scale block

    def __post_init__(self) -> None:
        if self.name != "fp8_block":
            raise ValueError(f"unknown expert format {self.name!r}")

    def describe(self) -> str:
        return f"FP8 e4m3 with {self.block[0]}x{self.block[1]} block scales"

    def scale_shape(self, n: int, k: int) -> tuple[int, int]:
        """[ceil(N/bn), ceil(K/bk)] scales of one [N, K] weight."""
        bn, bk = self.block
        return math.ceil(n / bn), math.ceil(k / bk)

    def projection_bytes(self, n: int, k: int) -> int:
        """Bytes of one expert's [N, K] weight as stored: values and scales."""
        rows, cols = self.scale_shape(n, k)
        return n * k + 4 * rows * cols

    def expert_bytes(self, hidden: int, inter: int) -> int:
        """w13 [2I, H] and w2 [H, I] of one expert as stored."""
        return self.projection_bytes(2 * inter, hidden) + self.projection_bytes(hidden, inter)

    def check_layer(self, prefix: str, hidden: int, inter: int) -> None:
        """Raises ValueError for a layer the format cannot split into gate and up."""
        if inter % self.block[0]:
            raise ValueError(f"{prefix}: intermediate size {inter} is not a multiple of the FP8 scale block's "
                             f"{self.block[0]} rows, so gate and up scales cannot be told apart")

    def empty(self, count: int, n: int, k: int, device: torch.device | str, pin_memory: bool,
              dtype: torch.dtype) -> QuantizedExperts:
        """Storage for `count` experts' [N, K] weights; `dtype` is what they dequantize to."""
        pin = pin_memory and torch.device(device).type == "cpu"
        weight = torch.empty(count, n, k, dtype=torch.float8_e4m3fn, device=device, pin_memory=pin)
        scale = torch.ones(count, *self.scale_shape(n, k), dtype=torch.float32, device=device, pin_memory=pin)
        return QuantizedExperts("fp8_block", {"weight": weight, "weight_scale_inv": scale}, dtype=dtype,
                                block=self.block)


class QuantizedHybridMoE(HybridMoE):
    """HybridMoE with both expert sets in a quantized format (module docstring). Expert tensors
    load by vLLM's names: w1 / w3 / w2 (values) and s1 / s3 / s2 (their scales), w13 / s13
    fused."""

    def __init__(self, *, expert_format: ExpertFormat, **kwargs):
        if kwargs.get("host_backing"):
            raise ValueError("quantized layers keep no host backing (no online re-placement)")
        if kwargs["math"].has_bias:
            raise ValueError("quantized experts with biases are not supported")
        self.expert_format = expert_format
        expert_format.check_layer("layer", kwargs["hidden_size"], kwargs["intermediate_size"])
        super().__init__(**kwargs)

    def _allocate_experts(self, Eg: int, Eh: int, dtype: torch.dtype, pin_memory: bool) -> None:
        f, H, I = self.expert_format, self.hidden_size, self.intermediate_size
        self.chunks = 1  # one chunk per host expert: host slot s is chunk-expert s
        self.w13_gpu = f.empty(Eg, 2 * I, H, self.device, False, dtype)  # [Eg, 2I, H]
        self.w2_gpu = f.empty(Eg, H, I, self.device, False, dtype)  # [Eg, H, I]
        self.w13_cpu = self.w13_cpu_chunks = f.empty(Eh, 2 * I, H, "cpu", pin_memory, dtype)  # [Eh, 2I, H]
        self.w2_cpu = self.w2_cpu_chunks = f.empty(Eh, H, I, "cpu", pin_memory, dtype)  # [Eh, H, I]
        self.b13_gpu = self.b2_gpu = self.b13_cpu = self.b2_cpu = None

    @property
    def expert_bytes(self) -> int:
        return self.expert_format.expert_bytes(self.hidden_size, self.intermediate_size)

    def _sets(self, expert: int):
        """(w13, w2, slot) of each set holding `expert`."""
        if self.device_slot[expert] >= 0:
            yield self.w13_gpu, self.w2_gpu, self.device_slot[expert]
        if self.host_slot[expert] >= 0:
            yield self.w13_cpu, self.w2_cpu, self.host_slot[expert]

    def load_expert(self, expert: int, name: str, weight: torch.Tensor) -> None:
        """One of `expert`'s tensors as vLLM's loaders name them: w1 / w3 [I, H] and w2 [H, I] in
        the format's storage dtype, s1 / s3 / s2 their scales, w13 / s13 gate and up together."""
        if name in ("w13", "s13"):
            gate, up = self.math.split_w13(weight)
            self.load_expert(expert, name[0] + "1", gate)
            self.load_expert(expert, name[0] + "3", up)
            return
        if name not in ("w1", "w2", "w3", "s1", "s2", "s3"):
            raise KeyError(f"unknown expert tensor {name!r} of a {self.expert_format.name} layer")
        key = "weight" if name[0] == "w" else "weight_scale_inv"
        I = self.intermediate_size
        for w13, w2, slot in self._sets(expert):
            if name[1] == "2":
                dst = w2.tensors[key][slot]
            else:
                rows = I if key == "weight" else I // self.expert_format.block[0]
                full = w13.tensors[key][slot]
                dst = full[:rows] if name[1] == "1" else full[rows:]
            if tuple(dst.shape) != tuple(weight.shape):
                raise ValueError(f"fiddler: expert {expert}'s {name} ({key}) has shape {list(weight.shape)}, the "
                                 f"layer's {self.expert_format.describe()} expects {list(dst.shape)}")
            dst.copy_(weight)

    def expert_weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [2I, H], w2 [H, I]) of one expert, dequantized (copies)."""
        w13, w2, slot = next(self._sets(expert))
        return w13[slot], w2[slot]

    def init_random(self, seed: int, scale: float = 1e-3, pool_size: int = 1 << 24) -> None:
        """--load-format dummy: values uniform over e4m3's range tiled from one pool per layer (as
        HybridMoE.init_random), every block scale scale / FP8_MAX, so weights are
        uniform(-scale, scale) as the bf16 layers'."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        pool = torch.empty(pool_size, dtype=torch.float32).uniform_(-FP8_MAX, FP8_MAX, generator=gen)
        pool = pool.to(torch.float8_e4m3fn).view(torch.uint8)
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
                    fill(experts.tensors["weight"][slot], (2 * e + j) * 104729 % pool_size)
                    experts.tensors["weight_scale_inv"][slot].fill_(scale / FP8_MAX)

    # -- CUDA: the device set dequantizes on the device, the host set on the CPU -----------
    def _forward_cuda(self, x, topk_weights, topk_ids, out, op_start: float) -> None:
        ids = topk_ids.to("cpu", torch.long)  # [T, K]
        cpu_ids = self.cpu_slot_of_host[ids]  # [T, K] host slot or -1
        n_cpu = self._count(cpu_ids)
        cold = None
        if n_cpu:
            self._cpu_chunk_reads += len(cold_token_counts(cpu_ids, self.num_host_slots))
            cold = self.cpu_runtime.submit(x.cpu(), self.w13_cpu, self.w2_cpu, cpu_ids, topk_weights.cpu(),
                                           math=self.math)
        acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
        if n_cpu < cpu_ids.numel():
            self._device_experts(x, self.gpu_slot_of[topk_ids], topk_weights, acc)
        if cold is not None:
            acc += cold.result().to(x.device)
        out.copy_(acc)
