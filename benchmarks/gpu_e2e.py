"""GPU verification and end-to-end benchmark of fiddler vs stock vLLM offload (issue 3).

One command on the H100 machine (after `source .gpu/install.sh`):

    python benchmarks/gpu_e2e.py --out benchmarks/results/gpu-e2e-h100.json

(a) correctness, tiny random Mixtral on the GPU: fiddler's greedy tokens equal
    stock vLLM's for several placements, eager and torch.compile + piecewise
    CUDA graphs (fp32 for exact equality; see tests/e2e/test_generate.py), and
    the compiled mode's decode speed against eager;
(b) performance, Mixtral-8x7B shapes with --load-format dummy and
    --gpu-memory-utilization 0.30 (a 24 GB GPU): decode tokens/s at batch 1
    and time to first token for a 2048-token prompt, for fiddler and for stock
    vLLM 0.26 with UVA offload (all weights), UVA expert-only offload
    (--cpu-offload-params), and prefetch offload; fiddler's GPU hit rate, CPU
    ms per step and PCIe GB per step.

Every system runs in its own process, so one system's pinned memory is gone
before the next starts. Stock systems offload the least that lets them start
at the same gpu_memory_utilization (their best setting at that budget).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

from vllm_fiddler.plugin import COALESCING_SCHEDULER

GIB = 1024**3
UTIL = 0.30
MAX_MODEL_LEN = 4096
# max_num_batched_tokens bounds every system's activation memory alike; a
# 2048-token prompt is still prefilled in one step.
ENGINE = dict(attention_backend="TRITON_ATTN", max_model_len=MAX_MODEL_LEN, enable_prefix_caching=False,
              max_num_seqs=8, max_num_batched_tokens=2048, seed=0)


# ---------------------------------------------------------------- systems
def mixtral_bytes(layers: int) -> tuple[float, float]:
    """(expert GiB, non-expert GiB) of Mixtral-8x7B with `layers` layers, bf16."""
    import types

    from vllm_fiddler.placement import MoEShape

    hf = types.SimpleNamespace(hidden_size=4096, num_hidden_layers=layers, num_local_experts=8,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                               vocab_size=32000, intermediate_size=14336, num_experts_per_tok=2,
                               tie_word_embeddings=False)
    s = MoEShape.from_hf_config(hf, 2)
    return s.all_experts_bytes / GIB, s.non_expert_bytes / GIB


KV_RESERVE_GIB = 3.0  # KV cache + activations kept free at UTIL, for every system


def resident_expert_fraction(gpu_total_gib: float) -> float:
    """Share of Mixtral-8x7B's experts (all 32 layers) that fit at UTIL beside the rest."""
    experts, other = mixtral_bytes(32)
    return max(0.0, min(1.0, (gpu_total_gib * UTIL - other - KV_RESERVE_GIB) / experts))


# prefetch: expert weights of 6 of every 8 layers live on the host and are
# copied in one layer ahead of use (25% resident; its GPU buffers hold a whole
# layer's experts on top)
STOCK_PREFETCH = dict(offload_group_size=8, offload_num_in_group=6, offload_prefetch_step=1,
                      offload_params={"w13_weight", "w2_weight"})


def prefetch_within_budget(layers: int, resident_fraction: float) -> dict:
    """Stock prefetch offload that fits the expert budget: the most resident layers r whose
    experts, plus the one layer of buffers prefetch copies into, stay within resident_fraction
    of the experts (r + 1 <= layers * fraction; r = 0 with 8 layers at a 24 GB GPU's share,
    every layer copied in each step through one layer of buffers)."""
    resident_layers = max(0, math.floor(layers * resident_fraction + 1e-9) - 1)
    return dict(offload_group_size=layers, offload_num_in_group=layers - resident_layers,
                offload_prefetch_step=1, offload_params={"w13_weight", "w2_weight"})


def systems(layers: int, gpu_total_gib: float) -> dict[str, dict]:
    """Each system at the same GPU budget for expert weights.

    With fewer than 32 layers the budget is scaled to keep the full model's
    share of experts resident (a 24 GB GPU holds ~20% of Mixtral's experts),
    so a trimmed model simulates the same GPU, not a bigger one.
    """
    experts, _ = mixtral_bytes(layers)
    resident = resident_expert_fraction(gpu_total_gib) * experts
    offload = round(experts - resident, 2)
    fiddler = {"gpu_expert_budget_gb": round(resident, 2), "kv_cache_reserve_gb": KV_RESERVE_GIB}
    return {
        # online re-placement is on by default (host memory allows it here)
        "fiddler": dict(model_impl="fiddler", additional_config={"fiddler": fiddler}),
        # the even placement, never re-placed
        "fiddler_static": dict(model_impl="fiddler", additional_config={"fiddler": {**fiddler, "adaptation": False}}),
        # the same with torch.compile + piecewise CUDA graphs (the others run as --eager says)
        "fiddler_compiled": dict(model_impl="fiddler", enforce_eager=False, additional_config={"fiddler": {
            "gpu_expert_budget_gb": round(resident, 2),
            "kv_cache_reserve_gb": KV_RESERVE_GIB}}),
        "stock_uva_all": dict(cpu_offload_gb=offload),
        "stock_uva_experts": dict(cpu_offload_gb=offload, cpu_offload_params={"w13_weight", "w2_weight"}),
        # the same with fiddler's arrival-coalescing scheduler (fiddler rows get it by default)
        "stock_uva_experts_coalesced": dict(cpu_offload_gb=offload, cpu_offload_params={"w13_weight", "w2_weight"},
                                            scheduler_cls=COALESCING_SCHEDULER),
        "stock_prefetch": dict(STOCK_PREFETCH),
        # prefetch at the budget (STOCK_PREFETCH holds more: 3/8 of the experts with 8 layers)
        "stock_prefetch_budget": prefetch_within_budget(layers, resident_expert_fraction(gpu_total_gib)),
    }


def time_generate(llm, prompts, max_tokens: int) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start


def fiddler_stats(llm) -> dict:
    from vllm_fiddler.stats import model_stats

    return llm.apply_model(model_stats)[0]


def run_system(name: str, layers: int, decode_tokens: int, eager: bool, out_path: str) -> None:
    import random

    from vllm import LLM

    from vllm_fiddler.stats import delta, step_breakdown
    from vllm_fiddler.tiny import build_mixtral_8x7b_shapes

    model = build_mixtral_8x7b_shapes(tempfile.mkdtemp(prefix="m8x7b-"), layers)
    import torch

    total = torch.cuda.mem_get_info()[1] / GIB
    kwargs = dict(systems(layers, total)[name])
    eager = kwargs.pop("enforce_eager", eager)
    t0 = time.perf_counter()
    llm = LLM(model=model, load_format="dummy", gpu_memory_utilization=UTIL, enforce_eager=eager,
              **ENGINE, **kwargs)
    load_s = time.perf_counter() - t0
    rng = random.Random(0)
    short = [[rng.randrange(100, 32000) for _ in range(32)]]
    time_generate(llm, short, 4)  # warm-up
    is_fiddler = name.startswith("fiddler")
    before = fiddler_stats(llm) if is_fiddler else {}
    t1 = time_generate(llm, [[rng.randrange(100, 32000) for _ in range(32)]], 1)
    tn = time_generate(llm, [[rng.randrange(100, 32000) for _ in range(32)]], 1 + decode_tokens)
    decode_tok_s = decode_tokens / max(tn - t1, 1e-9)
    after_decode = fiddler_stats(llm) if is_fiddler else {}
    ttfts = [time_generate(llm, [[rng.randrange(100, 32000) for _ in range(2048)]], 1) for _ in range(2)]
    after_prefill = fiddler_stats(llm) if is_fiddler else {}
    result = {"system": name, "kwargs": {k: (sorted(v) if isinstance(v, set) else v) for k, v in kwargs.items()},
              "load_s": load_s, "decode_tok_s": decode_tok_s, "ttft_2048_s": min(ttfts), "eager": eager}
    if is_fiddler:
        p = delta(after_prefill, after_decode)
        result.update(step_breakdown(after_decode, before))
        result.update({
            "prefill_2048_experts_copied": p["experts_copied"] / 2,
            "prefill_2048_cpu_ms": 1e3 * p["cpu_busy_s"] / 2,
            "prefill_2048_pcie_weight_gb": p["h2d_weight_bytes"] / 1e9 / 2,
        })
    with open(out_path, "w") as f:
        json.dump(result, f)


# ------------------------------------------------------------ correctness
# vLLM's own fp32 path is not exact either: on the H100 stock vLLM's first-token
# logprobs were 1.4e-3 nats from HF's fp32 (TF32 off) and fiddler's 2.4e-3
# (tiny random Mixtral, 5 prompts); 5e-3 is a bug detector, not a numerics claim
# (a wrong expert or a missing chunk moves logprobs by > 0.1 on this model).
LOGPROB_TOL = 5e-3
def correctness(out: dict) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_fiddler.tiny import build_tiny_mixtral

    model = build_tiny_mixtral(tempfile.mkdtemp(prefix="tiny-"), dtype="float32")
    import random

    rng = random.Random(0)
    prompts = [[rng.randrange(6, 512) for _ in range(n)] for n in (1, 5, 17, 64, 150)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    runs = {
        "stock_eager": dict(model_impl="auto", enforce_eager=True),
        "fiddler_eager_all_cpu": dict(model_impl="fiddler", enforce_eager=True,
                                      additional_config={"fiddler": {"gpu_expert_budget_gb": 0}}),
        "fiddler_eager_mixed": dict(model_impl="fiddler", enforce_eager=True,
                                    additional_config={"fiddler": {"gpu_expert_budget_gb": 0.004}}),
        "fiddler_eager_all_gpu": dict(model_impl="fiddler", enforce_eager=True,
                                      additional_config={"fiddler": {"gpu_expert_budget_gb": 1}}),
        "fiddler_compiled_mixed": dict(model_impl="fiddler", enforce_eager=False,
                                       additional_config={"fiddler": {"gpu_expert_budget_gb": 0.004}}),
        "stock_compiled": dict(model_impl="auto", enforce_eager=False),
    }
    tokens, speed, first_logprob = {}, {}, {}
    # The fp32 reference: Hugging Face's Mixtral on the GPU, TF32 off (torch's default for
    # matmuls). Stock vLLM's fused-MoE Triton kernel multiplies fp32 in TF32 (tl.dot's
    # default), fiddler's in IEEE fp32, so agreement is judged against this, not only stock.
    tokens["hf_fp32"], first_logprob["hf_fp32"] = hf_reference(model, prompts, 24)
    for name, kw in runs.items():
        llm = LLM(model=model, dtype="float32", gpu_memory_utilization=0.3, max_model_len=512,
                  attention_backend="TRITON_ATTN", seed=0, **kw)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        tokens[name] = [list(o.outputs[0].token_ids) for o in outs]
        first_logprob[name] = [next(iter(o.outputs[0].logprobs[0].values())).logprob for o in outs]
        one = [TokensPrompt(prompt_token_ids=prompts[1])]
        llm.generate(one, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
        start = time.perf_counter()
        llm.generate(one, SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True), use_tqdm=False)
        speed[name] = 128 / (time.perf_counter() - start)
        del llm
        import gc

        gc.collect()
    # Exact equality over 24 greedy tokens of a random model is fragile on the GPU
    # (near-ties; stock's TF32 MoE vs fiddler's fp32 one), so the check, per system
    # against the fp32 reference: the first token of every prompt equal, its logprob
    # within LOGPROB_TOL nats, and as many leading tokens agreeing as the best stock
    # run. Fiddler compiled must also give exactly fiddler eager's tokens.
    def leading(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    def compare(ref_name):
        ref, ref_lp = tokens[ref_name], first_logprob[ref_name]
        return ({k: sum(leading(a, b) for a, b in zip(v, ref)) / len(ref) for k, v in tokens.items()},
                {k: all(a[0] == b[0] for a, b in zip(v, ref)) for k, v in tokens.items()},
                {k: max(abs(a - b) for a, b in zip(v, ref_lp)) for k, v in first_logprob.items()})

    agree, first_equal, lp_err = compare("hf_fp32")
    agree_stock, _, lp_err_stock = compare("stock_eager")
    fiddler = [k for k in tokens if k.startswith("fiddler")]
    best_stock = max(agree["stock_eager"], agree["stock_compiled"])
    compiled_same = tokens["fiddler_compiled_mixed"] == tokens["fiddler_eager_mixed"]
    out["correctness"] = {
        "model": "tiny random Mixtral, fp32, 3 layers, 8 experts, top-2; reference: HF MixtralForCausalLM "
                 "fp32 on the GPU (TF32 off)",
        "first_token_equal_to_hf_fp32": first_equal,
        "first_token_logprob_max_abs_diff_vs_hf_fp32": lp_err,
        "mean_leading_tokens_equal_of_24_vs_hf_fp32": agree,
        "mean_leading_tokens_equal_of_24_vs_stock_eager": agree_stock,
        "first_token_logprob_max_abs_diff_vs_stock_eager": lp_err_stock,
        "fiddler_compiled_tokens_equal_eager": compiled_same,
        "decode_tok_s_batch1": speed,
        "compiled_vs_eager_speedup": speed["fiddler_compiled_mixed"] / speed["fiddler_eager_mixed"],
    }
    out["correctness"]["passed"] = compiled_same and all(
        first_equal[k] and lp_err[k] < LOGPROB_TOL and agree[k] >= best_stock - 1e-9 for k in fiddler)


def hf_reference(model: str, prompts, max_tokens: int):
    """Greedy tokens and first-token logprobs of Hugging Face's Mixtral, fp32, TF32 off."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).cuda().eval()
    tokens, first = [], []
    with torch.no_grad():
        for p in prompts:  # plain greedy loop: like vLLM's ignore_eos, EOS is just a token
            ids = torch.tensor([p], device="cuda")
            new = []
            for _ in range(max_tokens):
                logprobs = torch.log_softmax(hf(ids).logits[0, -1].float(), dim=-1)
                tok = int(logprobs.argmax())
                if not new:
                    first.append(float(logprobs[tok]))
                new.append(tok)
                ids = torch.cat([ids, ids.new_tensor([[tok]])], dim=1)
            tokens.append(new)
    del hf
    torch.cuda.empty_cache()
    return tokens, first


# ------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/gpu-e2e-h100.json")
    p.add_argument("--layers", type=int, default=8,
                   help="Mixtral-8x7B layers (32 = whole model); the expert budget scales with it")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--systems", default="fiddler,stock_uva_all,stock_uva_experts,stock_prefetch")
    p.add_argument("--eager", action="store_true", help="enforce_eager for every system in (b)")
    p.add_argument("--skip-correctness", action="store_true")
    p.add_argument("--skip-performance", action="store_true")
    p.add_argument("--system-timeout", type=int, default=900)
    p.add_argument("--merge", action="store_true",
                   help="keep the systems (and correctness) already in --out; rerun only those named")
    p.add_argument("--run-system", help=argparse.SUPPRESS)
    p.add_argument("--system-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model(model_stats)
    # host-resident dummy weights (stock prefetch offload) filled at copy speed: vllm_fiddler/synthetic.py
    os.environ.setdefault("FIDDLER_FAST_DUMMY_INIT", "1")
    if args.run_system:
        run_system(args.run_system, args.layers, args.decode_tokens, args.eager, args.system_out)
        return
    import torch
    import vllm

    out = {"device": f"{torch.cuda.get_device_name()} + {platform.processor() or 'x86_64'} "
                     f"({os.cpu_count()} CPUs)",
           "vllm_version": vllm.__version__, "command": " ".join(["python"] + sys.argv),
           "layers": args.layers, "gpu_memory_utilization": UTIL,
           "note": f"Mixtral-8x7B shapes, {args.layers} of 32 layers, dummy (random) weights, "
                   f"gpu_memory_utilization {UTIL}; every system keeps the same share of expert bytes on the "
                   f"GPU as a whole Mixtral-8x7B at this setting ({args.layers}/32 of the budget). Random "
                   "weights route nearly uniformly, so the hit rate is about the share of experts on the GPU. "
                   "Tokens/s scale ~32/layers for the whole model."}
    previous = {}
    if args.merge and os.path.exists(args.out):
        with open(args.out) as f:
            previous = json.load(f)
        if "correctness" in previous:
            out["correctness"] = previous["correctness"]
        out["command"] = previous.get("command", "") + " ; " + out["command"]
    if not args.skip_correctness:
        correctness(out)
        print(json.dumps(out["correctness"], indent=1), flush=True)
    if not args.skip_performance:
        results = dict(previous.get("systems", {}))
        for name in args.systems.split(","):
            path = tempfile.mktemp(suffix=f"-{name}.json")
            cmd = [sys.executable, __file__, "--run-system", name, "--system-out", path,
                   "--layers", str(args.layers), "--decode-tokens", str(args.decode_tokens)]
            if args.eager:
                cmd.append("--eager")
            # a session of its own, so a timeout kills the engine core it started too
            proc = subprocess.Popen(cmd, start_new_session=True)
            try:
                rc = proc.wait(args.system_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = f"timeout after {args.system_timeout} s"
            if rc == 0 and os.path.exists(path):
                with open(path) as f:
                    results[name] = json.load(f)
            else:
                results[name] = {"system": name, "error": f"exit {rc}"}
            print(json.dumps(results[name]), flush=True)
        out["systems"] = results
        ok = {k: v for k, v in results.items() if "error" not in v}
        out["decode_tok_s"] = {k: v["decode_tok_s"] for k, v in ok.items()}
        out["ttft_2048_s"] = {k: v["ttft_2048_s"] for k, v in ok.items()}
        if "fiddler" in ok:
            out["gpu_hit_rate"] = ok["fiddler"]["gpu_hit_rate"]
            stock = [v for k, v in out["decode_tok_s"].items() if k.startswith("stock")]
            if stock:
                out["decode_speedup_vs_best_stock"] = out["decode_tok_s"]["fiddler"] / max(stock)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k != "systems"}, indent=1))


if __name__ == "__main__":
    main()
