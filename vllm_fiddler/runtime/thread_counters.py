"""CPU time and preemptions of the expert threads and of the engine thread (Linux /proc).

The CPU experts share the host's cores with vLLM's engine thread, its other
threads and processes. When more threads want a core than there are cores,
the kernel preempts one: an expert thread preempted mid-job holds its work
item until it runs again (milliseconds), and the whole job, hence the layer,
waits for it. ``nonvoluntary_ctxt_switches`` counts exactly those preemptions
(a thread that blocks or sleeps switches voluntarily), so a benchmark can see
whether the expert threads lost their cores, and the engine thread whether it
lost its own.

The native pool names its threads ``fiddler-cpu`` and its job thread
``fiddler-job`` (kernels/cpu/ops.cpp); with the torch fallback there are none.
"""

from __future__ import annotations

import os
import threading

EXPERT_THREAD_NAMES = ("fiddler-cpu", "fiddler-job")  # exact: comm is cut at 15 characters
_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # the thread ended between listing and reading, or no /proc
        return None


def _task_counters(task_dir: str) -> tuple[int, float] | None:
    """(nonvoluntary context switches, CPU seconds: user + system) of one thread."""
    status, stat = _read(f"{task_dir}/status"), _read(f"{task_dir}/stat")
    if status is None or stat is None:
        return None
    preempted = next((int(line.split()[1]) for line in status.splitlines()
                      if line.startswith("nonvoluntary_ctxt_switches:")), 0)
    # fields after the parenthesised command name (which may hold spaces): state is
    # field 3, utime and stime fields 14 and 15 (proc(5))
    fields = stat.rsplit(")", 1)[1].split()
    return preempted, (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def thread_counters() -> dict:
    """Counters of this process's expert threads (summed), of the calling thread, and the
    process's CPU time (its other threads' share is what the two leave).

    Empty where /proc is missing. Monotonic per thread, so benchmarks take deltas
    (``vllm_fiddler.stats.delta``) over a span without threads starting or ending."""
    root = "/proc/self/task"
    try:
        tids = os.listdir(root)
    except OSError:
        return {}
    out = {"expert_threads": 0, "expert_thread_preemptions": 0, "expert_thread_cpu_s": 0.0}
    for tid in tids:
        name = (_read(f"{root}/{tid}/comm") or "").strip()
        if name not in EXPERT_THREAD_NAMES:
            continue
        counters = _task_counters(f"{root}/{tid}")
        if counters is not None:
            out["expert_threads"] += 1
            out["expert_thread_preemptions"] += counters[0]
            out["expert_thread_cpu_s"] += counters[1]
    own = _task_counters(f"{root}/{threading.get_native_id()}")
    if own is not None:
        out["engine_thread_preemptions"], out["engine_thread_cpu_s"] = own
    process = _task_counters("/proc/self")  # every thread of the process, ended ones included
    if process is not None:
        out["process_cpu_s"] = process[1]
    return out
