"""Benchmarks the Triton fused-MoE kernel against a torch (cuBLAS) reference.

For each token count T, with Mixtral-8x7B shapes by default, it times
`vllm_fiddler.kernels.triton.fused_moe` and a plain torch implementation (a
loop over experts: gather, two matmuls, SwiGLU, index_add), both with
`triton.testing.do_bench` (median), and reports:

- GB/s of expert weights read: experts hit x 3*H*I*bytes / time. This is
  the figure that matters for decode, where the op streams the weights once
  (H100 HBM3: ~3 TB/s peak, ~2.6-3.0 TB/s achievable);
- TFLOP/s: 2 * (valid token-slots) * 3*H*I / time, the figure that matters
  for prefill (H100 bf16 dense: ~800 TFLOP/s measured on a large matmul);
- the relative error of the Triton op against the torch one.

`--gpu-experts Eg` keeps only the first Eg experts on the GPU: ids >= Eg
become -1, as the hybrid layer passes them, and w13/w2 hold Eg experts.

`--format` stores the experts quantized (kernels.quant's layouts: fp8_block 128x128,
mxfp4, int4_group with --group): GB/s then counts the stored bytes (values and
scales), which the kernel reads and widens in registers, and the torch
reference dequantizes each routed expert before its matmuls. `--gpt-oss` adds
gpt-oss's expert math (clamped SwiGLU, biases).

From the repository root:

    python3 benchmarks/triton_moe.py                       # Mixtral, T = 1..4096
    python3 benchmarks/triton_moe.py --gpu-experts 4 --json benchmarks/results/triton_moe.json
    python3 benchmarks/triton_moe.py --format mxfp4 --gpt-oss --H 2880 --I 2880 --K 4 --tokens 1,4,16,64,256
"""

from __future__ import annotations

import argparse
import json
import sys

TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_moe(x, w13, w2, topk_weights, topk_ids, math=None, b13=None, b2=None):
    """The torch reference: one gather + two cuBLAS matmuls per expert (the project's torch path)."""
    import torch

    from vllm_fiddler.kernels.reference import SILU
    from vllm_fiddler.kernels.torch_moe import moe_forward

    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
    moe_forward(x, w13, w2, topk_ids, topk_weights, out, math or SILU, b13, b2)
    return out.to(x.dtype)


def profile(fn, fargs, fkwargs, T) -> dict:
    """Host time per call (launches only), GPU time (CUDA-graph replay), and the kernels' GPU times."""
    import time

    import torch
    import triton

    fn(*fargs, **fkwargs)
    torch.cuda.synchronize()
    n = 20  # few enough that the launch queue never fills (it would block the host)
    t0 = time.perf_counter()
    for _ in range(n):
        fn(*fargs, **fkwargs)
    host_us = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    res = dict(host_us=host_us)
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn(*fargs, **fkwargs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(*fargs, **fkwargs)
        res["graph_us"] = triton.testing.do_bench(graph.replay, warmup=25, rep=50, return_mode="median") * 1e3
    except Exception as e:  # capture is a diagnostic here, not a requirement
        res["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn(*fargs, **fkwargs)
        torch.cuda.synchronize()
    kernels = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t:
            kernels[ev.key[:60]] = round(t / 10, 1)  # us per call
    res["kernels_us"] = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:8])
    print(f"  T={T}: host {host_us:.0f} us/call, graph replay {res.get('graph_us', float('nan')):.0f} us, "
          f"kernels {res['kernels_us']}", flush=True)
    return res


def add_expert_args(p) -> None:
    """--format, --group, --gpt-oss: the experts expert_weights builds (this script's and the tuner's)."""
    p.add_argument("--format", choices=["dense", "fp8_block", "mxfp4", "int4_group", "int4_zp"], default="dense",
                   help="how the experts are stored (dense: in --dtype)")
    p.add_argument("--group", type=int, default=128, help="int4_group's / int4_zp's inputs per scale")
    p.add_argument("--gpt-oss", action="store_true", help="gpt-oss's expert math: clamped SwiGLU and biases")


def expert_weights(fmt: str, Eg: int, H: int, I: int, dtype, group: int = 128, gpt_oss: bool = False,
                   device: str = "cuda"):
    """Random experts as the benchmarks launch them: (w13 [Eg, 2I, H], w2 [Eg, H, I], math, b13, b2,
    stored bytes per expert); dense in `dtype`, or QuantizedExperts of `fmt` (INT4 in groups of
    `group`); gpt-oss's clamped SwiGLU and biases with `gpt_oss`."""
    import torch

    from vllm_fiddler.kernels.quant import QuantizedExperts
    from vllm_fiddler.kernels.reference import SILU, ExpertMath

    w13 = torch.randn(Eg, 2 * I, H, device=device) / H**0.5  # [Eg, 2I, H]
    w2 = torch.randn(Eg, H, I, device=device) / I**0.5  # [Eg, H, I]
    if fmt == "dense":
        w13, w2 = w13.to(dtype), w2.to(dtype)
        bytes_per_expert = 3 * H * I * w13.element_size()
    else:
        w13, w2 = (QuantizedExperts.quantize(fmt, w, dtype, group=group) for w in (w13, w2))
        bytes_per_expert = (w13.nbytes + w2.nbytes) // max(Eg, 1)
    math, b13, b2 = SILU, None, None
    if gpt_oss:
        math = ExpertMath(activation="swigluoai", has_bias=True)
        b13 = (0.1 * torch.randn(Eg, 2 * I, device=device)).to(dtype)  # [Eg, 2I]
        b2 = (0.1 * torch.randn(Eg, H, device=device)).to(dtype)  # [Eg, H]
    return w13, w2, math, b13, b2, bytes_per_expert


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--E", type=int, default=8, help="experts of the model (router width)")
    p.add_argument("--gpu-experts", type=int, default=None, help="experts on the GPU (default: E)")
    p.add_argument("--H", type=int, default=4096)
    p.add_argument("--I", type=int, default=14336)
    p.add_argument("--K", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    add_expert_args(p)
    p.add_argument("--tokens", type=str, default=None, help="comma-separated token counts")
    p.add_argument("--rep", type=float, default=100.0, help="do_bench rep (ms)")
    p.add_argument("--no-torch", action="store_true", help="skip the torch reference")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--profile", action="store_true",
                   help="also: host (CPU) time per call, GPU time from a CUDA-graph replay, and a "
                        "per-kernel breakdown from torch.profiler")
    args = p.parse_args(argv)

    import torch
    import triton

    from vllm_fiddler.kernels.triton import config_kind, device_name_for_config, fused_moe, get_config

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, DTYPES[args.dtype])
    E, H, I, K = args.E, args.H, args.I, args.K
    Eg = E if args.gpu_experts is None else args.gpu_experts
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else TOKENS
    dev = device_name_for_config()
    torch.manual_seed(0)
    w13, w2, math, b13, b2, bytes_per_expert = expert_weights(args.format, Eg, H, I, dtype, args.group,
                                                               args.gpt_oss)
    print(f"{dev}: E={E} (GPU {Eg}) H={H} I={I} K={K} {args.dtype} experts {args.format}; "
          f"{bytes_per_expert / 1e6:.1f} MB/expert", flush=True)

    rows = []
    for T in tokens:
        x = torch.randn(T, H, device="cuda").to(dtype)  # [T, H]
        probs = torch.softmax(torch.randn(T, E, device="cuda"), -1)
        tw, ti = torch.topk(probs, K, dim=-1)  # [T, K]
        tw = tw / tw.sum(-1, keepdim=True)
        ti = torch.where(ti < Eg, ti, -1)  # cold experts: -1
        hit = int(torch.unique(ti[ti >= 0]).numel())
        slots = int((ti >= 0).sum())
        out = torch.empty_like(x)
        cfg = get_config(T, Eg, H, I, K, config_kind(w13, dtype), dev)
        kw = dict(math=math, b13=b13, b2=b2)
        ms = triton.testing.do_bench(lambda: fused_moe(x, w13, w2, tw, ti, out=out, config=cfg, **kw),
                                     warmup=25, rep=args.rep, return_mode="median")
        row = dict(T=T, experts_hit=hit, valid_slots=slots, triton_ms=ms,
                   triton_gb_s=hit * bytes_per_expert / ms / 1e6,
                   triton_tflop_s=2 * slots * 3 * H * I / ms / 1e9, config=cfg)
        if args.profile:
            row.update(profile(fused_moe, (x, w13, w2, tw, ti), dict(out=out, config=cfg, **kw), T))
        if not args.no_torch:
            ref = torch_moe(x, w13, w2, tw, ti, **kw)
            got = fused_moe(x, w13, w2, tw, ti, config=cfg, **kw)
            row["rel_err"] = (torch.linalg.vector_norm(got.float() - ref.float())
                              / torch.linalg.vector_norm(ref.float()).clamp_min(1e-30)).item()
            tms = triton.testing.do_bench(lambda: torch_moe(x, w13, w2, tw, ti, **kw),
                                          warmup=25, rep=args.rep, return_mode="median")
            row.update(torch_ms=tms, torch_gb_s=hit * bytes_per_expert / tms / 1e6,
                       torch_tflop_s=2 * slots * 3 * H * I / tms / 1e9, speedup=tms / ms)
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\n{'T':>5} {'hit':>3} {'triton us':>9} {'GB/s':>6} {'TFLOP/s':>7} | "
          f"{'torch us':>9} {'GB/s':>6} {'TFLOP/s':>7} | {'speedup':>7} {'rel err':>8}"
          + (f" | {'host us':>7} {'graph us':>8}" if args.profile else ""))
    for r in rows:
        line = (f"{r['T']:5d} {r['experts_hit']:3d} {r['triton_ms'] * 1e3:9.1f} {r['triton_gb_s']:6.0f} "
                f"{r['triton_tflop_s']:7.1f} | ")
        if "torch_ms" in r:
            line += (f"{r['torch_ms'] * 1e3:9.1f} {r['torch_gb_s']:6.0f} {r['torch_tflop_s']:7.1f} | "
                     f"{r['speedup']:7.2f} {r['rel_err']:8.1e}")
        if args.profile:
            line += f" | {r['host_us']:7.0f} {r.get('graph_us', float('nan')):8.0f}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev, E=E, gpu_experts=Eg, H=H, I=I, K=K, dtype=args.dtype, format=args.format,
                           group=args.group if args.format.startswith("int4") else None, gpt_oss=args.gpt_oss,
                           bytes_per_expert=bytes_per_expert, command=" ".join(sys.argv), rows=rows), f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
