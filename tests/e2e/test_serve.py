"""`vllm serve --model-impl fiddler` answers the OpenAI API (via the `openai` client)."""

from __future__ import annotations

import pytest

from vllm_fiddler.serving import VllmServer as Server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_mixtral):
    s = Server([tiny_mixtral, "--model-impl", "fiddler", "--enforce-eager", "--max-model-len", "512",
                "--served-model-name", "tiny", "--additional-config",
                '{"fiddler": {"gpu_expert_budget_gb": 0.0002}}'])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")


def test_placement_logged(server):
    log = server.output()
    assert "fiddler placement" in log and "experts on GPU" in log


def test_completions(client):
    r = client.completions.create(model="tiny", prompt="hello world the model", max_tokens=8,
                                  temperature=0)
    assert r.usage.completion_tokens == 8 and r.choices[0].text.strip()
    again = client.completions.create(model="tiny", prompt="hello world the model", max_tokens=8,
                                      temperature=0)
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic


def test_chat_completions(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello gpu"}],
                                       max_tokens=6, temperature=0)
    assert r.choices[0].message.content and r.usage.completion_tokens == 6


def test_streaming_matches_non_streaming(client):
    kwargs = dict(model="tiny", prompt="the cat and dog", max_tokens=8, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert "".join(pieces) == whole


def test_metrics(server, client):
    """fiddler's counters on /metrics agree with the tokens the server computed."""
    import time

    client.completions.create(model="tiny", prompt="one two three four", max_tokens=5, temperature=0)
    time.sleep(2.5)  # the worker rewrites its stats at most once a second
    client.completions.create(model="tiny", prompt="one", max_tokens=2, temperature=0)
    time.sleep(1.5)
    values = server.metrics()
    gpu = values['vllm:fiddler_routed_tokens_total{placement="gpu"}']
    cpu = values['vllm:fiddler_routed_tokens_total{placement="cpu"}']
    # every routed pair is counted once, on one side: a multiple of top-k (2) x layers (3)
    assert gpu + cpu > 0 and (gpu + cpu) % 6 == 0
    assert values['vllm:fiddler_experts{placement="gpu"}'] + values['vllm:fiddler_experts{placement="cpu"}'] == 24
    assert "vllm:fiddler_cpu_expert_seconds_total" in values and "vllm:fiddler_weight_copy_bytes_total" in values
    # the CPU experts' weights read: some exactly when some pairs ran there
    assert (values["vllm:fiddler_cpu_weight_read_bytes_total"] > 0) == (cpu > 0)
    # re-placement is off here (auto, CPU platform): exported, and zero
    assert values["vllm:fiddler_expert_replacements_total"] == 0
    assert values["vllm:fiddler_replacement_copy_bytes_total"] == 0


def test_dense_model_fails_at_startup(tiny_llama):
    with pytest.raises(RuntimeError) as e:
        Server([tiny_llama, "--model-impl", "fiddler"], timeout_s=120)
    assert "LlamaForCausalLM has no routed experts" in str(e.value)
