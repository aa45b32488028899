#!/usr/bin/env python3
"""Benchmark of the CPU expert kernel (vllm_fiddler.kernels.cpu) against torch and kt-kernel.

Measures, in one run:
  1. the DRAM read bandwidth with all threads (torch.sum over buffers of several GB
     in total, each far larger than the L3), as the roofline for the kernels;
  2. for each shape (H x I) and token count: ms per expert FFN call and GB/s
     (expert weight bytes 3*H*I*2 / time) for
       - fiddler, each native ISA path available here (forced), plus "auto" when
         there is more than one (AMX for >= FIDDLER_CPU_AMX_MIN_TOKENS tokens),
       - torch bf16 (the same math through torch matmuls, torch threads = --threads),
       - kt-kernel (kTransformers' AMXBF16_MOE / AVX2BF16_MOE) if importable.
     Calls rotate through several distinct experts whose weights together are far
     larger than the L3, so the timings measure DRAM, not cache.

Writes a JSON (--out-json) and a PNG plot of GB/s against tokens (--out-png).

  python benchmarks/cpu_expert_kernel.py                # full run (a few minutes)
  python benchmarks/cpu_expert_kernel.py --quick        # small smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import sys
import time

import torch
import torch.nn.functional as F

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ----------------------------------------------------------------------------- machine
def cpu_model() -> str:
    from vllm_fiddler.cpuinfo import cpu_model_name

    return cpu_model_name()


def l3_bytes() -> int:
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            try:
                with open(os.path.join(base, d, "level")) as f:
                    level = int(f.read())
                with open(os.path.join(base, d, "size")) as f:
                    s = f.read().strip()
                mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
                size = int(s[:-1] if s[-1] in "KMG" else s) * mult
                if level >= 3:
                    best = max(best, size)
            except (OSError, ValueError):
                pass
    except OSError:
        pass
    return best or 32 << 20


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags if f.startswith(("avx512", "amx")))
    except OSError:
        pass
    return []


def measure_dram_read(total_gib: float, threads: int, reps: int) -> dict[str, float]:
    """Best read bandwidth (GB/s) over 4 buffers totalling total_gib (each >> L3), two ways:
    torch.sum (torch threads) and fiddler's own read loop (fiddler_cpu::stream_read:
    the kernel's thread pool, 1 MiB chunks, 64-bit loads)."""
    torch.set_num_threads(threads)
    n_buf = 4
    each = int(total_gib * (1 << 30) / n_buf) // 4
    bufs = [torch.ones(each, dtype=torch.float32) for _ in range(n_buf)]  # pages touched
    ways = {"torch.sum": lambda b: b.sum()}
    if hasattr(torch.ops, "fiddler_cpu") and hasattr(torch.ops.fiddler_cpu, "stream_read"):
        ways["fiddler_read_loop"] = lambda b: torch.ops.fiddler_cpu.stream_read(b)
    best = {}
    for name, fn in ways.items():
        best[name] = 0.0
        for _ in range(reps):
            for b in bufs:
                t0 = time.perf_counter()
                fn(b)
                dt = time.perf_counter() - t0
                best[name] = max(best[name], b.numel() * 4 / dt / 1e9)
    del bufs
    return best


# ----------------------------------------------------------------------------- timing
def time_rotating(fn, n_experts: int, min_time: float) -> float:
    """Seconds per call of fn(e), rotating e over the experts (first a warm-up pass)."""
    for e in range(n_experts):
        fn(e)
    iters = 0
    t0 = time.perf_counter()
    while True:
        fn(iters % n_experts)
        iters += 1
        dt = time.perf_counter() - t0
        if iters >= 2 * n_experts and dt >= min_time:
            return dt / iters


class KTKernelExpert:
    """kt-kernel's BF16 MoE (AMXBF16_MOE, else AVX2BF16_MOE) over the same experts.

    Uses kt-kernel's low-level API (CPUInfer + MOEConfig), as its NativeMoEWrapper does;
    kt-kernel repacks the weights into its own layout when loading them.
    """

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, threads: int, max_tokens: int):
        import kt_kernel  # noqa: F401  (loads the extension variant for this CPU)

        ext = kt_kernel.kt_kernel_ext
        moe_mod = ext.moe
        cls = getattr(moe_mod, "AMXBF16_MOE", None) or getattr(moe_mod, "AVX2BF16_MOE", None)
        if cls is None:
            raise RuntimeError("kt-kernel has no BF16 MoE backend in this build")
        self.variant = f"{getattr(kt_kernel, '__cpu_variant__', '?')}:{cls.__name__}"
        E, I2, H = w13.shape
        inter = I2 // 2
        wc = ext.WorkerPoolConfig()
        wc.subpool_count = 1
        wc.subpool_numa_map = [0]
        wc.subpool_thread_count = [threads]
        self.cpu_infer = ext.CPUInfer(wc)
        self.mask = torch.zeros(E, dtype=torch.bool)  # no expert on the GPU
        self.gate = [w13[e, :inter].contiguous() for e in range(E)]
        self.up = [w13[e, inter:].contiguous() for e in range(E)]
        self.down = [w2[e].contiguous() for e in range(E)]
        cfg = moe_mod.MOEConfig(E, 1, H, inter, self.mask.data_ptr())
        cfg.layer_idx = 0
        cfg.pool = self.cpu_infer.backend_
        cfg.max_len = max_tokens
        cfg.gate_projs = [[t.data_ptr() for t in self.gate]]
        cfg.up_projs = [[t.data_ptr() for t in self.up]]
        cfg.down_projs = [[t.data_ptr() for t in self.down]]
        cfg.gate_scales = [[0] * E]
        cfg.up_scales = [[0] * E]
        cfg.down_scales = [[0] * E]
        self.moe = cls(cfg)
        self.p2l = torch.arange(E, dtype=torch.int64)
        self.cpu_infer.submit(self.moe.load_weights_task(self.p2l.data_ptr()))
        self.cpu_infer.sync()
        del self.gate, self.up, self.down  # kt-kernel keeps its own packed copy
        self.H = H

    def prepare(self, T: int, E: int):
        self.x = torch.randn(T, self.H).bfloat16()
        self.out = torch.zeros(T, self.H, dtype=torch.bfloat16)
        self.bsz = torch.tensor([T], dtype=torch.int32)
        self.wts = torch.ones(T, 1, dtype=torch.float32)
        self.ids = [torch.full((T, 1), e, dtype=torch.int64) for e in range(E)]

    def __call__(self, e: int):
        self.cpu_infer.submit(self.moe.forward_task(self.bsz.data_ptr(), 1, self.ids[e].data_ptr(),
                                                    self.wts.data_ptr(), self.x.data_ptr(),
                                                    self.out.data_ptr(), False))
        self.cpu_infer.sync()


# ----------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="threads (default: CPUs in the affinity mask)")
    ap.add_argument("--quick", action="store_true", help="small, fast run (smoke test)")
    ap.add_argument("--shapes", default="4096x14336,2048x768", help="comma-separated HxI")
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--impls", default="fiddler,torch,kt-kernel")
    ap.add_argument("--dram-gib", type=float, default=4.0, help="total size of the DRAM bandwidth buffers")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement (at least)")
    ap.add_argument("--max-experts", type=int, default=256)
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--out-png", default=None)
    args = ap.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    host = socket.gethostname().split(".")[0] or "host"
    if args.quick:
        args.tokens = "1,4,16,64" if args.tokens == ap.get_default("tokens") else args.tokens
        args.dram_gib = min(args.dram_gib, 1.0)
        args.min_time = min(args.min_time, 0.2)
    out_json = args.out_json or os.path.join(RESULTS_DIR, f"cpu-expert-kernel-{host}.json")
    out_png = args.out_png or os.path.splitext(out_json)[0] + ".png"
    threads = args.threads or len(os.sched_getaffinity(0))
    tokens = [int(t) for t in args.tokens.split(",") if t]
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    l3 = l3_bytes()

    from vllm_fiddler.kernels import cpu as fcpu

    fcpu.set_num_threads(threads)
    native = [i for i in fcpu.available_isas() if i != "torch"]
    fiddler_isas = native + (["auto"] if len(native) > 1 else [])
    torch.set_num_threads(threads)

    print(f"# {cpu_model()}: {os.cpu_count()} CPUs, {threads} threads, L3 {l3 >> 20} MiB, "
          f"flags {' '.join(cpu_flags())}")
    print(f"# fiddler ISA paths here: {fcpu.available_isas()}; torch {torch.__version__}")
    dram_ways = measure_dram_read(args.dram_gib, threads, reps=2 if args.quick else 5)
    dram = max(dram_ways.values())
    print(f"# DRAM read bandwidth ({args.dram_gib:g} GiB, {threads} threads): {dram:.1f} GB/s (best of "
          + ", ".join(f"{k} {v:.1f}" for k, v in dram_ways.items()) + ")")

    kt_status = "not requested"
    if "kt-kernel" in impls:
        try:
            import kt_kernel  # noqa: F401

            kt_status = f"installed {getattr(kt_kernel, '__version__', '?')}"
        except Exception as exc:  # ImportError, or a broken install
            kt_status = "not installed" if isinstance(exc, ImportError) else f"import failed: {exc!r}"
        print(f"# kt-kernel: {kt_status}")

    rows = []

    def record(impl, isa, shape, T, sec, wbytes):
        row = {"impl": impl, "isa": isa, "shape": f"{shape[0]}x{shape[1]}", "tokens": T,
               "ms": round(sec * 1e3, 4), "gb_s": round(wbytes / sec / 1e9, 2)}
        rows.append(row)
        print(f"{row['shape']:>11} T={T:<4} {impl:>9} {isa:>12}: {row['ms']:9.3f} ms {row['gb_s']:8.1f} GB/s",
              flush=True)

    for H, I in shapes:
        wbytes = 3 * H * I * 2
        # enough distinct experts that their weights are >= 4x the L3 (at least 8; memory-capped)
        n_exp = max(8, math.ceil(4 * l3 / wbytes))
        n_exp = min(n_exp, args.max_experts, max(2, int((16 << 30) // wbytes)))
        if args.quick:
            n_exp = max(2, min(n_exp, math.ceil(3 * l3 / wbytes)))
        print(f"# shape {H}x{I}: {wbytes / 1e6:.1f} MB per expert, rotating over {n_exp} experts "
              f"({n_exp * wbytes / 1e9:.2f} GB)")
        w13 = torch.empty(n_exp, 2 * I, H, dtype=torch.bfloat16).uniform_(-0.05, 0.05)
        w2 = torch.empty(n_exp, H, I, dtype=torch.bfloat16).uniform_(-0.05, 0.05)
        for T in tokens:
            x = torch.randn(T, H).bfloat16()
            if "fiddler" in impls:
                out = torch.zeros(T, H, dtype=torch.float32)
                wts = torch.ones(T, 1, dtype=torch.float32)
                ids = [torch.full((T, 1), e, dtype=torch.int32) for e in range(n_exp)]
                for isa in fiddler_isas:
                    fn = lambda e, isa=isa: fcpu.moe_forward(x, w13, w2, ids[e], wts, out, isa=isa)  # noqa: E731
                    record("fiddler", isa, (H, I), T, time_rotating(fn, n_exp, args.min_time), wbytes)
            if "torch" in impls:
                def torch_ffn(e):
                    gate_up = F.linear(x, w13[e])
                    act = F.silu(gate_up[:, :I]) * gate_up[:, I:]
                    return F.linear(act, w2[e])

                record("torch", "bf16", (H, I), T, time_rotating(torch_ffn, n_exp, args.min_time), wbytes)
        # kt-kernel last, and only while measuring it: its worker threads would
        # compete with the other implementations' threads.
        if "kt-kernel" in impls and kt_status.startswith("installed"):
            kt = None
            try:
                kt = KTKernelExpert(w13, w2, threads, max(tokens))
                print(f"# kt-kernel backend: {kt.variant}")
                for T in tokens:
                    kt.prepare(T, n_exp)
                    record("kt-kernel", kt.variant, (H, I), T, time_rotating(kt, n_exp, args.min_time), wbytes)
            except Exception as exc:
                kt_status = f"failed: {type(exc).__name__}: {exc}"
                print(f"# kt-kernel: {kt_status}")
            del kt
        del w13, w2

    result = {
        "device": {"cpu": cpu_model(), "cpus": os.cpu_count(), "threads": threads, "l3_bytes": l3,
                   "flags": cpu_flags(), "host": host},
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "torch": torch.__version__,
        "fiddler_isas": fcpu.available_isas(),
        "amx_min_tokens": int(os.environ.get("FIDDLER_CPU_AMX_MIN_TOKENS", "8") or 8),
        "kt_kernel": kt_status,
        "dram_read_gb_s": round(dram, 2),
        "dram_read_by_method_gb_s": {k: round(v, 2) for k, v in dram_ways.items()},
        "dram_read_method": f"best of torch.sum and fiddler's read loop over 4 buffers, "
                            f"{args.dram_gib:g} GiB in total, {threads} threads",
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    with open(out_json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"# wrote {out_json}")
    plot(result, out_png)
    return 0


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib not installed: no plot")
        return
    shapes = sorted({r["shape"] for r in result["rows"]}, key=lambda s: -int(s.split("x")[0]))
    if not shapes:
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 4.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = [r for r in result["rows"] if r["shape"] == shape]
        for key in sorted({(r["impl"], r["isa"]) for r in rows}):
            pts = sorted((r["tokens"], r["gb_s"]) for r in rows if (r["impl"], r["isa"]) == key)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} ({key[1]})")
        ax.axhline(result["dram_read_gb_s"], color="k", ls="--", lw=1,
                   label=f"DRAM read {result['dram_read_gb_s']:.0f} GB/s")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per expert")
        ax.set_ylabel("weight GB/s (3*H*I*2 bytes / time)")
        ax.set_title(f"expert {shape} (H x I), bf16")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['device']['cpu']}, {result['device']['threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"# wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
