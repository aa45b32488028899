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

--format fp8_block: the experts in FP8 e4m3 with 128x128 block scales (DeepSeek-V3's
layout); --format mxfp4: e2m1 with an e8m0 exponent per 32 weights, with bf16
biases and gpt-oss's clamped SwiGLU (gpt-oss's layout; its experts are 2880x2880);
--format int4_group: INT4 in groups of 128 with bf16 scales (compressed-tensors W4A16).
GB/s counts the compressed bytes read (values and scales); fiddler's native
kernels against torch dequantizing each expert to bf16 first (what fiddler
falls back to); kt-kernel is not set up for these formats here.

Writes a JSON (--out-json, or under --out-dir) and a PNG plot of GB/s against tokens.

  python benchmarks/cpu_expert_kernel.py                # full run (a few minutes)
  python benchmarks/cpu_expert_kernel.py --quick        # small smoke run

Layouts mode (--layouts), for the AMX kernel on its target host in one run
(~1 min on 16 cores): the Mixtral expert (4096x14336) at 1, 16, 32, 64, 128
tokens, for forced isa="amx", avx512_bf16 (up to 16 tokens), auto (1 token) and
torch bf16, each in three weight placements (row field "layout" / "weights"):
      full/dram     one expert [2I, H] + [H, I], rotating over experts >= 4x the L3;
      chunked8/dram the host layout fiddler's runtime calls the kernel with: the
                    expert as 8 chunk-experts of I/8 (every token routed to all 8);
      chunked/cache the compute-bound reading: the same call shape, but every
                    chunk-expert is the same small chunk (a stride-0 expand, >= 8
                    chunks, each <= L3/4), so the weights stay in cache while the
                    kernel does the whole expert's work: ms are per whole expert,
                    directly comparable with the DRAM rows.
  AMX rows are skipped (with a note) where the CPU has no AMX or AMX is only
  emulated (FIDDLER_CPU_AMX_EMULATE=1). A summary (per token count: the DRAM
  floor, AMX, torch, compute-bound time) is printed and saved.

  python benchmarks/cpu_expert_kernel.py --layouts --out-dir "$OUT"
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
    ap.add_argument("--format", default="bf16", choices=["bf16", "fp8_block", "mxfp4", "int4_group", "int4_zp"],
                    help="the experts' format")
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--out-png", default=None)
    ap.add_argument("--out-dir", default=None, help="directory for the JSON and PNG (default benchmarks/results)")
    ap.add_argument("--layouts", action="store_true",
                    help="the AMX kernel in three weight placements (see above)")
    ap.add_argument("--time-emulated", action="store_true",
                    help="--layouts: time the emulated AMX kernels too (FIDDLER_CPU_AMX_EMULATE=1; tests of "
                         "this script only)")
    args = ap.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    host = socket.gethostname().split(".")[0] or "host"
    if args.layouts:
        return run_layouts(ap, args, host)
    if args.quick:
        args.tokens = "1,4,16,64" if args.tokens == ap.get_default("tokens") else args.tokens
        args.dram_gib = min(args.dram_gib, 1.0)
        args.min_time = min(args.min_time, 0.2)
    out_json, out_png, threads, tokens, shapes = run_plan(args, f"cpu-expert-kernel-{host}")
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

    if args.format != "bf16":
        return run_quantized(args, threads, tokens, shapes, dram, dram_ways, out_json, out_png)
    for H, I in shapes:
        wbytes = 3 * H * I * 2
        n_exp = rotation_experts(wbytes, l3, args)
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
        w13 = w2 = None  # freed before the next shape allocates its own

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
    return write_result(result, out_json, out_png)


def run_quantized(args, threads, tokens, shapes, dram, dram_ways, out_json, out_png) -> int:
    """--format fp8_block / mxfp4 / int4_group / int4_zp: fiddler's native kernels and torch (dequantize, then bf16 matmuls)."""
    from vllm_fiddler.kernels import cpu as fcpu
    from vllm_fiddler.kernels import quant, reference

    fmt = args.format
    math = reference.ExpertMath(activation="swigluoai", has_bias=True) if fmt == "mxfp4" else reference.SILU
    block = {"mxfp4": (1, quant.MXFP4_GROUP), "int4_group": (1, 128), "int4_zp": (1, 128)}.get(fmt, (128, 128))
    if not fcpu.quantized_available():
        print("# the native quantized-expert kernels are not available here (AVX512F/BW/VL)")

    def quantize(w):  # [N, K] -> the format's (values, scales)
        if fmt == "int4_group":
            packed, scale = quant.quant_int4_group(w, block[1])
            return packed, scale.bfloat16()  # as checkpoints store them
        if fmt == "int4_zp":  # AutoAWQ's asymmetric groups, as fiddler holds them
            packed, scale, zero = quant.quant_int4_zp(w, block[1])
            return packed, quant.pack_scale_zero(scale, zero)
        return quant.quant_mxfp4(w) if fmt == "mxfp4" else quant.quant_fp8_block(w, block)

    keys = {"mxfp4": ("blocks", "scales"), "int4_group": ("weight_packed", "weight_scale"),
            "int4_zp": ("weight_packed", "weight_scale_zero")}.get(
        fmt, ("weight", "weight_scale_inv"))

    def experts(tensors, n_exp, k):
        stacked = {key: t.expand(n_exp, *t.shape).clone() for key, t in zip(keys, tensors)}
        return quant.QuantizedExperts(fmt, stacked, block=block, group=block[1], k=k)

    rows = []
    for H, I in shapes:
        p13, p2 = quantize(torch.empty(2 * I, H).uniform_(-0.05, 0.05)), quantize(torch.empty(H, I).uniform_(-0.05, 0.05))
        wbytes = sum(t.numel() * t.element_size() for t in (*p13, *p2))
        n_exp = rotation_experts(wbytes, l3_bytes(), args)
        print(f"# shape {H}x{I} {fmt}: {wbytes / 1e6:.1f} MB per expert, rotating over {n_exp} experts")
        # every expert in its own memory (rotating past the L3), the same values
        w13, w2 = experts(p13, n_exp, H), experts(p2, n_exp, I)
        biases = (torch.zeros(n_exp, 2 * I, dtype=torch.bfloat16), torch.zeros(n_exp, H, dtype=torch.bfloat16)) \
            if math.has_bias else None
        for T in tokens:
            x = torch.randn(T, H).bfloat16()
            out = torch.zeros(T, H, dtype=torch.float32)
            wts = torch.ones(T, 1, dtype=torch.float32)
            ids = [torch.full((T, 1), e, dtype=torch.int32) for e in range(n_exp)]
            if fcpu.quantized_available():
                fn = lambda e: fcpu.moe_forward_quantized(x, w13, w2, ids[e], wts, out, math, biases)  # noqa: E731
                rows.append(quant_row("fiddler", "avx512_quant", H, I, T, time_rotating(fn, n_exp, args.min_time),
                                    wbytes))

            def torch_ffn(e):
                gate_up = F.linear(x, w13[e])
                if biases is not None:
                    gate_up = gate_up + biases[0][e]
                return F.linear(math.act(gate_up), w2[e])

            rows.append(quant_row("torch", "dequant+bf16", H, I, T, time_rotating(torch_ffn, n_exp, args.min_time),
                                wbytes))
        w13 = w2 = None
    host = socket.gethostname().split(".")[0] or "host"
    counted = {"fp8_block": "fp8 values + fp32 block scales", "mxfp4": "e2m1 values + e8m0 exponents",
               "int4_group": "int4 values + bf16 group scales",
               "int4_zp": "int4 values + a bf16 scale and zero point word a group"}[fmt]
    result = {"device": {"cpu": cpu_model(), "cpus": os.cpu_count(), "threads": threads, "host": host,
                         "flags": cpu_flags()},
              "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "torch": torch.__version__,
              "format": {"fp8_block": "fp8_block 128x128", "mxfp4": "mxfp4, biases, swigluoai",
                         "int4_group": "int4_group 128, bf16 scales",
                         "int4_zp": "int4_zp 128 (AWQ), bf16 scales, zero points"}[fmt],
              "gb_s_counts": f"compressed bytes: {counted}", "dram_read_gb_s": round(dram, 2),
              "dram_read_by_method_gb_s": {k: round(v, 2) for k, v in dram_ways.items()}, "rows": rows}
    return write_result(result, out_json, out_png)


def quant_row(impl, isa, H, I, T, sec, wbytes) -> dict:
    row = {"impl": impl, "isa": isa, "shape": f"{H}x{I}", "tokens": T, "ms": round(sec * 1e3, 4),
           "gb_s": round(wbytes / sec / 1e9, 2)}
    print(f"{row['shape']:>11} T={T:<4} {impl:>9} {isa:>12}: {row['ms']:9.3f} ms {row['gb_s']:8.1f} GB/s", flush=True)
    return row


# ----------------------------------------------------------------------------- layouts mode
LAYOUT_TOKENS = "1,16,32,64,128"
FEW_TOKENS = 16  # up to this, avx512_bf16 too (auto mode uses AMX from FIDDLER_CPU_AMX_MIN_TOKENS)


def cache_chunks(H: int, I: int, l3: int) -> int:
    """Chunks (>= 8, dividing I) for the cache-resident reading: one chunk <= L3 / 4."""
    c = 8
    while (I % c or 3 * H * (I // c) * 2 > l3 // 4) and I // c >= 64:
        c *= 2
    return c if I % c == 0 else 1


def run_layouts(ap, args, host: str) -> int:
    from vllm_fiddler.kernels import cpu as fcpu

    if args.tokens == ap.get_default("tokens"):
        args.tokens = LAYOUT_TOKENS if not args.quick else "1,16,64"
    if args.shapes == ap.get_default("shapes"):
        args.shapes = "4096x14336"
    if args.min_time == ap.get_default("min_time"):
        args.min_time = 0.2
    if args.quick:
        args.dram_gib = min(args.dram_gib, 1.0)
        args.min_time = min(args.min_time, 0.1)
    out_json, out_png, threads, tokens, shapes = run_plan(args, f"cpu-expert-kernel-layouts-{host}")
    l3 = l3_bytes()
    notes = []

    fcpu.set_num_threads(threads)
    torch.set_num_threads(threads)
    avail = fcpu.available_isas()
    emulated = os.environ.get("FIDDLER_CPU_AMX_EMULATE") == "1"
    amx_ok = "amx" in avail and (not emulated or args.time_emulated)
    if amx_ok and emulated:
        notes.append("AMX rows are the EMULATED kernels (--time-emulated): meaningless timings")
    if not amx_ok:
        why = "emulated (FIDDLER_CPU_AMX_EMULATE=1): not timed" if "amx" in avail else "not available on this CPU"
        notes.append(f"AMX rows skipped: AMX {why}")
    avx = "avx512_bf16" in avail

    print(f"# {cpu_model()}: {os.cpu_count()} CPUs, {threads} threads, L3 {l3 >> 20} MiB, "
          f"flags {' '.join(cpu_flags())}")
    print(f"# fiddler ISA paths here: {avail}; torch {torch.__version__}")
    for n in notes:
        print(f"# NOTE: {n}")
    dram_ways = measure_dram_read(args.dram_gib, threads, reps=2 if args.quick else 4)
    dram = max(dram_ways.values())
    print(f"# DRAM read bandwidth ({args.dram_gib:g} GiB, {threads} threads): {dram:.1f} GB/s (best of "
          + ", ".join(f"{k} {v:.1f}" for k, v in dram_ways.items()) + ")")

    rows = []

    def record(impl, isa, shape, T, sec, wbytes, layout, weights, chunks):
        row = {"impl": impl, "isa": isa, "shape": f"{shape[0]}x{shape[1]}", "tokens": T,
               "ms": round(sec * 1e3, 4), "gb_s": round(wbytes / sec / 1e9, 2),
               "layout": layout, "weights": weights, "chunks": chunks}
        rows.append(row)
        print(f"{row['shape']:>11} T={T:<4} {layout:>8}/{weights:<5} {impl:>7} {isa:>11}: "
              f"{row['ms']:9.3f} ms {row['gb_s']:8.1f} GB/s", flush=True)

    t_start = time.perf_counter()
    for H, I in shapes:
        wbytes = 3 * H * I * 2
        n_exp = rotation_experts(wbytes, l3, args)
        C = 8 if I % 8 == 0 and I // 8 >= 32 else 1  # the runtime's host layout (HybridMoE.expert_chunks)
        Cc = cache_chunks(H, I, l3)
        Ic, Icc = I // C, I // Cc
        print(f"# shape {H}x{I}: {wbytes / 1e6:.1f} MB per expert, rotating over {n_exp} experts "
              f"({n_exp * wbytes / 1e9:.2f} GB); chunked layout {C} x I/{C}; cache reading {Cc} x the same "
              f"{3 * H * Icc * 2 / 1e6:.1f} MB chunk")
        w13 = torch.empty(n_exp, 2 * I, H, dtype=torch.bfloat16).uniform_(-0.05, 0.05)
        w2 = torch.empty(n_exp, H, I, dtype=torch.bfloat16).uniform_(-0.05, 0.05)
        # the same memory as C chunk-experts per expert (values permuted: timing only)
        w13c, w2c = w13.view(n_exp * C, 2 * Ic, H), w2.view(n_exp * C, H, Ic)
        # one chunk, repeated Cc times (stride 0 between the chunk-experts)
        w13r = torch.empty(2 * Icc, H, dtype=torch.bfloat16).uniform_(-0.05, 0.05)
        w2r = torch.empty(H, Icc, dtype=torch.bfloat16).uniform_(-0.05, 0.05)
        w13rx, w2rx = w13r.expand(Cc, 2 * Icc, H), w2r.expand(Cc, H, Icc)
        for T in tokens:
            x = torch.randn(T, H).bfloat16()
            out = torch.zeros(T, H, dtype=torch.float32)
            placements = [
                ("full", "dram", 1, w13, w2, n_exp,
                 [torch.full((T, 1), e, dtype=torch.int32) for e in range(n_exp)], torch.ones(T, 1)),
                ("chunked" + str(C), "dram", C, w13c, w2c, n_exp,
                 [(torch.arange(C, dtype=torch.int32) + e * C).expand(T, C).contiguous() for e in range(n_exp)],
                 torch.ones(T, C)),
                ("chunked" + str(Cc), "cache", Cc, w13rx, w2rx, 1,
                 [torch.arange(Cc, dtype=torch.int32).expand(T, Cc).contiguous()], torch.ones(T, Cc)),
            ]
            for layout, weights, chunks, a13, a2, n_rot, ids, wts in placements:
                def bench(isa, x=x, out=out, a13=a13, a2=a2, ids=ids, wts=wts, n_rot=n_rot):
                    def fn(e):
                        fcpu.moe_forward(x, a13, a2, ids[e], wts, out, isa=isa)

                    return time_rotating(fn, n_rot, args.min_time)

                if amx_ok:
                    record("fiddler", "amx", (H, I), T, bench("amx"), wbytes, layout, weights, chunks)
                if avx and T <= FEW_TOKENS:
                    record("fiddler", "avx512_bf16", (H, I), T, bench("avx512_bf16"), wbytes, layout, weights,
                           chunks)
                if T == 1 and len([i for i in avail if i != "torch"]) > 1:
                    record("fiddler", "auto", (H, I), T, bench("auto"), wbytes, layout, weights, chunks)
                # torch: the full expert from DRAM, and the cache-resident chunk Cc times
                if "torch" in args.impls and (layout == "full" or weights == "cache"):
                    def torch_ffn(e, x=x, a13=a13, a2=a2, cached=weights == "cache", n_parts=chunks):
                        y = None
                        for c in range(n_parts if cached else 1):
                            w13e, w2e = (a13[c], a2[c]) if cached else (a13[e], a2[e])
                            inter = w2e.shape[1]
                            gate_up = F.linear(x, w13e)
                            yc = F.linear(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], w2e)
                            y = yc if y is None else y + yc
                        return y

                    record("torch", "bf16", (H, I), T, time_rotating(torch_ffn, n_rot, args.min_time), wbytes,
                           layout, weights, chunks)
        del w13, w2, w13c, w2c, w13r, w2r, w13rx, w2rx

    summary = layouts_summary(rows, dram)
    result = {
        "device": {"cpu": cpu_model(), "cpus": os.cpu_count(), "threads": threads, "l3_bytes": l3,
                   "flags": cpu_flags(), "host": host},
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "mode": "layouts",
        "torch": torch.__version__,
        "fiddler_isas": avail,
        "amx_min_tokens": int(os.environ.get("FIDDLER_CPU_AMX_MIN_TOKENS", "8") or 8),
        "notes": notes,
        "dram_read_gb_s": round(dram, 2),
        "dram_read_by_method_gb_s": {k: round(v, 2) for k, v in dram_ways.items()},
        "dram_read_method": f"best of torch.sum and fiddler's read loop over 4 buffers, "
                            f"{args.dram_gib:g} GiB in total, {threads} threads",
        "seconds": round(time.perf_counter() - t_start, 1),
        "summary": summary,
        "rows": rows,
    }
    return write_result(result, out_json, out_png, f" ({result['seconds']} s of measurements)")


def rotation_experts(wbytes: int, l3: int, args) -> int:
    """Distinct experts to rotate over, so their weights are >= 4x the L3 (at least 8; memory-capped)."""
    n_exp = max(8, math.ceil(4 * l3 / wbytes))
    n_exp = min(n_exp, args.max_experts, max(2, int((16 << 30) // wbytes)))
    if args.quick:
        n_exp = max(2, min(n_exp, math.ceil(3 * l3 / wbytes)))
    return n_exp


def run_plan(args, stem: str):
    """(out_json, out_png, threads, tokens, shapes) from the command line."""
    out_json = args.out_json or os.path.join(args.out_dir or RESULTS_DIR, f"{stem}.json")
    out_png = args.out_png or os.path.splitext(out_json)[0] + ".png"
    threads = args.threads or len(os.sched_getaffinity(0))
    tokens = [int(t) for t in args.tokens.split(",") if t]
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    return out_json, out_png, threads, tokens, shapes


def write_result(result: dict, out_json: str, out_png: str, note: str = "") -> int:
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    with open(out_json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"# wrote {out_json}{note}")
    plot(result, out_png)
    return 0


def layouts_summary(rows: list[dict], dram_gb_s: float) -> list[dict]:
    """Per shape and token count: the DRAM floor, the fastest 1-token call, torch, avx512_bf16,
    and AMX from DRAM (whole expert and the chunked layout) and with the weights in cache
    (compute bound); printed as a table."""
    out = []
    keyed = {(r["shape"], r["tokens"], r["layout"], r["weights"], r["impl"], r["isa"]): r["ms"] for r in rows}
    for shape, T in sorted({(r["shape"], r["tokens"]) for r in rows}, key=lambda k: (k[0], k[1])):
        H, I = (int(v) for v in shape.split("x"))
        floor = 3 * H * I * 2 / (dram_gb_s * 1e9) * 1e3

        def get(layout_prefix, weights, impl, isa):
            for (sh, t, lay, w, im, i), ms in keyed.items():
                if (sh, t, w, im, i) == (shape, T, weights, impl, isa) and lay.startswith(layout_prefix):
                    return ms
            return None

        amx_ms = get("full", "dram", "fiddler", "amx")
        torch_ms = get("full", "dram", "torch", "bf16")
        t1 = [r["ms"] for r in rows if r["shape"] == shape and r["tokens"] == 1 and r["impl"] == "fiddler"
              and r["layout"] == "full" and r["weights"] == "dram"]
        out.append({
            "shape": shape, "tokens": T, "dram_floor_ms": round(floor, 3),
            "stream_floor_ms": min(t1) if t1 else None,  # the fastest 1-token call: weights streamed, no compute
            "torch_ms": torch_ms, "torch_cache_ms": get("chunked", "cache", "torch", "bf16"),
            "avx512_ms": get("full", "dram", "fiddler", "avx512_bf16"),
            "amx_ms": amx_ms, "amx_chunked_dram_ms": get("chunked", "dram", "fiddler", "amx"),
            "amx_cache_ms": get("chunked", "cache", "fiddler", "amx"),
            "torch_amx_ratio": round(torch_ms / amx_ms, 2) if amx_ms and torch_ms else None,
        })
    print("# summary (ms per expert; floor = expert bytes / DRAM read; T=1 = fastest 1-token call, the weight "
          "stream alone; cache = weights in cache, compute bound)")
    print(f"# {'shape':>11} {'T':>4} {'floor':>6} {'T=1':>6} {'torch':>7} {'avx512':>7} {'amx':>7} "
          f"{'torch/amx':>9} {'amx chunked':>11} {'amx cache':>9} {'torch cache':>11}")
    fmt = lambda v: f"{v:7.2f}" if isinstance(v, (int, float)) else f"{'-':>7}"  # noqa: E731
    for e in out:
        print(f"# {e['shape']:>11} {e['tokens']:>4} {e['dram_floor_ms']:6.2f} {fmt(e['stream_floor_ms'])[1:]} "
              f"{fmt(e['torch_ms'])} {fmt(e['avx512_ms'])} {fmt(e['amx_ms'])} "
              f"{(str(e['torch_amx_ratio']) + 'x') if e['torch_amx_ratio'] else '-':>9} "
              f"{fmt(e['amx_chunked_dram_ms']):>11} {fmt(e['amx_cache_ms']):>9} {fmt(e['torch_cache_ms']):>11}")
    return out


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib not installed: no plot")
        return
    def panel_of(r):  # --layouts rows also carry a layout and a weight placement
        return (r["shape"],) + tuple(r[k] for k in ("layout", "weights") if k in r)

    def line_of(r):
        return (r["impl"], r["isa"])

    panels = sorted({panel_of(r) for r in result["rows"]},
                    key=lambda p: (-int(p[0].split("x")[0]), p[2:] == ("cache",), p[1:2] != ("full",)) + p[1:])
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        shape = " ".join(panel)
        rows = [r for r in result["rows"] if panel_of(r) == panel]
        for key in sorted({line_of(r) for r in rows}):
            pts = sorted((r["tokens"], r["gb_s"]) for r in rows if line_of(r) == key)
            label = f"{key[0]} ({key[1]})"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.axhline(result["dram_read_gb_s"], color="k", ls="--", lw=1,
                   label=f"DRAM read {result['dram_read_gb_s']:.0f} GB/s")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per expert")
        ax.set_ylabel("weight GB/s (3*H*I*2 bytes / time)")
        ax.set_title(f"expert {shape} (H x I), bf16")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['device']['cpu']}, {result['device']['threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"# wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
