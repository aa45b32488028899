"""vLLM's CPU platform: both expert sets in host memory, still through the two paths (the
hot experts in torch, the cold ones on the CPU expert runtime), so CPU CI runs the split."""

from __future__ import annotations

import torch

from vllm_fiddler.moe.steps.synced import cold_token_counts


class HostSteps:
    """HybridMoE's step on vLLM's CPU platform (a mixin of moe.layer.HybridMoE)."""

    def _forward_host(self, x, topk_weights, topk_ids, out) -> None:
        cpu_ids = self.cpu_slot_of[topk_ids]  # [T, K] host-set slot or -1
        gpu_ids = self.gpu_slot_of[topk_ids]  # [T, K] device-set slot or -1
        n_cpu = self._count(cpu_ids)
        cold = None
        if n_cpu:
            self._cpu_chunk_reads += self.chunks * len(cold_token_counts(cpu_ids, self.num_host_slots))
            cold = self.cpu_runtime.submit(x, self.w13_cpu_chunks, self.w2_cpu_chunks,
                                           *self.cpu_chunk_ids(cpu_ids, topk_weights), math=self.math,
                                           biases=self.host_biases)
        acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
        if n_cpu < cpu_ids.numel():
            self._device_experts(x, gpu_ids, topk_weights, acc)
        if cold is not None:
            acc += cold.result()
        out.copy_(acc)

    def _device_experts(self, x: torch.Tensor, gpu_ids: torch.Tensor, topk_weights: torch.Tensor,
                        acc: torch.Tensor) -> None:
        from vllm_fiddler.kernels.torch_moe import moe_forward

        moe_forward(x, self.w13_gpu, self.w2_gpu, gpu_ids, topk_weights, acc, self.math, self.b13_gpu,
                    self.b2_gpu)
