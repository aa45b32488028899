"""fp32 oracle for an MoE block's routed experts (the test reference).

Written for clarity, not speed: every kernel and the hybrid layer are checked
against these functions. ``ExpertMath`` names the expert math a layer asks
for (vLLM's activation and whether experts carry biases).

Shape legend: T = tokens, H = hidden size, I = expert intermediate size,
E = experts, K = experts per token (top-k).
Weight layout (vLLM's FusedMoE layout, also ours):
  w13[e] = cat(w1[e], w3[e])  # [2I, H]: gate projection rows first, then up
  w2[e]                       # [H, I]:  down projection
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class ExpertMath:
    """One expert's FFN: act(x w13^T + b13) w2^T + b2, with w13 = [gate rows; up rows].

    activation "silu": silu(gate) * up (Mixtral, Qwen, DeepSeek, GLM, OLMoE).
    activation "swigluoai" (gpt-oss): gate clamped to <= limit, up to [-limit, limit],
    (up + 1) * gate * sigmoid(alpha * gate). vLLM keeps gpt-oss's w13 rows and b13 with
    gate and up interleaved; fiddler stores them de-interleaved (split_w13).
    """

    activation: str = "silu"
    has_bias: bool = False
    alpha: float = 1.702
    limit: float = 7.0

    @property
    def plain_silu(self) -> bool:
        """SiLU-gated without biases: what every kernel computes natively."""
        return self.activation == "silu" and not self.has_bias

    def split_w13(self, w13: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """vLLM's w13 [2I, ...] (or b13 [2I]) of one expert -> (gate [I, ...], up [I, ...])."""
        if self.activation == "swigluoai":
            return w13[0::2], w13[1::2]
        inter = w13.shape[0] // 2
        return w13[:inter], w13[inter:]

    def act(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [n, 2I] (gate columns first) -> [n, I], in gate_up's dtype."""
        inter = gate_up.shape[-1] // 2
        gate, up = gate_up[..., :inter], gate_up[..., inter:]
        if self.activation == "silu":
            return F.silu(gate) * up
        if self.activation == "swigluoai":
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
            return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        raise ValueError(f"unknown expert activation {self.activation!r}")


SILU = ExpertMath()


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's router: softmax over E, top-k, renormalised to sum to 1.

    Returns (topk_weights [T, K] fp32, topk_ids [T, K] int64).
    """
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)  # [T, K]
    topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids


def expert_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, math: ExpertMath = SILU,
               b13: torch.Tensor | None = None, b2: torch.Tensor | None = None) -> torch.Tensor:
    """One expert's gated FFN in fp32: act(x w13^T + b13) w2^T + b2 -> [T, H]."""
    x, w13, w2 = x.float(), w13.float(), w2.float()
    gate_up = x @ w13.t()  # [T, 2I]
    if b13 is not None:
        gate_up = gate_up + b13.float()
    y = math.act(gate_up) @ w2.t()  # [T, H]
    return y + b2.float() if b2 is not None else y


def moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
        topk_weights: torch.Tensor, topk_ids: torch.Tensor, math: ExpertMath = SILU,
        b13: torch.Tensor | None = None, b2: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert_ffn_{topk_ids[t, k]}(x[t]), fp32 [T, H];
    b13 [E, 2I] and b2 [E, H] optional."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        token_idx, slot = torch.nonzero(topk_ids == e, as_tuple=True)  # [n], [n]
        if token_idx.numel() == 0:
            continue
        y = expert_ffn(x[token_idx], w13[e], w2[e], math,
                       b13[e] if b13 is not None else None, b2[e] if b2 is not None else None)  # [n, H]
        out.index_add_(0, token_idx, y * topk_weights[token_idx, slot, None].float())
    return out


def sparse_moe_block(x: torch.Tensor, gate_weight: torch.Tensor, w13: torch.Tensor,
                     w2: torch.Tensor, top_k: int) -> torch.Tensor:
    """Mixtral's whole sparse MoE block: router gate, routing, experts. fp32 [T, H]."""
    logits = x.float() @ gate_weight.float().t()  # [T, E]
    topk_weights, topk_ids = route(logits, top_k)
    return moe(x, w13, w2, topk_weights, topk_ids)
