"""HybridMoE: one MoE layer's experts split between device and host memory.

Architecture (per step, inside one opaque custom op):
  route (softmax top-k, renormalised, fp32)
    -> cold part: tokens routed to host-resident experts go to the CPU
       expert runtime (submit; runs while the GPU works)
    -> hot part: device-resident experts on the device (Triton on CUDA,
       torch elsewhere)
    -> wait for the cold part, add it, cast once to the model dtype.
Every (token, k) pair is computed on exactly one side: the slot maps send
an expert id to a local slot in its own set and to -1 in the other.

On vLLM's CPU platform both sets live in host memory but still run through
the two code paths, so CPU CI exercises the split.

Shape legend: T = tokens, H = hidden, I = expert intermediate, E = experts,
Eg / Ec = device- / host-resident experts, K = top-k.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm_fiddler.kernels.reference import route
from vllm_fiddler.runtime.cpu_experts import CPUExpertRuntime

# Checkpoint names of Mixtral's expert weights -> (tensor, row offset in w13).
_W1, _W2, _W3 = "w1", "w2", "w3"


class HybridMoE(nn.Module):
    def __init__(self, *, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 gpu_experts: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 cpu_runtime: CPUExpertRuntime, pin_memory: bool):
        super().__init__()
        E, H, I = num_experts, hidden_size, intermediate_size
        self.num_experts, self.top_k, self.hidden_size, self.intermediate_size = E, top_k, H, I
        self.gpu_experts = tuple(sorted(gpu_experts))
        self.cpu_experts = tuple(e for e in range(E) if e not in set(self.gpu_experts))
        self.device = torch.device(device)
        self.cpu_runtime = cpu_runtime
        # Plain tensors, not Parameters: vLLM's loader neither moves nor
        # re-initialises them, and this module places them itself.
        gpu_slot = torch.full((E,), -1, dtype=torch.int32)
        gpu_slot[list(self.gpu_experts)] = torch.arange(len(self.gpu_experts), dtype=torch.int32)
        cpu_slot = torch.full((E,), -1, dtype=torch.int32)
        cpu_slot[list(self.cpu_experts)] = torch.arange(len(self.cpu_experts), dtype=torch.int32)
        self.gpu_slot_of = gpu_slot.to(self.device)  # [E] slot in the device set, or -1
        self.cpu_slot_of = cpu_slot.to(self.device)  # [E] slot in the host set, or -1
        Eg, Ec = len(self.gpu_experts), len(self.cpu_experts)
        self.w13_gpu = torch.empty(Eg, 2 * I, H, dtype=dtype, device=self.device)  # [Eg, 2I, H]
        self.w2_gpu = torch.empty(Eg, H, I, dtype=dtype, device=self.device)  # [Eg, H, I]
        self.w13_cpu = torch.empty(Ec, 2 * I, H, dtype=dtype, device="cpu", pin_memory=pin_memory)
        self.w2_cpu = torch.empty(Ec, H, I, dtype=dtype, device="cpu", pin_memory=pin_memory)
        # Counters for metrics and tests: (token, k) pairs computed on each side.
        self.routed_to_gpu = 0
        self.routed_to_cpu = 0

    # ---- weights -------------------------------------------------------
    def expert_weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [2I, H], w2 [H, I]) of one expert, wherever it lives."""
        slot = self.gpu_experts.index(expert) if expert in self.gpu_experts else None
        if slot is not None:
            return self.w13_gpu[slot], self.w2_gpu[slot]
        slot = self.cpu_experts.index(expert)
        return self.w13_cpu[slot], self.w2_cpu[slot]

    def load_expert(self, expert: int, name: str, weight: torch.Tensor) -> None:
        w13, w2 = self.expert_weights(expert)
        I = self.intermediate_size
        if name == _W1:
            w13[:I].copy_(weight)
        elif name == _W3:
            w13[I:].copy_(weight)
        elif name == _W2:
            w2.copy_(weight)
        else:
            raise KeyError(f"unknown expert weight {name!r}")

    def load_weights(self, weights) -> set[str]:
        """Takes vLLM's names relative to this module: ``"{expert}.w1.weight"``."""
        loaded = set()
        for name, weight in weights:
            expert, kind, _ = name.split(".", 2)
            self.load_expert(int(expert), kind, weight)
            loaded.add(name)
        return loaded

    def init_random(self, seed: int, scale: float = 1e-3) -> None:
        """uniform(-scale, scale) weights for --load-format dummy, the same for any placement."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for e in range(self.num_experts):
            w13, w2 = self.expert_weights(e)
            for dst in (w13, w2):  # drawn on the host so every placement gets the same values
                dst.copy_(torch.empty(dst.shape, dtype=dst.dtype).uniform_(-scale, scale, generator=gen))

    # ---- compute -------------------------------------------------------
    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """x [T, H], router_logits [T, E] -> [T, H] in x.dtype."""
        out = torch.empty_like(x)
        self.forward_into(x, router_logits, out)
        return out

    def forward_into(self, x: torch.Tensor, router_logits: torch.Tensor, out: torch.Tensor) -> None:
        T = x.shape[0]
        if T == 0:
            return
        topk_weights, topk_ids = route(router_logits, self.top_k)  # [T, K] fp32, [T, K] int64
        cpu_ids = self.cpu_slot_of[topk_ids]  # [T, K] host-set slot or -1
        gpu_ids = self.gpu_slot_of[topk_ids]  # [T, K] device-set slot or -1
        n_cpu = int((cpu_ids >= 0).sum())
        self.routed_to_cpu += n_cpu
        self.routed_to_gpu += T * self.top_k - n_cpu
        cold = None
        if n_cpu:
            cold = self.cpu_runtime.submit(x.to("cpu"), self.w13_cpu, self.w2_cpu,
                                           cpu_ids.to("cpu"), topk_weights.to("cpu"))
        acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
        if n_cpu < T * self.top_k:
            self._device_experts(x, gpu_ids, topk_weights, acc)
        if cold is not None:
            acc += cold.result().to(x.device, non_blocking=True)
        out.copy_(acc)

    def _device_experts(self, x: torch.Tensor, gpu_ids: torch.Tensor, topk_weights: torch.Tensor,
                        acc: torch.Tensor) -> None:
        from vllm_fiddler.kernels.torch_moe import moe_forward

        moe_forward(x, self.w13_gpu, self.w2_gpu, gpu_ids, topk_weights, acc)
