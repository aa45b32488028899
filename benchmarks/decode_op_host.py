"""Batch-1 decode through a chain of hybrid MoE layers, without vLLM: where the host's time goes.

At decode the engine thread's Python is on the critical path: each layer's
routing copy, planning, the CPU hand-off and every kernel launch of the op
run there, between the previous layer's CPU experts and this layer's. This
runs the hybrid layers (Mixtral-8x7B shapes, the model's CPU runtime,
staging slots and calibrated cost model) behind a thin stand-in for the
attention block (a few GPU kernels), so the step is the ops' own cost:

    python benchmarks/decode_op_host.py --out benchmarks/results/decode-op-host-h100.json [--profile]

Reports per step: wall time, host time inside the ops (and of it, waiting
for the routing copy), the CPU experts' busy time, PCIe weight GB, and with
--profile the functions with the most host time (cProfile, which slows
Python ~1.5-2x: read it for shares, not for absolute times).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time

import torch

from vllm_fiddler.config import FiddlerConfig, default_cpu_threads
from vllm_fiddler.kernels import cpu as cpu_kernels
from vllm_fiddler.layers import hybrid_moe
from vllm_fiddler.layers.hybrid_moe import HybridMoE, expert_chunks
from vllm_fiddler.runtime.cpu_experts import CPUExpertRuntime
from vllm_fiddler.runtime.host_view import device_view
from vllm_fiddler.runtime.kernel_warmup import warm_up_kernels
from vllm_fiddler.runtime.moe_graphs import MoEGraphs
from vllm_fiddler.runtime.step_planner import get_step_planner
from vllm_fiddler.runtime.thread_counters import thread_counters
from vllm_fiddler.runtime.weight_stager import WeightStager

H, I, E, K = 4096, 14336, 8, 2  # Mixtral-8x7B
COUNTERS = ("op_s", "sync_wait_s", "cpu_wait_s", "to_cpu_submit_s")


def build(layers: int, gpu_experts: int, threads: int, staging: int, wait_on_device: bool,
          routed_graphs: bool = True):
    runtime = CPUExpertRuntime(threads, inline=False, pin_memory=True, wait_on_device=wait_on_device)
    stager = WeightStager(staging, H, I, expert_chunks(I), torch.bfloat16, torch.device("cuda")) if staging else None
    moe = []
    for i in range(layers):
        # gpu_experts spread as the "even" placement does: the first layers get one more
        n = gpu_experts // layers + (i < gpu_experts % layers)
        layer = HybridMoE(num_experts=E, top_k=K, hidden_size=H, intermediate_size=I,
                          gpu_experts=tuple(range(n)), dtype=torch.bfloat16, device=torch.device("cuda"),
                          cpu_runtime=runtime, pin_memory=True)
        layer.init_random(seed=1234 + i)
        layer.stager = stager
        if stager is not None:  # as the model sets them (vllm_fiddler.models.mixtral)
            layer.host_views = (device_view(layer.w13_cpu_chunks), device_view(layer.w2_cpu_chunks))
        moe.append(layer)
    warm_up_kernels(moe, stager, 64)
    graphs = MoEGraphs(FiddlerConfig.cuda_graph_max_tokens, H, K, torch.bfloat16, torch.device("cuda"))
    graphs.capture(moe, stager, streamed_max_tokens=FiddlerConfig.routed_max_tokens)
    if routed_graphs:  # as the model captures them (vllm_fiddler.models.mixtral)
        from vllm_fiddler.runtime.replacer import HEAT_TABLE_TOKENS

        graphs.capture_routed(moe, FiddlerConfig.routed_max_tokens, torch.bfloat16, HEAT_TABLE_TOKENS + 1)
    return runtime, stager, moe, graphs


class AttentionStandIn:
    """A few GPU kernels per layer where vLLM runs its attention block (norm, QKV, out
    projection, residual, router): the device work between two MoE ops, at batch 1."""

    def __init__(self, layers: int, seed: int = 0):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.qkv = [torch.randn(H, 6144, device="cuda", dtype=torch.bfloat16, generator=gen) * H**-0.5
                    for _ in range(layers)]
        self.o = [torch.randn(4096, H, device="cuda", dtype=torch.bfloat16, generator=gen) * 4096**-0.5
                  for _ in range(layers)]
        self.gate = [torch.randn(H, E, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(layers)]

    def __call__(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(h.dtype)  # [T, H]
        q = (x @ self.qkv[i])[:, :4096]  # [T, 4096]
        h = h + q @ self.o[i]
        x = h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(h.dtype)
        return h, x @ self.gate[i]  # residual [T, H], router logits [T, E]


def hold_host(seconds: float) -> None:
    """Python work on the engine thread (it holds the GIL), as vLLM's eager attention block
    takes (~1.1 ms a layer on the H100 box, docs/performance.md)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def run_steps(moe, attention, steps: int, h0: torch.Tensor, host_s: float = 0.0) -> None:
    h = h0
    for _ in range(steps):
        for i, layer in enumerate(moe):
            if host_s:
                hold_host(host_s)
            h, logits = attention(i, h)
            h = h + layer(h, logits)
        h = h * 0.5  # keeps the chain bounded, so routing stays varied
    torch.cuda.synchronize()


def snapshot(runtime, stager, moe) -> dict:
    snap = {k: sum(getattr(m, k) for m in moe) for k in COUNTERS}
    snap["cpu_busy_s"] = runtime.busy_s
    snap["h2d_bytes"] = stager.bytes_copied if stager else 0
    snap["streamed_bytes"] = sum(m.streamed_weight_bytes for m in moe)
    snap["routing_wait_s"] = runtime.routing_wait_s
    snap.update(thread_counters())
    return snap


def timeline(moe, attention, steps: int, h0: torch.Tensor, host_s: float = 0.0) -> dict:
    """Runs `steps` with the op and CPU-job traces on and splits the CPU's idle time between
    two consecutive jobs (ms, mean per gap; `*_per_step`: summed over a step):
    host_late: the engine thread reached the next op's routing wait only after the job was
    done (its Python is the critical path); device_chain: from max(job done, host waiting)
    until the routing copy arrived (the stream's wait release, the result's H2D, attention,
    router, D2H, the host's wake-up); plan: routing on the host -> job submitted; wake:
    submitted -> the job thread started it. Routed ops (routed_max_tokens) have no host
    thread between the routing and the job: only idle, wake (which then includes the wait
    for the routing's mark) and job."""
    first = id(moe[0])
    cpu_kernels.async_trace()  # drop older jobs
    hybrid_moe.OP_TRACE = []
    try:
        run_steps(moe, attention, steps, h0, host_s)
    finally:
        ops, hybrid_moe.OP_TRACE = hybrid_moe.OP_TRACE, None
    # the job thread records a job after storing its done word, so the GPU (and this thread)
    # can be past the last job before its record exists
    cpu_kernels.async_wait_idle()
    jobs = cpu_kernels.async_trace()
    ops = [o for o in ops if o[4] is not None]
    if len(jobs) != len(ops):
        return {"error": f"{len(jobs)} CPU jobs traced for {len(ops)} ops that submitted one"}
    parts = {"host_late": [], "device_chain": [], "plan": [], "wake": [], "idle": [], "job": []}
    edge = {k: [] for k in parts}
    for j in range(len(ops)):
        start, done = (t * 1e-9 for t in jobs[j][1:3])
        (edge if ops[j][0] == first else parts)["job"].append(done - start)
        if j + 1 == len(ops):
            break
        layer, _, sync_start, sync_end, submitted, _ = ops[j + 1]
        next_start = jobs[j + 1][1] * 1e-9
        into = edge if layer == first else parts
        into["idle"].append(next_start - done)
        into["wake"].append(next_start - submitted)
        if sync_start is None:  # a routed op: no host thread between the routing and the job
            continue
        into["host_late"].append(max(0.0, sync_start - done))
        into["device_chain"].append(sync_end - max(done, sync_start))
        into["plan"].append(submitted - sync_end)

    def summary(d: dict) -> dict:
        return {k: round(1e3 * sum(v) / len(v), 3) for k, v in d.items() if v}

    return {"within_step_ms": summary(parts), "step_edge_ms": summary(edge),
            "gaps_per_step_within": len(parts["idle"]) / steps, "note": timeline.__doc__.split("\n", 1)[1].strip()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/decode-op-host-h100.json")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--gpu-experts", type=int, default=11, help="device-resident experts over all layers "
                   "(11: e2e's 4.44 GB budget less 2 staging slots)")
    p.add_argument("--threads", type=int, default=default_cpu_threads(), help="the runtime's (calibration)")
    p.add_argument("--variants", default=f"{default_cpu_threads()}/1000/0/1/{FiddlerConfig.routed_max_tokens}",
                   help="comma-separated THREADS/SPIN_US/HOST_US/GRAPHS[/ROUTED[/STREAMED[/BARRIER]]] runs in this "
                        "process: compute threads, FIDDLER_CPU_SPIN_US, Python host work a layer (vLLM's "
                        "eager attention block is ~1100), 1/0 CUDA graphs for the op's GPU launches, "
                        "routed_max_tokens (0: every step syncs and plans; default the option's), chunks "
                        "a routed step streams to the GPU over the top-k positions of a token (of K*C, "
                        "spread as cost_model.streamed_chunks does; -1, the default: the cost model's "
                        "choice), 1/0 FIDDLER_CPU_PHASE_BARRIER (1: a CPU job's two projections as two pool runs "
                        "with a barrier between them; default 0: one run); each one the same layers and "
                        "cost model (calibrated at --threads)")
    p.add_argument("--staging-slots", type=int, default=2)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--host-wait", action="store_true", help="wait_on_device false")
    p.add_argument("--no-routed-graphs", action="store_true", help="routed_graphs false: routed steps "
                   "launch their GPU side eagerly (the model's default captures them)")
    p.add_argument("--profile", action="store_true", help="cProfile one more run of --steps")
    p.add_argument("--trace", action="store_true", help="one more run of --steps with the op and CPU-job "
                   "traces: where the CPU's idle time between jobs goes")
    p.add_argument("--label", default="")
    args = p.parse_args()

    start = time.perf_counter()
    runtime, stager, moe, graphs = build(args.layers, args.gpu_experts, args.threads, args.staging_slots,
                                         not args.host_wait, routed_graphs=not args.no_routed_graphs)
    get_step_planner(moe[0])  # calibrates (or loads the cached cost model)
    attention = AttentionStandIn(args.layers)
    h0 = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
    run_steps(moe, attention, 10, h0)  # warm-up
    setup_s = time.perf_counter() - start

    rows = []
    for variant in args.variants.split(","):
        fields = [int(v) for v in variant.split("/")]
        threads, spin_us, host_us, use_graphs = fields[:4]
        routed = fields[4] if len(fields) > 4 else FiddlerConfig.routed_max_tokens
        streamed = fields[5] if len(fields) > 5 else -1
        barrier = fields[6] if len(fields) > 6 else 0
        for layer in moe:
            layer.graphs = graphs if use_graphs else None
            layer.routed_max_tokens = routed
            layer.set_streamed_chunks(None if streamed < 0 else tuple(streamed // K + (k < streamed % K)
                                                                      for k in range(K)))
        os.environ["FIDDLER_CPU_SPIN_US"] = str(spin_us)
        os.environ["FIDDLER_CPU_PHASE_BARRIER"] = str(barrier)  # read by each CPU job
        cpu_kernels.set_num_threads(threads + 1)  # a new size rebuilds the pool, which reads the spin
        cpu_kernels.set_num_threads(threads)
        host_s = host_us * 1e-6
        run_steps(moe, attention, 5, h0, host_s)
        before = snapshot(runtime, stager, moe)
        t0 = time.perf_counter()
        run_steps(moe, attention, args.steps, h0, host_s)
        wall = time.perf_counter() - t0
        after = snapshot(runtime, stager, moe)
        per_step = {k: 1e3 * (after[k] - before[k]) / args.steps for k in COUNTERS + ("cpu_busy_s",)}
        variant_streamed = list(moe[0].routed_gpu_chunks or ()) if routed else []
        row = {"label": args.label, "variant": {"threads": threads, "spin_us": spin_us, "host_us_per_layer": host_us,
                                                "cuda_graphs": bool(use_graphs), "routed_max_tokens": routed,
                                                "streamed_chunks": variant_streamed, "chunks": moe[0].chunks,
                                                "phase_barrier": bool(barrier)},
               "layers": args.layers, "gpu_experts": args.gpu_experts, "staging_slots": args.staging_slots,
               "wait_on_device": runtime.wait_on_device, "steps": args.steps, "setup_s": round(setup_s, 1),
               "step_ms": round(1e3 * wall / args.steps, 3), "tok_s": round(args.steps / wall, 2),
               **{f"{k[:-2]}_ms_per_step": round(v, 3) for k, v in per_step.items()},
               "pcie_weight_gb_per_step": round((after["h2d_bytes"] - before["h2d_bytes"]) / 1e9 / args.steps, 4),
               "pcie_streamed_gb_per_step": round((after["streamed_bytes"] - before["streamed_bytes"]) / 1e9
                                                  / args.steps, 4),
               "cpu_routing_wait_ms_per_step": round(1e3 * (after["routing_wait_s"] - before["routing_wait_s"])
                                                     / args.steps, 3)}
        row.update({f"{k}_per_step": round((after[k] - before[k]) / args.steps, 3)
                    for k in ("expert_thread_preemptions", "engine_thread_preemptions") if k in after})
        row["op_host_ms_per_step"] = round(row["op_ms_per_step"] - row["sync_wait_ms_per_step"]
                                           - row["cpu_wait_ms_per_step"], 3)
        if args.trace:
            row["timeline"] = timeline(moe, attention, args.steps, h0, host_s)
        print(json.dumps(row))
        rows.append(row)
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run_steps(moe, attention, args.steps, h0, host_s)
        prof.disable()
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        stats.sort_stats("tottime").print_stats(35)
        stats.sort_stats("cumulative").print_stats(45)
        rows[-1]["profile"] = text.getvalue()
    runtime.shutdown()
    results = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    results.setdefault("device", f"{torch.cuda.get_device_name()} + {os.cpu_count()} CPUs")
    results.setdefault("rows", []).extend(rows)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
