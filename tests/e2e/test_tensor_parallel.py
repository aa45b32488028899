"""Tensor parallelism on vLLM's CPU platform (two worker processes, one core each): each rank
holds its 1/2 shard of every expert, GPU-resident and host ones alike, and vLLM all-reduces the
ranks' MoE outputs as it does for its own experts.

Greedy runs of the tiny Mixtral in fp32 at --tensor-parallel-size 2, fiddler against stock
vLLM at the same size, on one placement with a layer all on the GPU, one all on the CPU and
one split: the same top-5 tokens with log-probabilities within 1e-3 nats at every position
(test_families.check_same_distributions; fp32 summation order moves them by ~1e-5, a wrong
shard or a missing or doubled reduction by whole nats).

Quantized checkpoints (AutoAWQ INT4, gpt-oss's MXFP4) at the same size in bf16: each rank
loads its share of every expert from the whole checkpoint tensors (vLLM's gpt-oss loader
shards MXFP4 itself), against stock vLLM at TP=2 on the dequantized
checkpoint, by test_quantized's criteria (greedy tokens equal up to a near tie, and
log-probabilities as close to HF's as stock's are).
"""

from __future__ import annotations

import gc
import json
import os

import pytest
import test_quantized

from helpers.families import FAMILIES, build_family
from test_families import check_as_close_to_hf_as_stock, check_same_distributions, check_tokens_close, prompts, top_n

pytestmark = pytest.mark.slow

TP = 2


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def generate(path: str, model_impl: str, fiddler: dict | None = None, dtype: str = "float32", logprobs: int = 5):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=path, model_impl=model_impl, dtype=dtype, tensor_parallel_size=TP, enforce_eager=True,
              max_model_len=512, max_num_batched_tokens=64, max_num_seqs=16, seed=0,
              # the CPU platform reserves this share of host memory per rank for the KV cache
              gpu_memory_utilization=0.15,
              additional_config={"fiddler": fiddler} if fiddler is not None else {})
    try:
        params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=logprobs, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts()], params)
        return [(list(o.outputs[0].token_ids), o.outputs[0].logprobs) for o in outs]
    finally:
        del llm
        gc.collect()


@pytest.mark.skipif(len(_cores()) < TP, reason=f"needs {TP} cores, one per rank")
def test_tensor_parallel_greedy_runs_match_stock_vllm(tmp_path, monkeypatch, caplog):
    # one core per rank: vLLM's CPU workers bind their threads to these (its automatic binding
    # wants a NUMA node per rank)
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(c) for c in _cores()[:TP]))
    fam = FAMILIES["mixtral"]
    path = build_family("mixtral", str(tmp_path / "model"))
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps(fam.placement()))
    stock = generate(path, "auto")
    ours = generate(path, "fiddler", {"placement": str(placement)})
    check_same_distributions(ours, stock, "mixtral at TP=2", atol=1e-3)


# the per-expert loader's path (AWQ's layout: repacked words, scales and zero points shared in
# one word) and gpt-oss's (vLLM shards the tensors); every layout's shares: test_quantized_layer
QUANTIZED = [("mixtral", "awq"), ("gpt_oss", "mxfp4")]


@pytest.mark.skipif(len(_cores()) < TP, reason=f"needs {TP} cores, one per rank")
@pytest.mark.parametrize("name, fmt", QUANTIZED, ids=[f"{n}-{f}" for n, f in QUANTIZED])
def test_tensor_parallel_quantized_experts_match_stock_on_the_dequantized_weights(name, fmt, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(c) for c in _cores()[:TP]))
    fam = FAMILIES[name]
    src = build_family(name, str(tmp_path / "src"))
    quantized, ref = test_quantized.WRITERS[fmt](src, str(tmp_path / fmt))
    placement = tmp_path / "placement.json"
    placement.write_text(json.dumps(fam.placement()))
    top = test_quantized.NEAR_TIE_TOP
    stock = generate(ref, "auto", dtype="bfloat16", logprobs=top)
    ours = generate(quantized, "fiddler", {"placement": str(placement)}, dtype="bfloat16", logprobs=top)
    check_tokens_close(ours, stock, f"{name} {fmt} at TP={TP}")
    check_as_close_to_hf_as_stock(top_n(ours, 5), top_n(stock, 5), fam, ref, f"{name} {fmt} at TP={TP}")
