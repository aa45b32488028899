"""Every environment variable fiddler reads, in one registry (as vLLM's ``envs.py``).

Options a user decides go through ``--additional-config`` (vllm_fiddler.config);
these are for building, testing, benchmarking and debugging. Read them as
``envs.FIDDLER_CPU_ISA``: each access reads the environment again (workers are
started with the parent's environment, tests change it).
"""

from __future__ import annotations

import os
from typing import Any, Callable


def _str(name: str, default: str | None = None) -> Callable[[], str | None]:
    return lambda: os.environ.get(name) or default


def _flag(name: str, default: bool) -> Callable[[], bool]:
    def read() -> bool:
        value = os.environ.get(name, "").strip().lower()
        return default if not value else value not in ("0", "false", "no", "off")

    return read


def _int(name: str, default: int) -> Callable[[], int]:
    def read() -> int:
        value = os.environ.get(name, "").strip()
        try:
            return int(value) if value else default
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {value!r}") from None

    return read


# name -> (reader, what it is for)
environment_variables: dict[str, tuple[Callable[[], Any], str]] = {
    # ---- CPU expert kernels (vllm_fiddler.kernels.cpu) ----
    "FIDDLER_CPU_ISA": (_str("FIDDLER_CPU_ISA", "auto"),
                        "auto | amx | avx512_bf16 | torch: force the CPU kernels' instruction set (debugging)"),
    "FIDDLER_CPU_THREADS": (_int("FIDDLER_CPU_THREADS", 0),
                            "worker threads of the CPU kernels when used outside a model (benchmarks); "
                            "a model uses the cpu_threads option"),
    "FIDDLER_CPU_AMX_MIN_TOKENS": (_int("FIDDLER_CPU_AMX_MIN_TOKENS", 8),
                                   "tokens per expert from which the auto ISA uses AMX tiles (AVX512-BF16 below)"),
    "FIDDLER_CPU_SPIN_US": (_int("FIDDLER_CPU_SPIN_US", 1000),
                            "how long idle CPU kernel workers spin before sleeping, in us (read by ops.cpp)"),
    "FIDDLER_CPU_BUILD": (_flag("FIDDLER_CPU_BUILD", True), "0: do not build the native CPU kernels (torch only)"),
    "FIDDLER_CPU_BUILD_VERBOSE": (_flag("FIDDLER_CPU_BUILD_VERBOSE", False), "1: show the compiler output"),
    "FIDDLER_CPU_AMX_EMULATE": (_flag("FIDDLER_CPU_AMX_EMULATE", False),
                                "1: on a CPU without AMX, run the AMX kernels with emulated tiles (tests only)"),
    # ---- observability ----
    "FIDDLER_METRICS_FILE": (_str("FIDDLER_METRICS_FILE"),
                             "the stats file the worker writes and the frontend's Prometheus collector reads; "
                             "set by the first process that registers the plugin"),
    "FIDDLER_TRACE_DIR": (_str("FIDDLER_TRACE_DIR"),
                          "a folder for the served engine's per-op and CPU-job traces "
                          "(benchmarks/investigations/engine_trace.py); off when unset"),
    "FIDDLER_CACHE_DIR": (_str("FIDDLER_CACHE_DIR"),
                          "where calibrated cost models are cached (default $XDG_CACHE_HOME/vllm_fiddler)"),
    # ---- benchmarks on random weights (vllm_fiddler.synthetic) ----
    "FIDDLER_DUMMY_ROUTER_SKEW": (_str("FIDDLER_DUMMY_ROUTER_SKEW"),
                                  "a strength >= 1: --load-format dummy models get skewed router gates"),
    "FIDDLER_FAST_DUMMY_INIT": (_flag("FIDDLER_FAST_DUMMY_INIT", False),
                                "1: dummy weights in host memory are filled at copy speed"),
}


def __getattr__(name: str) -> Any:
    if name in environment_variables:
        return environment_variables[name][0]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(environment_variables)
