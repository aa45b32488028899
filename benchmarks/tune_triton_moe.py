"""Tunes the Triton fused-MoE tile configs on this GPU and writes them as JSON.

For each token count T it times every config of a modest search space with
`triton.testing.do_bench` (median) over the whole op (`fused_moe`: routing
metadata, both grouped GEMMs, the combine) and keeps the fastest; then it
tries the down projection's column tile (BLOCK_N_DOWN) alone. The result
goes to kernels/triton/configs/E=..,N=..,device_name=..,dtype=...json, which
`get_config` reads (nearest token count).

Compilation dominates a naive sweep, so by default the configs are first
compiled in parallel worker processes (`--jobs`), which fill Triton's on-disk
cache; the timing process then only loads them.

Mixtral-8x7B on one GPU, from the repository root (a few minutes):

    python3 benchmarks/tune_triton_moe.py --E 8 --H 4096 --I 14336 --K 2 --dtype bf16

Quantized experts (`--format fp8_block|mxfp4|int4_group`, `--gpt-oss` for gpt-oss's
biases and clamped SwiGLU) get their own tables (dtype=<format>): gpt-oss-120b's MXFP4
experts, 4 of 128 a token on a partial placement:

    python3 benchmarks/tune_triton_moe.py --E 32 --model-experts 128 --H 2880 --I 2880 --K 4 \
        --format mxfp4 --gpt-oss --tokens 1,2,4,8,16

`--quick` times fewer token counts. For a partial placement (Eg of the 8
experts on the GPU) pass `--E Eg --model-experts 8`: slots routed to the
other experts are -1, as the hybrid layer passes them. get_config falls back
to the file of the nearest E of the same N.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import multiprocessing as mp
import os
import sys
import time

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TOKENS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096]
TOKENS_QUICK = [1, 4, 16, 64, 256, 1024, 4096]


def _fm():
    return importlib.import_module("vllm_fiddler.kernels.triton.fused_moe")


def search_space() -> list[dict[str, int]]:
    """~80 configs: the tiles that make sense for a weight-streaming grouped GEMM."""
    space = []
    for bm, bn, bk, warps, stages in itertools.product(
            (16, 32, 64, 128), (32, 64, 128), (64, 128), (4, 8), (3, 4)):
        if bm == 128 and warps == 4:
            continue  # two 128-row fp32 accumulators do not fit 4 warps' registers
        if bm * bn <= 16 * 32 and warps == 8:
            continue  # too little work for 8 warps
        if bm == 128 and bn == 128 and bk == 128:
            continue  # shared memory: A + two B tiles per stage overflow
        space.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1 if bm == 16 else 8,
                          num_warps=warps, num_stages=stages))
    return space


def configs_for(T: int, E: int, K: int, space: list[dict[str, int]]) -> list[dict[str, int]]:
    """Drops row tiles much taller than the slots an expert gets (pure padding)."""
    per_expert = max(1.0, T * K / E)
    cap = max(16, 1 << (int(per_expert - 1).bit_length()))  # next power of two >= per_expert
    return [c for c in space if c["BLOCK_M"] <= 2 * cap]


def make_inputs(T, E, H, I, K, dtype, seed=0):
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, H, device="cuda", generator=g).to(dtype)
    logits = torch.randn(T, E, device="cuda", generator=g)
    probs = torch.softmax(logits, -1)
    tw, ti = torch.topk(probs, K, dim=-1)
    tw = tw / tw.sum(-1, keepdim=True)
    return x, tw, ti


def make_weights(E, H, I, dtype, experts: dict):
    """(w13, w2, fused_moe's math / b13 / b2, stored bytes per expert); experts: format, group,
    gpt_oss (triton_moe.expert_weights)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also in spawned compile workers
    from triton_moe import expert_weights

    w13, w2, math, b13, b2, nbytes = expert_weights(experts["format"], E, H, I, dtype, experts["group"],
                                                    experts["gpt_oss"])
    return w13, w2, dict(math=math, b13=b13, b2=b2), nbytes


def _compile_worker(args):
    """Compiles (by launching once) each config; returns the ones that failed."""
    configs, E, H, I, K, dtype_name, experts = args
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    fm = _fm()
    E1 = 1  # constexprs and strides do not depend on E: one expert is enough to compile
    w13, w2, kw, _ = make_weights(E1, H, I, dtype, experts)
    x, tw, ti = make_inputs(8, max(E, K), H, I, K, dtype)
    ti = ti % E1  # every slot to the one expert
    bad = []
    for cfg in configs:
        try:
            fm.fused_moe(x, w13, w2, tw, ti, config=cfg, **kw)
            torch.cuda.synchronize()
        except Exception as e:  # OutOfResources and the like: the config is not valid here
            bad.append((cfg, f"{type(e).__name__}: {str(e)[:200]}"))
    return bad


def precompile(space, E, H, I, K, dtype_name, jobs, experts) -> list[dict[str, int]]:
    """Compiles the whole space in `jobs` processes; returns the configs that work."""
    if jobs <= 1:
        bad = _compile_worker((space, E, H, I, K, dtype_name, experts))
    else:
        chunks = [space[i::jobs] for i in range(jobs)]
        ctx = mp.get_context("spawn")
        with ctx.Pool(jobs) as pool:
            bad = [b for part in pool.map(_compile_worker, [(c, E, H, I, K, dtype_name, experts) for c in chunks])
                   for b in part]
    for cfg, why in bad:
        print(f"  skipping {cfg}: {why}", flush=True)
    bad_keys = {json.dumps(c, sort_keys=True) for c, _ in bad}
    return [c for c in space if json.dumps(c, sort_keys=True) not in bad_keys]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--E", type=int, default=8, help="GPU-resident experts (w13.shape[0])")
    p.add_argument("--model-experts", type=int, default=None,
                   help="the router's width (default: E); slots routed past E are -1 (cold), "
                        "as in a partial placement")
    p.add_argument("--H", type=int, default=4096)
    p.add_argument("--I", type=int, default=14336)
    p.add_argument("--K", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from triton_moe import add_expert_args

    add_expert_args(p)  # quantized formats get their own tables
    p.add_argument("--tokens", type=str, default=None, help="comma-separated token counts")
    p.add_argument("--quick", action="store_true", help=f"tokens {TOKENS_QUICK}")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                   help="parallel compile processes (1: compile while timing)")
    p.add_argument("--rep", type=float, default=30.0, help="do_bench rep, ms per config")
    p.add_argument("--out-dir", default=None, help="default: the package's kernels/triton/configs")
    p.add_argument("--dry-run", action="store_true", help="print the JSON, write nothing")
    args = p.parse_args(argv)

    import torch
    import triton

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    fm = _fm()
    dtype = getattr(torch, DTYPES[args.dtype])
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else (
        TOKENS_QUICK if args.quick else TOKENS)
    E, H, I, K = args.E, args.H, args.I, args.K
    E_model = max(args.model_experts or E, E, K)
    device_name = fm.device_name_for_config()
    experts = dict(format=args.format, group=args.group, gpt_oss=args.gpt_oss)
    print(f"tuning fused_moe on {device_name}: E={E} (router {E_model}) H={H} I={I} K={K} {args.dtype} "
          f"experts {args.format}{' (gpt-oss math)' if args.gpt_oss else ''}, T in {tokens}", flush=True)

    t0 = time.time()
    space = search_space()
    needed = [c for c in space if any(c in configs_for(T, E_model, K, space) for T in tokens)]
    space = precompile(needed, E, H, I, K, args.dtype, args.jobs, experts)
    print(f"compiled {len(space)} configs in {time.time() - t0:.0f} s", flush=True)

    w13, w2, kw, bytes_per_expert = make_weights(E, H, I, dtype, experts)
    kind = fm.config_kind(w13, dtype)
    best_table: dict[str, dict[str, int]] = {}
    rows = []
    for T in tokens:
        for seed in range(T, T + 100):  # a routing that gives the GPU some work
            x, tw, ti = make_inputs(T, E_model, H, I, K, dtype, seed=seed)
            ti = torch.where(ti < E, ti, -1)  # cold experts (partial placement)
            if bool((ti >= 0).any()):
                break
        out = torch.empty_like(x)
        hit = int(torch.unique(ti[ti >= 0]).numel())

        def bench(cfg):
            return triton.testing.do_bench(
                lambda: fm.fused_moe(x, w13, w2, tw, ti, out=out, config=cfg, **kw),
                warmup=5, rep=args.rep, return_mode="median")

        default_cfg = fm.default_config(T, E, K, dtype.itemsize)
        default_ms = bench(default_cfg)
        best_ms, best_cfg = default_ms, default_cfg

        def try_all(candidates):
            nonlocal best_ms, best_cfg
            for cfg in candidates:
                try:
                    ms = bench(cfg)
                except Exception as e:
                    print(f"  T={T} {cfg}: {type(e).__name__}", flush=True)
                    continue
                if ms < best_ms:
                    best_ms, best_cfg = ms, cfg

        try_all(list(configs_for(T, E_model, K, space)))
        # Stage 2: the down projection's column tile alone (decode with few experts
        # hit runs few GEMM #2 programs: narrower tiles spread them over the SMs).
        try_all([dict(best_cfg, BLOCK_N_DOWN=bn) for bn in (16, 32, 64, 128)
                 if bn != best_cfg.get("BLOCK_N_DOWN", best_cfg["BLOCK_N"])])
        best_table[str(T)] = dict(best_cfg)
        gbs = hit * bytes_per_expert / best_ms / 1e6
        tflops = 2 * int((ti >= 0).sum()) * 3 * H * I / best_ms / 1e9
        rows.append((T, hit, best_ms, default_ms, gbs, tflops, best_cfg))
        print(f"T={T:5d} hit={hit} best {best_ms * 1e3:8.1f} us ({gbs:6.0f} GB/s, {tflops:6.1f} TFLOP/s)"
              f" default {default_ms * 1e3:8.1f} us  {best_cfg}", flush=True)

    text = json.dumps(best_table, indent=4) + "\n"
    if args.dry_run:
        print(text)
    else:
        out_dir = args.out_dir or fm.CONFIG_DIR
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, fm.config_file_name(E, I, device_name, kind))
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {path}")
    print(f"\n{'T':>5} {'hit':>3} {'best us':>9} {'default us':>10} {'GB/s':>6} {'TFLOP/s':>7}  config")
    for T, hit, ms, dms, gbs, tf, cfg in rows:
        c = "{BLOCK_M}x{BLOCK_N}x{BLOCK_K} g{GROUP_M} w{num_warps} s{num_stages}".format(**cfg)
        if "BLOCK_N_DOWN" in cfg:
            c += f" down-N {cfg['BLOCK_N_DOWN']}"
        print(f"{T:5d} {hit:3d} {ms * 1e3:9.1f} {dms * 1e3:10.1f} {gbs:6.0f} {tf:7.1f}  {c}")
    print(f"total {time.time() - t0:.0f} s")
    print("JSON " + json.dumps(best_table, separators=(",", ":")))  # recoverable from a log
    return 0


if __name__ == "__main__":
    sys.exit(main())
