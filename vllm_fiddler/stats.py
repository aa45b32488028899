"""Counters of a fiddler model, gathered in the worker (``LLM.apply_model(model_stats)``).

Plain numbers, so they cross process boundaries; benchmarks take deltas.
"""

from __future__ import annotations


def model_stats(model) -> dict:
    layers = [m for m in getattr(model, "fiddler_layers", []) if hasattr(m, "routed_to_gpu")]
    if not layers:
        return {}
    runtime = layers[0].cpu_runtime
    stager = layers[0].stager
    from vllm_fiddler.runtime import step_planner
    from vllm_fiddler.runtime.thread_counters import thread_counters

    planner = step_planner._planner
    replacer = getattr(model, "replacer", None)
    return {
        "routed_to_gpu": sum(m.routed_to_gpu for m in layers),
        "routed_to_cpu": sum(m.routed_to_cpu for m in layers),
        "layer0_steps": layers[0].steps,
        "cpu_busy_s": runtime.busy_s,
        "cpu_calls": runtime.calls,
        "h2d_weight_bytes": stager.bytes_copied if stager is not None else 0,
        "streamed_weight_bytes": sum(m.streamed_weight_bytes for m in layers),
        "cpu_weight_bytes": sum(m.cpu_weight_bytes for m in layers),
        "experts_copied": planner.copies if planner is not None else 0,
        "experts_split": planner.splits if planner is not None else 0,
        "gpu_experts": sum(len(m.gpu_experts) for m in layers),
        "cpu_experts": sum(len(m.cpu_experts) for m in layers),
        "moe_op_s": sum(m.op_s for m in layers),
        "moe_sync_wait_s": sum(m.sync_wait_s for m in layers),
        "moe_cpu_wait_s": sum(m.cpu_wait_s for m in layers),
        "moe_to_cpu_submit_s": sum(m.to_cpu_submit_s for m in layers),
        "gap_first_layer_s": layers[0].gap_before_s,
        "gap_other_layers_s": sum(m.gap_before_s for m in layers[1:]),
        "cpu_queue_s": runtime.queue_s,
        "cpu_routing_wait_s": runtime.routing_wait_s,
        "cpu_result_wait_s": runtime.result_wait_s,
        "replacements": replacer.replacements if replacer is not None else 0,
        "replacement_bytes": replacer.bytes_copied if replacer is not None else 0,
        "kernel_warmup_s": getattr(model, "kernel_warmup", {}).get("seconds", 0.0),
        "kernel_warmup_configs": getattr(model, "kernel_warmup", {}).get("configs", 0),
        "cuda_graphs": getattr(model, "cuda_graphs", {}).get("graphs", 0),
        "cuda_graph_replays": getattr(getattr(layers[0], "graphs", None), "replays", 0),
        # CPU jobs that FULL CUDA graphs handed the native thread themselves (runtime.graph_jobs)
        "graph_step_jobs": _graph_step_jobs() if getattr(model, "graph_jobs", None) is not None else 0,
        **_arrival_stats(),
        **thread_counters(),
        # not counters (delta() skips them): what routed steps stream now, and the cost model behind it
        "streamed": {"cuts": [list(m.routed_gpu_chunks or ()) for m in layers],
                     "cold_shares": [m.streamed_cold_share for m in layers],
                     "cold_patterns": [m.streamed_cold_patterns for m in layers]},
        **({"cost_model": _cost_summary(planner.cost)} if planner is not None else {}),
    }


def _cost_summary(cost) -> dict:
    """The calibrated figures behind a run's plans (ms an expert; GB/s)."""
    return {"cpu_ms_1_token": cost.cpu_ms(1), "copy_ms": cost.copy_ms, "stream_ms": cost.stream_ms,
            "cpu_contended_slowdown": cost.cpu_contended_slowdown,
            "h2d_contended_slowdown": cost.h2d_contended_slowdown}


def _arrival_stats() -> dict:
    """The scheduler's arrival coalescing, when it runs in this process (the engine core's)."""
    from vllm_fiddler import arrivals

    c = arrivals.last_coalescer
    if c is None:
        return {}
    return {"arrival_holds": c.holds, "arrival_held_s": c.held_s, "arrival_stragglers": c.stragglers}


def expert_tokens(model) -> list[list[int]]:
    """Tokens routed to each expert so far, per MoE layer: [L][E] (for profiling)."""
    return [m.expert_tokens.tolist() for m in getattr(model, "fiddler_layers", []) if hasattr(m, "expert_tokens")]


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))}


def step_breakdown(after: dict, before: dict, prefix: str = "decode_") -> dict:
    """Per-step figures of the steps between two model_stats() readings (benchmarks).

    A step is one forward of the first MoE layer. ``*_op_ms`` is the host time
    inside the hybrid op (all layers); of it, ``*_sync_wait_ms`` was spent
    waiting for the GPU work queued before each layer's routing copy, and
    ``*_cpu_wait_ms`` waiting for the CPU experts after the GPU work was queued
    (with ``wait_on_device``, the default, the device waits instead: that time
    moves into the next layer's ``*_sync_wait_ms``);
    ``*_to_cpu_submit_ms`` passed from each op's start until the CPU got its work.
    Outside the op: ``*_gap_first_layer_ms`` from the previous step's last MoE op
    to this step's first (sampler, scheduler, IPC, embedding, the first
    attention), ``*_gap_other_layers_ms`` the other layers' attention blocks;
    each gap includes its layer's routing (before the op's clock starts).
    On the CPU worker: ``*_cpu_queue_ms`` from submit until it took the job,
    ``*_cpu_routing_wait_ms`` a routed job's wait for its routing after that (the
    GPU's work before the routing copy), and, of ``*_cpu_ms``,
    ``*_cpu_result_wait_ms`` waiting for the previous result's H2D.
    ``*_pcie_weight_gb`` is the weights copied to the device (staging), and
    ``*_pcie_streamed_gb`` those routed steps' kernels read in place from host memory;
    ``*_cpu_weight_gb`` the weights the CPU experts read, and ``*_cpu_read_gb_s``
    that over their busy time: the DRAM bandwidth the CPU kernels got, against the
    host's measured read bandwidth (benchmarks/host_bandwidth.py).
    ``*_expert_thread_preemptions`` counts the times the kernel took a core from
    an expert thread (``vllm_fiddler.runtime.thread_counters``), and
    ``*_expert_thread_cpu_ms`` the CPU time they got (spinning included);
    ``*_engine_thread_*`` the same for the thread running the model, and
    ``*_process_cpu_ms`` the CPU time of all the worker process's threads.
    """
    d = delta(after, before)
    steps = max(1, d["layer0_steps"])
    routed = d["routed_to_gpu"] + d["routed_to_cpu"]
    per_step = {"cpu_ms": 1e3 * d["cpu_busy_s"], "pcie_weight_gb": d["h2d_weight_bytes"] / 1e9,
                "pcie_streamed_gb": d.get("streamed_weight_bytes", 0) / 1e9,
                "cpu_weight_gb": d.get("cpu_weight_bytes", 0) / 1e9,
                "experts_split": d.get("experts_split", 0), "experts_copied_whole": d.get("experts_copied", 0),
                "op_ms": 1e3 * d.get("moe_op_s", 0), "sync_wait_ms": 1e3 * d.get("moe_sync_wait_s", 0),
                "cpu_wait_ms": 1e3 * d.get("moe_cpu_wait_s", 0),
                "to_cpu_submit_ms": 1e3 * d.get("moe_to_cpu_submit_s", 0),
                "gap_first_layer_ms": 1e3 * d.get("gap_first_layer_s", 0),
                "gap_other_layers_ms": 1e3 * d.get("gap_other_layers_s", 0),
                "cpu_queue_ms": 1e3 * d.get("cpu_queue_s", 0),
                "cpu_routing_wait_ms": 1e3 * d.get("cpu_routing_wait_s", 0),
                "cpu_result_wait_ms": 1e3 * d.get("cpu_result_wait_s", 0),
                "cuda_graph_replays": d.get("cuda_graph_replays", 0),
                **{k: d[k] for k in ("expert_thread_preemptions", "engine_thread_preemptions") if k in d},
                **{k[:-2] + "_ms": 1e3 * d[k] for k in ("expert_thread_cpu_s", "engine_thread_cpu_s", "process_cpu_s")
                   if k in d}}
    return {"gpu_experts": after["gpu_experts"], "cpu_experts": after["cpu_experts"],
            "gpu_hit_rate": d["routed_to_gpu"] / max(1, routed), f"{prefix}steps_measured": steps,
            **{f"{prefix}{k}_per_step": v / steps for k, v in per_step.items()},
            f"{prefix}replacements": d.get("replacements", 0),
            **({f"{prefix}cpu_read_gb_s": d["cpu_weight_bytes"] / d["cpu_busy_s"] / 1e9}
               if d.get("cpu_weight_bytes") and d["cpu_busy_s"] > 0 else {}),
            **({"expert_threads": after["expert_threads"]} if "expert_threads" in after else {}),
            **{k: after[k] for k in ("streamed", "cost_model") if k in after},
            **{f"{prefix}{k}": d[k] for k in ("arrival_holds", "arrival_stragglers") if k in d}}


def _graph_step_jobs() -> int:
    from vllm_fiddler.kernels import cpu as cpu_kernels

    return cpu_kernels.graph_jobs_served()
