"""Batch-1 decode and time to first token of any MoE shape: fiddler against stock vLLM's offload.

Real shapes with ``--load-format dummy`` at the GPU budget of a smaller card
(``--gpu-gib``, default 24: a 24 GB GPU, whatever card runs it), for the
systems named; each runs in its own process, one after another, so pinned
memory is gone before the next starts. The host's bandwidth is measured in the
same run, first (benchmarks/host_bandwidth.py).

    source .gpu/install.sh; R=$PWD; cd /tmp
    python3 $R/benchmarks/decode.py --shape qwen3-30b-a3b --systems fiddler,stock_uva_experts \\
        --out $OUT/decode-qwen3.json

Budget: the card's memory is gpu_memory_utilization = gpu_gib / total of the
device; the experts get what is left after the non-expert weights, a 3 GiB KV
reserve and 1 GiB of runtime overhead. With --layers below the model's, that
expert budget is scaled by the share of layers kept, so a trimmed model
simulates the same card, not a bigger one.

Systems: fiddler (defaults: even placement, online re-placement on, vLLM's
compiled mode with CUDA graphs unless --eager); stock_uva_experts: stock vLLM
with expert-only UVA offload (--cpu-offload-gb of the experts that do not fit,
--cpu-offload-params w13_weight w2_weight): kernels read offloaded experts over
PCIe in place, stock vLLM's best offload at a budget where whole layers do not
fit. Both with FIDDLER_FAST_DUMMY_INIT=1 (host weights filled at copy speed).

Figures per system: decode tok/s at temperature 1.0 (the headline: random
tokens, so routing has no memory) and 0 (greedy: a random-weight model loops
on a few tokens, routing repeats and re-placement looks better than real
workloads allow); N / (time(1 + N tokens) - time(1 token)), 32-token prompt;
TTFT of --prefill-lens prompts (best of 2; for MLA models on a vLLM runtime without
FlashAttention, prefill runs mla_prefill_torch.py's plain-torch attention, and the row's
kwargs say so). For fiddler, per decode run: the GPU
hit rate and the host bytes read per token (CPU reads + PCIe reads of expert
weights, from fiddler's counters), and the roofline: host bytes per token over
the best host read bandwidth measured in this run (CPU and PCIe together, or
either alone), and the share of it reached. The output's "flat" list holds one
results_io row per figure (system, scenario, value, unit, hit rate, roofline
share, device, vLLM version, command, commit); "predicted" the throughput
model's figures for the same budget (MoE time only, even placement, uniform
routing), next to the measured ones.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_io  # noqa: E402
import shapes  # noqa: E402

GIB = 1024**3
KV_RESERVE_GIB = 3.0
OVERHEAD_GIB = 1.0
PROMPT_LEN = 32
SYSTEMS = ("fiddler", "stock_uva_experts")
CAPTURE_MAX = 16


def moe_shape(shape_name: str, layers: int | None = None, fp8: bool = False):
    """The MoE sizes of a shape in shapes.py (trimmed to `layers`), its experts in the format it is
    built in (shapes.expert_format: bf16, FP8 with 128x128 block scales, gpt-oss's MXFP4; the
    non-expert weights are counted in bf16)."""
    import dataclasses

    from vllm_fiddler.moe.quantized import ExpertFormat
    from vllm_fiddler.placement import MoEShape

    shape = MoEShape.from_hf_config(shapes.config(shape_name, layers), 2)
    fmt = shapes.expert_format(shape_name, fp8)
    return dataclasses.replace(shape, expert_format=ExpertFormat(*fmt)) if fmt else shape


def budget(shape_name: str, layers: int, gpu_gib: float, fp8: bool = False) -> dict:
    """Expert GiB resident on the GPU and offloaded, at a card of gpu_gib."""
    full, trimmed = moe_shape(shape_name, fp8=fp8), moe_shape(shape_name, layers, fp8)
    resident_full = gpu_gib - full.non_expert_bytes / GIB - KV_RESERVE_GIB - OVERHEAD_GIB
    share = max(0.0, min(1.0, resident_full / (full.all_experts_bytes / GIB)))
    experts = trimmed.all_experts_bytes / GIB
    return {"expert_gib": round(experts, 2), "resident_gib": round(experts * share, 2),
            "offloaded_gib": round(experts * (1 - share), 2), "resident_share": round(share, 4),
            "expert_mib": round(trimmed.expert_bytes / 2**20, 2), "moe_layers": trimmed.num_layers,
            "top_k": trimmed.top_k}


def system_kwargs(name: str, b: dict, util: float, eager: bool, attention: str = "TRITON_ATTN") -> dict:
    base = dict(load_format="dummy", gpu_memory_utilization=util, max_model_len=4096,
                max_num_batched_tokens=2048, max_num_seqs=8, enable_prefix_caching=False, seed=0,
                attention_backend=attention, enforce_eager=eager,
                # batch-1 decode replays the 1-token graph; capturing every size up to 1024
                # runs each through the MoE (minutes for host experts of 4-bit formats)
                compilation_config={"max_cudagraph_capture_size": CAPTURE_MAX})
    if name == "fiddler":
        return {**base, "model_impl": "fiddler", "additional_config": {"fiddler": {
            "gpu_expert_budget_gb": b["resident_gib"], "kv_cache_reserve_gb": KV_RESERVE_GIB}}}
    if name == "stock_uva_experts":
        return {**base, "cpu_offload_gb": b["offloaded_gib"], "cpu_offload_params": {"w13_weight", "w2_weight"}}
    raise ValueError(f"unknown system {name!r}")


def time_generate(llm, prompt: list[int], max_tokens: int, temperature: float) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True, seed=0)
    start = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
    return time.perf_counter() - start


def run_system(args) -> None:
    """Child: one system's engine, its scenarios; rewrites --system-out after each."""
    import torch
    from vllm import LLM

    model = shapes.build(args.shape, tempfile.mkdtemp(prefix="shape-"), args.layers, args.fp8)
    util = args.gpu_gib / (torch.cuda.mem_get_info()[1] / GIB)
    kwargs = system_kwargs(args.run_system, budget(args.shape, args.layers, args.gpu_gib, args.fp8), util, args.eager,
                           shapes.attention_backend(args.shape))
    if kwargs["attention_backend"] == "TRITON_MLA":
        import mla_prefill_torch

        if mla_prefill_torch.flash_attention_missing():  # vLLM's MLA prefill on Hopper needs FlashAttention
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the backend is registered in this process
            kwargs["attention_config"] = {"mla_prefill_backend": mla_prefill_torch.register()}
    row = {"system": args.run_system, "kwargs": {k: sorted(v) if isinstance(v, set) else v
                                                 for k, v in kwargs.items()}, "decode": {}, "ttft_s": {}}

    def save():
        with open(args.system_out, "w") as f:
            json.dump(row, f, indent=1)

    row["device"] = torch.cuda.get_device_name()
    t0 = time.perf_counter()
    llm = LLM(model=model, **kwargs)
    row["load_s"] = time.perf_counter() - t0
    save()
    fiddler = args.run_system == "fiddler"
    rng = random.Random(0)
    vocab = shapes.config(args.shape).vocab_size
    prompt = lambda n: [rng.randrange(100, vocab) for _ in range(n)]  # noqa: E731
    time_generate(llm, prompt(PROMPT_LEN), args.warmup_tokens, 1.0)
    for temperature in args.temperatures:
        stats = _stats(llm) if fiddler else {}
        t1 = time_generate(llm, prompt(PROMPT_LEN), 1, temperature)
        tn = time_generate(llm, prompt(PROMPT_LEN), 1 + args.decode_tokens, temperature)
        figure = {"tok_s": args.decode_tokens / max(tn - t1, 1e-9), "tokens": args.decode_tokens}
        if fiddler:
            from vllm_fiddler.stats import delta

            d = delta(_stats(llm), stats)
            pairs = d["routed_to_gpu"] + d["routed_to_cpu"]
            host_bytes = d["cpu_weight_bytes"] + d["streamed_weight_bytes"] + d["h2d_weight_bytes"]
            # the 1-token run's prefill and the n-token run's: the decode tokens' share of the pairs
            figure.update(gpu_hit_rate=d["routed_to_gpu"] / max(1, pairs), host_gb_per_token=host_bytes / 1e9 / (
                args.decode_tokens + 1), replacements=d["replacements"])
        row["decode"][f"t{temperature:g}"] = figure
        save()
    for n in args.prefill_lens:
        row["ttft_s"][str(n)] = min(time_generate(llm, prompt(n), 1, 1.0) for _ in range(2))
        save()


def _stats(llm) -> dict:
    from vllm_fiddler.stats import model_stats

    return llm.apply_model(model_stats)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(shapes.SHAPES))
    p.add_argument("--layers", type=int, default=None, help="keep this many layers (default: all)")
    p.add_argument("--gpu-gib", type=float, default=24.0, help="the card simulated (GiB)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--warmup-tokens", type=int, default=64)
    p.add_argument("--temperatures", default="1.0,0")
    p.add_argument("--prefill-lens", default="2048")
    p.add_argument("--eager", action="store_true")
    p.add_argument("--fp8", action="store_true", help="the shape as its FP8 checkpoints ship (128x128 block scales), "
                   "both systems; no prediction (the cost model prices bf16 experts)")
    p.add_argument("--system-timeout", type=float, default=480)
    p.add_argument("--out", required=True)
    p.add_argument("--run-system", help=argparse.SUPPRESS)
    p.add_argument("--system-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.layers = args.layers or shapes.config(args.shape).num_hidden_layers
    args.temperatures = [float(t) for t in str(args.temperatures).split(",") if t]
    args.prefill_lens = [int(n) for n in str(args.prefill_lens).split(",") if n]
    os.environ["FIDDLER_FAST_DUMMY_INIT"] = "1"
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model(model_stats)
    if args.run_system:
        run_system(args)
        return
    import host_bandwidth

    out = {"shape": args.shape, "layers": args.layers, "gpu_gib": args.gpu_gib, "fp8": args.fp8,
           "budget": budget(args.shape, args.layers, args.gpu_gib, args.fp8), "command": " ".join(sys.argv),
           "host_bandwidth": _bandwidth(host_bandwidth.__file__), "rows": []}
    bw = out["host_bandwidth"] or {}
    best_read = max(bw.get("cpu_read_gb_s") or 0, bw.get("pcie_h2d_gb_s") or 0,
                    (bw.get("together") or {}).get("sum_gb_s") or 0)
    for system in args.systems.split(","):
        path = tempfile.mktemp(suffix=".json")
        cmd = [sys.executable, __file__, *sys.argv[1:], "--run-system", system, "--system-out", path]
        # its own process group: on a timeout the engine's processes go with it, and the
        # next system finds the GPU free
        child = subprocess.Popen(cmd, start_new_session=True)
        try:
            child.wait(timeout=args.system_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        row = json.load(open(path)) if os.path.exists(path) else {"system": system, "error": "no result"}
        for figure in row.get("decode", {}).values():
            if figure.get("host_gb_per_token") and best_read:
                figure["roofline_tok_s"] = best_read / figure["host_gb_per_token"]
                figure["roofline_share"] = figure["tok_s"] / figure["roofline_tok_s"]
        out["rows"].append(row)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    out["predicted"] = None if shapes.expert_format(args.shape, args.fp8) else predicted(
        args.shape, args.layers, out["budget"], calibrated_cost(args.shape, args.layers), args.prefill_lens)
    import vllm

    out["flat"] = flat_rows(out, vllm.__version__, results_io.git_commit(os.path.dirname(__file__)))
    rows = {r["system"]: r for r in out["rows"]}
    if "fiddler" in rows and "stock_uva_experts" in rows:
        out["ratios"] = {t: rows["fiddler"]["decode"][t]["tok_s"] / rows["stock_uva_experts"]["decode"][t]["tok_s"]
                         for t in rows["fiddler"].get("decode", {}) if t in rows["stock_uva_experts"].get("decode", {})}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: out.get(k) for k in ("shape", "layers", "budget", "ratios", "predicted")}, indent=1))
    for r in out["rows"]:
        print(r["system"], json.dumps(r.get("decode")), json.dumps(r.get("ttft_s")))


def predicted(shape_name: str, layers: int, b: dict, cost=None, prefill_lens=(), batched_tokens: int = 2048) -> dict:
    """The throughput model's figures for this run's even placement under uniform routing
    (vllm_fiddler/throughput.py): MoE time only, no attention or engine overhead, no
    re-placement; `cost` is the engine's calibrated cost model where its cache has one
    (cost_model.cache_dir()), else the prior for the shape."""
    from vllm_fiddler.cost_model import default_for_shape
    from vllm_fiddler.placement import plan_even
    from vllm_fiddler.throughput import StepModel

    shape = moe_shape(shape_name, layers)
    cost = cost or default_for_shape(shape.hidden_size, shape.intermediate_size, 2)
    gpu = round(b["resident_share"] * shape.num_layers * shape.num_experts)
    model = StepModel(cost, plan_even(shape.num_layers, shape.num_experts, gpu).gpu_experts,
                      (tuple([1.0] * shape.num_experts),) * shape.num_layers, shape.top_k)
    return {"cost_model": cost.machine, "gpu_hit_rate": model.hit_rate(), "decode_tok_s": model.decode_tok_s(1),
            "ttft_s": {str(n): model.ttft_s(n, batched_tokens) for n in prefill_lens}}


def calibrated_cost(shape_name: str, layers: int):
    """The newest cost model the engines calibrated for this shape, if any."""
    import glob

    from vllm_fiddler import cost_model

    shape = moe_shape(shape_name, layers)
    tag = cost_model.shape_tag(shape.hidden_size, shape.intermediate_size, 2)
    files = sorted(glob.glob(os.path.join(cost_model.cache_dir(), f"cost_model-*{tag}*.json")), key=os.path.getmtime)
    return cost_model.load(files[-1]) if files else None


def flat_rows(out: dict, vllm_version: str, commit: str | None) -> list[dict]:
    """One results_io row per system and figure: decode at each temperature, TTFT per length."""
    flat = []
    for r in out["rows"]:
        meta = dict(device=r.get("device"), vllm_version=vllm_version, command=out["command"], commit=commit)
        for name, fig in r.get("decode", {}).items():  # "t1", "t0"
            flat.append(results_io.row(r["system"], f"decode_batch1_temperature_{name[1:]}", fig["tok_s"], "tok/s",
                                       gpu_hit_rate=fig.get("gpu_hit_rate"),
                                       roofline_share=fig.get("roofline_share"), **meta))
        for n, seconds in r.get("ttft_s", {}).items():
            flat.append(results_io.row(r["system"], f"ttft_{n}_tokens", seconds, "s", **meta))
    return flat


def _bandwidth(script: str) -> dict | None:
    """host_bandwidth.py in its own process (it pins GiBs), 2 rounds of 2 s."""
    path = tempfile.mktemp(suffix=".json")
    try:
        subprocess.run([sys.executable, script, "--out", path, "--seconds", "2", "--rounds", "2"],
                       capture_output=True, timeout=120, check=True)
        with open(path) as f:
            return json.load(f)
    except Exception:  # noqa: BLE001 - a run without its bandwidth still has its rows
        return None


if __name__ == "__main__":
    main()
