"""Counters of a fiddler model, gathered in the worker (``LLM.apply_model(model_stats)``).

Plain numbers, so they cross process boundaries; benchmarks take deltas.
"""

from __future__ import annotations


def model_stats(model) -> dict:
    layers = [m for m in getattr(model, "moe_layers", []) if hasattr(m, "routed_to_gpu")]
    if not layers:
        return {}
    runtime = layers[0].cpu_runtime
    stager = layers[0].stager
    from vllm_fiddler.runtime import step_planner

    planner = step_planner._planner
    return {
        "routed_to_gpu": sum(m.routed_to_gpu for m in layers),
        "routed_to_cpu": sum(m.routed_to_cpu for m in layers),
        "layer0_steps": layers[0].steps,
        "cpu_busy_s": runtime.busy_s,
        "cpu_calls": runtime.calls,
        "h2d_weight_bytes": stager.bytes_copied if stager is not None else 0,
        "experts_copied": planner.copies if planner is not None else 0,
        "experts_split": planner.splits if planner is not None else 0,
        "gpu_experts": sum(len(m.gpu_experts) for m in layers),
        "cpu_experts": sum(len(m.cpu_experts) for m in layers),
    }


def expert_tokens(model) -> list[list[int]]:
    """Tokens routed to each expert so far, per MoE layer: [L][E] (for profiling)."""
    return [m.expert_tokens.tolist() for m in getattr(model, "moe_layers", []) if hasattr(m, "expert_tokens")]


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))}
