"""The benchmarks' stock systems stay within the GPU budget they claim (benchmarks/gpu_e2e.py)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import REPO, load_benchmark


@pytest.fixture(scope="module")
def gpu_e2e():
    return load_benchmark("gpu_e2e")


def prefetch_share(kw: dict, layers: int) -> float:
    """Share of the experts' bytes vLLM's prefetch offloader keeps on the GPU with these
    settings: its resident layers plus one buffer slot per prefetch step."""
    group, offloaded, step = kw["offload_group_size"], kw["offload_num_in_group"], kw["offload_prefetch_step"]
    resident = sum(1 for i in range(layers) if i % group < group - offloaded)
    return (resident + step) / layers


@pytest.mark.parametrize("layers", [8, 16, 32])
@pytest.mark.parametrize("fraction", [0.1, 0.197, 0.3, 0.5])
def test_prefetch_within_budget_is_the_largest_that_fits(gpu_e2e, layers, fraction):
    kw = gpu_e2e.prefetch_within_budget(layers, fraction)
    assert 1 <= kw["offload_num_in_group"] <= kw["offload_group_size"]  # vLLM's own check
    share = prefetch_share(kw, layers)
    if fraction * layers >= 1:  # one layer of buffers fits
        assert share <= fraction + 1e-9
        bigger = dict(kw, offload_num_in_group=kw["offload_num_in_group"] - 1)
        if bigger["offload_num_in_group"] >= 1:
            assert prefetch_share(bigger, layers) > fraction  # one more resident layer would not fit


def test_the_e2e_budget_rows(gpu_e2e):
    """On an 80 GB GPU, 8 layers: the budget row keeps no layer resident; STOCK_PREFETCH holds 3/8."""
    fraction = gpu_e2e.resident_expert_fraction(79.2)
    assert 0.15 < fraction < 0.25
    assert prefetch_share(gpu_e2e.prefetch_within_budget(8, fraction), 8) == 1 / 8
    assert prefetch_share(gpu_e2e.STOCK_PREFETCH, 8) == 3 / 8 > fraction


@pytest.fixture(scope="module")
def e2e():
    return load_benchmark("e2e")


def test_ratios_same_budget_leave_out_the_over_budget_system(e2e):
    """TTFT (lower is better) and throughput: the conservative set counts every stock system,
    the same-budget set leaves out those holding more than the budget."""
    assert e2e.OVER_BUDGET_SYSTEMS == {"stock_prefetch"}
    table = {"prefill_2048": {"fiddler": 0.36, "stock_prefetch": 0.33, "stock_prefetch_budget": 0.44,
                              "stock_uva_experts": 1.7, "fiddler_gpu50": 0.2},
             "serve_c32": {"fiddler": 150.0, "stock_prefetch": 90.0, "stock_uva_experts": 75.0},
             "beam_4": {"stock_uva_experts": 2.0}}  # no fiddler figure: no ratio
    conservative = e2e.ratios(table)
    same_budget = e2e.ratios(table, e2e.OVER_BUDGET_SYSTEMS)
    assert conservative == pytest.approx({"prefill_2048": 0.33 / 0.36, "serve_c32": 150 / 90})
    assert same_budget == pytest.approx({"prefill_2048": 0.44 / 0.36, "serve_c32": 150 / 75})


def test_roofline_uses_the_host_dram_both_links_share(e2e):
    """The decode bound moves the cold bytes at the host DRAM measured with CPU and DMA reading
    at once (the H100 box: 92.7 + 40.1 GB/s together against 115.6 + 50.7 alone), not at the
    sum of the solo figures; the row's hit rate sets the cold bytes."""
    out = {"layers": 8, "tiny": False, "dram_read_gb_s": 115.6, "pcie_h2d_gb_s": 50.7,
           "host_read_together_gb_s": 132.8}
    expert_bytes = 3 * 4096 * 14336 * 2
    cold = 8 * 2 * (1 - 0.25) * expert_bytes
    bounds = e2e.roofline({"fiddler": {"gpu_hit_rate": 0.25}}, out)
    assert bounds["roofline_decode_tok_s"] == pytest.approx(132.8e9 / cold)
    assert bounds["roofline_decode_tok_s_independent"] == pytest.approx(166.3e9 / cold)
    assert bounds["roofline_decode_tok_s_dram_bound"] == pytest.approx(115.6e9 / cold)
    # a host where one link alone beats both together: the bound is the best measured
    assert e2e.roofline({"fiddler": {"gpu_hit_rate": 0.25}}, {**out, "host_read_together_gb_s": 100.0})[
        "roofline_decode_tok_s"] == pytest.approx(115.6e9 / cold)
    # no measurement together (an old JSON): no headline bound; stock rows have none
    assert "roofline_decode_tok_s" not in e2e.roofline({"fiddler": {"gpu_hit_rate": 0.25}},
                                                       {**out, "host_read_together_gb_s": None})
    assert e2e.roofline({"scenarios": {}}, out) == {}
    # a row measured again right after its engine (--bandwidth-per-row) takes its own figures;
    # an incomplete or failed one falls back to the JSON's
    after = {"dram_read_gb_s": 100.0, "pcie_h2d_gb_s": 40.0, "host_read_together_gb_s": 110.0}
    row = {"fiddler": {"gpu_hit_rate": 0.25}, "host_bandwidth_after": after}
    assert e2e.roofline(row, out)["roofline_decode_tok_s"] == pytest.approx(110.0e9 / cold)
    for broken in ({"bandwidth_error": "timed out"}, {**after, "host_read_together_gb_s": None}, None):
        assert e2e.roofline({**row, "host_bandwidth_after": broken}, out)["roofline_decode_tok_s"] == \
            pytest.approx(132.8e9 / cold)
        # ... or to the measurement before the engine, when that one is whole
        assert e2e.roofline({**row, "host_bandwidth_before": after, "host_bandwidth_after": broken}, out)[
            "roofline_decode_tok_s"] == pytest.approx(110.0e9 / cold)
    # measured before and after: each figure the higher of the two (the most the host delivered)
    before = {"dram_read_gb_s": 120.0, "pcie_h2d_gb_s": 38.0, "host_read_together_gb_s": 140.0}
    both = e2e.roofline({**row, "host_bandwidth_before": before}, out)
    assert both["roofline_decode_tok_s"] == pytest.approx(140.0e9 / cold)
    assert both["roofline_decode_tok_s_independent"] == pytest.approx((120.0 + 40.0) * 1e9 / cold)


def test_in_process_engine_rows_get_their_own_tables(e2e):
    """--engine-in-process rows (run '<run>_in_process') are summarized apart: they never enter
    the default protocol's tables, nor count as the skewed run."""
    assert e2e.run_key(0) == "uniform" and e2e.run_key(30, in_process=True) == "skew30_in_process"

    def row(**scenarios):
        return {"scenarios": scenarios}

    header = dict(model="m", decode_tokens=128, beam_tokens=32, serve_prompts=256, serve_input_len=128,
                  serve_output_len=64, eager=True, max_model_len=8256)
    out = {**header, "layers": 8, "tiny": False, "runs": {
        "uniform": {"fiddler": row(beam_8=3.6), "stock_uva_all": row(beam_8=1.9)},
        "uniform_in_process": {"fiddler": row(beam_8=6.6), "stock_uva_all": row(beam_8=2.9)},
        "skew30": {"fiddler": row(decode=21.7), "stock_uva_experts": row(decode=10.4)}}}
    e2e.summarize(out)
    assert out["scenarios"]["beam_8"] == {"fiddler": 3.6, "stock_uva_all": 1.9}
    assert out["scenarios_in_process"] == {"beam_8": {"fiddler": 6.6, "stock_uva_all": 2.9}}
    assert out["ratios_vs_best_stock_same_budget_in_process"] == pytest.approx({"beam_8": 6.6 / 2.9})
    assert out["skew_of_scenarios_skewed"] == "skew30"
    assert out["scenarios_skewed"]["decode"] == {"fiddler": 21.7, "stock_uva_experts": 10.4}


def test_memory_map_tells_slow_memory_from_a_slow_moment(monkeypatch):
    """host_memory_map's reading: GiBs slow in every round agree in rank (~1); a round that
    slows every GiB at once does not make them agree; random noise gives ~0."""
    import random

    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))  # its results_io
    mm = load_benchmark("investigations/host_memory_map")
    place = [160.0, 120.0, 165.0, 150.0, 118.0, 170.0]  # GiBs 1 and 4 backed by slow memory
    assert mm.rank_agreement([place, [v * 0.7 for v in place], [v + 1.0 for v in place]]) == pytest.approx(1.0)
    rng = random.Random(0)
    noise = [[rng.gauss(150, 10) for _ in range(40)] for _ in range(6)]
    assert abs(mm.rank_agreement(noise)) < 0.2
    assert mm.spread([120.0, 160.0, 150.0]) == {"min": 120.0, "median": 150.0, "max": 160.0,
                                                 "max_over_min": pytest.approx(4 / 3)}
    assert mm.rank_agreement([place]) != mm.rank_agreement([place])  # one round: nothing to compare (nan)


def planted_engine_trace(tmp_path, steps: int = 6) -> None:
    """Two layers a step, 10 ms apart: layer 0's job runs 4 chunk-experts in 2 ms after a
    0.5 ms routing wait; layer 1's job is submitted while layer 0's runs, waits 0.3 ms and
    runs 1 chunk-expert in 1 ms; layer 0's next job is submitted 6.2 ms after that one is
    done. Written as two flushes, with a stray job (calibration) before the first op."""
    ms = 1e-3
    ops, jobs = [], [(1, 2, 3, 2, 9)]
    done = None
    for k in range(steps):
        base = 1.0 + 10 * ms * k
        for layer, (start, wait, run, chunks) in enumerate(((0.0, 0.5, 2.0, 4), (1.0, 0.3, 1.0, 1))):
            op_start, submitted = base + start * ms, base + (start + 0.1) * ms
            picked = submitted if done is None else max(submitted, done)
            started, finished = picked + wait * ms, picked + (wait + run) * ms
            ops.append((layer, op_start, None, None, submitted, op_start + 0.2 * ms))
            stamps = (submitted - 0.01 * ms, started, finished, picked)
            jobs.append(tuple(int(t * 1e9) for t in stamps) + (chunks,))
            done = finished
    ops.insert(4, (0, 0.9, 0.9, 0.9, None, 0.9))  # a synced op (prefill): not a routed step's
    fields = {"op_fields": [], "job_fields": [], "chunk_bytes": 10**6, "cpu_threads": 15}
    for n, (o, j) in enumerate(((ops[:5], jobs[:4]), (ops[5:], jobs[4:]))):
        record = {"ops": o, "jobs": j, **fields}
        (tmp_path / f"trace-77-{n:04d}.json").write_text(json.dumps(record))


def test_engine_trace_splits_the_cpu_idle_time(tmp_path):
    """engine_trace on a planted timeline: job read rates by size, the engine thread's lateness
    and the routing waits per step, the step period and the CPU's busy share."""
    engine_trace = load_benchmark("investigations/engine_trace")
    planted_engine_trace(tmp_path)
    summary = engine_trace.summarize(engine_trace.load(str(tmp_path)), last_steps=3)
    assert summary["layers"] == 2 and summary["steps"] == 3
    assert summary["step_period_ms"]["p50"] == pytest.approx(10.0)
    assert summary["tok_s_from_periods"] == pytest.approx(100.0)
    assert summary["read_gb_s_by_chunk_experts"] == {1: {"jobs": 3, "mean": pytest.approx(1.0)},
                                                    4: {"jobs": 3, "mean": pytest.approx(2.0)}}
    assert summary["cpu_busy_ms_per_step"] == pytest.approx(3.0)
    assert summary["cpu_busy_share"] == pytest.approx(0.3)
    # layer 0's job came 10 + 0.09 - 3.9 = 6.19 ms after layer 1's was done (the native submit
    # stamps 0.01 ms before the op's); layer 1's was queued behind layer 0's
    assert summary["host_late_ms_per_step"] == pytest.approx(6.19, abs=1e-3)
    assert summary["routing_wait_ms_per_step"] == pytest.approx(0.8, abs=1e-3)
    assert summary["per_layer"][1]["queued_ms"] == pytest.approx(2.6 - 1.09, abs=1e-3)
    assert summary["cpu_read_gb_s_over_busy"] == pytest.approx(5e6 / 3e-3 / 1e9, rel=1e-3)


def test_decode_results_are_flat_rows():
    """decode.py's "flat" list: one row per system and figure, every results_io field present,
    the temperature and prompt length in the scenario, provenance on every row."""
    decode = load_benchmark("decode")
    results_io = load_benchmark("results_io")
    out = {"command": "python benchmarks/decode.py --shape qwen3-30b-a3b", "rows": [
        {"system": "fiddler", "device": "NVIDIA H100 80GB HBM3",
         "decode": {"t1": {"tok_s": 30.0, "gpu_hit_rate": 0.2, "roofline_share": 0.9}, "t0": {"tok_s": 35.0}},
         "ttft_s": {"2048": 0.5}},
        {"system": "stock_uva_experts", "device": "NVIDIA H100 80GB HBM3", "decode": {"t1": {"tok_s": 10.0}},
         "ttft_s": {}},
        {"system": "broken", "error": "no result"},
    ]}
    flat = decode.flat_rows(out, "0.26.0", "abc123")
    assert [(r["system"], r["scenario"], r["value"], r["unit"]) for r in flat] == [
        ("fiddler", "decode_batch1_temperature_1", 30.0, "tok/s"),
        ("fiddler", "decode_batch1_temperature_0", 35.0, "tok/s"),
        ("fiddler", "ttft_2048_tokens", 0.5, "s"),
        ("stock_uva_experts", "decode_batch1_temperature_1", 10.0, "tok/s")]
    for r in flat:
        assert tuple(r) == results_io.ROW_FIELDS
        assert r["vllm_version"] == "0.26.0" and r["commit"] == "abc123" and r["command"] == out["command"]
        assert r["device"] == "NVIDIA H100 80GB HBM3"
    assert flat[0]["gpu_hit_rate"] == 0.2 and flat[0]["roofline_share"] == 0.9
    assert flat[3]["gpu_hit_rate"] is None
    with pytest.raises(ValueError):
        results_io.row("x", "y", 1.0, "s", lease="Z")


def test_replacement_grid_cells_gain_only_where_routing_allows():
    """The simulated grid's cells: re-placement from the even placement wins under popularity
    skew and on the greedy loop, and cannot win in the memoryless uniform corner."""
    grid = load_benchmark("replacement_grid")
    from vllm_fiddler.routing_model import SyntheticRouting, greedy_loop_trace

    layers, steps, gpu = 4, 800, 6  # 6 of 32 experts on the GPU
    flat = grid.cell(SyntheticRouting(8, 2, skew=0.0, locality=0.0).trace(layers, steps), layers, 8, gpu)
    assert abs(flat["replacement"] - flat["even_static"]) < 0.03
    skewed = grid.cell(SyntheticRouting(8, 2, skew=1.5, locality=0.15).trace(layers, steps), layers, 8, gpu)
    assert skewed["replacement"] > skewed["even_static"] + 0.1 and skewed["swaps"] > 0
    assert skewed["best_static_hindsight"] >= skewed["replacement"] - 0.05
    loop = grid.cell(greedy_loop_trace(SyntheticRouting(8, 2), layers, steps), layers, 8, gpu)
    assert loop["replacement"] > loop["even_static"] + 0.1


def test_decode_prediction_of_the_run_budget():
    """decode.py's "predicted": the throughput model's batch-1 decode and TTFT at the run's
    budget (even placement, uniform routing); more GPU share, a faster prediction."""
    decode = load_benchmark("decode")
    b = decode.budget("mixtral-8x7b", 2, 24.0)
    p = decode.predicted("mixtral-8x7b", 2, b, prefill_lens=(512, 2048))
    assert 0 < p["gpu_hit_rate"] < 0.5 and p["decode_tok_s"] > 0
    assert p["ttft_s"]["2048"] > p["ttft_s"]["512"] > 0 and p["cost_model"]
    bigger = decode.predicted("mixtral-8x7b", 2, {**b, "resident_share": 0.75})
    assert bigger["decode_tok_s"] > p["decode_tok_s"] and bigger["gpu_hit_rate"] > p["gpu_hit_rate"]


@pytest.mark.parametrize("causal", [True, False])
def test_torch_mla_prefill_matches_per_query_softmax(causal):
    """decode.py's MLA prefill fallback (benchmarks/mla_prefill_torch.py) against attention
    written out one query at a time: three sequences of 5, 3 and 2 queries, over their own
    tokens (causal, the new-token call) or over 5, 7 and no context keys (the context-chunk
    call); 20 heads (two head chunks), D 24, Dv 16; out and FlashAttention's lse layout
    [H, T]. fp32 throughout: within 1e-5."""
    import torch

    mla = load_benchmark("mla_prefill_torch")
    gen = torch.Generator().manual_seed(0)
    H, D, Dv = 20, 24, 16
    cu_q, cu_k = torch.tensor([0, 5, 8, 10]), torch.tensor([0, 5, 12, 12])
    if causal:  # the new-token call attends within each sequence: keys are the queries
        cu_k = cu_q
    q = torch.randn(10, H, D, generator=gen)
    k = torch.randn(int(cu_k[-1]), H, D, generator=gen)
    v = torch.randn(int(cu_k[-1]), H, Dv, generator=gen)
    out, lse = mla.varlen_attention(q, k, v, cu_q, cu_k, 0.3, causal)
    for i in range(3):
        q0, q1, k0, k1 = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        for j in range(q0, q1):
            seen = k1 - (q1 - j - 1) if causal else k1  # keys k0 .. seen - 1
            if seen <= k0:
                assert out[j].abs().max() == 0 and torch.isinf(lse[:, j]).all()
                continue
            scores = torch.einsum("hd,khd->hk", q[j], k[k0:seen]) * 0.3  # [H, keys]
            torch.testing.assert_close(lse[:, j], torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
            ref = torch.einsum("hk,khv->hv", scores.softmax(-1), v[k0:seen])
            torch.testing.assert_close(out[j], ref, atol=1e-5, rtol=1e-5)
