"""Measures the cost model's inputs on this machine (CUDA), with a cache file.

What is timed, on the model's real shapes and the runtime's real code paths:
- CPU: one cold expert through the CPU kernel at several token counts;
- PCIe: one expert's weights host->device into a staging slot, and the GPU's
  kernels reading one expert in place from pinned host memory (routed steps);
- GPU: one expert through the Triton kernel at several token counts;
- host DRAM contention: the CPU expert (1 and 64 tokens) while staging
  copies stream on the copy stream, and the copies while the CPU expert
  (1 token, DRAM-bound) runs; each slowdown is contended / solo time, timed
  back to back, clamped to [1, 3] (the CPU's: the larger of its two), each
  time the best of CONTENTION_ROUNDS rounds.
The result is saved under ~/.cache/vllm_fiddler keyed by CPU, GPU, shape,
dtype, threads, chunks and CACHE_VERSION, so later starts skip the ~1.3 s of
measurement.
"""

from __future__ import annotations

import math
import os
import threading
import time

import torch

from vllm_fiddler.cpuinfo import cpu_model_name
from vllm_fiddler.logger import logger

CPU_TOKENS = (1, 4, 16, 64, 256)
CPU_WARMUP_CALLS = 4  # 1-token experts before the first timed point
CPU_TIMINGS = 2  # timings per CPU point (2 calls each); the best is kept
# Passes over CPU_TOKENS until one agrees with the best so far within CPU_PASS_AGREEMENT at
# every point: on the H100 box one engine start timed every point ~2x slow for a whole
# pass ((1, 5.46), (16, 5.53) ms against (1, 2.79), (16, 3.94) in the next start; the
# host was busy for ~1 s), and that cached model planned 3.4 whole-expert copies a decode
# step instead of 0.25: 19.3 against 27.6 tok/s.
CPU_MAX_PASSES = 4
CPU_PASS_AGREEMENT = 0.15
GPU_TOKENS = (1, 16, 64, 256, 1024)
CONTENTION_CPU_TOKENS = (1, 64)  # CPU expert timed against a stream of copies at these token counts
CONTENTION_REPS = 5  # CPU expert calls per timing (1 token ~3 ms, 64 ~9 ms on the H100 box)
CONTENTION_COPY_REPS = 4  # expert copies per timing (~7 ms each at 50 GB/s)
# Rounds of (solo, contended) timings; each time is the best over rounds (noise only adds
# time): a single disturbed round on the H100 box timed the CPU expert at 1 token 2.27x
# slower against copies (host_bandwidth: ~1.3x) and at 64 tokens 2.2x its own curve, and
# the model it cached split no expert in decode, where 1.25x models split ~3-7 a step.
CONTENTION_ROUNDS = 3
SLOWDOWN_RANGE = (1.0, 3.0)  # a measured slowdown is clamped to this
# Part of the cache key: bump it when what is measured changes, so that older
# cache files (under another name) are re-measured. "v2": contention factors;
# "v3": warmed-up CPU points, best of CPU_TIMINGS; "v4": passes until they agree;
# "v5": contention from the best of CONTENTION_ROUNDS rounds; "v6": in-place reads.
CACHE_VERSION = "v6"
STREAM_REPS = 4  # in-place reads of a whole expert per timing (~7 ms each: 50.1 GB/s on the H100 box)


def machine_key(hidden: int, inter: int, dtype: torch.dtype, threads: int) -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "nogpu"
    raw = f"{cpu_model_name()}|{os.cpu_count()}|{gpu}|H{hidden}|I{inter}|{dtype}|t{threads}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in raw)


def _time_ms(fn, reps: int, sync=None) -> float:
    fn()  # warm-up
    if sync:
        sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if sync:
        sync()
    return (time.perf_counter() - start) * 1e3 / reps


def _cpu_expert_fn(layer, tokens: int):
    """A callable computing one whole cold expert on `tokens` tokens through the CPU kernel,
    a different cold expert each call (so DRAM, not the L3, is measured)."""
    from vllm_fiddler.runtime.cpu_experts import cpu_moe_forward

    H, C = layer.hidden_size, layer.chunks
    dtype = layer.w13_cpu.dtype
    n_cold = layer.w13_cpu.shape[0]
    chunk = torch.arange(C, dtype=torch.int32)  # [C]
    x = torch.randn(tokens, H, device="cpu").to(dtype)
    w = torch.ones(tokens, C, device="cpu")
    out = torch.zeros(tokens, H, device="cpu")
    it = iter(range(10**9))

    def one():
        e = next(it) % n_cold
        ids = (chunk + e * C).expand(tokens, C).contiguous()  # [t, C] every chunk of expert e
        cpu_moe_forward(x, layer.w13_cpu_chunks, layer.w2_cpu_chunks, ids, w, out)

    return one


def _copy_fn(layer, stager):
    """A callable staging one whole cold expert (expert 0) into a slot, on the stager's copy stream."""
    return lambda: stager.release(stager.stage(layer.w13_cpu[0], layer.w2_cpu[0])[0])


def _stream_fn(layer):
    """A callable computing one token through every chunk of one cold expert on the GPU,
    its weights read in place from pinned host memory (HybridMoE.streamed_share's launch),
    a different cold expert each call; None where the host chunks cannot be mapped."""
    from vllm_fiddler.kernels.triton import fused_moe
    from vllm_fiddler.runtime.host_view import device_view

    try:
        w13, w2 = layer.host_views or (device_view(layer.w13_cpu_chunks), device_view(layer.w2_cpu_chunks))
    except (ValueError, RuntimeError) as e:
        logger.info("fiddler: in-place reads not timed (%s); priced as copies", e)
        return None
    K, C, device = layer.top_k, layer.chunks, layer.device
    n_cold = layer.w13_cpu.shape[0]
    x = torch.randn(1, layer.hidden_size, device=device).to(layer.w13_cpu.dtype)  # [1, H]
    w = torch.ones(1, K * C, device=device)  # [1, K*C]
    # [n_cold, K*C]: expert e's C chunk-experts in the first top-k position, -1 in the others
    rows = torch.full((n_cold, K * C), -1, dtype=torch.int32)
    rows[:, :C] = torch.arange(n_cold * C, dtype=torch.int32).view(n_cold, C)
    rows = rows.to(device)
    it = iter(range(10**9))
    return lambda: fused_moe(x, w13, w2, w, rows[next(it) % n_cold].unsqueeze(0))


def slowdown(contended_ms: float, solo_ms: float) -> float:
    """contended / solo, clamped to SLOWDOWN_RANGE; 1.0 if either is unusable."""
    if not (solo_ms > 0 and contended_ms > 0 and math.isfinite(solo_ms) and math.isfinite(contended_ms)):
        return 1.0
    lo, hi = SLOWDOWN_RANGE
    return min(max(contended_ms / solo_ms, lo), hi)


def _copies_until(stop: threading.Event, started: threading.Event, layer, stager, errors: list) -> None:
    """Thread body: whole-expert copies back to back through the stager (two in flight, so the
    copy engine never waits for this thread) until `stop`, then waits for the last ones."""
    n_cold = layer.w13_cpu.shape[0]
    pending: list = []
    try:
        with torch.cuda.device(stager.stream.device):
            k = 0
            while not stop.is_set():
                e = (n_cold - 1 - k) % n_cold  # rotate, from the other end than the CPU
                slot, ready = stager.stage(layer.w13_cpu[e], layer.w2_cpu[e])
                stager.release(slot)
                pending.append(ready)
                k += 1
                started.set()
                if len(pending) >= 2:
                    first = pending.pop(0)
                    while not first.query() and not stop.is_set():
                        time.sleep(2e-4)  # poll: a blocking sync would spin on a core the CPU pool needs
            for ev in pending:
                ev.synchronize()
    except BaseException as e:  # noqa: BLE001 - re-raised by the caller
        errors.append(e)
        started.set()


def _while_running(background, name: str, what: str, measure):
    """measure(), taken while `background(stop, started, errors)` runs in a thread: started once it
    has set `started`; the thread is stopped and joined after, and its error re-raised."""
    stop, started, errors = threading.Event(), threading.Event(), []
    thread = threading.Thread(target=background, args=(stop, started, errors), name=name, daemon=True)
    thread.start()
    try:
        if not started.wait(timeout=10.0):
            raise RuntimeError(f"calibration: {what} did not start")
        if errors:
            raise errors[0]
        result = measure()
    finally:
        stop.set()
        thread.join(timeout=10.0)
    if errors:
        raise errors[0]
    if thread.is_alive():
        raise RuntimeError(f"calibration: {what} did not stop")
    return result


def measure_contention(layer, runtime, stager, rounds: int = CONTENTION_ROUNDS) -> dict:
    """Host DRAM contention between the CPU expert kernel and the staging copies.

    CPU: the CPU expert at CONTENTION_CPU_TOKENS, timed alone and then while
    a thread keeps whole-expert copies streaming through the stager; the
    slowdown is the larger of the two ratios. PCIe: whole-expert copies, timed
    alone and then while the worker computes 1-token CPU experts back to
    back (DRAM-bound: the most traffic). `rounds` rounds of all four, each
    time the best over rounds (contention_from_rounds). About 0.3 s a round
    on the H100 box. Returns {"cpu_contended_slowdown",
    "h2d_contended_slowdown"} and the best times under "detail"; raises if a
    helper thread failed.
    """
    cpu_fns = {t: _cpu_expert_fn(layer, t) for t in CONTENTION_CPU_TOKENS}
    copy = _copy_fn(layer, stager)
    one = cpu_fns[min(CONTENTION_CPU_TOKENS)]

    def cpu_until_stop(stop, started, errors):
        def loop():  # time_on_worker calls it twice (warm-up + 1 rep): the 1st runs until stop
            started.set()
            while not stop.is_set():
                one()

        try:
            runtime.time_on_worker(loop, reps=1)
        except BaseException as e:  # noqa: BLE001 - re-raised by _while_running
            errors.append(e)
            started.set()

    def time_cpu() -> dict:
        return {t: runtime.time_on_worker(fn, reps=CONTENTION_REPS) for t, fn in cpu_fns.items()}

    def time_copies() -> float:
        return _time_ms(copy, CONTENTION_COPY_REPS, torch.cuda.synchronize)

    measured = []
    for _ in range(rounds):
        # 1. The CPU expert, alone, then against a stream of copies.
        cpu_solo = time_cpu()
        cpu_busy = _while_running(
            lambda stop, started, errors: _copies_until(stop, started, layer, stager, errors),
            "fiddler-calibrate-copies", "the copy thread", time_cpu)
        # 2. The copies, alone, then while the worker computes 1-token experts back to back.
        copy_solo = time_copies()
        copy_busy = _while_running(cpu_until_stop, "fiddler-calibrate-cpu", "the CPU expert loop", time_copies)
        measured.append({"cpu_solo": cpu_solo, "cpu_busy": cpu_busy, "copy_solo": copy_solo,
                         "copy_busy": copy_busy})
    return contention_from_rounds(measured)


def contention_from_rounds(measured: list[dict]) -> dict:
    """Slowdowns from rounds of {"cpu_solo": {tokens: ms}, "cpu_busy": {tokens: ms},
    "copy_solo": ms, "copy_busy": ms}: each time the best over rounds, solo and contended
    alike (a disturbance only adds time, to either side); the CPU's slowdown is the larger
    over its token counts."""
    cpu_solo = {t: min(r["cpu_solo"][t] for r in measured) for t in measured[0]["cpu_solo"]}
    cpu_busy = {t: min(r["cpu_busy"][t] for r in measured) for t in cpu_solo}
    copy_solo = min(r["copy_solo"] for r in measured)
    copy_busy = min(r["copy_busy"] for r in measured)
    detail = {"cpu_ms": {t: (cpu_solo[t], cpu_busy[t]) for t in cpu_solo}, "copy_ms": (copy_solo, copy_busy),
              "rounds": len(measured)}
    return {"cpu_contended_slowdown": max(slowdown(cpu_busy[t], cpu_solo[t]) for t in cpu_solo),
            "h2d_contended_slowdown": slowdown(copy_busy, copy_solo), "detail": detail}


def settled_points(one_pass, max_passes: int = CPU_MAX_PASSES,
                   agreement: float = CPU_PASS_AGREEMENT) -> list[tuple[int, float]]:
    """[(tokens, ms)]: the best time per point over passes of one_pass() ({tokens: ms}), run
    until a pass agrees with the best so far within `agreement` at every point, or
    max_passes. Noise only adds time, so a disturbed pass disagrees with a quiet one."""
    best = one_pass()
    for n in range(2, max_passes + 1):
        current = one_pass()
        agree = all(abs(current[t] - best[t]) <= agreement * min(current[t], best[t]) for t in best)
        best = {t: min(best[t], current[t]) for t in best}
        if agree:
            break
    else:
        logger.warning("fiddler: CPU expert timings did not settle in %d passes (the host is busy?); "
                       "keeping the best of each", max_passes)
    if n > 2:
        logger.info("fiddler: CPU expert timings settled after %d passes", n)
    return sorted(best.items())


def measure(layer, runtime, stager) -> dict:
    """Raw measurements on a HybridMoE layer with at least one cold expert, through the
    runtime's own paths: whole experts in the host's chunked layout (see HybridMoE).

    The dict holds fit_from_measurements' arguments, and "contention_detail"
    (the raw contention timings, or the error that left the factors at 1.0)."""
    from vllm_fiddler.kernels.triton import fused_moe

    H, I, C = layer.hidden_size, layer.intermediate_size, layer.chunks
    dtype, device = layer.w13_cpu.dtype, layer.device
    chunk = torch.arange(C, dtype=torch.int32)  # [C]
    # The worker's first calls start its thread team and fault in buffers (a fresh H100 box
    # read 7.2 ms at 1 token before any warm-up, 3.3 ms after): warm it, then keep the best
    # of CPU_TIMINGS timings per point (noise only adds time).
    runtime.time_on_worker(_cpu_expert_fn(layer, 1), reps=CPU_WARMUP_CALLS)
    fns = {t: _cpu_expert_fn(layer, t) for t in CPU_TOKENS}
    cpu_points = settled_points(
        lambda: {t: min(runtime.time_on_worker(fn, reps=2) for _ in range(CPU_TIMINGS)) for t, fn in fns.items()})
    copy_ms = _time_ms(_copy_fn(layer, stager), 3, torch.cuda.synchronize)
    expert_bytes = 3 * H * I * layer.w13_cpu.element_size()
    stream = _stream_fn(layer)
    stream_gb_s = expert_bytes / _time_ms(stream, STREAM_REPS, torch.cuda.synchronize) / 1e6 if stream else 0.0
    gpu_points = []
    # the layout of HybridMoE._copied_experts: K*C slots per token, here the
    # first k-slot on staging slot 0's chunks and the other K-1 on other experts (-1)
    K = layer.top_k
    row = torch.cat([chunk, torch.full(((K - 1) * C,), -1, dtype=torch.int32)])  # [K*C]
    for t in GPU_TOKENS:
        x = torch.randn(t, H, device=device).to(dtype)
        ids = row.to(device).expand(t, K * C).contiguous()  # [t, K*C]
        w = torch.ones(t, K * C, device=device)
        gpu_points.append((t, _time_ms(lambda: fused_moe(x, stager.w13_chunks, stager.w2_chunks, w, ids), 5,
                                       torch.cuda.synchronize)))
    try:
        contention = measure_contention(layer, runtime, stager)
        detail = contention.pop("detail")
    except Exception as e:  # noqa: BLE001 - no contention model beats no engine; not cached (see below)
        logger.warning("fiddler: measuring host DRAM contention failed (%r); planning without it", e)
        contention = {"cpu_contended_slowdown": 1.0, "h2d_contended_slowdown": 1.0}
        detail = {"error": repr(e)}
    return {"cpu_points": cpu_points, "h2d_gb_s": expert_bytes / copy_ms / 1e6, "copy_latency_ms": 0.0,
            "gpu_points": gpu_points, "expert_bytes": expert_bytes, "stream_gb_s": stream_gb_s, **contention,
            "contention_detail": detail}


def cache_key(layer, threads: int) -> str:
    """The cache file's key: machine, shape, dtype, threads, chunks and CACHE_VERSION."""
    return (machine_key(layer.hidden_size, layer.intermediate_size, layer.w13_cpu.dtype, threads)
            + f"_C{layer.chunks}_{CACHE_VERSION}")


def load_or_measure(layer, runtime, stager, threads: int):
    from vllm_fiddler import cost_model

    key = cache_key(layer, threads)
    cached = cost_model.load_cached(key)
    if cached is not None:
        logger.info("fiddler: cost model from cache (%s)", key)
        return cached
    start = time.perf_counter()
    m = measure(layer, runtime, stager)
    detail = m.pop("contention_detail")
    model = cost_model.fit_from_measurements(**m)
    if "error" in detail:  # contention left at 1.0: measure again at the next start
        logger.warning("fiddler: cost model not cached (contention not measured)")
    else:
        cost_model.save_cached(key, model)
    logger.info("fiddler: cost model measured in %.2f s: CPU expert %s ms by tokens, H2D %.1f GB/s, in-place "
                "reads %.1f GB/s, GPU expert %s ms; host DRAM contention: CPU %.2fx, copies %.2fx slower while "
                "both run (%s)",
                time.perf_counter() - start, [(t, round(ms, 2)) for t, ms in m["cpu_points"]], m["h2d_gb_s"],
                m["stream_gb_s"],
                [(t, round(ms, 3)) for t, ms in m["gpu_points"]], model.cpu_contended_slowdown,
                model.h2d_contended_slowdown, _fmt_detail(detail))
    return model


def _fmt_detail(detail: dict) -> str:
    if "error" in detail:
        return f"not measured: {detail['error']}"
    cpu = ", ".join(f"{t} tok {a:.2f}->{b:.2f} ms" for t, (a, b) in detail["cpu_ms"].items())
    a, b = detail["copy_ms"]
    return f"CPU expert {cpu}; expert copy {a:.2f}->{b:.2f} ms; best of {detail.get('rounds', 1)} rounds"
