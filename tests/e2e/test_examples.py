"""The examples run on the tiny model: the resumable batch job and serve.sh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from vllm_fiddler.serving import free_port

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_batch(model, inp, out):
    return subprocess.run([sys.executable, os.path.join(ROOT, "examples", "offline_batch.py"),
                           "--model", model, "--input", str(inp), "--output", str(out), "--max-tokens", "5",
                           "--enforce-eager", "--max-model-len", "256", "--chunk", "2"],
                          capture_output=True, text=True, timeout=600)


def test_offline_batch_resumes(tiny_mixtral, tmp_path):
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"hello world {i} the model"}) + "\n"
                           for i in range(6)))
    # an interrupted earlier run: two results, then half a line
    out.write_text(json.dumps({"id": "p0", "prompt": "x", "text": "y", "tokens": 5}) + "\n"
                   + json.dumps({"id": "p3", "prompt": "x", "text": "y", "tokens": 5}) + "\n" + '{"id": "p4", "pro')
    r = run_batch(tiny_mixtral, inp, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 already done, 4 to go" in r.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()[3:]]
    assert sorted(row["id"] for row in rows) == ["p1", "p2", "p4", "p5"]
    assert all(row["tokens"] == 5 and row["text"] for row in rows)
    again = run_batch(tiny_mixtral, inp, out)  # nothing left: exits before loading the model
    assert again.returncode == 0 and "0 to go" in again.stdout and "Initializing" not in again.stderr


def test_serve_sh(tiny_mixtral):
    port = free_port()
    env = {**os.environ, "MODEL": tiny_mixtral, "PORT": str(port), "PYTHON": sys.executable}
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "examples", "serve.sh"), "--enforce-eager",
                             "--max-model-len", "256"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, "serve.sh exited"
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/completions", method="POST",
                    headers={"Content-Type": "application/json"},
                    data=json.dumps({"model": "fiddler", "prompt": "hello", "max_tokens": 4}).encode())
                with urllib.request.urlopen(req, timeout=30) as r:
                    body = json.loads(r.read())
                break
            except OSError:
                time.sleep(2)
        else:
            pytest.fail("serve.sh did not answer in 300 s")
        assert body["usage"]["completion_tokens"] == 4
    finally:
        proc.terminate()
        proc.wait(60)
