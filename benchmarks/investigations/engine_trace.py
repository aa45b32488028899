"""Where a served engine's decode step goes: its MoE ops against its CPU jobs.

Run an engine with FIDDLER_TRACE_DIR=DIR (vllm_fiddler.moe.steps.trace writes its
ops' host times and the native job thread's trace there), then

    python benchmarks/investigations/engine_trace.py DIR --steps 512 --out trace-summary.json

For the last --steps routed decode steps it reports, per layer and per step:
- each CPU job's run time and its read rate (CPU chunk-experts x chunk bytes / run time),
- the CPU's idle time before each job, split into `host_late` (the engine thread
  submitted the job only after the previous one was done: its Python was the critical
  path) and `routing_wait` (the job waited for its routing to land: the device chain
  of result H2D, attention, router and routing copy, or GPU work queued before it),
- the step's period on the engine thread's clock and the CPU's busy share of it.
Pure Python on the JSON files: no CUDA, no vLLM.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
from collections import defaultdict


def load(trace_dir: str) -> dict:
    """The ops and jobs of the process that wrote the most trace files in `trace_dir`."""
    by_pid = defaultdict(list)
    for path in glob.glob(os.path.join(trace_dir, "trace-*-*.json")):
        by_pid[os.path.basename(path).split("-")[1]].append(path)
    if not by_pid:
        raise SystemExit(f"no trace-<pid>-<n>.json files in {trace_dir}")
    paths = sorted(max(by_pid.values(), key=len))
    ops, jobs, meta = [], [], {}
    for path in paths:
        with open(path) as f:
            record = json.load(f)
        ops += record["ops"]
        jobs += record["jobs"]
        meta = {k: record[k] for k in ("chunk_bytes", "cpu_threads", "op_fields", "job_fields")}
    return {"ops": ops, "jobs": jobs, **meta}


def match_jobs(ops: list, jobs: list) -> list:
    """Each op with a submitted job -> (op, job): the job submitted last at or before the
    op's `submitted` time and after its start (one engine thread submits in order)."""
    jobs = sorted(jobs, key=lambda j: j[0])
    pairs, i = [], 0
    for op in ops:
        submitted = op[4]
        if submitted is None:
            continue
        while i + 1 < len(jobs) and jobs[i + 1][0] <= submitted * 1e9:
            i += 1
        if i < len(jobs) and op[1] * 1e9 <= jobs[i][0] <= submitted * 1e9:
            pairs.append((op, jobs[i]))
    return pairs


def steps_of(pairs: list, n_layers: int) -> list[list]:
    """Consecutive routed (op, job) pairs of layers 0..n_layers-1 in order: one decode step each."""
    steps, current = [], None
    for op, job in pairs:
        if op[0] == 0:
            current = []
        if current is None or op[2] is not None or op[0] != len(current):
            current = None  # not a routed step in layer order (prefill, or a gap in the trace)
            continue
        current.append((op, job))
        if len(current) == n_layers:
            steps.append(current)
            current = None
    return steps


def mean(values) -> float | None:
    values = list(values)
    return round(statistics.fmean(values), 4) if values else None


def summarize(trace: dict, last_steps: int) -> dict:
    pairs = match_jobs(trace["ops"], trace["jobs"])
    n_layers = 1 + max(op[0] for op, _ in pairs)
    # one step before the window (its last job's end) and one after (the period's end)
    steps = steps_of(pairs, n_layers)[-(last_steps + 2):]
    if len(steps) < 3:
        raise SystemExit(f"only {len(steps)} routed steps of {n_layers} layers in the trace")
    chunk_bytes = trace["chunk_bytes"]
    per_layer = defaultdict(lambda: defaultdict(list))
    by_size = defaultdict(list)  # a job's CPU chunk-experts -> its read rates
    step_rows = []
    for s in range(1, len(steps) - 1):
        step = steps[s]
        period = steps[s + 1][0][0][1] - step[0][0][1]  # layer 0's op start to the next step's
        previous_done = steps[s - 1][-1][1][2]
        busy = 0.0
        idle = {"host_late": 0.0, "routing_wait": 0.0}
        for layer, (op, job) in enumerate(step):
            submitted, started, done, picked, chunk_experts = job
            run = (done - started) * 1e-9
            busy += run
            row = per_layer[layer]
            row["run_ms"].append(1e3 * run)
            row["chunk_experts"].append(chunk_experts)
            if chunk_experts:
                rate = chunk_experts * chunk_bytes / run / 1e9
                row["read_gb_s"].append(rate)
                by_size[chunk_experts].append(rate)
            late = max(0, submitted - previous_done) * 1e-9
            wait = (started - max(picked, previous_done)) * 1e-9
            row["host_late_ms"].append(1e3 * late)
            row["routing_wait_ms"].append(1e3 * wait)
            idle["host_late"] += late
            idle["routing_wait"] += wait
            row["queued_ms"].append(1e3 * (picked - submitted) * 1e-9)
            previous_done = done
        step_rows.append({"period_ms": 1e3 * period, "cpu_busy_ms": 1e3 * busy,
                          "host_late_ms": 1e3 * idle["host_late"],
                          "routing_wait_ms": 1e3 * idle["routing_wait"],
                          "cpu_bytes": sum(job[4] for _, job in step) * chunk_bytes})
    rates = sorted(r for v in by_size.values() for r in v)
    periods = sorted(r["period_ms"] for r in step_rows)

    def pct(values, q):
        return round(values[min(len(values) - 1, int(q * len(values)))], 3)

    busy = sum(r["cpu_busy_ms"] for r in step_rows)
    return {
        "steps": len(step_rows), "layers": n_layers, "cpu_threads": trace["cpu_threads"],
        "chunk_bytes": chunk_bytes,
        "step_period_ms": {"mean": mean(periods), "p10": pct(periods, 0.1), "p50": pct(periods, 0.5),
                           "p90": pct(periods, 0.9)},
        "tok_s_from_periods": round(1e3 / statistics.fmean(periods), 2),
        "cpu_busy_ms_per_step": mean(r["cpu_busy_ms"] for r in step_rows),
        "cpu_busy_share": round(busy / sum(periods), 4),
        "host_late_ms_per_step": mean(r["host_late_ms"] for r in step_rows),
        "routing_wait_ms_per_step": mean(r["routing_wait_ms"] for r in step_rows),
        "cpu_read_gb_s_over_busy": round(sum(r["cpu_bytes"] for r in step_rows) / (busy * 1e-3) / 1e9, 3)
        if busy else None,
        "job_read_gb_s": {f"p{round(100 * q)}": pct(rates, q) for q in (0.1, 0.5, 0.9)} if rates else {},
        "per_layer": {layer: {k: mean(v) for k, v in row.items()}
                      for layer, row in sorted(per_layer.items())},
        "read_gb_s_by_chunk_experts": {n: {"jobs": len(v), "mean": mean(v)}
                                       for n, v in sorted(by_size.items())},
        "note": __doc__.split("\n\n", 1)[0],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace_dir")
    p.add_argument("--steps", type=int, default=500, help="the last this many routed decode steps (less one "
                   "at each end of the trace)")
    p.add_argument("--out", default=None, help="write the summary here as JSON (else print it)")
    args = p.parse_args()
    summary = summarize(load(args.trace_dir), args.steps)
    text = json.dumps(summary, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
