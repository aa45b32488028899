"""Online re-placement's GPU hit rate over the synthetic routing model's two knobs (simulated).

Each cell replays a batch-1 decode of the synthetic routing model
(vllm_fiddler/routing_model.py: popularity skew x temporal locality) through
the runtime's own re-placement policy (adaptation.simulate with the default
adaptation settings, priced by the Mixtral-8x7B cost prior) and reports the GPU
hit rate of: the even placement kept static, re-placement from it, and the best
static placement for the whole run (planned from its own counts: hindsight, an
upper bound no static profile reaches). One more row replays a greedy
random-weight decode, whose output loops over 3 tokens: the case that flatters
every expert cache.

    python benchmarks/replacement_grid.py --out benchmarks/results/replacement-grid-sim.json

Default setting: Mixtral-8x7B (32 MoE layers, top-2 of 8), the GPU holding 11 of
every 64 experts (a 24 GB GPU's share), 2048 decode steps. A simulation, not a
measurement: it prices copies and CPU work by the prior, and each copy lands
the step after it is planned.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_io  # noqa: E402

SKEWS = (0.0, 0.5, 1.0, 1.5)
LOCALITIES = (0.0, 0.15, 0.3, 0.6)


def policy_and_settings():
    from vllm_fiddler.adaptation import AdaptationPolicy
    from vllm_fiddler.config import AdaptationSettings
    from vllm_fiddler.cost_model import default_for_shape

    settings = AdaptationSettings()
    return AdaptationPolicy.priced(default_for_shape(), settings), settings  # Mixtral-8x7B bf16 prior


def cell(trace, num_layers: int, num_experts: int, gpu_experts: int) -> dict:
    """Hit rates of one trace [S][L][E]: even static, re-placement from even, best static."""
    from vllm_fiddler.adaptation import simulate, static_hit_rate, trace_counts
    from vllm_fiddler.placement import plan_even, plan_from_popularity

    policy, s = policy_and_settings()
    even = plan_even(num_layers, num_experts, gpu_experts).gpu_experts
    adaptive = simulate(trace, even, policy, half_life_steps=s.half_life_steps, replan_every=s.interval_steps,
                        copy_latency_steps=1, replan_on_landing=True)
    best, _ = plan_from_popularity(trace_counts(trace), gpu_experts)
    return {"even_static": static_hit_rate(trace, even), "replacement": adaptive.hit_rate,
            "best_static_hindsight": static_hit_rate(trace, best.gpu_experts), "swaps": adaptive.num_swaps}


def main() -> None:
    from vllm_fiddler.routing_model import SyntheticRouting, greedy_loop_trace

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--gpu-share", type=float, default=11 / 64, help="share of all experts on the GPU")
    p.add_argument("--steps", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    gpu_experts = round(args.gpu_share * args.layers * args.experts)
    command = results_io.command_line("replacement_grid.py", args)
    meta = dict(device="simulation (adaptation.simulate, Mixtral-8x7B cost prior)", vllm_version=None,
                command=command, commit=results_io.git_commit(os.path.dirname(os.path.abspath(__file__))))
    rows, cells = [], []

    def add(scenario: str, trace) -> None:
        c = cell(trace, args.layers, args.experts, gpu_experts)
        cells.append({"scenario": scenario, **c})
        for system in ("even_static", "replacement", "best_static_hindsight"):
            rows.append(results_io.row(system, scenario, c[system], "GPU hit rate", gpu_hit_rate=c[system], **meta))
        print(f"{scenario:32s} even {c['even_static']:.1%}  re-placement {c['replacement']:.1%} "
              f"({c['swaps']} swaps)  best static {c['best_static_hindsight']:.1%}", flush=True)

    for skew in SKEWS:
        for locality in LOCALITIES:
            model = SyntheticRouting(args.experts, args.top_k, skew=skew, locality=locality, seed=args.seed)
            add(f"skew_{skew:g}_locality_{locality:g}", model.trace(args.layers, args.steps))
    add("greedy_random_weights_loop_3", greedy_loop_trace(SyntheticRouting(args.experts, args.top_k), args.layers,
                                                         args.steps))
    results_io.write_result(args.out, {"command": command, "gpu_experts": gpu_experts, "cells": cells, "rows": rows})


if __name__ == "__main__":
    main()
