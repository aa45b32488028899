"""Read bandwidth per GiB of pinned host memory: is a slow decode engine slow memory, or a slow moment?

Why: on the H100 box the same batch-1 decode plan's CPU experts took 20 to
36 ms a step from one engine to the next on one machine, while the bandwidth
probe run right after each engine (host_bandwidth.py: 4 GiB of fresh, unpinned
buffers) measured the same figures (e2e-h100.json, repeats). Each
engine pins its own ~18 GB of cold experts. In a virtual machine, guest memory
can be backed by host memory of unequal speed (another socket, or pages the
host has not mapped yet), and a probe of 4 GiB elsewhere would not see it.

This pins `--gib` GiB as the engine does (torch's pinned allocator, one tensor
per GiB) and reads every GiB with all threads (the fiddler CPU kernel's
stream-read loop), in `--rounds` rounds that each visit the GiBs in a fresh
random order, plus the probe's unpinned buffers as a control. If the
per-GiB figures keep their ranking from round to round (`rank_agreement`
near 1) and spread widely, where an engine's experts land decides its speed;
if each round moves all GiBs together, it is the moment.

    python benchmarks/investigations/host_memory_map.py --out benchmarks/results/host-memory-map-h100.json
    python benchmarks/investigations/host_memory_map.py --gib 2 --rounds 2 --passes 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import random
import statistics
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/
from results_io import command_line, write_result
from vllm_fiddler.kernels import cpu as cpu_kernels

GIB = 1024**3


def read_gb_s(buf: torch.Tensor, passes: int) -> float:
    """GB/s of reading `buf` `passes` times with every pool thread."""
    native = "avx512_bf16" in cpu_kernels.available_isas()
    start = time.perf_counter()
    for _ in range(passes):
        if native:
            torch.ops.fiddler_cpu.stream_read(buf)
        else:
            buf.sum()
    return passes * buf.numel() * buf.element_size() / (time.perf_counter() - start) / 1e9


def rank_agreement(rounds: list[list[float]]) -> float:
    """Mean Spearman correlation of the per-GiB figures between every pair of
    rounds: ~1 when the same GiBs are slow each time, ~0 when speed is the moment's."""
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for i, j in enumerate(order):
            r[j] = float(i)
        return r

    pairs = []
    for a in range(len(rounds)):
        for b in range(a + 1, len(rounds)):
            ra, rb = ranks(rounds[a]), ranks(rounds[b])
            if len(ra) > 1:
                pairs.append(statistics.correlation(ra, rb))
    return statistics.fmean(pairs) if pairs else float("nan")


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "max_over_min": max(values) / min(values)}


def measure(gib: int, rounds: int, passes: int, threads: int, seed: int = 0) -> dict:
    cuda = torch.cuda.is_available()
    cpu_kernels.set_num_threads(threads)
    torch.set_num_threads(threads)
    start = time.perf_counter()
    pinned = []
    for _ in range(gib):  # one GiB at a time, as HybridMoE's per-layer tensors come from the pinned allocator
        t = torch.empty(GIB // 2, dtype=torch.bfloat16, pin_memory=cuda)
        t.fill_(1.0)  # touched, so no round pays first-touch faults
        pinned.append(t)
    alloc_s = time.perf_counter() - start
    control = [torch.ones(GIB // 2, dtype=torch.bfloat16) for _ in range(4)]  # what host_bandwidth reads
    read_gb_s(pinned[0], 1)  # builds / warms the read loop
    rng = random.Random(seed)
    per_round, control_rounds, round_s = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        order = list(range(gib))
        rng.shuffle(order)
        got = [0.0] * gib
        for i in order:
            got[i] = read_gb_s(pinned[i], passes)
        per_round.append(got)
        control_rounds.append(statistics.fmean(read_gb_s(c, passes) for c in control))
        round_s.append(time.perf_counter() - t0)
    per_gib = [statistics.fmean(r[i] for r in per_round) for i in range(gib)]
    round_means = [statistics.fmean(r) for r in per_round]
    return {
        "device": (torch.cuda.get_device_name() if cuda else "cpu") + f" + {os.cpu_count()} CPUs",
        "pinned": cuda, "threads": threads, "gib": gib, "rounds": rounds, "passes": passes,
        "alloc_s": alloc_s, "round_s": round_s,
        "per_gib_mean_gb_s": spread(per_gib), "per_round_mean_gb_s": spread(round_means),
        "control_unpinned_gb_s": spread(control_rounds),
        "rank_agreement": rank_agreement(per_round),
        "gb_s": per_round,  # [rounds][gib]
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="")
    p.add_argument("--gib", type=int, default=48, help="pinned GiB (an 8-layer engine pins ~18 GB of cold experts)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--passes", type=int, default=4, help="reads of a GiB per visit")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="as host_bandwidth.py: every CPU")
    args = p.parse_args()
    result = {"command": command_line("investigations/host_memory_map.py", args),
              **measure(args.gib, args.rounds, args.passes, args.threads)}
    print(json.dumps({k: v for k, v in result.items() if k != "gb_s"}, indent=1))
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
