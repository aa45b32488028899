"""Host time of HybridMoE's per-layer routing and expert counting on the GPU (batch 1).

Every decode step runs this once per MoE layer, on the engine thread, before
the hybrid op can start, so its host time is on the critical path. Compares
torch.bincount (which syncs with the device to size its output) with the
sync-free index_add_ count HybridMoE uses, and routing alone.

    python benchmarks/investigations/routing_overhead.py --out benchmarks/results/routing-overhead-h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from vllm_fiddler.kernels.reference import route

E, K = 8, 2  # Mixtral


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/routing-overhead-h100.json")
    p.add_argument("--iters", type=int, default=500)
    args = p.parse_args()
    logits = torch.randn(1, E, device="cuda", dtype=torch.bfloat16)  # [T, E], T = 1
    tokens = torch.zeros(E, dtype=torch.int64, device="cuda")
    heat = torch.zeros(E, dtype=torch.float64, device="cuda")
    table = torch.rand(64, dtype=torch.float64, device="cuda")  # a heat table (adaptation)

    def count_and_heat(counts):
        tokens.add_(counts)
        heat.add_(table[counts.clamp(max=table.numel() - 1)])

    def with_bincount():
        _, ids = route(logits, K)
        count_and_heat(torch.bincount(ids.flatten(), minlength=E))

    def with_index_add():
        _, ids = route(logits, K)
        flat = ids.flatten()
        count_and_heat(torch.zeros(E, dtype=torch.int64, device="cuda").index_add_(
            0, flat, flat.new_ones(()).expand_as(flat)))

    def route_only():
        route(logits, K)

    results = {}
    for name, fn in (("route_bincount_heat", with_bincount), ("route_index_add_heat", with_index_add),
                     ("route_only", route_only)):
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.iters):
            fn()
        results[name] = (time.perf_counter() - start) / args.iters * 1e6  # host us per call
        torch.cuda.synchronize()
    out = {"command": f"python benchmarks/investigations/routing_overhead.py --iters {args.iters}",
           "device": f"{torch.cuda.get_device_name()} + {os.cpu_count()} CPUs",
           "host_us_per_layer": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
