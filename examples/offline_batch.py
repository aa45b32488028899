"""Offline batch job: prompts from a JSONL file to a JSONL file, resumable.

    python examples/offline_batch.py --model PATH --input prompts.jsonl --output results.jsonl \
        [--max-tokens 128] [--chunk 64] [--additional-config '{"fiddler": {...}}']

Input lines: {"id": ..., "prompt": "..."} ("id" optional: the line number is
used). Output lines: {"id": ..., "prompt": ..., "text": ..., "tokens": n}.
Results are appended chunk by chunk and flushed, so an interrupted job
re-run with the same arguments skips the ids already in the output. A job
with nothing left to do exits before loading the model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            row = json.loads(line)
            if "prompt" not in row:
                sys.exit(f"{path}:{n + 1}: no \"prompt\" key")
            row.setdefault("id", n)
            rows.append(row)
    return rows


def done_ids(path: str) -> set:
    if not os.path.exists(path):
        return set()
    ids = set()
    with open(path) as f:
        for line in f:
            try:
                ids.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError):
                pass  # a line cut by an interruption: its prompt is redone
    return ids


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--chunk", type=int, default=64, help="prompts per generate() call")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--additional-config", default="{}", help='e.g. \'{"fiddler": {"cpu_threads": 15}}\'')
    args = p.parse_args(argv)
    rows = read_jsonl(args.input)
    finished = done_ids(args.output)
    todo = [r for r in rows if r["id"] not in finished]
    print(f"[batch] {len(rows)} prompts, {len(rows) - len(todo)} already done, {len(todo)} to go", flush=True)
    if not todo:
        return 0
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    engine = {"max_model_len": args.max_model_len} if args.max_model_len else {}
    llm = LLM(model=args.model, model_impl="fiddler", enforce_eager=args.enforce_eager,
              additional_config=json.loads(args.additional_config), **engine)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    with open(args.output, "a") as out, tqdm(total=len(todo), desc="prompts", unit="prompt") as bar:
        if out.tell() and not _ends_with_newline(args.output):
            out.write("\n")  # close a line cut by an interruption
        for start in range(0, len(todo), args.chunk):
            chunk = todo[start:start + args.chunk]
            results = llm.generate([r["prompt"] for r in chunk], params, use_tqdm=False)
            for row, res in zip(chunk, results):
                out.write(json.dumps({"id": row["id"], "prompt": row["prompt"], "text": res.outputs[0].text,
                                      "tokens": len(res.outputs[0].token_ids)}) + "\n")
            out.flush()
            bar.update(len(chunk))
    return 0


if __name__ == "__main__":
    sys.exit(main())
