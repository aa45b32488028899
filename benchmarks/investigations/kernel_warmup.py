"""What a step pays when the Triton MoE kernels meet a new tile config, with and without
the load-time warm-up (vllm_fiddler.runtime.kernel_warmup).

Mixtral-8x7B shapes on one GPU: the hot path (2 device-resident experts of a
layer, K=2) and the staging slots' chunk-experts (2 slots x 8 chunks, K*C = 16
slots per token). Each phase runs in a fresh process with an empty Triton
cache directory, so nothing compiled earlier is reused:

  cold      steps at the token counts of a width-4..16 beam search and of
            decode / prefill, in that order, first call timed: a call that
            compiles is as slow as the step it stalls;
  warmed    kernels.triton.warm_up first (timed), then the same steps.

    python3 benchmarks/investigations/kernel_warmup.py --out benchmarks/results/kernel-warmup-h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

H, I, K, CHUNKS, SLOTS, HOT = 4096, 14336, 2, 8, 2, 2
# token counts of the steps timed: decode, beam-search steps (widths 4-16 times 1-16
# uncached tokens per beam), a prefill chunk
STEPS = [1, 4, 9, 17, 34, 50, 68, 100, 136, 200, 2048]


def phase(warm: bool, max_tokens: int) -> dict:
    import torch

    from vllm_fiddler.kernels.triton import fused_moe, warm_up

    dev, dtype = torch.device("cuda"), torch.bfloat16
    hot = (torch.randn(HOT, 2 * I, H, device=dev, dtype=dtype) * 0.01,
           torch.randn(HOT, H, I, device=dev, dtype=dtype) * 0.01)
    Ic = I // CHUNKS
    staged = (torch.randn(SLOTS * CHUNKS, 2 * Ic, H, device=dev, dtype=dtype) * 0.01,
              torch.randn(SLOTS * CHUNKS, H, Ic, device=dev, dtype=dtype) * 0.01)
    paths = {"hot": (hot, K, HOT), "staged": (staged, K * CHUNKS, SLOTS * CHUNKS)}
    out = {"warm_up_s": {}, "first_call_ms": {}, "second_call_ms": {}}
    if warm:
        for name, ((w13, w2), k, _) in paths.items():
            start = time.perf_counter()
            n = warm_up(w13, w2, k, max_tokens)
            torch.cuda.synchronize()
            out["warm_up_s"][name] = time.perf_counter() - start
            out.setdefault("configs", {})[name] = n
    for name, ((w13, w2), k, experts) in paths.items():
        first, second = {}, {}
        for T in STEPS:
            x = torch.randn(T, H, device=dev, dtype=dtype)
            ids = torch.randint(0, experts, (T, k), device=dev, dtype=torch.int32)
            w = torch.rand(T, k, device=dev)
            for timings in (first, second):
                torch.cuda.synchronize()
                start = time.perf_counter()
                fused_moe(x, w13, w2, w, ids)
                torch.cuda.synchronize()
                timings[T] = 1e3 * (time.perf_counter() - start)
        out["first_call_ms"][name], out["second_call_ms"][name] = first, second
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--max-tokens", type=int, default=2048, help="warm_up's max_num_batched_tokens")
    p.add_argument("--phase", choices=["cold", "warmed"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase == "warmed", args.max_tokens)))
        return
    import torch

    result = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "device": torch.cuda.get_device_name(0), "steps_tokens": STEPS,
              "shapes": {"hot": f"{HOT} experts [2I={2 * I}, H={H}], K={K}",
                         "staged": f"{SLOTS} slots x {CHUNKS} chunks [2Ic={2 * I // CHUNKS}, H], K*C={K * CHUNKS}"}}
    for name in ("cold", "warmed"):
        env = {**os.environ, "TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="triton-cache-")}
        proc = subprocess.run([sys.executable, __file__, "--out", args.out, "--phase", name,
                               "--max-tokens", str(args.max_tokens)],
                              env=env, capture_output=True, text=True, check=True)
        result[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("cold", "warmed"):
        r = result[name]
        r["stall_ms_total"] = {path: sum(max(0.0, r["first_call_ms"][path][T] - r["second_call_ms"][path][T])
                                         for T in r["first_call_ms"][path]) for path in r["first_call_ms"]}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k].get("stall_ms_total") for k in ("cold", "warmed")}),
          json.dumps(result["warmed"].get("warm_up_s")))


if __name__ == "__main__":
    main()
