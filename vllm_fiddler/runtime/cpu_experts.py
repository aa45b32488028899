"""CPU expert runtime: computes host-resident (cold) experts off the engine thread.

Architecture: one dedicated worker thread per process owns the CPU expert
work; the engine thread ``submit``s a layer's cold work and keeps launching
GPU work, then ``wait``s for the result. The heavy lifting runs inside torch
or the C++ kernel, which release the GIL, so the engine thread keeps going.

Constraints: the worker's compute threads are the process's cores less one
(FiddlerConfig.cpu_threads). On vLLM's CPU platform the engine thread's own
OpenMP team already occupies every core, and a second team spinning beside it
made a tiny model's warm-up 3x slower (49 s vs 15 s, 2 cores), so there the
runtime runs the same work inline (``inline=True``).
"""

from __future__ import annotations

import concurrent.futures

import threading

import torch

from vllm_fiddler.logger import logger


def cpu_moe_forward(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                    topk_weights: torch.Tensor, out: torch.Tensor) -> None:
    """out [T, H] fp32 += the cold experts' weighted outputs (see kernels.torch_moe)."""
    from vllm_fiddler.kernels.torch_moe import moe_forward

    moe_forward(x, w13, w2, topk_ids, topk_weights, out)


class CPUExpertRuntime:
    def __init__(self, num_threads: int, inline: bool = False):
        self.num_threads = num_threads
        self.inline = inline
        self._pool = None if inline else concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="fiddler-cpu-experts", initializer=self._init_worker)

    def _init_worker(self) -> None:
        # OpenMP thread teams are per calling thread: size this thread's team.
        torch.set_num_threads(self.num_threads)

    def submit(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
               topk_weights: torch.Tensor) -> concurrent.futures.Future:
        """Starts out = cold experts(x) on the worker; the future yields fp32 [T, H]."""

        def run() -> torch.Tensor:
            out = torch.zeros(x.shape, dtype=torch.float32)
            cpu_moe_forward(x, w13, w2, topk_ids, topk_weights, out)
            return out

        if self._pool is not None:
            return self._pool.submit(run)
        done: concurrent.futures.Future = concurrent.futures.Future()
        try:
            done.set_result(run())
        except BaseException as e:  # surfaced by .result(), like the threaded path
            done.set_exception(e)
        return done

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


_runtime: CPUExpertRuntime | None = None
_runtime_lock = threading.Lock()


def get_cpu_runtime(num_threads: int, inline: bool) -> CPUExpertRuntime:
    """The process's one runtime (all layers share the CPU's cores)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = CPUExpertRuntime(num_threads, inline=inline)
            logger.info("fiddler: CPU expert runtime, %d compute threads%s", num_threads,
                        " (inline on the CPU platform)" if inline else " on a dedicated thread")
        return _runtime
