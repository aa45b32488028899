"""MLA prefill attention in plain torch, for a GPU box whose vLLM runtime has no FlashAttention.

On Hopper, vLLM picks FlashAttention for MLA prefill and nothing else (its
``MLAPrefillBackendEnum`` priorities for SM90); a runtime built without
``vllm_flash_attn``'s library fails DeepSeek-V3's first prefill. ``decode.py``
then registers this backend as vLLM's ``CUSTOM`` MLA prefill backend and runs
its engines in-process (the registration lives in the process that builds the
model). Prefill is slower than FlashAttention's, so TTFT of such a run is an
upper bound (the results file says which backend ran); decode does not use it.

Shape legend: T tokens, Tq / Tk of one sequence, H heads, D q/k head dim, Dv v head dim.
"""

from __future__ import annotations

import torch

HEAD_CHUNK = 16  # heads per score tensor: 16 x 2048 x 2048 fp32 = 256 MiB at a 2048-token prompt


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D], k [Tk, H, D], v [Tk, H, Dv]; sequence i is rows cu_q[i]:cu_q[i+1] of q and
    cu_k[i]:cu_k[i+1] of k / v -> (out [T, H, Dv] in q's dtype, lse [H, T] fp32), as
    FlashAttention's varlen call returns them. causal: query j of a sequence sees keys up to
    Tk - Tq + j (aligned at the end)."""
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for i in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]
        if q1 == q0 or k1 == k0:
            continue
        mask = None
        if causal:
            tq, tk = q1 - q0, k1 - k0
            mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(tk - tq + 1)  # [Tq, Tk] hidden
        for h0 in range(0, q.shape[1], HEAD_CHUNK):
            h1 = min(h0 + HEAD_CHUNK, q.shape[1])
            qi = q[q0:q1, h0:h1].transpose(0, 1).float()  # [h, Tq, D]
            ki = k[k0:k1, h0:h1].transpose(0, 1).float()  # [h, Tk, D]
            vi = v[k0:k1, h0:h1].transpose(0, 1).float()  # [h, Tk, Dv]
            scores = qi @ ki.transpose(1, 2) * scale  # [h, Tq, Tk]
            if mask is not None:
                scores.masked_fill_(mask, float("-inf"))
            total = torch.logsumexp(scores, dim=-1)  # [h, Tq]
            probs = torch.exp(scores - total[..., None]).nan_to_num_(0.0)  # rows with no key: 0
            out[q0:q1, h0:h1] = (probs @ vi).transpose(0, 1).to(out.dtype)
            lse[h0:h1, q0:q1] = total
    return out, lse


def backend_class():
    """vLLM's MLAPrefillBackend contract over varlen_attention (imported lazily: vLLM needed)."""
    from vllm.v1.attention.backends.mla.prefill.base import MLAPrefillBackend

    class TorchMLAPrefill(MLAPrefillBackend):
        @staticmethod
        def get_name() -> str:
            return "TORCH_MLA_PREFILL"

        def run_prefill_new_tokens(self, q, k, v, return_softmax_lse, out=None, output_scale=None):
            if out is not None or output_scale is not None:
                raise NotImplementedError("torch MLA prefill writes no quantized output")
            cu = self._prefill_metadata.query_start_loc
            result, lse = varlen_attention(q, k, v, cu, cu, self.scale, causal=True)
            return (result, lse) if return_softmax_lse else result

        def run_prefill_context_chunk(self, chunk_idx, q, k, v):
            meta = self._prefill_metadata
            return varlen_attention(q, k, v, meta.query_start_loc, meta.chunked_context.cu_seq_lens[chunk_idx],
                                    self.scale, causal=False)

    return TorchMLAPrefill


TorchMLAPrefill = None  # set by register(): the class vLLM's registry imports by name


def flash_attention_missing() -> bool:
    """Whether vLLM's FlashAttention library (what MLA prefill on Hopper calls) is absent."""
    try:
        import vllm.vllm_flash_attn.flash_attn_interface  # noqa: F401  (loads the library where there is one)
    except Exception:
        return True
    return not (hasattr(torch.ops._vllm_fa2_C, "varlen_fwd") or hasattr(torch.ops._vllm_fa3_C, "fwd"))


def register() -> str:
    """Registers the torch backend as vLLM's CUSTOM MLA prefill backend; returns the
    attention_config value that selects it."""
    global TorchMLAPrefill
    from vllm.v1.attention.backends.mla.prefill.registry import MLAPrefillBackendEnum, register_mla_prefill_backend

    TorchMLAPrefill = backend_class()
    register_mla_prefill_backend(MLAPrefillBackendEnum.CUSTOM, f"{__name__}.TorchMLAPrefill")
    return "CUSTOM"
