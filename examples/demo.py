"""vllm-fiddler demo: offline generation through LLM() and an OpenAI request to `vllm serve`.

    python examples/demo.py                      # builds a tiny random Mixtral (no GPU, no weights needed)
    python examples/demo.py --model /path/to/Mixtral-8x7B-v0.1 --gpu-memory-utilization 0.3

Both halves run with model_impl="fiddler": hot experts device-resident, cold
experts computed on the CPU; the placement table is logged at start-up.
"""

from __future__ import annotations

import argparse
import json
import os


def default_model() -> str:
    from vllm_fiddler.tiny import build_tiny_mixtral

    path = os.path.join(os.path.expanduser("~"), ".cache", "vllm_fiddler", "tiny-mixtral")
    print(f"[demo] no --model given: building a tiny random Mixtral at {path}")
    return build_tiny_mixtral(path)


def offline(model: str, engine: dict, fiddler: dict) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, model_impl="fiddler", additional_config={"fiddler": fiddler}, **engine)
    prompts = ["hello world the model", "the expert on the cpu is", "one two three"]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16))
    for o in outputs:
        print(f"[demo] LLM()  {o.prompt!r} -> {o.outputs[0].text!r}")
    del llm


def serve(model: str, engine: dict, fiddler: dict) -> None:
    import openai

    from vllm_fiddler.serving import VllmServer

    args = [model, "--model-impl", "fiddler", "--served-model-name", "demo",
            "--additional-config", json.dumps({"fiddler": fiddler})]
    for key, value in engine.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    print("[demo] starting: vllm serve " + " ".join(args))
    with VllmServer(args) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        r = client.completions.create(model="demo", prompt="the gpu and the cpu", max_tokens=12,
                                      temperature=0)
        print(f"[demo] /v1/completions -> {r.choices[0].text!r}")
        chat = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hello expert"}], max_tokens=12,
            temperature=0)
        print(f"[demo] /v1/chat/completions -> {chat.choices[0].message.content!r}")
        placement = [line.split("] ", 1)[-1] for line in server.output().splitlines()
                     if "fiddler placement" in line]
        print(f"[demo] server log: {placement[0] if placement else '(no placement line found)'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Mixtral checkpoint (default: a generated tiny model)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--gpu-expert-budget-gb", type=float, default=None)
    p.add_argument("--skip-serve", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # CPU platform: a small KV cache
    model = args.model or default_model()
    engine = {"max_model_len": 512 if args.model is None else 4096}
    if args.gpu_memory_utilization is not None:
        engine["gpu_memory_utilization"] = args.gpu_memory_utilization
    fiddler = {}
    if args.gpu_expert_budget_gb is not None:
        fiddler["gpu_expert_budget_gb"] = args.gpu_expert_budget_gb
    offline(model, engine, fiddler)
    if not args.skip_serve:
        serve(model, engine, fiddler)
    print("[demo] done")


if __name__ == "__main__":
    main()
