"""Plain-torch grouped experts: the portable fallback for both expert sets.

Used for GPU-resident experts when Triton cannot run (the CPU platform) and
for host-resident experts when the C++ CPU kernel is unavailable. Computes in
the weights' dtype with torch's matmuls (fp32 accumulation inside), and
accumulates the top-k weighted sum in fp32, as vLLM's fused MoE does.

Shape legend: T = tokens, H = hidden, I = intermediate, Ex = experts in this
set, K = top-k.
"""

from __future__ import annotations

import torch

from vllm_fiddler.kernels.reference import SILU, ExpertMath


def moe_forward(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor, out: torch.Tensor, math: ExpertMath = SILU,
                b13: torch.Tensor | None = None, b2: torch.Tensor | None = None) -> None:
    """out += sum_k topk_weights[t, k] * ffn_{topk_ids[t, k]}(x[t]); ids of -1 are skipped.

    x [T, H]; w13 [Ex, 2I, H]; w2 [Ex, H, I] (tensors, or quant.QuantizedExperts: a routed
    expert is dequantized when it is used); topk_ids [T, K] local ids or -1;
    topk_weights [T, K] fp32; out [T, H] fp32; with math.has_bias, b13 [Ex, 2I] and b2 [Ex, H].
    """
    if x.shape[0] == 0 or topk_ids.numel() == 0:
        return
    flat_ids = topk_ids.reshape(-1)  # [T*K]
    if int(flat_ids.min()) < -1 or int(flat_ids.max()) >= w13.shape[0]:
        raise ValueError(f"topk_ids out of range [-1, {w13.shape[0]})")
    valid = flat_ids >= 0
    if not bool(valid.any()):
        return
    order = torch.argsort(flat_ids.masked_fill(~valid, w13.shape[0]), stable=True)  # [T*K]
    counts = torch.bincount(flat_ids[valid], minlength=w13.shape[0]).tolist()  # [Ex]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        slots = order[start:start + n]  # [n] flat (token, k) positions
        start += n
        tokens = slots // topk_ids.shape[1]  # [n]
        gate_up = x[tokens].to(w13.dtype) @ w13[e].t()  # [n, 2I]
        if b13 is not None:
            gate_up = gate_up + b13[e].to(gate_up.dtype)
        act = math.act(gate_up)  # [n, I]
        y = act @ w2[e].t()  # [n, H]
        if b2 is not None:
            y = y + b2[e].to(y.dtype)
        y = y.float()
        out.index_add_(0, tokens, y * topk_weights.reshape(-1)[slots, None].float())
