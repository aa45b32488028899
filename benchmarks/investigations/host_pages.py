"""Cold experts in 4 KB pinned pages against 2 MB huge pages: CPU expert and copy speed.

Why: on the H100 box the same batch-1 decode plan's CPU experts took 25 to
42 ms a step from one engine to the next (benchmarks/results/
decode-host-h100.json), with the same threads and calibration. Each engine
pins ~17 GB of cold experts through torch's pinned allocator, in 4 KB pages
unless the kernel gives huge pages (this box's transparent huge pages are
"madvise"), and in a virtual machine every TLB miss is a two-level walk. This
measures the experts' two readers on each kind of memory:

- 4k: torch.empty(..., pin_memory=True) (what HybridMoE allocates today);
- huge: mmap + madvise(MADV_HUGEPAGE), touched, then cudaHostRegister (pinned
  in place; without CUDA, not pinned).

For each, in alternating rounds (the box drifts): one expert at 1 token
through the CPU kernel, rotating over all experts as decode does (ms, GB/s
of weights), and with CUDA one expert's pinned host->device copy (GB/s).

    python benchmarks/investigations/host_pages.py --out benchmarks/results/host-pages-h100.json
    python benchmarks/investigations/host_pages.py --experts 4 --hidden 512 --inter 1024 --seconds 0.5   # smoke run
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/
from results_io import command_line, write_result
from vllm_fiddler.config import default_cpu_threads
from vllm_fiddler.kernels import cpu as cpu_kernels

MADV_HUGEPAGE = 14  # linux/mman.h


def anon_huge_pages_kb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return -1


class HostBuffer:
    """`nbytes` of host memory as a uint8 tensor, in 4 KB pinned pages or huge pages."""

    def __init__(self, nbytes: int, kind: str, cuda: bool):
        self.kind, self.registered, self._map = kind, False, None
        if kind == "4k":
            self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        else:
            self._map = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            view = (ctypes.c_char * nbytes).from_buffer(self._map)
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            if libc.madvise(ctypes.c_void_p(ctypes.addressof(view)), ctypes.c_size_t(nbytes), MADV_HUGEPAGE):
                raise OSError(ctypes.get_errno(), "madvise(MADV_HUGEPAGE) failed")
            del view
            self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)
            self.tensor.fill_(0)  # faults every page in now, as huge pages where the kernel can
            if cuda:
                err = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, 0)
                if int(err) != 0:
                    raise RuntimeError(f"cudaHostRegister failed: {err}")
                self.registered = True

    def close(self) -> None:
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
        self.tensor = None
        if self._map is not None:
            self._map.close()


def measure(kind: str, args, cuda: bool) -> dict:
    H, I, E = args.hidden, args.inter, args.experts
    w13_elems, w2_elems = 2 * I * H, H * I
    expert_bytes = 2 * (w13_elems + w2_elems)
    before_kb = anon_huge_pages_kb()
    start = time.perf_counter()
    buf = HostBuffer(E * expert_bytes, kind, cuda)
    alloc_s = time.perf_counter() - start
    try:
        flat = buf.tensor.view(torch.bfloat16)
        w13 = flat[:E * w13_elems].view(E, 2 * I, H)  # [E, 2I, H]
        w2 = flat[E * w13_elems:].view(E, H, I)  # [E, H, I]
        w13.uniform_(-1e-2, 1e-2)
        w2.uniform_(-1e-2, 1e-2)
        row = {"kind": kind, "alloc_s": round(alloc_s, 2), "anon_huge_pages_gb": (anon_huge_pages_kb() - before_kb) / 2**20,
               "pinned": kind == "4k" and cuda or buf.registered}
        x = torch.randn(1, H).to(torch.bfloat16)
        out = torch.zeros(1, H)
        wts = torch.ones(1, 1)
        ids = [torch.full((1, 1), e, dtype=torch.int32) for e in range(E)]
        cpu_kernels.moe_forward(x, w13, w2, ids[0], wts, out)  # builds / warms the kernels
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            cpu_kernels.moe_forward(x, w13, w2, ids[calls % E], wts, out)
            calls += 1
        ms = 1e3 * (time.perf_counter() - t0) / calls
        row.update(cpu_expert_ms=round(ms, 3), cpu_gb_s=round(expert_bytes / ms / 1e6, 1))
        if cuda:
            dev = torch.empty(w13_elems, dtype=torch.bfloat16, device="cuda")
            dev.copy_(w13[0].view(-1), non_blocking=True)
            torch.cuda.synchronize()
            copies, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < args.seconds:
                dev.copy_(w13[copies % E].view(-1), non_blocking=True)
                copies += 1
                torch.cuda.synchronize()
            row["h2d_gb_s"] = round(2 * w13_elems * copies / (time.perf_counter() - t0) / 1e9, 1)
        return row
    finally:
        buf.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="")
    p.add_argument("--experts", type=int, default=48, help="48 Mixtral experts: ~17 GB, an engine's cold set")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=14336)
    p.add_argument("--threads", type=int, default=default_cpu_threads())
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    cpu_kernels.set_num_threads(args.threads)
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp = f.read().strip()
    rows = []
    for r in range(args.rounds):
        for kind in ("4k", "huge"):
            row = {"round": r, **measure(kind, args, cuda)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"device": (torch.cuda.get_device_name() if cuda else "cpu") + f" + {os.cpu_count()} CPUs",
              "transparent_hugepage": thp, "threads": args.threads, "cpu_isa": cpu_kernels.isa(),
              "shape": {"hidden": args.hidden, "inter": args.inter, "experts": args.experts},
              "command": command_line("investigations/host_pages.py", args), "rows": rows}
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
