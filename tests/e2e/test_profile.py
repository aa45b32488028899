"""``python -m vllm_fiddler.profile``: bad input (no engine), then one profiling run on the tiny Mixtral.

The engine test checks the counts exactly: with prefix caching off, each
request forwards its prompt tokens and all generated tokens but the last
(sampled, never fed back), and each forwarded token is routed to top_k
experts in every MoE layer. vLLM's warm-up and memory-profiling dummy runs
also pass through the experts; the tool subtracts them (a baseline read
right after the engine starts), so any leak would break the equality.
"""

from __future__ import annotations

import json
import random
import re

import pytest

from vllm_fiddler.placement import GIB, plan_from_popularity
from vllm_fiddler.profile import experts_for_budget, main, random_prompts

TINY_EXPERT_BYTES = 3 * 128 * 192 * 2  # tiny Mixtral: H=128, I=192, bf16


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def run_main(argv, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ------------------------------------------------------------ no engine
@pytest.mark.parametrize("rows, words", [
    ([], ["has no prompts"]),
    (["", "   "], ["has no prompts"]),
    ([{"prompt": "hi"}, "{oops"], [":2:", "not valid JSON"]),
    ([{"text": "hi"}], [":1:", "exactly one of"]),
    ([{"prompt": "hi", "prompt_token_ids": [1]}], ["exactly one of"]),
    ([{"prompt": ""}], ["non-empty string"]),
    ([{"prompt_token_ids": []}], ["non-empty list"]),
    ([{"prompt_token_ids": [1, -2]}], ["token ids"]),
    ([[1, 2]], ["expected an object"]),
])
def test_bad_prompts_file(tmp_path, capsys, rows, words):
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    rc, _, err = run_main(["--model", "unused", "--prompts", prompts, "--budget-experts", 4,
                           "--out-popularity", tmp_path / "pop.json",
                           "--out-placement", tmp_path / "pl.json"], capsys)
    assert rc == 2
    for w in words:
        assert w in err
    assert not (tmp_path / "pl.json").exists()


def test_missing_prompts_file(tmp_path, capsys):
    rc, _, err = run_main(["--model", "unused", "--prompts", tmp_path / "nope.jsonl", "--budget-experts", 4,
                           "--out-popularity", tmp_path / "pop.json", "--out-placement", tmp_path / "pl.json"],
                          capsys)
    assert rc == 2 and "does not exist" in err


@pytest.mark.parametrize("extra, words", [
    (["--budget-experts", "-1"], ["--budget-experts", ">= 0"]),
    (["--budget-experts", "x"], ["--budget-experts"]),
    (["--gpu-expert-budget-gb", "-0.5"], ["--gpu-expert-budget-gb", ">= 0"]),
    (["--gpu-expert-budget-gb", "nan"], ["--gpu-expert-budget-gb"]),
    (["--budget-experts", "1", "--gpu-expert-budget-gb", "1"], ["not allowed with"]),
    ([], ["one of the arguments --budget-experts --gpu-expert-budget-gb is required"]),
])
def test_bad_budget(tmp_path, capsys, extra, words):
    with pytest.raises(SystemExit) as e:
        main(["--num-random-prompts", "2", "--model", "m", "--out-popularity", str(tmp_path / "a"),
              "--out-placement", str(tmp_path / "b"), *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err


@pytest.mark.parametrize("extra, words", [
    (["--additional-config", "{bad"], ["--additional-config is not valid JSON"]),
    (["--additional-config", "[1]"], ["must be a JSON object"]),
    (["--additional-config", '{"fiddler": {"bogus": 1}}'], ["unknown fiddler option", "bogus"]),
    (["--out-placement", "/nonexistent-dir/p.json"], ["folder does not exist"]),
])
def test_bad_options(tmp_path, capsys, extra, words):
    argv = ["--num-random-prompts", 2, "--model", "m", "--budget-experts", 1,
            "--out-popularity", tmp_path / "a", "--out-placement", tmp_path / "b", *extra]
    rc, _, err = run_main(argv, capsys)
    assert rc == 2
    for w in words:
        assert w in err


def test_needs_model_and_popularity_out(tmp_path, capsys):
    rc, _, err = run_main(["--num-random-prompts", 2, "--budget-experts", 1,
                           "--out-popularity", tmp_path / "a", "--out-placement", tmp_path / "b"], capsys)
    assert rc == 2 and "--model is required" in err
    rc, _, err = run_main(["--num-random-prompts", 2, "--model", "m", "--budget-experts", 1,
                           "--out-placement", tmp_path / "b"], capsys)
    assert rc == 2 and "--out-popularity is required" in err


def test_experts_for_budget():
    assert experts_for_budget(10 * 100 + 99, 100, 0) == 10
    assert experts_for_budget(10 * 100, 100, 2) == 8  # staging slots come out of the budget
    assert experts_for_budget(150, 100, 2) == 0
    assert experts_for_budget(0, 100, 2) == 0
    assert experts_for_budget(-5, 100, 0) == 0


def test_random_prompts():
    a = random_prompts(20, vocab_size=50, max_len=9, seed=3, exclude=range(6))
    assert a == random_prompts(20, vocab_size=50, max_len=9, seed=3, exclude=range(6))
    assert a != random_prompts(20, vocab_size=50, max_len=9, seed=4, exclude=range(6))
    lens = {len(p["prompt_token_ids"]) for p in a}
    assert lens <= set(range(4, 10)) and len(lens) > 1
    assert all(6 <= t < 50 for p in a for t in p["prompt_token_ids"])


def test_replan_from_popularity_file(tmp_path, capsys):
    """--from-popularity: no engine; a GB budget converts with the file's expert size."""
    counts = [[9, 1, 1, 5], [1, 8, 1, 1]]
    pop = tmp_path / "pop.json"
    pop.write_text(json.dumps({"model": "m", "num_layers": 2, "num_experts": 4, "tokens": counts,
                               "prompts": 3, "expert_bytes": 1024**2}))
    out = tmp_path / "pl.json"
    # 3.5 MiB of 1 MiB experts, 1 staging slot: 2 GPU experts
    rc, text, err = run_main(["--from-popularity", pop, "--gpu-expert-budget-gb", 3.5 / 1024,
                              "--staging-slots", 1, "--out-placement", out], capsys)
    assert rc == 0, err
    data = json.loads(out.read_text())
    assert data["gpu_experts"] == [[0], [1]]
    assert data["report"]["expected_hit_rate"] == pytest.approx(17 / 27)
    assert data["report"]["min_gpu_expert_budget_gb"] == pytest.approx(0.01)  # 3 MiB, rounded up
    assert "expected GPU hit rate 63.0%" in text
    rc, _, err = run_main(["--from-popularity", pop, "--budget-experts", 3, "--out-placement", out], capsys)
    assert rc == 0, err
    assert json.loads(out.read_text())["gpu_experts"] == [[0, 3], [1]]
    pop.write_text(json.dumps({"tokens": counts}))
    rc, _, err = run_main(["--from-popularity", pop, "--gpu-expert-budget-gb", 1, "--out-placement", out],
                          capsys)
    assert rc == 2 and "expert_bytes" in err


# ------------------------------------------------------------ one engine
TEXT_PROMPTS = ["the model is fast on the gpu", "hello world one two three four five six seven"]
ID_LENGTHS = [1, 5, 17, 33, 64, 90]
MAX_TOKENS = 6
BUDGET_EXPERTS = 5


@pytest.mark.slow
def test_profile_tiny_mixtral(tiny_mixtral, tmp_path, capsys):
    from transformers import AutoTokenizer

    import vllm_fiddler
    from vllm_fiddler.config import FiddlerConfig
    from vllm_fiddler.placement import MoEShape, load_placement_file, popularity_from_file, resolve_placement

    rng = random.Random(0)
    id_prompts = [[rng.randrange(6, 512) for _ in range(n)] for n in ID_LENGTHS]
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": t} for t in TEXT_PROMPTS]
                          + [{"prompt_token_ids": p, "id": i} for i, p in enumerate(id_prompts)])
    tok = AutoTokenizer.from_pretrained(tiny_mixtral)
    prompt_tokens = sum(len(tok.encode(t)) for t in TEXT_PROMPTS) + sum(ID_LENGTHS)
    n_prompts = len(TEXT_PROMPTS) + len(ID_LENGTHS)
    forwarded = prompt_tokens + n_prompts * (MAX_TOKENS - 1)

    pop_path, placement_path = tmp_path / "pop.json", tmp_path / "placement.json"
    # a GB budget worth 5.5 experts (exact in binary): 5 fit
    budget_gb = 5.5 * TINY_EXPERT_BYTES / GIB
    assert experts_for_budget(int(budget_gb * GIB), TINY_EXPERT_BYTES, 0) == BUDGET_EXPERTS
    rc, out, err = run_main([
        "--model", tiny_mixtral, "--prompts", prompts, "--max-tokens", MAX_TOKENS, "--ignore-eos",
        "--batch-size", 3, "--gpu-expert-budget-gb", repr(budget_gb), "--staging-slots", 0,
        "--out-popularity", pop_path, "--out-placement", placement_path,
        "--enforce-eager", "--max-model-len", 512, "--dtype", "bfloat16",
        "--additional-config", json.dumps({"fiddler": {"gpu_expert_budget_gb": 0}})], capsys)
    assert rc == 0, err[-3000:]

    # progress: one line per batch of 3
    assert len(re.findall(r"^batch \d/3: ", out, re.MULTILINE)) == 3, out
    warmup = re.search(r"engine start-up runs routed (\d+) \(token, expert\) pairs: not counted", out)
    assert warmup, out
    print(f"warm-up routed {warmup.group(1)} pairs (subtracted)")
    assert "note: routed" not in out  # the tool's own consistency check

    # popularity: exactly forwarded tokens x top_k per layer
    raw = json.loads(pop_path.read_text())
    assert {"model", "num_layers", "num_experts", "tokens", "prompts"} <= set(raw)
    pop = popularity_from_file(str(pop_path))
    assert (pop.model, pop.num_layers, pop.num_experts, pop.prompts) == (tiny_mixtral, 3, 8, n_prompts)
    assert pop.extra["top_k"] == 2 and pop.extra["expert_bytes"] == TINY_EXPERT_BYTES
    assert pop.extra["prompt_tokens"] == prompt_tokens
    assert pop.extra["generated_tokens"] == n_prompts * MAX_TOKENS
    assert pop.extra["forwarded_tokens"] == forwarded
    assert [sum(layer) for layer in pop.tokens] == [forwarded * 2] * 3
    assert all(c >= 0 for layer in pop.tokens for c in layer)

    # placement: the plan of those counts, loadable, reported
    placement, report = plan_from_popularity(pop.tokens, BUDGET_EXPERTS)
    assert load_placement_file(str(placement_path), 3, 8) == placement
    assert placement.num_gpu == BUDGET_EXPERTS
    data = json.loads(placement_path.read_text())
    assert data["report"]["expected_hit_rate"] == pytest.approx(report.expected_hit_rate)
    assert data["report"]["even_hit_rate"] == pytest.approx(report.even_hit_rate)
    assert report.expected_hit_rate >= report.even_hit_rate
    assert report.text().splitlines()[0] in out

    # ... and accepted by vLLM's config path (no second engine), fitting the reported budget
    from vllm.engine.arg_utils import EngineArgs

    vllm_fiddler.register()
    fiddler = {"placement": str(placement_path), "gpu_expert_budget_gb": data["report"]["min_gpu_expert_budget_gb"]}
    cfg = EngineArgs(model=tiny_mixtral, model_impl="fiddler", max_model_len=512,
                     additional_config={"fiddler": fiddler}).create_engine_config()
    fcfg = FiddlerConfig.from_additional_config(cfg.additional_config)
    assert fcfg.placement == str(placement_path)
    shape = MoEShape.from_hf_config(cfg.model_config.hf_config, cfg.model_config.dtype.itemsize)
    assert shape.expert_bytes == TINY_EXPERT_BYTES
    assert resolve_placement(fcfg, shape, int(fcfg.gpu_expert_budget_gb * GIB))[0] == placement
