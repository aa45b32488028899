"""The CUDA steps' op trace (benchmarks' timelines; FIDDLER_TRACE_DIR writes a served
engine's)."""

from __future__ import annotations

import json
import os
import time

from vllm_fiddler import envs

# When a list, each CUDA op appends (id(layer), op start, routing-copy wait start, its end,
# CPU job submitted or None, op end), time.perf_counter() seconds: benchmarks'
# timelines (benchmarks/decode_op_host.py), with the CPU jobs' own times
# (vllm_fiddler.kernels.cpu.async_trace, the same clock).
OP_TRACE: list | None = None

# FIDDLER_TRACE_DIR (benchmarks; off by default): a served engine's op and CPU-job
# traces, written every TRACE_FLUSH_OPS ops to <dir>/trace-<pid>-<n>.json, for
# benchmarks/investigations/engine_trace.py. The engine core is its own process, so this is how its
# timeline leaves it; a flush takes a few ms of the engine thread, once in 64 batch-1
# steps of 8 layers.
TRACE_DIR = envs.FIDDLER_TRACE_DIR
TRACE_FLUSH_OPS = 512
if TRACE_DIR:
    OP_TRACE = []
_trace_layers: dict[int, int] = {}  # id(layer) -> its order of first appearance
_trace_flushes = 0


def trace_op(layer, op_start: float, sync_start, sync_end, submitted) -> None:
    """Appends an op to OP_TRACE; under FIDDLER_TRACE_DIR, writes out the ops and the CPU jobs
    done so far when TRACE_FLUSH_OPS have gathered."""
    global _trace_flushes
    OP_TRACE.append((id(layer), op_start, sync_start, sync_end, submitted, time.perf_counter()))
    if TRACE_DIR is None or len(OP_TRACE) < TRACE_FLUSH_OPS:
        return
    from vllm_fiddler.kernels import cpu as cpu_kernels

    ops = [(_trace_layers.setdefault(op[0], len(_trace_layers)), *op[1:]) for op in OP_TRACE]
    record = {"op_fields": ["layer", "op_start", "sync_start", "sync_end", "submitted", "op_end"],
              "ops": ops, "job_fields": list(cpu_kernels.ASYNC_TRACE_FIELDS),
              "jobs": cpu_kernels.async_trace(),
              "chunk_bytes": layer.chunk_bytes, "cpu_threads": layer.cpu_runtime.num_threads}
    os.makedirs(TRACE_DIR, exist_ok=True)
    path = os.path.join(TRACE_DIR, f"trace-{os.getpid()}-{_trace_flushes:04d}.json")
    with open(path, "w") as f:
        json.dump(record, f)
    _trace_flushes += 1
    OP_TRACE.clear()
