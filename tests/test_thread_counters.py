"""Expert-thread CPU time and preemption counters (vllm_fiddler.runtime.thread_counters)."""

from __future__ import annotations

import os
import time

import pytest
import torch

from vllm_fiddler.kernels import cpu
from vllm_fiddler.runtime import thread_counters as tc
from vllm_fiddler.stats import step_breakdown

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")


def test_task_counters_parse_a_name_with_spaces_and_parentheses(tmp_path):
    """stat's command name may hold ") (": the fields are counted after its last ')'."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = ["S"] + ["0"] * 10 + [str(3 * ticks), str(ticks)] + ["0"] * 30  # state, then fields 4.. ; utime, stime
    (tmp_path / "stat").write_text("4242 (odd ) (name) " + " ".join(fields) + "\n")
    (tmp_path / "status").write_text("Name:\todd\nvoluntary_ctxt_switches:\t9\nnonvoluntary_ctxt_switches:\t17\n")
    assert tc._task_counters(str(tmp_path)) == (17, 4.0)
    assert tc._task_counters(str(tmp_path / "gone")) is None


def _grows(key: str, work, seconds: float = 10.0) -> float:
    """How much counter `key` grew while `work` ran for up to `seconds` of wall time (>= 0.05 s of it)."""
    before = tc.thread_counters()[key]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and tc.thread_counters()[key] - before < 0.05:
        work()
    return tc.thread_counters()[key] - before


def test_engine_thread_counts_its_own_cpu_time():
    x = torch.randn(128, 128)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the work must run on this thread
    try:  # busy on this thread: its user time grows (in clock ticks)
        assert _grows("engine_thread_cpu_s", lambda: x @ x) >= 0.05
    finally:
        torch.set_num_threads(threads)


def test_native_pool_threads_are_named_and_counted():
    native = [i for i in cpu.available_isas() if i != "torch"]
    if not native:
        pytest.skip("no native kernels on this machine")
    cpu.set_num_threads(3)  # the caller and two named pool workers
    H, I = 256, 512
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, H, generator=gen).to(torch.bfloat16)
    w13 = (torch.randn(2 * I, H, generator=gen) * H**-0.5).to(torch.bfloat16)
    w2 = (torch.randn(H, I, generator=gen) * I**-0.5).to(torch.bfloat16)
    cpu.expert_ffn(x, w13, w2, isa=native[0])  # starts the pool
    assert tc.thread_counters()["expert_threads"] >= 2, "the pool's workers are not named fiddler-cpu"
    assert _grows("expert_thread_cpu_s", lambda: cpu.expert_ffn(x, w13, w2, isa=native[0])) >= 0.05


def test_step_breakdown_reports_thread_counters_per_step():
    base = {"layer0_steps": 0, "routed_to_gpu": 0, "routed_to_cpu": 0, "cpu_busy_s": 0.0, "h2d_weight_bytes": 0,
            "gpu_experts": 1, "cpu_experts": 7, "expert_threads": 15, "expert_thread_preemptions": 100,
            "expert_thread_cpu_s": 1.0, "engine_thread_preemptions": 5, "engine_thread_cpu_s": 2.0,
            "process_cpu_s": 4.0}
    after = {**base, "layer0_steps": 10, "routed_to_cpu": 20, "cpu_busy_s": 0.25, "cpu_weight_bytes": 30 * 10**9,
             "expert_thread_preemptions": 130,
             "expert_thread_cpu_s": 1.5, "engine_thread_preemptions": 25, "engine_thread_cpu_s": 2.2,
             "process_cpu_s": 5.0}
    b = step_breakdown(after, base)
    assert b["expert_threads"] == 15
    assert b["decode_expert_thread_preemptions_per_step"] == pytest.approx(3.0)
    assert b["decode_engine_thread_preemptions_per_step"] == pytest.approx(2.0)
    assert b["decode_expert_thread_cpu_ms_per_step"] == pytest.approx(50.0)
    assert b["decode_engine_thread_cpu_ms_per_step"] == pytest.approx(20.0)
    assert b["decode_process_cpu_ms_per_step"] == pytest.approx(100.0)
    assert b["decode_cpu_weight_gb_per_step"] == pytest.approx(3.0)
    assert b["decode_cpu_read_gb_s"] == pytest.approx(120.0)  # 30 GB over 0.25 s of CPU work
    assert "decode_cpu_read_gb_s" not in step_breakdown(base, base)  # nothing read: no rate


def test_runtime_sizes_the_native_pool_before_its_first_job():
    """Native jobs bypass the runtime's Python worker, whose initializer also sizes the pool:
    a first native job must not start the pool at every core (one thread per core beside
    the engine thread)."""
    from vllm_fiddler.runtime.cpu_experts import CPUExpertRuntime

    if not [i for i in cpu.available_isas() if i != "torch"]:
        pytest.skip("no native kernels on this machine")
    before = cpu._get_num_threads()
    want = before + 3  # differs from whatever an earlier test left
    runtime = CPUExpertRuntime(want, inline=False)
    try:
        assert cpu._get_num_threads() == want
    finally:
        runtime.shutdown()
        cpu.set_num_threads(before)
