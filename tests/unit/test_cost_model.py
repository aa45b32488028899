"""Unit tests of vllm_fiddler.cost_model (pure Python: no torch, no GPU)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
import subprocess
import sys
import time

import pytest

from vllm_fiddler import cost_model as cm
from vllm_fiddler.cost_model import CostModel, plan_cold_experts


def flat_model(cpu_ms: float, copy_ms: float, gpu_ms: float) -> CostModel:
    """Every expert costs cpu_ms on the CPU, copy_ms to copy and gpu_ms on the GPU, whatever its tokens."""
    return CostModel(cpu_points=((1, cpu_ms),), h2d_gb_s=1.0, copy_latency_ms=0.0,
                     expert_bytes=int(round(copy_ms * 1e6)), gpu_points=((1, gpu_ms),))


def linear_model(cpu_fixed, cpu_per_tok, copy_ms, gpu_fixed, gpu_per_tok) -> CostModel:
    return CostModel(cpu_points=((1, cpu_fixed + cpu_per_tok), (1000, cpu_fixed + 1000 * cpu_per_tok)),
                     h2d_gb_s=1.0, copy_latency_ms=0.0, expert_bytes=int(round(copy_ms * 1e6)),
                     gpu_points=((1, gpu_fixed + gpu_per_tok), (1000, gpu_fixed + 1000 * gpu_per_tok)))


def brute_force(token_counts, cost, gpu_busy_ms=0.0, max_copies=None, staging_slots=None):
    """Every subset, the planner's copy order and tie-break key: the reference optimum (with the
    cost model's contention factors)."""
    items = sorted((e, n) for e, n in token_counts.items() if n > 0)
    experts = [e for e, _ in items]
    cpu = {e: cost.cpu_ms(n) for e, n in items}
    gpu = {e: cost.gpu_ms(n) for e, n in items}
    limit = len(experts) if max_copies is None else min(max_copies, len(experts))
    best = None
    for m in range(limit + 1):
        for subset in itertools.combinations(experts, m):
            order = cm.copy_order(sorted(subset), cost.copy_ms, gpu)
            rest = [e for e in experts if e not in subset]
            crit, cpu_end, _, _ = cm.simulate(rest, order, cpu, gpu, cost.copy_ms, gpu_busy_ms, staging_slots,
                                              cost.cpu_contended_slowdown, cost.h2d_contended_slowdown)
            busy = cpu_end + m * cost.copy_ms + sum(gpu[e] for e in subset)
            key = (round(crit / 1e-9), m, round(busy / 1e-9), tuple(sorted(subset)))
            if best is None or key < best[0]:
                best = (key, crit, tuple(sorted(subset)))
    return best[1], best[2]


def random_model(rng: random.Random) -> CostModel:
    cpu, t, ms = [], 1, rng.uniform(1, 10)
    for _ in range(rng.randint(1, 5)):
        cpu.append((t, ms))
        t *= rng.choice((2, 4, 8))
        ms += rng.uniform(0, 20)
    gpu = [(1, rng.uniform(0.05, 1.0))]
    gpu.append((rng.choice((64, 512, 2048)), gpu[0][1] + rng.uniform(0, 3)))
    return CostModel(cpu_points=tuple(cpu), h2d_gb_s=rng.uniform(10, 60), copy_latency_ms=rng.uniform(0, 0.5),
                     expert_bytes=rng.randint(50, 400) * 10**6, gpu_points=tuple(gpu))


def random_counts(rng: random.Random, n: int) -> dict[int, int]:
    ids = rng.sample(range(64), n)
    scale = rng.choice((4, 64, 4096))
    return {e: rng.randint(1, scale) for e in ids}


# ----------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------


def test_interpolation():
    c = CostModel(cpu_points=((1, 6.5), (16, 6.5), (64, 9.7), (128, 18.8), (512, 61.0)), h2d_gb_s=55,
                  copy_latency_ms=0.0, expert_bytes=10**6, gpu_points=((1, 0.2),))
    assert c.cpu_ms(0) == 0.0
    assert c.cpu_ms(1) == 6.5 and c.cpu_ms(16) == 6.5 and c.cpu_ms(512) == 61.0
    assert c.cpu_ms(0.5) == 6.5  # below the first point: the first point's (fixed) cost
    assert c.cpu_ms(96) == pytest.approx((9.7 + 18.8) / 2)
    assert c.cpu_ms(1024) == pytest.approx(61.0 + (61.0 - 18.8) / 384 * 512)  # last slope, extended
    assert c.gpu_ms(5000) == 0.2  # one point: flat
    assert c.copy_ms == pytest.approx(10**6 / 55e6)


def test_points_are_cleaned_and_validated():
    c = CostModel(cpu_points=((64, 10.0), (1, 6.0), (16, 7.0), (16, 5.0), (128, 9.0)), h2d_gb_s=10,
                  copy_latency_ms=0.1, expert_bytes=1, gpu_points=((1, 1),))
    # sorted, duplicates averaged (16 -> 6.0), made non-decreasing by lowering the inflated
    # fewer-token point (64: 10.0 -> 9.0), not by raising the later ones
    assert c.cpu_points == ((1, 6.0), (16, 6.0), (64, 9.0), (128, 9.0))
    # a fresh worker's slow first point (the H100 box: 7.23 ms at 1 token, 4.61 at 16)
    warm = CostModel(cpu_points=((1, 7.23), (4, 5.46), (16, 4.61), (64, 8.44)), h2d_gb_s=10,
                     copy_latency_ms=0.0, expert_bytes=1, gpu_points=((1, 1),))
    assert warm.cpu_points == ((1, 4.61), (4, 4.61), (16, 4.61), (64, 8.44))
    for bad in (dict(h2d_gb_s=0), dict(h2d_gb_s=float("nan")), dict(copy_latency_ms=-1), dict(expert_bytes=0),
                dict(cpu_points=()), dict(cpu_points=((1, -2.0),))):
        kw = dict(cpu_points=((1, 1.0),), h2d_gb_s=1.0, copy_latency_ms=0.0, expert_bytes=1,
                  gpu_points=((1, 1.0),))
        kw.update(bad)
        with pytest.raises(ValueError):
            CostModel(**kw)


def test_json_round_trip_and_cache_files(tmp_path, monkeypatch):
    c = cm.default_for_shape()
    c2 = CostModel.from_json(c.to_json())
    assert c2 == c and hash(c2) == hash(c)
    assert json.loads(c.to_json())["version"] == 3
    # explicit paths
    p = cm.save(c, str(tmp_path / "sub" / "m.json"))
    assert cm.load(p) == c
    assert cm.load(str(tmp_path / "missing.json")) is None
    (tmp_path / "bad.json").write_text("{not json")
    assert cm.load(str(tmp_path / "bad.json")) is None
    # the cache dir, by key
    monkeypatch.setenv("FIDDLER_CACHE_DIR", str(tmp_path / "cache"))
    key = "NVIDIA H100|Xeon 8480+|H4096/I14336|bf16|t52"
    path = cm.save_cached(key, c)
    assert os.path.dirname(path) == str(tmp_path / "cache")
    name = os.path.basename(path)
    assert name.startswith("cost_model-") and name.endswith(".json")
    assert all(ch.isalnum() or ch in "-_." for ch in name)
    assert cm.load_cached(key) == c
    assert cm.load_cached("another machine") is None
    assert [f for f in os.listdir(tmp_path / "cache") if f.startswith(".")] == []  # no temp file left
    monkeypatch.delenv("FIDDLER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cm.cache_dir() == str(tmp_path / "xdg" / "vllm_fiddler")


def test_key_names_machine_and_shape():
    c = cm.default_for_shape(4096, 14336, 2)
    assert "H4096-I14336-bf16" in c.key
    other = cm.default_for_shape(6144, 16384, 2)
    assert other.key != c.key
    assert all(ch.isalnum() or ch in "-_." for ch in c.key)


def test_fit_from_measurements_and_fit_copy():
    bytes_ = 352_321_536
    bw, lat = cm.fit_copy([(bytes_ / 4, 0.064 + bytes_ / 4 / 55e6), (bytes_, 0.064 + bytes_ / 55e6),
                           (bytes_ / 2, 0.064 + bytes_ / 2 / 55e6)])
    assert bw == pytest.approx(55.0) and lat == pytest.approx(0.064)
    bw1, lat1 = cm.fit_copy([(bytes_, 6.4), (bytes_, 6.5)])
    assert lat1 == 0.0 and bw1 == pytest.approx(bytes_ / 6.45 / 1e6)
    c = cm.fit_from_measurements(cpu_points=[(1, 6.4), (1, 6.6), (64, 9.7), [512, 61]], h2d_gb_s=bw,
                                 copy_latency_ms=lat, gpu_points=[(16, 0.17), (1, 0.17), (512, 0.32)],
                                 expert_bytes=bytes_, machine="box", shape="H4096-I14336-bf16")
    assert c.cpu_ms(1) == pytest.approx(6.5)
    assert c.copy_ms == pytest.approx(6.47, abs=0.01)
    assert c.gpu_ms(256) == pytest.approx(0.17 + (0.32 - 0.17) * 240 / 496)
    assert c.key == "box-H4096-I14336-bf16" and c.source == "measured"


def test_default_for_shape_is_the_measured_prior():
    c = cm.default_for_shape()  # Mixtral-8x7B bf16
    assert c.expert_bytes == 352_321_536
    assert c.copy_ms == pytest.approx(6.47)
    assert [c.cpu_ms(t) for t in (1, 16, 64, 128, 512)] == [6.5, 6.5, 9.7, 18.8, 61.0]
    assert c.gpu_ms(1) == pytest.approx(0.17) and c.gpu_ms(512) == pytest.approx(0.32)
    assert c.gpu_ms(4096) > c.gpu_ms(512)
    # A lone expert is worth copying from ~20 tokens on (6.5 ms CPU vs 6.47 + 0.17 ms).
    assert 16 < c.breakeven_tokens() < 64
    # Scaled by expert bytes for another shape.
    half = cm.default_for_shape(4096, 7168, 2)
    assert half.expert_bytes * 2 == c.expert_bytes
    assert half.cpu_ms(64) == pytest.approx(c.cpu_ms(64) / 2)
    assert half.copy_ms < c.copy_ms
    assert "prior" in c.source and "prior" in c.describe()


def test_import_is_pure_python():
    code = ("import sys; import vllm_fiddler.cost_model as m;"
            "m.plan_cold_experts({0: 5}, m.default_for_shape());"
            "bad = [k for k in ('torch', 'triton', 'vllm', 'numpy') if k in sys.modules]; print(bad);"
            "sys.exit(1 if bad else 0)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------


def test_empty_input():
    c = cm.default_for_shape()
    p = plan_cold_experts({}, c)
    assert p.cpu == () and p.copy == () and p.critical_path_ms == 0.0
    p = plan_cold_experts({3: 0, 5: 0}, c, gpu_busy_ms=1.5)  # zero-token experts are not hit
    assert p.cpu == () and p.copy == () and p.critical_path_ms == 1.5
    assert "0 cold experts" in p.report()


def test_min_max_splits_where_min_sum_is_indifferent():
    """4 cold experts, each 10 ms on the CPU and 10 ms to copy (GPU compute ~free).

    Per-expert costs are equal on both sides, so minimising their SUM cannot
    choose (26/40 ms whatever the split, and "all on one side" is as good as
    any); the step's critical path is the max of the two queues, and a 2/2
    split halves it.
    """
    c = flat_model(cpu_ms=10.0, copy_ms=10.0, gpu_ms=0.01)
    counts = {0: 3, 1: 3, 2: 3, 3: 3}
    p = plan_cold_experts(counts, c)
    opt, _ = brute_force(counts, c)
    assert p.critical_path_ms == pytest.approx(opt)
    assert p.critical_path_ms == pytest.approx(20.01)
    assert len(p.cpu) == 2 and len(p.copy) == 2
    best_one_sided = min(p.all_cpu_ms, p.all_copy_ms)
    assert best_one_sided == pytest.approx(40.0)
    assert p.critical_path_ms < 0.51 * best_one_sided
    # The sum of per-expert costs is the same for every split: min-sum is indifferent.
    sums = {round(sum(10.0 if e in cp else 10.0 for e in counts), 9)
            for m in range(5) for cp in itertools.combinations(counts, m)}
    assert len(sums) == 1
    # Deterministic tie-break: the lowest ids are copied.
    assert p.copy == (0, 1) and p.cpu == (2, 3)


def test_decode_stays_on_cpu_when_copying_costs_more():
    # Mixtral prior: a lone 1-token expert: 6.5 ms CPU < 6.47 + 0.17 ms copy + GPU.
    c = cm.default_for_shape()
    p = plan_cold_experts({5: 1}, c)
    assert p.cpu == (5,) and p.copy == ()
    assert p.critical_path_ms == pytest.approx(6.5)
    # A slower link (PCIe gen4 x16, ~25 GB/s: 14 ms a copy): two decode experts both stay on the CPU.
    slow = cm.default_for_shape(h2d_gb_s=25.0)
    p = plan_cold_experts({1: 1, 6: 2}, slow)
    assert p.copy == () and p.critical_path_ms == pytest.approx(13.0)
    # ...and so does everything when the GPU is already busy for longer than the CPU queue needs.
    p = plan_cold_experts({1: 1, 2: 1, 6: 1}, c, gpu_busy_ms=30.0)
    assert p.copy == () and p.critical_path_ms == pytest.approx(30.0)


def test_decode_with_two_experts_overlaps_cpu_and_pcie():
    # On the measured box a copy costs about one CPU expert, so with 2 decode experts
    # one goes each way: max(6.5, 6.47 + 0.17) instead of 13 ms.
    c = cm.default_for_shape()
    p = plan_cold_experts({0: 1, 4: 1}, c)
    assert len(p.copy) == 1 and len(p.cpu) == 1
    assert p.critical_path_ms == pytest.approx(c.copy_ms + c.gpu_ms(1))


def test_long_prefill_copies():
    c = cm.default_for_shape()
    counts = {0: 2000, 2: 3500, 3: 1200, 7: 4000}
    p = plan_cold_experts(counts, c)
    assert set(p.copy) == set(counts) and p.cpu == ()
    # The PCIe queue is the critical path: 4 copies back to back, then the last compute.
    assert p.pcie_ms == pytest.approx(4 * c.copy_ms)
    assert p.critical_path_ms < 0.2 * p.all_cpu_ms
    # Copy order: Johnson's rule, longest GPU compute first, shortest last.
    assert p.copy == (7, 2, 0, 3)


def test_max_copies_respected():
    c = cm.default_for_shape()
    counts = {0: 2000, 2: 3500, 3: 1200, 7: 4000, 9: 100}
    for k in range(0, 6):
        p = plan_cold_experts(counts, c, max_copies=k)
        assert len(p.copy) <= k
        opt, _ = brute_force(counts, c, max_copies=k)
        assert p.critical_path_ms == pytest.approx(opt)
    assert plan_cold_experts(counts, c, max_copies=0).copy == ()
    # The largest experts are the ones copied when slots are short.
    assert set(plan_cold_experts(counts, c, max_copies=2).copy) == {2, 7}
    assert math.isinf(plan_cold_experts(counts, c, max_copies=2).all_copy_ms)


def test_staging_slots_make_copies_wait_for_compute():
    c = flat_model(cpu_ms=100.0, copy_ms=5.0, gpu_ms=3.0)
    cpu = {0: 100.0, 1: 100.0}
    gpu = {0: 3.0, 1: 3.0}
    # One slot: copy 2 waits until expert 1 is computed (5 + 3), then 5 + 3 more.
    assert cm.simulate([], [0, 1], cpu, gpu, 5.0, 0.0, staging_slots=1) == (16.0, 0.0, 13.0, 16.0)
    # Two slots (double buffering): the copies stream back to back.
    assert cm.simulate([], [0, 1], cpu, gpu, 5.0, 0.0, staging_slots=2) == (13.0, 0.0, 10.0, 13.0)
    assert cm.simulate([], [0, 1], cpu, gpu, 5.0, 0.0) == (13.0, 0.0, 10.0, 13.0)
    # The hot work delays the copied experts' compute, hence the slot's release.
    assert cm.simulate([], [0, 1], cpu, gpu, 5.0, 20.0, staging_slots=1) == (31.0, 0.0, 28.0, 31.0)
    p1 = plan_cold_experts({0: 1, 1: 1, 2: 1}, c, staging_slots=1)
    p2 = plan_cold_experts({0: 1, 1: 1, 2: 1}, c, staging_slots=2)
    assert p1.critical_path_ms == pytest.approx(24.0) and p2.critical_path_ms == pytest.approx(18.0)
    with pytest.raises(ValueError):
        plan_cold_experts({0: 1}, c, staging_slots=0)


def test_gpu_busy_delays_copied_experts():
    c = flat_model(cpu_ms=10.0, copy_ms=4.0, gpu_ms=1.0)
    p = plan_cold_experts({0: 1, 1: 1}, c, gpu_busy_ms=0.0)
    assert p.copy == (0, 1) and p.critical_path_ms == pytest.approx(9.0)  # 4, 8, +1
    p = plan_cold_experts({0: 1, 1: 1}, c, gpu_busy_ms=9.5)
    assert p.critical_path_ms == pytest.approx(10.5)  # one each way: max(10, 9.5 + 1), the copy waiting
    assert len(p.copy) == 1


def test_exact_search_matches_brute_force_on_random_cases():
    rng = random.Random(1234)
    for trial in range(300):
        c = random_model(rng)
        counts = random_counts(rng, rng.randint(1, 9))
        busy = rng.choice((0.0, 0.0, rng.uniform(0, 50)))
        max_copies = rng.choice((None, None, rng.randint(0, 4)))
        slots = rng.choice((None, None, 1, 2))
        p = plan_cold_experts(counts, c, gpu_busy_ms=busy, max_copies=max_copies, staging_slots=slots)
        opt, copy_set = brute_force(counts, c, busy, max_copies, slots)
        assert p.exact
        assert p.critical_path_ms == pytest.approx(opt, abs=1e-9), (trial, counts)
        assert tuple(sorted(p.copy)) == copy_set, (trial, counts)
        assert sorted(p.cpu + p.copy) == sorted(counts)


def test_heuristic_close_to_exact_on_random_cases():
    """The heuristic (used above exact_limit) against exhaustive search: within 5%, mostly equal."""
    rng = random.Random(99)
    ratios = []
    for _ in range(300):
        c = random_model(rng)
        counts = random_counts(rng, rng.randint(2, 11))
        busy = rng.choice((0.0, rng.uniform(0, 40)))
        max_copies = rng.choice((None, rng.randint(1, 6)))
        exact = plan_cold_experts(counts, c, gpu_busy_ms=busy, max_copies=max_copies)
        heur = plan_cold_experts(counts, c, gpu_busy_ms=busy, max_copies=max_copies, exact_limit=0)
        assert exact.exact and not heur.exact
        assert heur.critical_path_ms >= exact.critical_path_ms - 1e-9
        if max_copies is not None:
            assert len(heur.copy) <= max_copies
        ratios.append(heur.critical_path_ms / exact.critical_path_ms)
    assert max(ratios) <= 1.05, max(ratios)
    assert sum(r <= 1 + 1e-9 for r in ratios) >= 0.9 * len(ratios)


def test_large_inputs_use_the_heuristic_quickly():
    c = cm.default_for_shape()
    rng = random.Random(5)
    counts = {e: rng.randint(1, 600) for e in range(40)}
    t = time.perf_counter()
    p = plan_cold_experts(counts, c)
    assert time.perf_counter() - t < 5.0
    assert not p.exact and sorted(p.cpu + p.copy) == list(range(40))
    assert p.critical_path_ms <= min(p.all_cpu_ms, p.all_copy_ms)


def test_exact_search_is_fast_for_mixtral_sizes():
    c = cm.default_for_shape()
    rng = random.Random(7)
    cases = [{e: rng.randint(1, rng.choice((4, 300, 3000))) for e in range(8)} for _ in range(50)]
    t = time.perf_counter()
    for counts in cases:
        cm._plan_cached.cache_clear()
        plan_cold_experts(counts, c)
    per_plan_ms = (time.perf_counter() - t) / len(cases) * 1e3
    assert per_plan_ms < 20, per_plan_ms  # ~0.2 ms here; generous for slow CI machines


def test_monotonicity():
    rng = random.Random(42)
    for _ in range(100):
        c = random_model(rng)
        counts = random_counts(rng, rng.randint(1, 7))
        base = plan_cold_experts(counts, c).critical_path_ms
        e = rng.choice(sorted(counts))
        # more tokens for one expert: never shorter
        assert plan_cold_experts({**counts, e: counts[e] * 3 + 1}, c).critical_path_ms >= base - 1e-9
        # one more expert hit: never shorter
        assert plan_cold_experts({**counts, 1000: rng.randint(1, 500)}, c).critical_path_ms >= base - 1e-9
        # busier GPU: never shorter
        assert plan_cold_experts(counts, c, gpu_busy_ms=rng.uniform(0, 30)).critical_path_ms >= base - 1e-9
        # faster link: never longer
        faster = CostModel(c.cpu_points, c.h2d_gb_s * 2, c.copy_latency_ms, c.expert_bytes, c.gpu_points)
        assert plan_cold_experts(counts, faster).critical_path_ms <= base + 1e-9
        # more copies allowed: never longer
        prev = math.inf
        for k in range(len(counts) + 1):
            cur = plan_cold_experts(counts, c, max_copies=k).critical_path_ms
            assert cur <= prev + 1e-9
            prev = cur
        assert prev == pytest.approx(base)
        # the plan is never worse than either one-sided plan
        p = plan_cold_experts(counts, c)
        assert p.critical_path_ms <= min(p.all_cpu_ms, p.all_copy_ms) + 1e-9


def test_deterministic_and_report():
    c = cm.default_for_shape()
    a = plan_cold_experts({3: 40, 1: 40, 2: 1, 0: 700}, c)
    cm._plan_cached.cache_clear()
    b = plan_cold_experts(dict(reversed(list({3: 40, 1: 40, 2: 1, 0: 700}.items()))), c)
    assert a == b
    assert sorted(a.cpu + a.copy) == [0, 1, 2, 3]
    # A tie between copying and not goes to not copying.
    tie = flat_model(cpu_ms=10.0, copy_ms=10.0, gpu_ms=0.0)
    assert plan_cold_experts({0: 1}, tie).copy == ()
    text = a.report()
    assert "critical path" in text and "cpu" in text and "copy" in text
    for e in (0, 1, 2, 3):
        assert f"e{e}(" in text


# ---------------------------------------------------------------- chunk plans
def brute_force_chunks(token_counts, cost, chunks, gpu_busy_ms=0.0):
    """Every allocation of chunks to the GPU per expert (whole copies first, partial ones after, each
    group in every order): the reference optimum of the chunked problem."""
    items = sorted((e, n) for e, n in token_counts.items() if n > 0)
    lat, bw_ms = cost.copy_latency_ms, cost.copy_ms - cost.copy_latency_ms
    best = math.inf
    for alloc in itertools.product(range(chunks + 1), repeat=len(items)):
        cpu_end = sum(cost.cpu_ms(n) * (chunks - j) / chunks for (e, n), j in zip(items, alloc))
        copied = [(lat + bw_ms * j / chunks, cost.gpu_ms(n) * j / chunks) for (e, n), j in zip(items, alloc) if j]
        for order in itertools.permutations(copied):
            best = min(best, cm.simulate_items(cpu_end, order, gpu_busy_ms)[0])
    return best


def test_chunk_plan_splits_one_decode_expert_between_dram_and_pcie():
    """Two 1-token cold experts on the H100 box's measured costs (CPU 3.4 ms, copy 6.47 ms): whole
    experts end at copy + GPU (~6.6 ms); cutting the copied one at 5/8 ends at ~4.7 ms."""
    c = CostModel(cpu_points=((1, 3.4), (16, 3.6)), h2d_gb_s=55.0, copy_latency_ms=0.064,
                  expert_bytes=cm.MIXTRAL_EXPERT_BYTES, gpu_points=((1, 0.17), (512, 0.32)))
    p = cm.plan_cold_chunks({0: 1, 4: 1}, c, chunks=8)
    assert p.whole.critical_path_ms == pytest.approx(c.copy_ms + c.gpu_ms(1))
    assert p.split is not None and p.on_gpu(p.split) == 5 and len(p.copy) == 1
    assert p.on_gpu(4 if p.split == 0 else 0) == 0  # the other expert stays whole on the CPU
    assert p.critical_path_ms == pytest.approx(3.4 + 3.4 * 3 / 8)
    assert p.critical_path_ms < 0.75 * p.whole.critical_path_ms
    # ... within one chunk of the bandwidth bound: 2 experts' bytes over CPU + PCIe together
    cpu_gb_s = cm.MIXTRAL_EXPERT_BYTES / 3.4 / 1e6
    bound = 2 * cm.MIXTRAL_EXPERT_BYTES / (cpu_gb_s + 55.0) / 1e6
    assert bound < p.critical_path_ms < bound + 3.4 / 8 + 0.2
    # A lone cold expert is cut too: ~3/8 copied, 5/8 on the CPU, instead of 3.4 ms on the CPU alone.
    p1 = cm.plan_cold_chunks({2: 1}, c, chunks=8)
    assert p1.whole.copy == () and p1.split == 2 and 0 < p1.on_gpu(2) < 8
    assert p1.critical_path_ms < 0.75 * 3.4  # 2.53 ms: 3/8 over PCIe (2.47 ms) + its GPU part
    assert cm.plan_cold_chunks({2: 1}, c, chunks=1).split is None  # one chunk: whole experts only


def test_chunk_plan_keeps_whole_experts_when_cutting_does_not_pay():
    # long prefill: the CPU's share of any expert would outlast all the copies: every expert is
    # copied whole (at 700 tokens each, 1/8 of an expert on the CPU, ~10 ms, would still pay)
    c = cm.default_for_shape()
    counts = {e: 4000 for e in range(6)}
    p = cm.plan_cold_chunks(counts, c, chunks=8)
    assert p.split is None and sorted(p.copy) == list(range(6)) and all(p.on_gpu(e) == 8 for e in range(6))
    assert p.critical_path_ms == pytest.approx(p.whole.critical_path_ms)
    # a copy latency longer than the CPU's whole time: never cut
    slow = CostModel(cpu_points=((1, 1.0),), h2d_gb_s=55.0, copy_latency_ms=5.0,
                     expert_bytes=cm.MIXTRAL_EXPERT_BYTES, gpu_points=((1, 0.2),))
    p = cm.plan_cold_chunks({0: 1, 1: 1}, slow, chunks=8)
    assert p.split is None and p.copy == ()


@pytest.mark.parametrize("seed", range(40))
def test_chunk_plan_is_consistent_and_near_the_chunked_optimum(seed):
    rng = random.Random(seed)
    cost = random_model(rng)
    chunks = rng.choice((2, 4, 8))
    counts = {e: rng.choice((1, 1, 2, 8, 64, 512)) for e in rng.sample(range(8), rng.randint(1, 3))}
    busy = rng.choice((0.0, 0.5, 5.0))
    p = cm.plan_cold_chunks(counts, cost, chunks, gpu_busy_ms=busy)
    # never worse than whole experts; at most one expert cut; the reported timeline is the plan's
    assert p.critical_path_ms <= p.whole.critical_path_ms + 1e-9
    cut = [e for e, j in p.gpu_chunks if 0 < j < chunks]
    assert cut == ([p.split] if p.split is not None else [])
    assert set(p.copy) == {e for e, j in p.gpu_chunks if j > 0} and (p.split is None or p.copy[-1] == p.split)
    cpu_end = sum(cost.cpu_ms(n) * (chunks - p.on_gpu(e)) / chunks for e, n in counts.items())
    lat, bw = cost.copy_latency_ms, cost.copy_ms - cost.copy_latency_ms
    order = [(lat + bw * p.on_gpu(e) / chunks, cost.gpu_ms(counts[e]) * p.on_gpu(e) / chunks) for e in p.copy]
    assert cm.simulate_items(cpu_end, order, busy)[0] == pytest.approx(p.critical_path_ms)
    # near the optimum over every chunk allocation: one cut gets within about a chunk of it
    best = brute_force_chunks(counts, cost, chunks, busy)
    chunk_cost = max(max(cost.cpu_ms(n) for n in counts.values()), cost.copy_ms) / chunks
    assert best - 1e-9 <= p.critical_path_ms <= best + chunk_cost + cost.copy_latency_ms + 1e-9


@pytest.mark.parametrize("seed", range(30))
def test_plans_on_ranked_ids_equal_plans_on_the_ids(seed):
    """The planners compute (and cache) plans on experts relabelled 0..n-1 in id order and map
    the labels back: the result equals planning on the ids themselves (tie-breaks included)."""
    rng = random.Random(seed)
    cost = random_model(rng)
    if seed % 3 == 0:  # identical decode experts: every tie-break by id is exercised
        counts = {e: 1 for e in rng.sample(range(60), rng.randint(2, 6))}
    else:
        counts = {e: rng.choice((1, 2, 8, 64, 512)) for e in rng.sample(range(60), rng.randint(1, 7))}
    busy, max_copies = rng.choice((0.0, 0.5, 5.0)), rng.choice((None, 0, 1, 3))
    items = tuple(sorted(counts.items()))
    direct = cm._plan_cached.__wrapped__(items, cost, busy, max_copies, None, cm.EXACT_LIMIT)
    assert plan_cold_experts(counts, cost, gpu_busy_ms=busy, max_copies=max_copies) == direct
    chunks = rng.choice((2, 8))
    chunked = cm.plan_cold_chunks(counts, cost, chunks, gpu_busy_ms=busy, max_copies=max_copies)
    assert chunked == cm._chunk_cached.__wrapped__(direct, cost, chunks, busy, max_copies)


def test_chunk_plan_rejects_bad_chunks():
    with pytest.raises(ValueError, match="chunks"):
        cm.plan_cold_chunks({0: 1}, cm.default_for_shape(), chunks=0)


# ----------------------------------------------------------------------------
# Host DRAM contention: the CPU queue and the copies slow each other while both run
# ----------------------------------------------------------------------------


def contended(cost: CostModel, s_cpu: float, s_h2d: float) -> CostModel:
    return dataclasses.replace(cost, cpu_contended_slowdown=s_cpu, h2d_contended_slowdown=s_h2d)


def ref_timeline(cpu_work, copies, gpu_busy_ms=0.0, s_cpu=1.0, s_h2d=1.0, slots=None):
    """An event-driven reference for the contended timeline, written apart from cm.HostDram:
    (critical path, CPU end, PCIe end, GPU end) of `cpu_work` solo ms of CPU work from t = 0 and
    copies [(copy ms, GPU ms)] in order; while the CPU and a copy both run, their rates are
    1/s_cpu and 1/s_h2d; slots: copy i waits for the GPU end of copy i - slots."""
    t, cpu_left = 0.0, float(cpu_work)
    cpu_end = 0.0 if cpu_left <= 0 else None
    gpu, pcie_end, done = gpu_busy_ms, 0.0, []
    for i, (c_ms, g_ms) in enumerate(copies):
        start = pcie_end if slots is None or i < slots else max(pcie_end, done[i - slots])
        if cpu_end is None:  # the CPU alone until the copy starts
            if cpu_left <= start - t:
                cpu_end, cpu_left = t + cpu_left, 0.0
            else:
                cpu_left -= start - t
        t, copy_left = start, float(c_ms)
        while copy_left > 0:
            if cpu_end is None:  # both running: the next event is whichever ends first
                dt_cpu, dt_copy = cpu_left * s_cpu, copy_left * s_h2d
                if dt_cpu <= dt_copy:
                    t += dt_cpu
                    copy_left -= dt_cpu / s_h2d
                    cpu_end, cpu_left = t, 0.0
                else:
                    t += dt_copy
                    cpu_left -= dt_copy / s_cpu
                    copy_left = 0.0
            else:  # the copy alone
                t += copy_left
                copy_left = 0.0
        pcie_end = t
        gpu = max(gpu, pcie_end) + g_ms
        done.append(gpu)
    if cpu_end is None:
        cpu_end = t + cpu_left
    return max(cpu_end, gpu), cpu_end, pcie_end, gpu


def ref_whole(cost, copy_set, token_counts, gpu_busy_ms=0.0, slots=None):
    """ref_timeline of a whole-expert plan: `copy_set` copied in the planner's (Johnson) order."""
    items = sorted((e, n) for e, n in token_counts.items() if n > 0)
    gpu = {e: cost.gpu_ms(n) for e, n in items}
    order = cm.copy_order(sorted(copy_set), cost.copy_ms, gpu)
    cpu_work = sum(cost.cpu_ms(n) for e, n in items if e not in copy_set)
    return ref_timeline(cpu_work, [(cost.copy_ms, gpu[e]) for e in order], gpu_busy_ms,
                        cost.cpu_contended_slowdown, cost.h2d_contended_slowdown, slots)


def ref_chunks(cost, token_counts, chunks, on_gpu, copy_order_, gpu_busy_ms=0.0):
    """ref_timeline of a chunk allocation {expert: chunks on the GPU} copied in `copy_order_`."""
    lat, bw = cost.copy_latency_ms, cost.copy_ms - cost.copy_latency_ms
    cpu_work = sum(cost.cpu_ms(n) * (chunks - on_gpu.get(e, 0)) / chunks for e, n in token_counts.items())
    copies = [(cost.copy_ms, cost.gpu_ms(token_counts[e])) if on_gpu[e] == chunks
              else (lat + bw * on_gpu[e] / chunks, cost.gpu_ms(token_counts[e]) * on_gpu[e] / chunks)
              for e in copy_order_]
    return ref_timeline(cpu_work, copies, gpu_busy_ms, cost.cpu_contended_slowdown, cost.h2d_contended_slowdown)


def test_overlap_arithmetic_against_hand_computed_timelines():
    # CPU 10 ms, copy 4 ms, both 2x slower together: the copy ends at 8 having slowed the CPU,
    # which did 4 ms of its work by then; its last 6 ms run alone: 14.
    assert cm.overlap(10.0, 4.0, 2.0, 2.0) == (14.0, 8.0)
    # CPU 2 ms at 1.5x ends at 3; by then the copy (2x) did 1.5 of its 10 ms; the rest alone: 11.5.
    assert cm.overlap(2.0, 10.0, 1.5, 2.0) == (3.0, 11.5)
    # the H100 box's decode split (5/8 of a 1-token expert copied): CPU 4.29 ms, copy 4.343 ms
    cpu_end, pcie_end = cm.overlap(4.29, 4.343, 1.25, 1.26)
    assert cpu_end == pytest.approx(4.29 * 1.25)  # 5.3625: the CPU ends first
    assert pcie_end == pytest.approx(5.3625 + 4.343 - 5.3625 / 1.26)
    # no contention, nothing to overlap with, or nothing at all: solo times
    assert cm.overlap(7.0, 3.0, 1.0, 1.0) == (7.0, 3.0)
    assert cm.overlap(0.0, 5.0, 2.0, 2.0) == (0.0, 5.0) and cm.overlap(5.0, 0.0, 2.0, 2.0) == (5.0, 0.0)
    # two copies back to back (4 ms each, GPU 1 ms each), CPU 10 ms, 2x/2x: copy 1 ends at 8
    # (CPU 6 left), copy 2 at 16 (CPU 2 left), which the CPU then finishes alone: 18.
    assert cm.timeline_items(10.0, [(4.0, 1.0), (4.0, 1.0)], 0.0, 2.0, 2.0) == (18.0, 18.0, 16.0, 17.0)
    assert cm.simulate_items(10.0, [(4.0, 1.0), (4.0, 1.0)], 0.0, 2.0, 2.0) == (18.0, 17.0)
    assert cm.simulate_items(10.0, [(4.0, 1.0), (4.0, 1.0)]) == (10.0, 9.0)  # uncontended, as before
    # One staging slot leaves the PCIe queue idle while the GPU computes: the CPU runs alone at full
    # speed then. CPU 10, copies 5 ms, GPU 3 ms, 2x/2x: copy 1 0-10 (CPU 5 left), GPU 10-13; CPU
    # alone 10-13 (2 left); copy 2 from 13: the CPU ends at 13 + 2*2 = 17, the copy did 2 of its 5,
    # the other 3 alone: 20; GPU 20-23.
    cpu, gpu = {0: 6.0, 1: 4.0}, {2: 3.0, 3: 3.0}
    assert cm.simulate([0, 1], [2, 3], cpu, gpu, 5.0, 0.0, 1, 2.0, 2.0) == (23.0, 17.0, 20.0, 23.0)
    # ... and a CPU queue that ends in that gap (6 ms: 1 left at 10) ends at 11; copy 2 alone: 13-18.
    assert cm.simulate([0], [2, 3], cpu, gpu, 5.0, 0.0, 1, 2.0, 2.0) == (21.0, 11.0, 18.0, 21.0)
    assert cm.simulate([0], [2, 3], cpu, gpu, 5.0, 0.0, 1) == (16.0, 6.0, 13.0, 16.0)  # uncontended
    # the reference event loop agrees on all of these
    assert ref_timeline(10.0, [(4.0, 1.0), (4.0, 1.0)], 0.0, 2.0, 2.0) == (18.0, 18.0, 16.0, 17.0)
    assert ref_timeline(10.0, [(5.0, 3.0), (5.0, 3.0)], 0.0, 2.0, 2.0, slots=1) == (23.0, 17.0, 20.0, 23.0)
    assert ref_timeline(6.0, [(5.0, 3.0), (5.0, 3.0)], 0.0, 2.0, 2.0, slots=1) == (21.0, 11.0, 18.0, 21.0)


def test_host_dram_matches_the_reference_on_random_timelines():
    rng = random.Random(11)
    for _ in range(2000):
        cpu_work = rng.choice((0.0, rng.uniform(0, 50)))
        copies = [(rng.uniform(0, 10), rng.uniform(0, 5)) for _ in range(rng.randint(0, 6))]
        busy = rng.choice((0.0, rng.uniform(0, 20)))
        s_cpu, s_h2d = rng.choice((1.0, rng.uniform(1, 3))), rng.choice((1.0, rng.uniform(1, 3)))
        got = cm.timeline_items(cpu_work, copies, busy, s_cpu, s_h2d)
        assert got == pytest.approx(ref_timeline(cpu_work, copies, busy, s_cpu, s_h2d), abs=1e-9)
        # contention never makes anything end sooner
        solo = cm.timeline_items(cpu_work, copies, busy)
        assert all(a >= b - 1e-9 for a, b in zip(got, solo))
        if copies:  # staging slots through simulate
            slots = rng.choice((1, 2))
            cpu, gpu = {-1: cpu_work}, {i: g for i, (_, g) in enumerate(copies)}
            c_ms = copies[0][0]
            got = cm.simulate([-1], list(range(len(copies))), cpu, gpu, c_ms, busy, slots, s_cpu, s_h2d)
            want = ref_timeline(cpu_work, [(c_ms, g) for _, g in copies], busy, s_cpu, s_h2d, slots)
            assert got == pytest.approx(want, abs=1e-9)


def test_contention_fields_validate_and_serialize(tmp_path, monkeypatch):
    base = cm.default_for_shape()
    assert base.cpu_contended_slowdown == 1.0 and base.h2d_contended_slowdown == 1.0 and not base.contended
    c = contended(base, 1.25, 1.26)
    assert c.contended and c != base and hash(c) != hash(base)
    assert "1.25x" in c.describe() and "1.26x" in c.describe()
    # JSON round trip and the cache, by key
    assert CostModel.from_json(c.to_json()) == c
    monkeypatch.setenv("FIDDLER_CACHE_DIR", str(tmp_path))
    cm.save_cached("box", c)
    assert cm.load_cached("box") == c
    # an old (version 1) cache file, without the factors, loads with 1.0: the old behaviour
    d = json.loads(c.to_json())
    del d["cpu_contended_slowdown"], d["h2d_contended_slowdown"]
    d["version"] = 1
    with open(cm.cache_path("old box"), "w") as f:
        json.dump(d, f)
    old = cm.load_cached("old box")
    assert old is not None and old == base and not old.contended
    # calibration's path carries them
    f = cm.fit_from_measurements(cpu_points=[(1, 3.12), (64, 8.6)], h2d_gb_s=50.7, copy_latency_ms=0.0,
                                 gpu_points=[(1, 0.17)], expert_bytes=cm.MIXTRAL_EXPERT_BYTES,
                                 cpu_contended_slowdown=1.25, h2d_contended_slowdown=1.26)
    assert (f.cpu_contended_slowdown, f.h2d_contended_slowdown) == (1.25, 1.26)
    assert CostModel.from_json(f.to_json()) == f
    f1 = cm.fit_from_measurements(cpu_points=[(1, 3.12)], h2d_gb_s=50.7, copy_latency_ms=0.0,
                                  gpu_points=[(1, 0.17)], expert_bytes=1)
    assert not f1.contended
    for bad in (0.99, 0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="slowdown"):
            contended(base, bad, 1.0)
        with pytest.raises(ValueError, match="slowdown"):
            contended(base, 1.0, bad)
    # the measured numbers behind the defaults calibration should find on the H100 box
    assert cm.MEASURED_CPU_CONTENDED_SLOWDOWN == pytest.approx(115.55 / 92.74)
    assert cm.MEASURED_H2D_CONTENDED_SLOWDOWN == pytest.approx(50.70 / 40.06)
    prior = cm.default_for_shape(cpu_contended_slowdown=cm.MEASURED_CPU_CONTENDED_SLOWDOWN,
                                 h2d_contended_slowdown=cm.MEASURED_H2D_CONTENDED_SLOWDOWN)
    assert prior.contended and dataclasses.replace(prior, cpu_contended_slowdown=1.0,
                                                   h2d_contended_slowdown=1.0) == base


# -- factors 1.0: the plans of the model without contention, bit for bit --------------------------
# The simulation and the chunk refinement as they were before contention, verbatim.


def old_simulate(cpu, copy, cpu_ms, gpu_ms, copy_ms, gpu_busy_ms=0.0, staging_slots=None):
    cpu_end = sum(cpu_ms[e] for e in cpu)
    pcie = 0.0
    gpu = gpu_busy_ms
    done = []
    for i, e in enumerate(copy):
        start = pcie
        if staging_slots is not None and i >= staging_slots:
            start = max(start, done[i - staging_slots])
        pcie = start + copy_ms
        gpu = max(gpu, pcie) + gpu_ms[e]
        done.append(gpu)
    return max(cpu_end, gpu), cpu_end, pcie, gpu


def old_simulate_items(cpu_end, copies, gpu_busy_ms=0.0):
    pcie = 0.0
    gpu = gpu_busy_ms
    for c_ms, g_ms in copies:
        pcie += c_ms
        gpu = max(gpu, pcie) + g_ms
    return max(cpu_end, gpu), gpu


def old_plan(token_counts, cost, gpu_busy_ms=0.0, max_copies=None, staging_slots=None):
    """The exhaustive optimum under old_simulate, with the planner's tie-break: (key, timeline, order)."""
    items = sorted((e, n) for e, n in token_counts.items() if n > 0)
    experts = [e for e, _ in items]
    cpu = {e: cost.cpu_ms(n) for e, n in items}
    gpu = {e: cost.gpu_ms(n) for e, n in items}
    limit = len(experts) if max_copies is None else max(0, min(max_copies, len(experts)))
    best = None
    for m in range(limit + 1):
        for subset in itertools.combinations(experts, m):
            order = cm.copy_order(sorted(subset), cost.copy_ms, gpu)
            rest = [e for e in experts if e not in subset]
            t = old_simulate(rest, order, cpu, gpu, cost.copy_ms, gpu_busy_ms, staging_slots)
            busy = t[1] + m * cost.copy_ms + sum(gpu[e] for e in subset)
            key = (round(t[0] / 1e-9), m, round(busy / 1e-9), tuple(sorted(subset)))
            if best is None or key < best[0]:
                best = (key, t, tuple(order))
    return best


def old_chunk_refine(whole, cost, chunks, gpu_busy_ms, max_copies):
    n = dict(whole.token_counts)
    best = (whole.critical_path_ms, None, None, whole.cpu_ms, whole.gpu_end_ms)
    if chunks > 1 and n:
        lat = cost.copy_latency_ms
        bw_ms = cost.copy_ms - lat

        def part(e, j):
            return lat + bw_ms * j / chunks, cost.gpu_ms(n[e]) * j / chunks

        whole_copies = [(cost.copy_ms, cost.gpu_ms(n[e])) for e in whole.copy]
        if max_copies is None or len(whole.copy) < max_copies:
            for e in whole.cpu:
                for j in range(1, chunks):
                    cpu_end = whole.cpu_ms - cost.cpu_ms(n[e]) * j / chunks
                    crit, gpu_end = old_simulate_items(cpu_end, whole_copies + [part(e, j)], gpu_busy_ms)
                    if crit < best[0] - 1e-6:
                        best = (crit, e, j, cpu_end, gpu_end)
        for i, e in enumerate(whole.copy):
            others = whole_copies[:i] + whole_copies[i + 1:]
            for j in range(1, chunks):
                cpu_end = whole.cpu_ms + cost.cpu_ms(n[e]) * (chunks - j) / chunks
                crit, gpu_end = old_simulate_items(cpu_end, others + [part(e, j)], gpu_busy_ms)
                if crit < best[0] - 1e-6:
                    best = (crit, e, j, cpu_end, gpu_end)
    return best


def test_factors_one_reproduce_the_uncontended_plans_exactly():
    rng = random.Random(2024)
    for trial in range(250):
        c = contended(random_model(rng), 1.0, 1.0)  # explicitly 1.0: the model before contention
        counts = random_counts(rng, rng.randint(1, 8))
        busy = rng.choice((0.0, 0.0, rng.uniform(0, 50)))
        max_copies = rng.choice((None, None, rng.randint(0, 4)))
        slots = rng.choice((None, None, 1, 2))
        p = plan_cold_experts(counts, c, gpu_busy_ms=busy, max_copies=max_copies, staging_slots=slots)
        _, (crit, cpu_end, pcie_end, gpu_end), order = old_plan(counts, c, busy, max_copies, slots)
        assert (p.critical_path_ms, p.cpu_ms, p.pcie_ms, p.gpu_end_ms, p.copy) == \
            (crit, cpu_end, pcie_end, gpu_end, order), trial  # exact: no float changed
        chunks = rng.choice((1, 2, 4, 8))
        q = cm.plan_cold_chunks(counts, c, chunks, gpu_busy_ms=busy, max_copies=max_copies)
        crit, split, j, cpu_end, gpu_end = old_chunk_refine(q.whole, c, chunks, busy, max_copies)
        assert (q.critical_path_ms, q.split, q.cpu_ms, q.gpu_end_ms) == (crit, split, cpu_end, gpu_end), trial
        assert split is None or q.on_gpu(split) == j


# -- factors > 1: the planners against brute force under the contended timeline -------------------


def random_contention(rng):
    return rng.choice((1.0, rng.uniform(1.0, 2.0))), rng.choice((rng.uniform(1.0, 2.0), 1.25))


def test_contended_whole_plans_match_brute_force():
    rng = random.Random(77)
    n_differ = 0
    for trial in range(300):
        solo = random_model(rng)
        c = contended(solo, *random_contention(rng))
        counts = random_counts(rng, rng.randint(1, 8))
        busy = rng.choice((0.0, 0.0, rng.uniform(0, 50)))
        max_copies = rng.choice((None, None, rng.randint(0, 4)))
        slots = rng.choice((None, None, 1, 2))
        p = plan_cold_experts(counts, c, gpu_busy_ms=busy, max_copies=max_copies, staging_slots=slots)
        assert p.exact and sorted(p.cpu + p.copy) == sorted(counts)
        if max_copies is not None:
            assert len(p.copy) <= max_copies
        # its timeline is the reference's
        ref = ref_whole(c, set(p.copy), counts, busy, slots)
        assert (p.critical_path_ms, p.cpu_ms, p.pcie_ms, p.gpu_end_ms) == pytest.approx(ref, abs=1e-9)
        # and no subset of copies does better under the contended reference timeline
        experts = sorted(counts)
        limit = len(experts) if max_copies is None else min(max_copies, len(experts))
        opt = min(ref_whole(c, set(s), counts, busy, slots)[0]
                  for m in range(limit + 1) for s in itertools.combinations(experts, m))
        assert p.critical_path_ms == pytest.approx(opt, abs=1e-9), (trial, counts)
        # same answer as the planner's own brute force (tie-break included) under contention
        _, copy_set = brute_force(counts, c, busy, max_copies, slots)
        assert tuple(sorted(p.copy)) == copy_set
        # the uncontended plan is never better under contention, and contention never helps
        s = plan_cold_experts(counts, solo, gpu_busy_ms=busy, max_copies=max_copies, staging_slots=slots)
        assert ref_whole(c, set(s.copy), counts, busy, slots)[0] >= p.critical_path_ms - 1e-9
        assert p.critical_path_ms >= s.critical_path_ms - 1e-9
        n_differ += set(s.copy) != set(p.copy)
    assert n_differ > 0  # contention does move plans


def test_contended_heuristic_close_to_exact():
    rng = random.Random(5150)
    ratios = []
    for _ in range(200):
        c = contended(random_model(rng), *random_contention(rng))
        counts = random_counts(rng, rng.randint(2, 11))
        busy = rng.choice((0.0, rng.uniform(0, 40)))
        exact = plan_cold_experts(counts, c, gpu_busy_ms=busy)
        heur = plan_cold_experts(counts, c, gpu_busy_ms=busy, exact_limit=0)
        assert heur.critical_path_ms >= exact.critical_path_ms - 1e-9
        ratios.append(heur.critical_path_ms / exact.critical_path_ms)
    # as without contention: mostly equal, rarely a few % off (up to ~8% seen over other seeds)
    assert max(ratios) <= 1.10, max(ratios)
    assert sum(r <= 1 + 1e-9 for r in ratios) >= 0.9 * len(ratios)


def test_more_contention_never_shortens_a_plan():
    """More contention: every plan's timeline is no shorter, so neither is the (exact) whole-expert
    optimum. (The chunk plan, a refinement of that optimum, is a heuristic: it may not be monotone.)"""
    rng = random.Random(8)
    factors = ((1.0, 1.0), (1.0, 1.3), (1.3, 1.3), (1.6, 1.3), (2.0, 2.5))
    for _ in range(150):
        base = random_model(rng)
        counts = random_counts(rng, rng.randint(1, 7))
        chunks = rng.choice((2, 4, 8))
        prev = 0.0
        for s_cpu, s_h2d in factors:
            cur = plan_cold_experts(counts, contended(base, s_cpu, s_h2d)).critical_path_ms
            assert cur >= prev - 1e-9
            prev = cur
        p = cm.plan_cold_chunks(counts, contended(base, *factors[rng.randrange(len(factors))]), chunks)
        times = [ref_chunks(contended(base, *f), counts, chunks, dict(p.gpu_chunks), p.copy)[0] for f in factors]
        assert all(b >= a - 1e-9 for a, b in itertools.pairwise(times))


def brute_force_cuts(whole, cost, chunks, gpu_busy_ms=0.0, max_copies=None):
    """The reference's best over the whole plan and every cut of one of its experts (the chunk
    planner's candidates: a CPU expert's first j chunks copied after the whole copies, or a copied
    expert keeping j chunks, moved last): (critical path, split, j)."""
    counts = dict(whole.token_counts)
    on = {e: chunks for e in whole.copy}
    best = (ref_chunks(cost, counts, chunks, on, whole.copy, gpu_busy_ms)[0], None, None)
    for e in counts:
        if e in whole.cpu and max_copies is not None and len(whole.copy) >= max_copies:
            continue
        for j in range(1, chunks):
            order = [x for x in whole.copy if x != e] + [e]
            crit = ref_chunks(cost, counts, chunks, {**on, e: j}, order, gpu_busy_ms)[0]
            if crit < best[0] - 1e-6:
                best = (crit, e, j)
    return best


def brute_force_chunks_contended(token_counts, cost, chunks, gpu_busy_ms=0.0):
    """The reference's best over every allocation of chunks and every copy order."""
    items = sorted(token_counts.items())
    best = math.inf
    for alloc in itertools.product(range(chunks + 1), repeat=len(items)):
        on = {e: j for (e, _), j in zip(items, alloc) if j}
        for order in itertools.permutations(on):
            best = min(best, ref_chunks(cost, token_counts, chunks, on, order, gpu_busy_ms)[0])
    return best


@pytest.mark.parametrize("seed", range(40))
def test_contended_chunk_plan_against_brute_force(seed):
    rng = random.Random(1000 + seed)
    c = contended(random_model(rng), *random_contention(rng))
    chunks = rng.choice((2, 4, 8))
    counts = {e: rng.choice((1, 1, 2, 8, 64, 512)) for e in rng.sample(range(8), rng.randint(1, 3))}
    busy = rng.choice((0.0, 0.5, 5.0))
    max_copies = rng.choice((None, None, 1))
    p = cm.plan_cold_chunks(counts, c, chunks, gpu_busy_ms=busy, max_copies=max_copies)
    # the whole plan is the contended optimum; the chunk plan never worse; at most one expert cut
    assert p.whole == plan_cold_experts(counts, c, gpu_busy_ms=busy, max_copies=max_copies)
    assert p.critical_path_ms <= p.whole.critical_path_ms + 1e-9
    assert [e for e, j in p.gpu_chunks if 0 < j < chunks] == ([p.split] if p.split is not None else [])
    # its timeline is the reference's
    ref = ref_chunks(c, counts, chunks, dict(p.gpu_chunks), p.copy, busy)
    assert (p.critical_path_ms, p.cpu_ms, p.gpu_end_ms) == pytest.approx((ref[0], ref[1], ref[3]), abs=1e-9)
    # the split point: the best of every cut of every expert, by brute force under contention
    crit, split, _ = brute_force_cuts(p.whole, c, chunks, busy, max_copies)
    assert p.critical_path_ms == pytest.approx(crit, abs=1e-9)
    assert (p.split is None) == (split is None)  # (experts of equal costs tie: either may be the one cut)
    # near the optimum over every chunk allocation and copy order (within about one chunk)
    if max_copies is None:
        best = brute_force_chunks_contended(counts, c, chunks, busy)
        s = max(c.cpu_contended_slowdown, c.h2d_contended_slowdown)
        chunk_cost = max(max(c.cpu_ms(n) for n in counts.values()), c.copy_ms) / chunks
        assert best - 1e-9 <= p.critical_path_ms <= best + s * (chunk_cost + c.copy_latency_ms) + 1e-9


# -- the H100 box's numbers ------------------------------------------------------------------------


def target_model(copy_latency_ms: float = 0.0) -> CostModel:
    """The H100 box with the native CPU kernel: CPU expert 3.12 ms at 1 token, 8.6 at 64, 21.3 at
    256; H2D 50.7 GB/s; Mixtral expert 352 MB; the prior's GPU times. Without contention."""
    return CostModel(cpu_points=((1, 3.12), (64, 8.6), (256, 21.3)), h2d_gb_s=50.7,
                     copy_latency_ms=copy_latency_ms, expert_bytes=cm.MIXTRAL_EXPERT_BYTES,
                     gpu_points=cm.default_for_shape().gpu_points)


def chunk_plan_time(p, cost, counts, gpu_busy_ms=0.0) -> float:
    """The reference critical path of chunk plan p's allocation under cost's contention."""
    return ref_chunks(cost, counts, p.chunks, dict(p.gpu_chunks), p.copy, gpu_busy_ms)[0]


def cpu_work(p, cost, counts) -> float:
    """Solo CPU ms a chunk plan leaves on the CPU."""
    return sum(cost.cpu_ms(n) * (p.chunks - p.on_gpu(e)) / p.chunks for e, n in counts.items())


@pytest.mark.parametrize("counts,latency,solo_cut,contended_cut", [
    # two 1-token cold experts (the README's decode case), the measured 0.064 ms copy latency:
    # the copied share of the cut expert drops from 5/8 to 4/8
    ({0: 1, 4: 1}, cm.MEASURED_COPY_LATENCY_MS, (0, 5), (0, 4)),
    # a small decode batch, 8 and 16 tokens on two cold experts: 6/8 -> 5/8 of the 16-token one
    ({0: 8, 1: 16}, 0.0, (1, 6), (1, 5)),
])
def test_decode_split_moves_with_the_h100_contention(counts, latency, solo_cut, contended_cut):
    solo = target_model(latency)
    cont = contended(solo, 1.25, 1.26)
    ps, pc = cm.plan_cold_chunks(counts, solo, 8), cm.plan_cold_chunks(counts, cont, 8)
    assert (ps.split, ps.on_gpu(ps.split)) == solo_cut and (pc.split, pc.on_gpu(pc.split)) == contended_cut
    assert len(ps.copy) == len(pc.copy) == 1  # one expert cut, the other whole on the CPU
    # under the contended timeline the contended plan is better, and is what it says it is
    t_solo_plan, t_cont_plan = chunk_plan_time(ps, cont, counts), chunk_plan_time(pc, cont, counts)
    assert t_cont_plan == pytest.approx(pc.critical_path_ms, abs=1e-9)
    assert t_cont_plan < t_solo_plan - 0.01
    # the plain model promised ~20% less than the split delivers once both sides share DRAM
    assert ps.critical_path_ms < 0.85 * t_solo_plan
    # the CPU gets more of the cut expert: the copies are the side that slows most
    assert cpu_work(pc, solo, counts) > cpu_work(ps, solo, counts)
    # and no cut of any whole-expert assignment does better under contention (brute force)
    items, best = sorted(counts), math.inf
    for m in range(len(items) + 1):
        for copied in itertools.combinations(items, m):
            on = {e: 8 for e in copied}
            best = min(best, ref_chunks(cont, counts, 8, on, list(copied))[0])
            for e in items:
                for j in range(1, 8):
                    order = [x for x in copied if x != e] + [e]
                    best = min(best, ref_chunks(cont, counts, 8, {**on, e: j}, order)[0])
    assert pc.critical_path_ms == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("counts", [
    {0: 480, 1: 530, 2: 505, 3: 470, 4: 560, 5: 515, 6: 490},  # 7 cold experts, 1 hot (546 tokens)
    {0: 480, 1: 530, 2: 505, 3: 470, 4: 560, 5: 515},  # 6 cold experts, 2 hot
])
def test_prefill_gives_the_cpu_less_under_contention(counts):
    """2048 prompt tokens, top-2 of 8 experts: ~500 tokens per expert, 6-7 of them cold."""
    solo = target_model(cm.MEASURED_COPY_LATENCY_MS)
    cont = contended(solo, 1.25, 1.26)
    hot_ms = solo.gpu_ms(2 * 2048 - sum(counts.values()))
    ps = cm.plan_cold_chunks(counts, solo, 8, gpu_busy_ms=hot_ms)
    pc = cm.plan_cold_chunks(counts, cont, 8, gpu_busy_ms=hot_ms)
    assert cpu_work(ps, solo, counts) > 30.0  # without contention the CPU takes most of an expert
    assert cpu_work(pc, solo, counts) < cpu_work(ps, solo, counts)  # with it, less
    assert cpu_work(pc, solo, counts) == 0.0  # here: nothing, every expert is copied
    # better under the contended timeline, which the plain plan misjudged by > 20%
    t_solo_plan = chunk_plan_time(ps, cont, counts, hot_ms)
    assert pc.critical_path_ms < t_solo_plan - 1.0
    assert ps.critical_path_ms < 0.85 * t_solo_plan
    assert pc.critical_path_ms == pytest.approx(chunk_plan_time(pc, cont, counts, hot_ms), abs=1e-9)


def test_calibration_passes_run_until_they_agree():
    """A pass disturbed by a busy host (every point ~2x) is outvoted: passes go on until one
    agrees with the best so far, and each point keeps its best time."""
    from vllm_fiddler.runtime.calibrate import settled_points

    def scripted(*passes):
        it = iter(passes)
        calls = []

        def one_pass():
            calls.append(1)
            return dict(next(it))

        return one_pass, calls

    quiet = {1: 2.8, 16: 3.9, 256: 22.0}
    busy = {1: 5.5, 16: 5.5, 256: 26.6}
    one_pass, calls = scripted(busy, quiet, {1: 2.9, 16: 3.8, 256: 22.5})
    assert settled_points(one_pass) == [(1, 2.8), (16, 3.8), (256, 22.0)] and len(calls) == 3
    one_pass, calls = scripted(quiet, {1: 2.85, 16: 4.0, 256: 21.8})
    assert settled_points(one_pass) == [(1, 2.8), (16, 3.9), (256, 21.8)] and len(calls) == 2
    # never settling: stops at max_passes with the best of each point
    one_pass, calls = scripted(busy, quiet, busy, {1: 9.0, 16: 2.0, 256: 50.0})
    assert settled_points(one_pass, max_passes=4) == [(1, 2.8), (16, 2.0), (256, 22.0)] and len(calls) == 4


def test_contention_keeps_each_times_best_round():
    """A disturbed round (1 token 2.82 -> 6.42 ms, 64 tokens 15.16 ms alone) is outvoted
    by quiet rounds; one round alone still gives its own ratios, clamped to SLOWDOWN_RANGE."""
    from vllm_fiddler.runtime.calibrate import SLOWDOWN_RANGE, contention_from_rounds

    disturbed = {"cpu_solo": {1: 2.82, 64: 15.16}, "cpu_busy": {1: 6.42, 64: 7.78}, "copy_solo": 6.42,
                 "copy_busy": 8.53}
    quiet = {"cpu_solo": {1: 2.70, 64: 6.80}, "cpu_busy": {1: 3.45, 64: 7.90}, "copy_solo": 6.45,
             "copy_busy": 8.10}
    quiet2 = {"cpu_solo": {1: 2.75, 64: 6.70}, "cpu_busy": {1: 3.50, 64: 8.00}, "copy_solo": 6.40,
              "copy_busy": 8.30}
    got = contention_from_rounds([disturbed, quiet, quiet2])
    assert got["cpu_contended_slowdown"] == pytest.approx(max(3.45 / 2.70, 7.78 / 6.70))
    assert got["h2d_contended_slowdown"] == pytest.approx(8.10 / 6.40)
    assert got["detail"]["rounds"] == 3 and got["detail"]["cpu_ms"][64] == (6.70, 7.78)
    alone = contention_from_rounds([disturbed])
    assert alone["cpu_contended_slowdown"] == pytest.approx(6.42 / 2.82)  # 64 tokens: 0.51, clamped to 1
    hot = dict(disturbed, cpu_busy={1: 20.0, 64: 7.78})
    assert contention_from_rounds([hot])["cpu_contended_slowdown"] == SLOWDOWN_RANGE[1]



# ----------------------------------------------------------------------------
# Routed steps: chunks streamed to the GPU
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("cpu_ms,copy_ms,s_cpu,s_h2d,chunks", [
    (2.9, 6.5, 1.17, 1.20, 8),  # an H100 box model
    (2.9, 6.5, 1.0, 1.0, 8),
    (6.0, 3.0, 1.3, 1.1, 5),  # a slow CPU: most chunks over PCIe
    (1.0, 50.0, 1.0, 1.0, 8),  # a slow link: nothing streamed
    (3.0, 3.0, 1.0, 1.0, 1),  # one chunk: all or nothing
])
def test_streamed_chunks_is_the_best_cut_by_brute_force(cpu_ms, copy_ms, s_cpu, s_h2d, chunks):
    cost = dataclasses.replace(flat_model(cpu_ms, copy_ms, 0.1), cpu_contended_slowdown=s_cpu,
                               h2d_contended_slowdown=s_h2d)

    def step_ms(n):  # both sides at once: each slowed by the other while both run
        both = 0 < n < chunks
        return max(cpu_ms * (chunks - n) / chunks * (s_cpu if both else 1),
                   copy_ms * n / chunks * (s_h2d if both else 1))

    (n,) = cm.streamed_chunks(cost, chunks)
    assert 0 <= n <= chunks
    assert step_ms(n) == pytest.approx(min(step_ms(j) for j in range(chunks + 1)))
    if step_ms(n) == pytest.approx(cpu_ms):
        assert n == 0  # streaming that saves nothing is not done


def test_streamed_chunks_planted_answers():
    model_n = dataclasses.replace(flat_model(2.9, 6.5, 0.1), cpu_contended_slowdown=1.17,
                                  h2d_contended_slowdown=1.20)
    assert cm.streamed_chunks(model_n, 8) == (2,)  # 2.54 ms against 2.9 on the CPU alone
    # two positions: 5 of 16 (2.44 ms an expert), spread 3 + 2, the first position taking more
    assert cm.streamed_chunks(model_n, 8, top_k=2) == (3, 2)
    assert cm.streamed_chunks(model_n, 8, top_k=4) == (3, 3, 2, 2)  # 10 of 32: 2.44 ms
    assert cm.streamed_chunks(flat_model(1.0, 50.0, 0.1), 8, top_k=2) == (0, 0)
    assert cm.streamed_chunks(flat_model(10.0, 1.0, 0.1), 4, top_k=2) == (4, 4)  # the link wins outright
    for bad in ((0, 1), (8, 0)):
        with pytest.raises(ValueError):
            cm.streamed_chunks(model_n, *bad)


@pytest.mark.parametrize("top_k,chunks", [(1, 8), (2, 8), (3, 5), (4, 4)])
@pytest.mark.parametrize("cold_share", [1.0, 0.8, 0.43, 0.1])
@pytest.mark.parametrize("cpu_ms,s_cpu,s_h2d", [(2.93, 1.28, 1.23), (2.56, 1.08, 1.29), (6.0, 1.3, 1.1)])
def test_streamed_chunks_minimise_the_expected_layer_over_cold_subsets(top_k, chunks, cold_share, cpu_ms,
                                                                        s_cpu, s_h2d):
    """The cut minimises the layer's expected max(CPU, PCIe) over every subset of cold top-k
    positions (each cold with probability cold_share), among the evenly spread cuts: checked
    against an enumeration of the subsets themselves."""
    cost = dataclasses.replace(flat_model(cpu_ms, 6.5, 0.1), cpu_contended_slowdown=s_cpu,
                               h2d_contended_slowdown=s_h2d, stream_gb_s=50.1 / 54.9)  # 7.12 ms an expert

    def expected(cut):
        total = 0.0
        for cold in itertools.product((0, 1), repeat=top_k):
            if not any(cold):
                continue
            gpu = sum(n for n, c in zip(cut, cold) if c)
            on_cpu = sum(cold) * chunks - gpu
            both = gpu > 0 and on_cpu > 0
            ms = max(cpu_ms * on_cpu / chunks * (s_cpu if both else 1), 7.12 * gpu / chunks * (s_h2d if both else 1))
            total += math.prod(cold_share if c else 1 - cold_share for c in cold) * ms
        return total

    spread = [tuple(m // top_k + (k < m % top_k) for k in range(top_k)) for m in range(chunks * top_k + 1)]
    got = cm.streamed_chunks(cost, chunks, top_k, cold_share=cold_share)
    assert got in spread
    assert expected(got) == pytest.approx(min(expected(c) for c in spread), rel=1e-3)
    if expected(got) == pytest.approx(expected((0,) * top_k), rel=1e-9):
        assert got == (0,) * top_k  # streaming that saves nothing is not done


def test_streamed_chunks_follow_the_hit_rate():
    """An H100 box calibration (CPU 2.93 ms an expert, contention 1.28x / 1.23x, in-place reads
    50.1 GB/s): with every expert cold, 5 of 16 chunks (3, 2); at decode's measured 57% hit
    rate a layer mostly has one cold expert, whose 3 of 8 would outlast the CPU's 5: (2, 2)."""
    model_x = dataclasses.replace(flat_model(2.93, 6.5, 0.1), cpu_contended_slowdown=1.28,
                                  h2d_contended_slowdown=1.23, stream_gb_s=50.1 / 54.9)
    assert cm.streamed_chunks(model_x, 8, top_k=2) == cm.streamed_chunks(model_x, 8, 2, cold_share=1.0) == (3, 2)
    assert cm.streamed_chunks(model_x, 8, top_k=2, cold_share=0.43) == (2, 2)
    assert cm.streamed_chunks(model_x, 8, top_k=1, cold_share=0.43) == cm.streamed_chunks(model_x, 8) == (2,)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            cm.streamed_chunks(model_x, 8, top_k=2, cold_share=bad)


def test_streamed_chunks_price_the_measured_in_place_reads():
    """Streamed chunks are read by the GPU's kernels in place, not by the copy engine: with
    their own measured rate the cut follows it; a model without one (an older cache file)
    prices them as copies."""
    model_n = dataclasses.replace(flat_model(2.9, 6.5, 0.1), cpu_contended_slowdown=1.17,
                                  h2d_contended_slowdown=1.20)
    assert model_n.stream_gb_s == 0.0 and model_n.stream_ms == pytest.approx(model_n.copy_ms)
    # in-place reads at 0.8x the copy's rate: 8.1 ms an expert; 4 of 16 (2.54 ms) beats 5 (3.05)
    slower = dataclasses.replace(model_n, stream_gb_s=0.8 * model_n.h2d_gb_s)
    assert slower.stream_ms == pytest.approx(6.5 / 0.8)
    assert cm.streamed_chunks(slower, 8, top_k=2) == (2, 2)
    # as fast as the copies: the copy-priced cut
    same = dataclasses.replace(model_n, stream_gb_s=model_n.h2d_gb_s)
    assert cm.streamed_chunks(same, 8, top_k=2) == cm.streamed_chunks(model_n, 8, top_k=2) == (3, 2)
    # round trip through the cache format; a version-2 file (no field) loads as not measured
    assert CostModel.from_json(slower.to_json()) == slower
    old = json.loads(model_n.to_json())
    del old["stream_gb_s"]
    old["version"] = 2
    assert CostModel.from_dict(old).stream_gb_s == 0.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="stream_gb_s"):
            dataclasses.replace(model_n, stream_gb_s=bad)


def _pattern_layer_ms(cut, patterns, chunks, cpu_ms, s_cpu, s_h2d, stream_ms=7.12):
    """The expected max(CPU, PCIe) of a layer over tokens' cold-position masks (bit k: position
    k cold), weighted by `patterns`: written out mask by mask, apart from the cost model's loop."""
    total = 0.0
    for mask, weight in enumerate(patterns):
        cold = [k for k in range(len(cut)) if mask >> k & 1]
        if not cold:
            continue
        gpu = sum(cut[k] for k in cold)
        on_cpu = len(cold) * chunks - gpu
        both = gpu > 0 and on_cpu > 0
        total += weight * max(cpu_ms * on_cpu / chunks * (s_cpu if both else 1),
                              stream_ms * gpu / chunks * (s_h2d if both else 1))
    return total / sum(patterns)


@pytest.mark.parametrize("patterns", [
    [0, 1, 1, 0],  # exactly one cold expert a token (settled batch-1 decode)
    [0, 1, 0, 0],  # always the first position
    [0, 0, 0, 1],  # both, always
    [3, 1, 1, 0],  # mostly none
    [0, 5, 2, 9],
])
@pytest.mark.parametrize("cpu_ms,s_cpu,s_h2d", [(2.46, 1.22, 1.25), (3.3, 1.22, 1.25), (6.0, 1.3, 1.1)])
def test_streamed_chunks_minimise_the_expected_layer_over_cold_patterns(patterns, cpu_ms, s_cpu, s_h2d):
    """Given how often each set of top-k positions was cold together, the cut minimises the
    layer's expected max(CPU, PCIe) over those sets, among the evenly spread cuts, and takes the
    fewest chunks among equals."""
    top_k, chunks = 2, 8
    cost = dataclasses.replace(flat_model(cpu_ms, 6.5, 0.1), cpu_contended_slowdown=s_cpu,
                               h2d_contended_slowdown=s_h2d, stream_gb_s=50.1 / 54.9)  # 7.12 ms an expert
    spread = [tuple(m // top_k + (k < m % top_k) for k in range(top_k)) for m in range(chunks * top_k + 1)]
    got = cm.streamed_chunks(cost, chunks, top_k, cold_patterns=patterns)
    costs = [_pattern_layer_ms(c, patterns, chunks, cpu_ms, s_cpu, s_h2d) for c in spread]
    best = min(costs)
    assert got == spread[next(i for i, c in enumerate(costs) if c <= best * (1 + 1e-9))]
    # counts or shares alike
    assert cm.streamed_chunks(cost, chunks, top_k, cold_patterns=[10 * w for w in patterns]) == got


def test_streamed_chunks_over_cold_patterns_of_independent_positions_equal_the_share():
    """Masks weighted as independent positions cold at `cold_share` price the cut as the share
    does."""
    for cpu_ms in (2.46, 2.93, 3.3, 4.0, 6.0):
        cost = dataclasses.replace(flat_model(cpu_ms, 6.5, 0.1), cpu_contended_slowdown=1.22,
                                   h2d_contended_slowdown=1.25, stream_gb_s=50.1 / 54.9)
        for top_k in (1, 2, 3):
            for share in (0.1, 0.43, 0.5, 0.8, 1.0):
                independent = [math.prod(share if mask >> k & 1 else 1 - share for k in range(top_k))
                               for mask in range(1 << top_k)]
                assert cm.streamed_chunks(cost, 8, top_k, cold_patterns=independent) == \
                    cm.streamed_chunks(cost, 8, top_k, cold_share=share)


def test_streamed_chunks_one_cold_expert_a_token_on_a_slow_cpu():
    """The case behind pricing over patterns: a CPU at 3.3 ms an expert. Independent positions
    at decode's 50% share weigh two cold experts a quarter and take (3, 2); with exactly one cold
    expert a token, as settled decode has, a lone expert's 3 streamed chunks would outlast the
    CPU's 5: (2, 2). No cold expert at all: nothing streamed."""
    slow = dataclasses.replace(flat_model(3.3, 6.5, 0.1), cpu_contended_slowdown=1.22,
                               h2d_contended_slowdown=1.25, stream_gb_s=50.1 / 54.9)
    assert cm.streamed_chunks(slow, 8, 2, cold_share=0.5) == (3, 2)
    assert cm.streamed_chunks(slow, 8, 2, cold_patterns=[0, 1, 1, 0]) == (2, 2)
    assert cm.streamed_chunks(slow, 8, 2, cold_patterns=[5, 0, 0, 0]) == (0, 0)
    for bad in ([0, 1, 1], [0, 1, 1, 0, 0], [0, -1, 2, 0], [0, 0, 0, 0]):
        with pytest.raises(ValueError, match="cold_patterns"):
            cm.streamed_chunks(slow, 8, 2, cold_patterns=bad)
