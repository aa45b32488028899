"""End-to-end scenarios of fiddler against stock vLLM offload (issue 5 item 3).

Mixtral-8x7B shapes with `--layers` of its 32 layers, `--load-format dummy`,
gpu_memory_utilization 0.30 (a 24 GB GPU on an 80 GB H100) and the GPU budgets
of benchmarks/gpu_e2e.py, whose helpers this script imports. Every system runs
in its own process (one engine start serves all its offline scenarios; the
serve scenarios start `vllm serve` in a second one), so one system's pinned
memory is gone before the next starts.

On the H100 machine, from a directory other than the repository root (the
repository's vllm_fiddler/ folder would shadow the installed package):

    source .gpu/install.sh
    R=$PWD; cd /tmp
    python3 $R/benchmarks/e2e.py --out $OUT/e2e-h100.json --eager --skew 0 \
        --systems fiddler --scenarios decode,prefill_2048

A device command may run 10 minutes at most, so a full run (8 layers) is
several commands, each adding to the same JSON with --merge: before each,
copy the JSON so far to $OUT (`cp $R/benchmarks/results/e2e-h100.json $OUT/`
once the previous one is back in the repository). The first measures the
host's DRAM / PCIe bandwidth, alone and at once (~40 s); --merge keeps it. Measured wall times
(8 layers): an engine start 45-120 s (fiddler's includes compiling its MoE
kernels, 5-15 s); fiddler's offline scenarios ~165 s in all, stock UVA
experts' ~265 s; beam search, two searches per width of 32 tokens, 5-20 s
each; serving: fiddler c8 + c1 ~240 s, c32 ~110 s; stock UVA experts c1 + c8
~400 s, c32 ~230 s; stock prefetch c32 ~360 s, c8 + c1 ~500 s.

    S=decode,prefill_512,prefill_2048,prefill_8192,beam_4,beam_8,beam_16
    E="python3 $R/benchmarks/e2e.py --out $OUT/e2e-h100.json --merge --eager"
    P=decode,prefill_512,prefill_2048,prefill_8192
    $E --skew 0 --systems fiddler --scenarios $S --decode-tokens 128 --beam-tokens 32 --system-timeout 555
    $E --skew 0 --systems stock_uva_experts --scenarios $S --decode-tokens 128 --beam-tokens 32 \
        --system-timeout 560
    $E --skew 0 --systems stock_prefetch --scenarios $S --decode-tokens 128 --beam-tokens 32 --system-timeout 560
    $E --skew 0 --systems stock_uva_all --scenarios $S --decode-tokens 128 --beam-tokens 32 --system-timeout 560
    $E --skew 0 --systems stock_uva_experts_coalesced --scenarios beam_4,beam_8,beam_16 --beam-tokens 32 \
        --system-timeout 280
    $E --skew 0 --systems fiddler_prefetch_memory,fiddler_gpu25,fiddler_gpu0,fiddler_gpu50 \
        --scenarios $P --decode-tokens 128 --system-timeout 165
    $E --skew 30 --systems fiddler,fiddler_static,stock_uva_experts --scenarios decode,prefill_2048 \
        --decode-tokens 128 --warmup-tokens 1024 --system-timeout 260
    # serving: one command per system and group, each under 10 minutes
    $E --skew 0 --systems fiddler --scenarios serve_c32,serve_c8,serve_c1 --system-timeout 500
    $E --skew 0 --systems stock_uva_experts --scenarios serve_c32 --system-timeout 380
    $E --skew 0 --systems stock_uva_experts --scenarios serve_c1,serve_c8 --system-timeout 470
    $E --skew 0 --systems stock_prefetch --scenarios serve_c32 --system-timeout 565
    $E --skew 0 --systems stock_prefetch --scenarios serve_c8,serve_c1 --system-timeout 570
    $E --skew 0 --systems stock_uva_all --scenarios serve_c32 --system-timeout 570
    # beams with the engine core in the LLM's process (run uniform_in_process): ~4 min each
    B="$E --skew 0 --engine-in-process --scenarios beam_4,beam_8,beam_16 --beam-tokens 32"
    $B --systems fiddler --system-timeout 240
    $B --systems stock_uva_experts --system-timeout 310
    $B --systems stock_uva_all --system-timeout 290

On a CPU machine (plumbing only, ~4 minutes on 2 cores):

    .venv/bin/python benchmarks/e2e.py --tiny --scenarios decode,prefill_512,beam_4 \
        --out /tmp/e2e-tiny.json

Systems: fiddler (gpu_e2e's budget: the share of experts a whole
Mixtral-8x7B keeps on a 24 GB GPU), fiddler_gpu0 / _gpu25 / _gpu50 (0, 25, 50 %
of the experts' bytes on the GPU), fiddler_prefetch_memory (fiddler with the
expert memory stock_prefetch holds: stock_prefetch's settings exceed the shared budget, since
its resident layers plus its prefetch buffers are 3/8 of the experts),
stock_uva_all, stock_uva_experts, stock_prefetch (stock vLLM 0.26 offload at
the same gpu_memory_utilization; stock_prefetch holds 1.9x the expert budget
with 8 layers), stock_prefetch_budget (prefetch offload within the budget:
gpu_e2e.prefetch_within_budget), stock_uva_experts_coalesced (stock_uva_experts
with fiddler's arrival-coalescing scheduler, `--scheduler-cls
vllm_fiddler.plugin.CoalescingScheduler`, which fiddler rows get by default:
beam steps then run as one engine step on both sides, so beam ratios measure
the MoE layer, not the scheduler; counted as a stock system in the ratios,
the conservative choice); `--tiny`: the tiny
random Mixtral on vLLM's CPU platform, fiddler vs stock, to prove the plumbing.

Figures (JSON `scenarios` / `scenarios_skewed`: scenario -> system -> figure):
  decode        tokens/s at batch 1: N / (time(1 + N tokens) - time(1 token)),
                N = --decode-tokens, 32-token prompt;
  prefill_<n>   time to first token (s) of an n-token prompt, best of 2;
  beam_<w>      LLM.beam_search width w, 32-token prompt, --beam-tokens
                tokens: tokens of the best beam per second (max_tokens / s),
                best of BEAM_REPS searches (`beam_reps_tok_s` has each);
  serve_c<c>    `vllm bench serve` output tokens/s, random dataset, at most c
                requests in flight.
`ratios_vs_best_stock`: fiddler / best stock system; for prefill (lower is
better) best stock / fiddler, so > 1 means fiddler is faster everywhere.
`roofline_decode_tok_s`: batch-1 decode bound of the `fiddler` row: each layer
reads its cold experts once per token, cold bytes = layers * top_k *
(1 - gpu_hit_rate) * expert bytes, split between CPU compute and DMA, both
reading host DRAM; moved at the most host DRAM delivered with the CPU and
the PCIe DMA reading at once (`host_read_together_gb_s`, measured in this
run by host_bandwidth.measure; with --bandwidth-per-row, measured again
right before and after each fiddler decode row's engine, the higher of the
two for that row); `_independent`:
at CPU read + PCIe H2D as if they did not share DRAM; `_dram_bound`: at the
CPU's read alone (see roofline()).
`FIDDLER_DUMMY_ROUTER_SKEW=<strength>` (vllm_fiddler/synthetic.py) skews every
MoE gate of the dummy weights, for stock and fiddler alike: `--skew`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_e2e
import serve_load

GIB = gpu_e2e.GIB
PREFILL_LENS = (512, 2048, 8192)
BEAM_WIDTHS = (4, 8, 16)
CONCURRENCIES = (1, 8, 32)
SCENARIOS = (["decode"] + [f"prefill_{n}" for n in PREFILL_LENS] + [f"beam_{w}" for w in BEAM_WIDTHS]
             + [f"serve_c{c}" for c in CONCURRENCIES])
LOWER_IS_BETTER = {f"prefill_{n}" for n in PREFILL_LENS}
PROMPT_LEN = 32  # decode and beam prompts
BEAM_REPS = 2  # beam searches per width (see beam_scenario)
# the 8192-token prompt plus its generated tokens; chunked prefill splits it
# into gpu_e2e's 2048-token batches
MAX_MODEL_LEN = 8192 + 64
# beam width 16 asks for 2 * 16 logprobs per step (vLLM's default cap is 20),
# and 16 beams / 32 serve requests should be batched in one step. Prefix
# caching on (vLLM's default): LLM.beam_search submits every beam's whole
# sequence at each step, and without the cache each step re-prefills them all
# (stock beam search then ran > 135 s for 32 tokens). Every prompt here is
# fresh random tokens, so no TTFT run hits the cache.
ENGINE = {**gpu_e2e.ENGINE, "max_model_len": MAX_MODEL_LEN, "max_num_seqs": 32, "max_logprobs": 32,
          "enable_prefix_caching": True}
TINY_MAX_MODEL_LEN = 4096  # the tiny config's max_position_embeddings
TINY_ENGINE = dict(max_model_len=TINY_MAX_MODEL_LEN, enable_prefix_caching=False, max_num_seqs=32,
                   max_logprobs=32, seed=0, enforce_eager=True)
TINY_EXPERT_BUDGET_GB = serve_load.TINY_EXPERT_BUDGET_GB  # some experts on each side
GPU_SYSTEMS = ("fiddler", "fiddler_static", "fiddler_gpu0", "fiddler_gpu25", "fiddler_gpu50",
               "fiddler_prefetch_memory", "stock_uva_all", "stock_uva_experts", "stock_prefetch",
               "stock_prefetch_budget", "stock_uva_experts_coalesced")
# stock systems holding more expert memory than the budget (gpu_e2e.STOCK_PREFETCH: 3/8 of
# the experts with 8 layers, 1.9x the budget): in `ratios_vs_best_stock`, which is the
# conservative figure, but not in `ratios_vs_best_stock_same_budget`, the comparison
OVER_BUDGET_SYSTEMS = {"stock_prefetch"}
BANDWIDTH_KEYS = ("dram_read_gb_s", "pcie_h2d_gb_s", "host_read_together_gb_s")
ROOFLINE_KEYS = ("roofline_decode_tok_s", "roofline_decode_tok_s_independent", "roofline_decode_tok_s_dram_bound")
TINY_SYSTEMS = ("fiddler", "stock")


# ---------------------------------------------------------------- systems
def gpu_system_kwargs(name: str, layers: int, gpu_total_gib: float, eager: bool) -> dict:
    """LLM kwargs (besides model) of one system on the GPU, at gpu_e2e's budget.

    fiddler_gpu<p> keeps p % of the experts' bytes on the GPU; where that and
    the rest do not fit at UTIL, gpu_memory_utilization is raised for that
    system only (the JSON row records it).
    """
    util = gpu_e2e.UTIL
    if name.startswith("fiddler_gpu") or name == "fiddler_prefetch_memory":
        experts, other = gpu_e2e.mixtral_bytes(layers)
        share = (prefetch_expert_share() if name == "fiddler_prefetch_memory"
                 else int(name[len("fiddler_gpu"):]) / 100)
        budget = round(experts * share, 2)
        kw = dict(model_impl="fiddler", additional_config={"fiddler": {
            "gpu_expert_budget_gb": budget, "kv_cache_reserve_gb": gpu_e2e.KV_RESERVE_GIB}})
        need = (budget + other + gpu_e2e.KV_RESERVE_GIB + 1.0) / gpu_total_gib  # 1 GiB: CUDA context etc.
        util = max(util, math.ceil(need * 20) / 20)
    else:
        kw = dict(gpu_e2e.systems(layers, gpu_total_gib)[name])
    return {**ENGINE, "load_format": "dummy", "gpu_memory_utilization": util, "enforce_eager": eager, **kw}


def prefetch_expert_share() -> float:
    """Share of the experts' bytes stock_prefetch holds on the GPU: its resident
    layers plus the buffers its prefetch copies into (one layer per prefetch step)."""
    kw = gpu_e2e.STOCK_PREFETCH
    group, offloaded, ahead = kw["offload_group_size"], kw["offload_num_in_group"], kw["offload_prefetch_step"]
    return (group - offloaded + ahead) / group


def tiny_system_kwargs(name: str) -> dict:
    kw = {"stock": dict(model_impl="auto"),
          "fiddler": dict(model_impl="fiddler",
                          additional_config={"fiddler": {"gpu_expert_budget_gb": TINY_EXPERT_BUDGET_GB}})}[name]
    # dummy weights, so that --skew's router hook applies here too
    return {**TINY_ENGINE, "load_format": "dummy", **kw}


def cli_flags(kwargs: dict) -> list[str]:
    """LLM kwargs as `vllm serve` flags (sets: nargs='+', dicts: JSON, False: --no-)."""
    flags = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + flag[2:])
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        elif isinstance(value, (set, list, tuple)):
            flags += [flag, *sorted(value)]
        else:
            flags += [flag, str(value)]
    return flags


def jsonable(kwargs: dict) -> dict:
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in kwargs.items()}


# -------------------------------------------------------------- scenarios
def random_prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100 if vocab > 1000 else 6, vocab) for _ in range(n)]


def decode_scenario(llm, rng, vocab: int, tokens: int, is_fiddler: bool) -> tuple[float, dict]:
    """(tokens/s, fiddler counter deltas over the measurement) at batch 1."""
    before = gpu_e2e.fiddler_stats(llm) if is_fiddler else {}
    t1 = gpu_e2e.time_generate(llm, [random_prompt(rng, PROMPT_LEN, vocab)], 1)
    tn = gpu_e2e.time_generate(llm, [random_prompt(rng, PROMPT_LEN, vocab)], 1 + tokens)
    after = gpu_e2e.fiddler_stats(llm) if is_fiddler else {}
    return tokens / max(tn - t1, 1e-9), (after, before)


def prefill_scenario(llm, rng, vocab: int, n: int) -> list[float]:
    """Seconds to the first token of two fresh n-token prompts (the figure is the min)."""
    return [gpu_e2e.time_generate(llm, [random_prompt(rng, n, vocab)], 1) for _ in range(2)]


def beam_scenario(llm, rng, vocab: int, width: int, tokens: int) -> list[float]:
    """Best-beam tokens/s of BEAM_REPS beam searches of fresh prompts (the figure is the max).

    Every step of a beam search is a batch of `width` requests whose uncached
    tails (prefix caching works in 16-token blocks) make steps of ~1-16 tokens
    per beam: token counts that decode and prefill never run. The first search
    of a width may therefore meet kernel configs a system has not compiled
    yet (stock vLLM's fused MoE compiles per tile config too); the best of two
    is the steady state."""
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import BeamSearchParams

    params = BeamSearchParams(beam_width=width, max_tokens=tokens, ignore_eos=True)
    reps = []
    for _ in range(BEAM_REPS):
        start = time.perf_counter()
        llm.beam_search([TokensPrompt(prompt_token_ids=random_prompt(rng, PROMPT_LEN, vocab))], params)
        reps.append(tokens / (time.perf_counter() - start))
    return reps


def serve_prompts(args, concurrency: int) -> int:
    """--serve-prompts at the highest concurrency, 8 per slot below it (c1 at
    256 x 64 tokens would take ~12 minutes at fiddler's batch-1 speed)."""
    return min(args.serve_prompts, 8 * concurrency)


def serve_scenarios(args, row: dict, model: str, kwargs: dict, scenarios: list[str], save) -> None:
    from vllm_fiddler.serving import VllmServer

    flags = [model, "--served-model-name", serve_load.SERVED_NAME, *cli_flags(kwargs)]
    row["serve_args"] = shlex.join(["vllm", "serve", *flags])
    work = tempfile.mkdtemp(prefix="e2e-serve-")
    t0 = time.perf_counter()
    with VllmServer(flags, timeout_s=args.system_timeout, env=serve_load.OFFLINE_ENV) as server:
        row["serve_startup_s"] = time.perf_counter() - t0
        for scenario in scenarios:
            c = int(scenario[len("serve_c"):])
            bench = argparse.Namespace(input_len=args.serve_input_len, output_len=args.serve_output_len,
                                       num_prompts=serve_prompts(args, c), max_concurrency=c,
                                       bench_timeout=args.system_timeout)
            result_dir = os.path.join(work, scenario)
            os.makedirs(result_dir)
            _, result, tail = serve_load.bench_serve(bench, server, model, result_dir)
            if result.get("completed") == bench.num_prompts and "output_throughput" in result:
                row["scenarios"][scenario] = result["output_throughput"]
                row.setdefault("serve", {})[scenario] = {"requests": bench.num_prompts,
                                                         **serve_load.bench_summary(result)}
            else:
                row["errors"][scenario] = f"vllm bench serve: {result.get('failed', '?')} failed\n{tail[-1500:]}"
            save()


def offline_scenarios(args, row: dict, model: str, kwargs: dict, scenarios: list[str], save) -> None:
    from vllm import LLM

    vocab = 512 if args.tiny else 32000
    t0 = time.perf_counter()
    llm = LLM(model=model, **kwargs)
    row["load_s"] = time.perf_counter() - t0
    rng = random.Random(0)
    # warm-up; a long one (--warmup-tokens) stands for a server that has been
    # running, so that online re-placement has seen the routing
    t0 = time.perf_counter()
    gpu_e2e.time_generate(llm, [random_prompt(rng, PROMPT_LEN, vocab)], args.warmup_tokens)
    row["warmup_s"], row["warmup_tokens"] = time.perf_counter() - t0, args.warmup_tokens
    save()
    is_fiddler = kwargs.get("model_impl") == "fiddler"
    if is_fiddler:
        row["kernel_warmup"] = {k: gpu_e2e.fiddler_stats(llm).get(k) for k in
                                ("kernel_warmup_s", "kernel_warmup_configs")}
    for scenario in scenarios:
        try:
            kind, _, n = scenario.partition("_")
            if kind == "decode":
                row["decode_tokens"] = args.decode_tokens
                row["scenarios"]["decode"], (after, before) = decode_scenario(
                    llm, rng, vocab, args.decode_tokens, is_fiddler)
                if after:
                    from vllm_fiddler.stats import step_breakdown

                    row["fiddler"] = step_breakdown(after, before)
            elif kind == "prefill":
                reps = prefill_scenario(llm, rng, vocab, int(n))
                row["scenarios"][scenario] = min(reps)
                row.setdefault("prefill_reps_s", {})[scenario] = reps
            else:
                row["beam_tokens"] = args.beam_tokens
                before = gpu_e2e.fiddler_stats(llm) if is_fiddler else {}
                reps = beam_scenario(llm, rng, vocab, int(n), args.beam_tokens)
                row["scenarios"][scenario] = max(reps)
                row.setdefault("beam_reps_tok_s", {})[scenario] = reps
                if is_fiddler:
                    from vllm_fiddler.stats import step_breakdown

                    breakdown = step_breakdown(gpu_e2e.fiddler_stats(llm), before, prefix="")
                    # > 1: the engine core started a step before every beam had arrived
                    breakdown["engine_steps_per_beam_step"] = breakdown["steps_measured"] / (
                        len(reps) * args.beam_tokens)
                    row.setdefault("fiddler_beam", {})[scenario] = breakdown
        except Exception as e:  # noqa: BLE001 - one failed scenario must not lose the others
            row["errors"][scenario] = f"{type(e).__name__}: {e}"[-1500:]
        save()


def run_system(args) -> None:
    """Child process: one system, one group of scenarios (offline or serve); rewrites
    --system-out after every scenario, so a timeout keeps what was measured."""
    from vllm_fiddler.tiny import build_mixtral_8x7b_shapes, build_tiny_mixtral

    if args.tiny:
        model = build_tiny_mixtral(tempfile.mkdtemp(prefix="tiny-"))
        kwargs = tiny_system_kwargs(args.run_system)
    else:
        import torch

        model = build_mixtral_8x7b_shapes(tempfile.mkdtemp(prefix="m8x7b-"), args.layers)
        kwargs = gpu_system_kwargs(args.run_system, args.layers, args.gpu_gib or torch.cuda.mem_get_info()[1] / GIB,
                                   args.eager)
    if args.fiddler_options and kwargs.get("model_impl") == "fiddler":
        options = kwargs["additional_config"] = dict(kwargs.get("additional_config", {}))
        options["fiddler"] = {**options.get("fiddler", {}), **json.loads(args.fiddler_options)}
    row = {"system": args.run_system, "kwargs": jsonable(kwargs), "scenarios": {}, "errors": {}}

    def save():
        write_json(args.system_out, row)

    scenarios = args.scenarios.split(",")
    if scenarios[0].startswith("serve_"):
        serve_scenarios(args, row, model, kwargs, scenarios, save)
    else:
        offline_scenarios(args, row, model, kwargs, scenarios, save)
    save()


# -------------------------------------------------------------- bandwidth
def measure_bandwidth(out_path: str) -> None:
    """Child process (so the parent holds no CUDA context or pinned memory):
    host_bandwidth.measure(): the CPU's DRAM read (fiddler's stream-read kernel
    when built, else torch.sum), pinned H2D, each alone and both at once."""
    import host_bandwidth

    write_json(out_path, host_bandwidth.measure(seconds=2.0, cpu_gib=8.0, rounds=3))


def roofline(row: dict, out: dict) -> dict:
    """Batch-1 decode bounds (tok/s) of a fiddler row, from its GPU hit rate.

    A token reads each layer's cold experts once, cold bytes = layers * top_k *
    (1 - hit rate) * expert bytes, by CPU compute or DMA, both from host DRAM.
    `roofline_decode_tok_s` moves them at the most host DRAM delivered, with the
    CPU and the DMA reading at once or either alone if that was more, in the
    measurements right before and after this row's engine where there are any,
    else the JSON's. The host's bandwidth drifts by more than 10% over minutes:
    each figure is the higher of the two, as each is already the best of its
    rounds (one engine had 121.6 GB/s together right after it,
    141.4-143.6 after the machine's two engines before it). `_independent`
    adds the two links' solo figures, as if they did not share DRAM (not
    reachable here: `host_read_together_gb_s` is far below that sum);
    `_dram_bound` is the CPU's read alone."""
    hit = row.get("fiddler", {}).get("gpu_hit_rate")
    # the bandwidth measured around this row's engine (--bandwidth-per-row), else the JSON's
    around = [m for m in (row.get("host_bandwidth_before"), row.get("host_bandwidth_after"))
              if m and all(m.get(k) for k in BANDWIDTH_KEYS)]
    source = {k: max(m[k] for m in around) for k in BANDWIDTH_KEYS} if around else out
    dram, pcie, together = (source.get(k) for k in BANDWIDTH_KEYS)
    if hit is None or not dram or not pcie:
        return {}
    if out.get("tiny"):
        expert_bytes, n_layers, top_k = 3 * 128 * 192 * 2, 3, 2
    else:
        layers = out["layers"]
        expert_bytes, n_layers, top_k = gpu_e2e.mixtral_bytes(layers)[0] * GIB / (layers * 8), layers, 2
    cold = n_layers * top_k * (1 - hit) * expert_bytes
    if cold <= 0:
        return {}
    bounds = {"roofline_decode_tok_s_independent": (dram + pcie) * 1e9 / cold,
              "roofline_decode_tok_s_dram_bound": dram * 1e9 / cold}
    if together:
        bounds["roofline_decode_tok_s"] = max(together, dram, pcie) * 1e9 / cold
    return bounds


# ------------------------------------------------------------------ parent
def write_json(path: str, data: dict) -> None:
    """Atomic, so a kill mid-write leaves the previous version."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(f"{path}.tmp", path)


def run_child(cmd: list[str], env: dict, timeout: int) -> str | None:
    """None on success, else why not. A new session, so that a timeout kills the
    child's engine core and `vllm serve` too, not just the child."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"timed out after {timeout} s"
    return None if rc == 0 else f"exit {rc}"


IN_PROCESS_SUFFIX = "_in_process"


def run_key(skew: float, in_process: bool = False) -> str:
    return ("uniform" if skew == 0 else f"skew{skew:g}") + (IN_PROCESS_SUFFIX if in_process else "")


def system_rows(args, name: str, skew: float) -> dict:
    """Runs one system's scenario groups (offline, serve) in child processes; its row."""
    # FIDDLER_FAST_DUMMY_INIT: host-resident dummy weights (stock prefetch offload) filled at
    # copy speed, not by vLLM's serial host generator (vllm_fiddler/synthetic.py)
    env = {**os.environ, **serve_load.OFFLINE_ENV, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
           "FIDDLER_FAST_DUMMY_INIT": "1"}
    env.pop("FIDDLER_DUMMY_ROUTER_SKEW", None)
    if skew:
        env["FIDDLER_DUMMY_ROUTER_SKEW"] = f"{skew:g}"
    if args.tiny:
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    scenarios = args.scenarios.split(",")
    groups = [g for g in ([s for s in scenarios if not s.startswith("serve_")],
                          [s for s in scenarios if s.startswith("serve_")]) if g]
    row = {"system": name, "scenarios": {}, "errors": {}}
    for group in groups:
        path = tempfile.mktemp(suffix=f"-{name}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--run-system", name, "--system-out", path,
               "--scenarios", ",".join(group)] + child_flags(args)
        # the LLM's engine core in the LLM's process (offline groups; `vllm serve` keeps its own)
        in_process = args.engine_in_process and not group[0].startswith("serve_")
        failure = run_child(cmd, {**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if in_process else env,
                            args.system_timeout)
        part = {"scenarios": {}, "errors": {}}
        if os.path.exists(path):
            with open(path) as f:
                part = json.load(f)
        for s in group:
            if s not in part["scenarios"] and s not in part["errors"]:
                part["errors"][s] = failure or "not measured"
        row["scenarios"].update(part.pop("scenarios"))
        row["errors"].update(part.pop("errors"))
        row.update(part)
    return row


def child_flags(args) -> list[str]:
    flags = ["--layers", str(args.layers), "--decode-tokens", str(args.decode_tokens),
             "--warmup-tokens", str(args.warmup_tokens),
             "--beam-tokens", str(args.beam_tokens), "--serve-prompts", str(args.serve_prompts),
             "--serve-input-len", str(args.serve_input_len), "--serve-output-len", str(args.serve_output_len),
             "--system-timeout", str(args.system_timeout)]
    return (flags + (["--tiny"] if args.tiny else []) + (["--eager"] if args.eager else [])
            + (["--gpu-gib", str(args.gpu_gib)] if args.gpu_gib else [])
            + (["--fiddler-options", args.fiddler_options] if args.fiddler_options else []))


def merge_row(old: dict, new: dict) -> dict:
    """The new row's figures over the old one's; old scenarios not rerun stay."""
    rerun = set(new["scenarios"]) | set(new["errors"])
    merged = {**old, **{k: v for k, v in new.items() if k not in ("scenarios", "errors")}}
    for key in ("serve", "prefill_reps_s", "beam_reps_tok_s", "fiddler_beam"):  # per-scenario details: the old ones not rerun stay
        if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            merged[key] = {**old[key], **new[key]}
    merged["scenarios"] = {**old.get("scenarios", {}), **new["scenarios"]}
    merged["errors"] = {**{k: v for k, v in old.get("errors", {}).items() if k not in rerun}, **new["errors"]}
    return merged


def summarize(out: dict) -> None:
    """Top-level tables, ratios and rooflines from out['runs']."""
    skewed = sorted(k for k in out["runs"] if k.startswith("skew") and not k.endswith(IN_PROCESS_SUFFIX))
    for suffix, key in (("", "uniform"), ("_skewed", skewed[0] if skewed else None),
                        (IN_PROCESS_SUFFIX, "uniform" + IN_PROCESS_SUFFIX)):
        rows = out["runs"].get(key, {})
        if suffix == IN_PROCESS_SUFFIX and not rows:
            continue
        table = {s: {name: r["scenarios"][s] for name, r in rows.items() if s in r.get("scenarios", {})}
                 for s in SCENARIOS}
        if suffix == IN_PROCESS_SUFFIX:
            table = {s: figures for s, figures in table.items() if figures}
        out["scenarios" + suffix] = table
        out["ratios_vs_best_stock" + suffix] = ratios(table)
        out["ratios_vs_best_stock_same_budget" + suffix] = ratios(table, OVER_BUDGET_SYSTEMS)
        for row in rows.values():
            for k in ROOFLINE_KEYS:
                row.pop(k, None)
            row.update(roofline(row, out))
        fiddler = rows.get("fiddler", {})
        for k in ROOFLINE_KEYS:
            out[k + suffix] = fiddler.get(k)
    out["skew_of_scenarios_skewed"] = skewed[0] if skewed else None
    present = {k: {name: sorted(r.get("scenarios", {})) for name, r in rows.items()}
               for k, rows in out["runs"].items()}
    out["note"] = (f"{out['model']}; decode {out['decode_tokens']} tokens, beam {out['beam_tokens']} tokens, "
                   f"serve {out['serve_prompts']} requests at c32 (8 per concurrency slot below), input "
                   f"{out['serve_input_len']} / output {out['serve_output_len']} tokens; engines: "
                   f"{'enforce_eager' if out['eager'] else 'torch.compile + CUDA graphs'}, max_model_len "
                   f"{out['max_model_len']}, max_num_seqs 32, max_logprobs 32 (each row's kwargs has all). "
                   f"Measured (run -> system -> scenarios): {json.dumps(present)}. Figures: see the "
                   "module docstring of benchmarks/e2e.py; beam figures are output tokens of the best beam "
                   "per second (max_tokens / seconds).")


def ratios(table: dict, exclude: frozenset | set = frozenset()) -> dict:
    """fiddler / the best stock system per scenario (stock systems in `exclude` left out)."""
    out = {}
    for scenario, figures in table.items():
        stock = [v for k, v in figures.items() if k.startswith("stock") and k not in exclude]
        if "fiddler" not in figures or not stock:
            continue
        if scenario in LOWER_IS_BETTER:
            out[scenario] = min(stock) / figures["fiddler"]
        else:
            out[scenario] = figures["fiddler"] / max(stock)
    return out


def header(args, previous: dict) -> dict:
    from vllm_fiddler.cpuinfo import cpu_model_name

    command = shlex.join(["python3", *sys.argv])
    out = dict(previous)
    out.update({
        "command": previous["command"] + " ; " + command if previous.get("command") else command,
        "vllm_version": serve_load.installed_vllm_version(), "layers": 3 if args.tiny else args.layers,
        "tiny": args.tiny,
        "model": ("tiny random Mixtral (3 layers, 8 experts, top-2, H=128, bf16, dummy weights) on vLLM's "
                  "CPU platform" if args.tiny else
                  f"Mixtral-8x7B shapes, {args.layers} of 32 layers, dummy (random) weights, "
                  f"gpu_memory_utilization {gpu_e2e.UTIL} unless a row's kwargs say more; tokens/s scale "
                  f"~32/layers for the whole model"),
        "serve_prompts": args.serve_prompts, "serve_input_len": args.serve_input_len,
        "serve_output_len": args.serve_output_len, "eager": args.eager or args.tiny,
        "max_model_len": TINY_MAX_MODEL_LEN if args.tiny else MAX_MODEL_LEN,
        "cpu": f"{cpu_model_name()} ({os.cpu_count()} CPUs)",
    })
    # per-command settings: only a command that measures with them changes them (rows
    # record their own too)
    scenarios = args.scenarios.split(",")
    if "decode" in scenarios or "decode_tokens" not in out:
        out["decode_tokens"] = args.decode_tokens
    if any(s.startswith("beam_") for s in scenarios) or "beam_tokens" not in out:
        out["beam_tokens"] = args.beam_tokens
    out.setdefault("runs", {})
    return out


def bandwidth(args, out: dict) -> None:
    """DRAM / PCIe bandwidth of this host, once per JSON (kept by --merge)."""
    if args.tiny:
        out.update(dict.fromkeys(BANDWIDTH_KEYS), device=f"cpu + {out['cpu']}")
        return
    if all(out.get(k) for k in BANDWIDTH_KEYS):
        return
    bw = measured_bandwidth()
    if "bandwidth_error" in bw:
        out.update(dict.fromkeys(BANDWIDTH_KEYS), **bw)
        return
    out.update(bw, device=f"{bw['host_bandwidth']['device'].split(' + ')[0]} + {out['cpu']}")


def measured_bandwidth() -> dict:
    """BANDWIDTH_KEYS and the whole `host_bandwidth` record, measured now in a child
    process; or {"bandwidth_error": why}."""
    path = tempfile.mktemp(suffix="-bandwidth.json")
    failure = run_child([sys.executable, os.path.abspath(__file__), "--measure-bandwidth", path],
                        os.environ.copy(), 300)
    if failure:
        return {"bandwidth_error": failure}
    with open(path) as f:
        bw = json.load(f)
    return {"dram_read_gb_s": bw["cpu_read_gb_s"], "pcie_h2d_gb_s": bw["pcie_h2d_gb_s"],
            "host_read_together_gb_s": bw["together"]["sum_gb_s"], "host_bandwidth": bw}


# ------------------------------------------------------------------- plots
def plots(out: dict, plots_dir: str, stem: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        out["plots_note"] = "matplotlib not importable: no plots"
        return []
    os.makedirs(plots_dir, exist_ok=True)
    written = []

    def bars(path, groups: dict[str, dict[str, float]], ylabel, title, lines=()):
        systems = sorted({s for g in groups.values() for s in g}, key=system_order)
        if not systems:
            return
        fig, ax = plt.subplots(figsize=(min(14, max(6, 1.2 * len(systems) * len(groups))), 4.5))
        width = 0.8 / len(groups)
        for i, (label, figures) in enumerate(groups.items()):
            xs = [j + i * width for j, s in enumerate(systems) if s in figures]
            ax.bar(xs, [figures[s] for s in systems if s in figures], width, label=label)
        for value, label, style in lines:
            ax.axhline(value, color="k", linestyle=style, label=label)
        ax.set_xticks([j + width * (len(groups) - 1) / 2 for j in range(len(systems))], systems,
                      rotation=20, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    skew = out.get("skew_of_scenarios_skewed")
    decode = {"uniform router": out["scenarios"]["decode"]}
    if skew and out["scenarios_skewed"]["decode"]:
        decode[f"skewed router ({skew})"] = out["scenarios_skewed"]["decode"]
    lines = [(v, label, style) for v, label, style in (
        (out.get("roofline_decode_tok_s"), "fiddler roofline, uniform (host DRAM, CPU + DMA)", "--"),
        (out.get("roofline_decode_tok_s_skewed"), "fiddler roofline, skewed (host DRAM, CPU + DMA)", ":")) if v]
    bars(os.path.join(plots_dir, f"{stem}-decode.png"), {k: v for k, v in decode.items() if v},
         "tokens/s", "decode, batch 1", lines)
    beams = {f"width {w}": out["scenarios"][f"beam_{w}"] for w in BEAM_WIDTHS if out["scenarios"][f"beam_{w}"]}
    beams.update({f"width {w}, engine in-process": figures for w in BEAM_WIDTHS
                  if (figures := out.get("scenarios" + IN_PROCESS_SUFFIX, {}).get(f"beam_{w}"))})
    bars(os.path.join(plots_dir, f"{stem}-beam.png"), beams, "best-beam tokens/s", "beam search")

    prefill = {n: out["scenarios"][f"prefill_{n}"] for n in PREFILL_LENS if out["scenarios"][f"prefill_{n}"]}
    systems = sorted({s for f in prefill.values() for s in f}, key=system_order)
    if systems:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for s in systems:
            pts = [(n, f[s]) for n, f in prefill.items() if s in f]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("time to first token (s)")
        ax.set_title("prefill")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(plots_dir, f"{stem}-prefill.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def system_order(name: str):
    order = GPU_SYSTEMS + TINY_SYSTEMS
    return order.index(name) if name in order else len(order)


# -------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/e2e-h100.json")
    p.add_argument("--plots-dir", help="default: beside --out")
    p.add_argument("--layers", type=int, default=8, help="Mixtral-8x7B layers (32 = whole model)")
    p.add_argument("--systems", help=f"default: {','.join(GPU_SYSTEMS)} (tiny: {','.join(TINY_SYSTEMS)})")
    p.add_argument("--scenarios", default=",".join(s for s in SCENARIOS if not s.startswith("serve_")),
                   help=f"comma list of {','.join(SCENARIOS)} (serve_* only when named)")
    p.add_argument("--skew", default="0,30", help="router skew strengths, 0 = uniform (comma list)")
    p.add_argument("--decode-tokens", type=int, help="default 512 (tiny 16)")
    p.add_argument("--beam-tokens", type=int, help="default 64 (tiny 8)")
    p.add_argument("--warmup-tokens", type=int, default=4,
                   help="tokens decoded at batch 1 before any scenario (each system alike)")
    p.add_argument("--serve-prompts", type=int, default=256, help="requests at concurrency 32")
    p.add_argument("--serve-input-len", type=int, default=128)
    p.add_argument("--serve-output-len", type=int, default=64)
    p.add_argument("--eager", action="store_true", help="enforce_eager for every system (tiny: always)")
    p.add_argument("--gpu-gib", type=float, help="the GPU memory (GiB) the expert budgets are computed for "
                   "(default: this GPU's); 79.18 keeps the H100 80GB's budgets on a bigger card")
    p.add_argument("--fiddler-options", help="JSON of fiddler options (docs/options.md) over every fiddler row's own, "
                   "e.g. '{\"cpu_threads\": 14}'; the rows' kwargs record them")
    p.add_argument("--engine-in-process", action="store_true",
                   help="VLLM_ENABLE_V1_MULTIPROCESSING=0 for every system: generate() then adds all of "
                        "a beam step's requests before the engine steps; rows go to run '<run>_in_process'")
    p.add_argument("--system-timeout", type=int, default=540, help="seconds per system and scenario group")
    p.add_argument("--merge", action="store_true", help="keep what --out holds; (re)run only what is named")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny Mixtral, fiddler vs stock")
    p.add_argument("--run-system", help=argparse.SUPPRESS)
    p.add_argument("--system-out", help=argparse.SUPPRESS)
    p.add_argument("--bandwidth-per-row", action="store_true",
                   help="measure the host's DRAM / PCIe bandwidth again right before and after each fiddler "
                        "decode row's engine (~40 s each) and take that row's roofline from them: the VM's bandwidth "
                        "drifts by more than 10%% over minutes")
    p.add_argument("--measure-bandwidth", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.decode_tokens is None:
        args.decode_tokens = 16 if args.tiny else 512
    if args.beam_tokens is None:
        args.beam_tokens = 8 if args.tiny else 64
    if args.systems is None:
        args.systems = ",".join(TINY_SYSTEMS if args.tiny else GPU_SYSTEMS)
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.measure_bandwidth:
        measure_bandwidth(args.measure_bandwidth)
        return
    if args.run_system:
        run_system(args)
        return
    previous = {}
    if args.merge and os.path.exists(args.out):
        with open(args.out) as f:
            previous = json.load(f)
    out = header(args, previous)
    bandwidth(args, out)
    plots_dir = args.plots_dir or os.path.dirname(os.path.abspath(args.out))
    stem = os.path.splitext(os.path.basename(args.out))[0]
    for skew in (float(s) for s in args.skew.split(",")):
        key = run_key(skew, args.engine_in_process)
        runs = out["runs"].setdefault(key, {})
        for name in args.systems.split(","):
            t0 = time.perf_counter()
            fiddler_decode = name.startswith("fiddler") and not args.tiny and "decode" in args.scenarios.split(",")
            per_row = args.bandwidth_per_row and fiddler_decode
            before = measured_bandwidth() if per_row else None
            old, new = runs.get(name, {}), system_rows(args, name, skew)
            if fiddler_decode and "decode" in new["scenarios"]:
                # a new decode figure: an older row's measurements do not belong to it; with
                # --bandwidth-per-row its roofline takes the host as it was around it
                old = {k: v for k, v in old.items() if k not in ("host_bandwidth_before", "host_bandwidth_after")}
                if per_row:
                    new["host_bandwidth_before"], new["host_bandwidth_after"] = before, measured_bandwidth()
            row = merge_row(old, new)
            row["wall_s"] = time.perf_counter() - t0
            runs[name] = row
            summarize(out)
            write_json(args.out, out)
            print(json.dumps({"run": key, **{k: v for k, v in row.items() if k != "kwargs"}}),
                  flush=True)
    summarize(out)
    out["plots"] = plots(out, plots_dir, stem)
    write_json(args.out, out)
    print(json.dumps({k: out[k] for k in ("scenarios", "scenarios_skewed", "ratios_vs_best_stock",
                                          *ROOFLINE_KEYS, *BANDWIDTH_KEYS)},
                     indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
