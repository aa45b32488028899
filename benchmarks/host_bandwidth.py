"""Host memory roofline for cold experts: DRAM read, PCIe H2D, and both at once.

A decode step reads every cold expert's bytes once: the CPU kernel reads
some from DRAM, the copy path DMAs the rest from the same (pinned) DRAM over
PCIe. Whether the two add up (CPU GB/s + PCIe GB/s) or share one DRAM
budget decides the decode roofline, so this measures both alone and together.

    python benchmarks/host_bandwidth.py --out benchmarks/results/host-bandwidth-h100.json

CPU reads use the fiddler CPU kernel's read loop (all threads) when it is
built, else torch.sum; buffers are several GB so the L3 is not measured.
With CUDA they come from torch's pinned allocator, like the cold experts: on
the H100 box the same loop read pinned GiBs at a median 161 GB/s and fresh
pageable ones at 127 (benchmarks/investigations/host_memory_map.py, one process, alternating
rounds), so a pageable probe understated the experts' read bound by ~20%.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch

GIB = 1024**3


def cpu_read(buffers, seconds: float) -> float:
    """GB/s of reading `buffers` round robin for about `seconds`."""
    from vllm_fiddler.kernels import cpu as cpu_kernels

    native = "avx512_bf16" in cpu_kernels.available_isas()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for b in buffers:
            if native:
                torch.ops.fiddler_cpu.stream_read(b)
            else:
                b.sum()
            done += b.numel() * b.element_size()
    return done / (time.perf_counter() - start) / 1e9


def h2d(src, dst, seconds: float) -> float:
    """GB/s of pinned copies; the thread sleeps on a blocking event while each copy runs.
    A spinning sync (the default) held a core beside the CPU readers' one per core when
    both ran at once, and the preempted readers understated the CPU's share: the H100
    box's batch-1 decode then moved its cold bytes faster than this "together" figure
    allowed (41.9 tok/s against a 40.2 roofline, e2e-h100.json repeats)."""
    stream = torch.cuda.Stream()
    copied = torch.cuda.Event(blocking=True)
    done, start = 0, time.perf_counter()
    with torch.cuda.stream(stream):
        while time.perf_counter() - start < seconds:
            dst.copy_(src, non_blocking=True)
            copied.record(stream)
            copied.synchronize()
            done += src.numel() * src.element_size()
    return done / (time.perf_counter() - start) / 1e9


def measure(seconds: float = 3.0, cpu_gib: float = 4.0, rounds: int = 3) -> dict:
    """CPU read and pinned H2D GB/s, each alone and both at once (all threads), each
    figure the best of `rounds`: the VM's figures move by 10-15% from one round to the
    next (H100 box: the CPU read alone 132-161 GB/s on one machine), and a roofline
    takes the most the host can deliver."""
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    pinned = torch.cuda.is_available()  # the cold experts' kind of memory
    buffers = [torch.ones(int(cpu_gib * GIB / 4 / 2), dtype=torch.bfloat16, pin_memory=pinned) for _ in range(4)]
    src = torch.ones(GIB // 2, dtype=torch.bfloat16).pin_memory()
    dst = torch.empty_like(src, device="cuda")
    cpu_alone = pcie_alone = 0.0
    together = {"cpu_read_gb_s": 0.0, "pcie_h2d_gb_s": 0.0, "sum_gb_s": 0.0}
    for _ in range(rounds):
        cpu_alone = max(cpu_alone, cpu_read(buffers, seconds))
        pcie_alone = max(pcie_alone, h2d(src, dst, seconds))
        got = {}
        t = threading.Thread(target=lambda: got.setdefault("pcie", h2d(src, dst, seconds)))
        t.start()
        got["cpu"] = cpu_read(buffers, seconds)
        t.join()
        if got["cpu"] + got["pcie"] > together["sum_gb_s"]:
            together = {"cpu_read_gb_s": got["cpu"], "pcie_h2d_gb_s": got["pcie"],
                        "sum_gb_s": got["cpu"] + got["pcie"]}
    return {
        "device": f"{torch.cuda.get_device_name()} + {threads} CPUs", "threads": threads, "rounds": rounds,
        "cpu_buffers": f"{cpu_gib:g} GiB, " + ("pinned" if pinned else "pageable"),
        "cpu_read_gb_s": cpu_alone, "pcie_h2d_gb_s": pcie_alone, "together": together,
        "sum_alone_gb_s": cpu_alone + pcie_alone,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/host-bandwidth-h100.json")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--cpu-gib", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    out = {"command": "python benchmarks/host_bandwidth.py "
                      f"--seconds {args.seconds} --cpu-gib {args.cpu_gib} --rounds {args.rounds}",
           **measure(args.seconds, args.cpu_gib, args.rounds)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
