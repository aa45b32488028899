"""fp32 oracle for Mixtral's sparse MoE block (the test reference).

Written for clarity, not speed: every kernel and the hybrid layer are checked
against these functions.

Shape legend: T = tokens, H = hidden size, I = expert intermediate size,
E = experts, K = experts per token (top-k).
Weight layout (vLLM's FusedMoE layout, also ours):
  w13[e] = cat(w1[e], w3[e])  # [2I, H]: gate projection rows first, then up
  w2[e]                       # [H, I]:  down projection
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's router: softmax over E, top-k, renormalised to sum to 1.

    Returns (topk_weights [T, K] fp32, topk_ids [T, K] int64).
    """
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)  # [T, K]
    topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids


def expert_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert's SwiGLU FFN in fp32: (silu(x w1^T) * (x w3^T)) w2^T -> [T, H]."""
    x, w13, w2 = x.float(), w13.float(), w2.float()
    inter = w13.shape[0] // 2
    gate_up = x @ w13.t()  # [T, 2I]
    act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [T, I]
    return act @ w2.t()  # [T, H]


def moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
        topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert_ffn_{topk_ids[t, k]}(x[t]), fp32 [T, H]."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        token_idx, slot = torch.nonzero(topk_ids == e, as_tuple=True)  # [n], [n]
        if token_idx.numel() == 0:
            continue
        y = expert_ffn(x[token_idx], w13[e], w2[e])  # [n, H]
        out.index_add_(0, token_idx, y * topk_weights[token_idx, slot, None].float())
    return out


def sparse_moe_block(x: torch.Tensor, gate_weight: torch.Tensor, w13: torch.Tensor,
                     w2: torch.Tensor, top_k: int) -> torch.Tensor:
    """Mixtral's whole sparse MoE block: router gate, routing, experts. fp32 [T, H]."""
    logits = x.float() @ gate_weight.float().t()  # [T, E]
    topk_weights, topk_ids = route(logits, top_k)
    return moe(x, w13, w2, topk_weights, topk_ids)
