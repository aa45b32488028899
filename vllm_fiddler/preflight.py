"""Pre-flight checks, run before any expert is allocated.

Each failure is one message saying what to change. Pure functions over
numbers (tested in CI); `run_preflight` gathers the numbers on the machine.
"""

from __future__ import annotations

from vllm_fiddler.config import FiddlerConfigError
from vllm_fiddler.cpuinfo import cpu_flags
from vllm_fiddler.placement import GIB, MoEShape, Placement, format_bytes

# Kept free beside the host-resident experts: the engine process, tokenizer,
# pinned staging buffers and the OS (vLLM itself reserves host RAM too).
HOST_MARGIN_BYTES = 4 * GIB
HOST_MARGIN_FRACTION = 0.05


def host_bytes_needed(shape: MoEShape, placement: Placement, device_is_host: bool,
                      host_backing: bool = False) -> int:
    """Host memory the experts take: the cold set, plus a host copy of every GPU-resident expert
    with host backing (online re-placement), plus the device set itself on vLLM's CPU platform."""
    n = placement.num_cpu + (placement.num_gpu if host_backing else 0) \
        + (placement.num_gpu if device_is_host else 0)
    return n * shape.expert_bytes


def check_host_memory(needed_bytes: int, available_bytes: int) -> None:
    margin = HOST_MARGIN_BYTES + int(HOST_MARGIN_FRACTION * needed_bytes)
    if needed_bytes + margin > available_bytes:
        raise FiddlerConfigError(
            f"fiddler: the host-resident experts need {format_bytes(needed_bytes)} of host memory "
            f"(+{format_bytes(margin)} margin) but only {format_bytes(available_bytes)} is available: "
            f"keep more experts on the GPU (raise gpu_expert_budget_gb or --gpu-memory-utilization), "
            f"use a machine with more RAM, or free host memory")


def cpu_isa_warning(flags: set[str]) -> str | None:
    """A warning when cold experts can only take the slow torch path."""
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return None
    return ("fiddler: this CPU has neither AVX512-BF16 nor AMX-BF16; cold experts run on torch's "
            "CPU path (about 2x slower at decode on the H100 host): keep more experts on the GPU")


def available_host_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def host_backing_fits(shape: MoEShape, placement: Placement, device_is_host: bool) -> bool:
    """Whether host memory can also keep a copy of every GPU-resident expert."""
    try:
        check_host_memory(host_bytes_needed(shape, placement, device_is_host, host_backing=True),
                          available_host_bytes())
    except FiddlerConfigError:
        return False
    return True


def check_streamed_chunks(cut: tuple[int, ...], top_k: int, chunks: int) -> None:
    """A fixed streamed_chunks option must name one count per top-k position, each at most the
    chunks an expert is cut into."""
    if len(cut) != top_k or any(n > chunks for n in cut):
        raise FiddlerConfigError(
            f"fiddler option streamed_chunks {list(cut)} does not fit this model: it needs {top_k} "
            f"count(s), one per top-k position, each from 0 to {chunks} (the chunks of an expert), "
            f"or \"auto\"")


def run_preflight(shape: MoEShape, placement: Placement, device_is_host: bool,
                  host_backing: bool = False) -> list[str]:
    """Raises FiddlerConfigError on an impossible setup; returns warnings to log."""
    try:
        check_host_memory(host_bytes_needed(shape, placement, device_is_host, host_backing),
                          available_host_bytes())
    except FiddlerConfigError as e:
        if host_backing:
            raise FiddlerConfigError(
                f"{e}; or turn online re-placement off (\"adaptation\": false), which keeps only "
                f"the CPU-resident experts in host memory") from None
        raise
    warning = cpu_isa_warning(cpu_flags())
    return [warning] if warning and placement.num_cpu else []
