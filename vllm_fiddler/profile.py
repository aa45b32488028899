"""Expert-popularity profiling and placement planning.

Runs prompts through ``LLM(model_impl="fiddler")``, reads how many tokens the
router sent to each (layer, expert), and writes

- a popularity file: ``{"model", "num_layers", "num_experts", "tokens": [[...] per
  layer], "prompts", ...}`` (plus how many tokens were forwarded, top_k, dtype and
  the expert size, so it can be re-planned for another budget without the model);
- a placement file for a GPU-expert budget, in fiddler's placement format
  ``{"gpu_experts": [[e, ...] per layer]}`` plus an informational "report"
  (fiddler reads only "gpu_experts").

    python -m vllm_fiddler.profile --model PATH --prompts prompts.jsonl \\
        --gpu-expert-budget-gb 16 --out-popularity pop.json --out-placement placement.json
    python -m vllm_fiddler.profile --from-popularity pop.json --budget-experts 40 \\
        --out-placement placement-40.json

Prompts JSONL: one object per line, ``{"prompt": "text"}`` or
``{"prompt_token_ids": [1, 2, ...]}``; other keys are ignored.

Counts are taken where the router picks experts, before placement, so the
placement used while profiling does not matter. The engine's own warm-up
and memory-profiling runs are subtracted (a baseline read right after the
engine starts), and prefix caching is off, so every prompt token counts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

from vllm_fiddler.config import FiddlerConfig, FiddlerConfigError
from vllm_fiddler.placement import (
    GIB,
    Popularity,
    format_bytes,
    plan_from_popularity,
    popularity_from_file,
    write_placement_file,
    write_popularity_file,
)

INSECURE_SERIALIZATION = "VLLM_ALLOW_INSECURE_SERIALIZATION"


class ProfileError(ValueError):
    """Bad input to the profiler; the message says what to change."""


# ------------------------------------------------------------------ inputs
def load_prompts(path: str) -> list[dict]:
    """Prompts JSONL -> vLLM prompt dicts (``{"prompt": str}`` or ``{"prompt_token_ids": [...]}``)."""
    if not os.path.isfile(path):
        raise ProfileError(f"prompts file {path!r} does not exist")
    prompts = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ProfileError(f"{where}: not valid JSON: {e}") from None
            if not isinstance(obj, dict):
                raise ProfileError(f"{where}: expected an object with \"prompt\" or \"prompt_token_ids\"")
            has_text, has_ids = "prompt" in obj, "prompt_token_ids" in obj
            if has_text == has_ids:
                raise ProfileError(f"{where}: give exactly one of \"prompt\" (text) or \"prompt_token_ids\"")
            if has_text:
                text = obj["prompt"]
                if not isinstance(text, str) or not text:
                    raise ProfileError(f"{where}: \"prompt\" must be a non-empty string")
                prompts.append({"prompt": text})
            else:
                ids = obj["prompt_token_ids"]
                if not isinstance(ids, list) or not ids or not all(
                        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                    raise ProfileError(
                        f"{where}: \"prompt_token_ids\" must be a non-empty list of token ids (integers >= 0)")
                prompts.append({"prompt_token_ids": ids})
    if not prompts:
        raise ProfileError(f"prompts file {path!r} has no prompts")
    return prompts


def random_prompts(n: int, vocab_size: int, max_len: int, seed: int = 0,
                   exclude: Sequence[int] = ()) -> list[dict]:
    """n prompts of uniformly random token ids, lengths uniform in [max(1, max_len // 2), max_len].

    A smoke test of the tool: random tokens route nearly uniformly, so the
    profile says little about a real workload.
    """
    banned = set(exclude)
    pool = [t for t in range(vocab_size) if t not in banned]
    if not pool:
        raise ProfileError("no token ids left to draw random prompts from")
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.choice(pool) for _ in range(rng.randint(max(1, max_len // 2), max_len))]}
            for _ in range(n)]


def experts_for_budget(budget_bytes: int, expert_bytes: int, staging_slots: int) -> int:
    """GPU-resident experts that fit `budget_bytes`, as fiddler counts at start-up.

    Staging slots for the weight-copy path come out of the same budget (CUDA only).
    """
    fit = max(0, budget_bytes) // expert_bytes
    return max(0, fit - min(staging_slots, fit))


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected an integer >= 1, got 0")
    return value


def _gb(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GB, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of GB >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vllm_fiddler.profile", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", metavar="FILE.jsonl", help="prompts to profile with (see above)")
    src.add_argument("--num-random-prompts", type=_positive_int, metavar="N",
                     help="profile with N prompts of random token ids (a smoke test)")
    src.add_argument("--from-popularity", metavar="POP.json",
                     help="no engine: plan from an existing popularity file")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-experts", type=_non_negative_int, metavar="N",
                        help="(layer, expert) pairs to keep on the GPU")
    budget.add_argument("--gpu-expert-budget-gb", type=_gb, metavar="G",
                        help="GPU memory for resident experts (GiB, as fiddler's gpu_expert_budget_gb); "
                             "converted with the expert size 3*hidden*intermediate*dtype bytes")
    p.add_argument("--staging-slots", type=_non_negative_int, default=None,
                   help="expert-sized staging slots fiddler takes from the GPU-expert budget when "
                        "serving (default: the staging_slots of --additional-config, 2 unless set, if CUDA "
                        "is available here; 0 on a machine without CUDA, as fiddler on vLLM's CPU platform)")
    p.add_argument("--out-popularity", metavar="POP.json", help="popularity file to write")
    p.add_argument("--out-placement", required=True, metavar="PLACEMENT.json",
                   help="placement file to write")
    p.add_argument("--model", help="model path or name (required unless --from-popularity)")
    p.add_argument("--max-tokens", type=_positive_int, default=32,
                   help="tokens generated per prompt (default 32)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    p.add_argument("--random-prompt-len", type=_positive_int, default=128,
                   help="random prompts are [len/2, len] tokens long (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=64,
                   help="prompts per llm.generate call; a progress line is printed after each")
    p.add_argument("--additional-config", default=None, metavar="JSON",
                   help="vLLM additional_config for the profiling engine, e.g. '{\"fiddler\": {...}}'")
    p.add_argument("--max-model-len", type=_positive_int, default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--dtype", default="auto")
    return p


# --------------------------------------------------------------- profiling
def _engine(args, additional_config: dict):
    from vllm import LLM

    kwargs: dict[str, Any] = {
        "model": args.model, "model_impl": "fiddler", "additional_config": additional_config,
        "dtype": args.dtype, "seed": args.seed, "enforce_eager": args.enforce_eager,
        # every prompt token must pass through the experts to be counted
        "enable_prefix_caching": False}
    if args.max_model_len is not None:
        kwargs["max_model_len"] = args.max_model_len
    if args.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    return LLM(**kwargs)


def _read_counts(llm) -> list[list[int]]:
    from vllm_fiddler.stats import expert_tokens

    return llm.apply_model(expert_tokens)[0]


def _sub(a: list[list[int]], b: list[list[int]]) -> list[list[int]]:
    return [[x - y for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]


def profile_prompts(llm, prompts: list[dict], *, max_tokens: int, ignore_eos: bool, batch_size: int,
                    log=None) -> tuple[list[list[int]], dict]:
    """Runs `prompts`, returns ([L][E] tokens routed per expert, token totals), engine warm-up excluded."""
    from vllm import SamplingParams

    log = log or (lambda msg: print(msg, flush=True))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos)
    baseline = _read_counts(llm)  # warm-up / memory-profiling dummy runs, not prompts
    log(f"engine start-up runs routed {sum(sum(r) for r in baseline)} (token, expert) pairs: not counted")
    last = baseline
    totals = {"prompt_tokens": 0, "generated_tokens": 0, "forwarded_tokens": 0}
    batches = (len(prompts) + batch_size - 1) // batch_size
    start = time.perf_counter()
    for b in range(batches):
        batch = prompts[b * batch_size:(b + 1) * batch_size]
        t0 = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        now = _read_counts(llm)
        routed = sum(sum(r) for r in _sub(now, last))
        last = now
        p_tok = sum(len(o.prompt_token_ids) for o in outs)
        g_tok = sum(len(o.outputs[0].token_ids) for o in outs)
        # the last generated token of each request is sampled, never forwarded
        fwd = p_tok + sum(max(0, len(o.outputs[0].token_ids) - 1) for o in outs)
        totals["prompt_tokens"] += p_tok
        totals["generated_tokens"] += g_tok
        totals["forwarded_tokens"] += fwd
        log(f"batch {b + 1}/{batches}: {len(batch)} prompts, {p_tok} prompt + {g_tok} generated tokens, "
            f"{routed} routed (token, expert) pairs, {time.perf_counter() - t0:.1f} s "
            f"(total {time.perf_counter() - start:.1f} s)")
    return _sub(last, baseline), totals


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


# -------------------------------------------------------------------- main
def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _main(args)
    except (ProfileError, FiddlerConfigError) as e:
        return _fail(str(e))


def _main(args) -> int:
    # -- everything that can be checked before an engine starts
    if args.from_popularity is None:
        if not args.model:
            raise ProfileError("--model is required to profile (or plan from --from-popularity)")
        if not args.out_popularity:
            raise ProfileError("--out-popularity is required when profiling")
    elif args.out_popularity:
        raise ProfileError("--out-popularity goes with profiling, not --from-popularity")
    try:
        additional = json.loads(args.additional_config) if args.additional_config else {}
    except json.JSONDecodeError as e:
        raise ProfileError(f"--additional-config is not valid JSON: {e}") from None
    if not isinstance(additional, dict):
        raise ProfileError("--additional-config must be a JSON object, e.g. '{\"fiddler\": {...}}'")
    fiddler_cfg = FiddlerConfig.from_additional_config(additional)
    for out in (args.out_popularity, args.out_placement):
        if out and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            raise ProfileError(f"cannot write {out!r}: its folder does not exist")
    prompts = load_prompts(args.prompts) if args.prompts else None

    # -- the popularity: profiled now, or read back
    if args.from_popularity is not None:
        pop = popularity_from_file(args.from_popularity)
        print(f"read {args.from_popularity}: {pop.num_layers} layers x {pop.num_experts} experts, "
              f"{pop.prompts} prompts", flush=True)
    else:
        pop = _profile(args, additional, prompts)
        write_popularity_file(args.out_popularity, pop)
        print(f"wrote popularity file {args.out_popularity}", flush=True)

    # -- budget -> number of GPU experts
    expert_bytes = pop.extra.get("expert_bytes")
    if not isinstance(expert_bytes, int) or expert_bytes <= 0:
        expert_bytes = None
    slots = args.staging_slots
    if slots is None:  # what fiddler will take from the budget when serving here
        slots = fiddler_cfg.staging_slots if _cuda_available() else 0
    if args.gpu_expert_budget_gb is not None:
        if expert_bytes is None:
            raise ProfileError(f"{args.from_popularity}: no \"expert_bytes\" to convert "
                               f"--gpu-expert-budget-gb with; use --budget-experts")
        n = experts_for_budget(int(args.gpu_expert_budget_gb * GIB), expert_bytes, slots)
        budget_info: dict[str, Any] = {"gpu_expert_budget_gb": args.gpu_expert_budget_gb}
        print(f"budget {args.gpu_expert_budget_gb} GiB / {format_bytes(expert_bytes)} per expert, "
              f"less {slots} staging slots: {n} GPU experts", flush=True)
    else:
        n = args.budget_experts
        budget_info = {"budget_experts": n}

    placement, report = plan_from_popularity(pop.tokens, n)
    extra: dict[str, Any] = {**budget_info, "staging_slots": slots, "model": pop.model}
    if expert_bytes is not None:
        extra["expert_bytes"] = expert_bytes
        # what to pass as gpu_expert_budget_gb when serving with this file
        # (the placed experts plus the staging slots, rounded up to 0.01 GiB)
        extra["min_gpu_expert_budget_gb"] = math.ceil(
            (report.num_gpu_experts + slots) * expert_bytes / GIB * 100) / 100
    extra["popularity"] = args.from_popularity or args.out_popularity
    write_placement_file(args.out_placement, placement, report, **extra)
    print(report.text())
    print(f"wrote placement file {args.out_placement}; serve with --additional-config "
          f"'{{\"fiddler\": {{\"placement\": \"{args.out_placement}\""
          + (f", \"gpu_expert_budget_gb\": {extra['min_gpu_expert_budget_gb']}" if "min_gpu_expert_budget_gb"
             in extra else "") + "}}'", flush=True)
    return 0


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _profile(args, additional: dict, prompts: list[dict] | None) -> Popularity:
    import gc

    from vllm_fiddler.placement import MoEShape

    # apply_model ships a function to the worker: vLLM needs this to pickle it
    # (set for the profiling run only, then put back as it was).
    saved = os.environ.get(INSECURE_SERIALIZATION)
    os.environ[INSECURE_SERIALIZATION] = "1"
    t0 = time.perf_counter()
    llm = None
    try:
        llm = _engine(args, additional)
        print(f"engine ready in {time.perf_counter() - t0:.1f} s", flush=True)
        mc = llm.model_config
        hf = mc.hf_config
        if prompts is None:
            tok = llm.get_tokenizer()
            prompts = random_prompts(args.num_random_prompts, mc.get_vocab_size(), args.random_prompt_len,
                                     seed=args.seed, exclude=getattr(tok, "all_special_ids", ()))
        counts, totals = profile_prompts(llm, prompts, max_tokens=args.max_tokens,
                                         ignore_eos=args.ignore_eos, batch_size=args.batch_size)
    finally:
        del llm
        gc.collect()
        if saved is None:
            os.environ.pop(INSECURE_SERIALIZATION, None)
        else:
            os.environ[INSECURE_SERIALIZATION] = saved
    shape = MoEShape.from_hf_config(hf, dtype_bytes=mc.dtype.itemsize)
    if len(counts) != shape.num_layers or any(len(r) != shape.num_experts for r in counts):
        raise ProfileError(f"the engine reported counts for {len(counts)} layers; the model has "
                           f"{shape.num_layers} layers of {shape.num_experts} experts")
    routed = [sum(r) for r in counts]
    expected = totals["forwarded_tokens"] * shape.top_k
    if any(r != expected for r in routed):
        print(f"note: routed (token, expert) pairs per layer {routed} differ from forwarded tokens x top_k "
              f"= {expected} (preempted requests recompute their tokens; async scheduling can run a step "
              f"past EOS): counts are what the experts computed", flush=True)
    return Popularity(
        tokens=tuple(tuple(r) for r in counts), model=args.model, prompts=len(prompts),
        extra={**totals, "top_k": shape.top_k, "max_tokens": args.max_tokens,
               "dtype": _dtype_name(mc.dtype), "expert_bytes": shape.expert_bytes})


if __name__ == "__main__":
    sys.exit(main())
