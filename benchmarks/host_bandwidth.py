"""Host memory roofline for cold experts: DRAM read, PCIe H2D, and both at once.

A decode step reads every cold expert's bytes once: the CPU kernel reads
some from DRAM, the copy path DMAs the rest from the same (pinned) DRAM over
PCIe. Whether the two add up (CPU GB/s + PCIe GB/s) or share one DRAM
budget decides the decode roofline, so this measures both alone and together.

    python benchmarks/host_bandwidth.py --out benchmarks/results/host-bandwidth-h100.json

CPU reads use the fiddler CPU kernel's read loop (all threads) when it is
built, else torch.sum; buffers are several GB so the L3 is not measured.
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
    stream = torch.cuda.Stream()
    done, start = 0, time.perf_counter()
    with torch.cuda.stream(stream):
        while time.perf_counter() - start < seconds:
            dst.copy_(src, non_blocking=True)
            stream.synchronize()
            done += src.numel() * src.element_size()
    return done / (time.perf_counter() - start) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/host-bandwidth-h100.json")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--cpu-gib", type=float, default=4.0)
    args = p.parse_args()
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    buffers = [torch.ones(int(args.cpu_gib * GIB / 4 / 2), dtype=torch.bfloat16) for _ in range(4)]
    src = torch.ones(GIB // 2, dtype=torch.bfloat16).pin_memory()
    dst = torch.empty_like(src, device="cuda")
    cpu_alone = cpu_read(buffers, args.seconds)
    pcie_alone = h2d(src, dst, args.seconds)
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("pcie", h2d(src, dst, args.seconds)))
    t.start()
    got["cpu"] = cpu_read(buffers, args.seconds)
    t.join()
    out = {
        "device": f"{torch.cuda.get_device_name()} + {os.cpu_count()} CPUs",
        "command": "python benchmarks/host_bandwidth.py " + f"--seconds {args.seconds} --cpu-gib {args.cpu_gib}",
        "threads": threads,
        "cpu_read_gb_s": cpu_alone, "pcie_h2d_gb_s": pcie_alone,
        "together": {"cpu_read_gb_s": got["cpu"], "pcie_h2d_gb_s": got["pcie"],
                     "sum_gb_s": got["cpu"] + got["pcie"]},
        "sum_alone_gb_s": cpu_alone + pcie_alone,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
