"""CPU expert runtime: computes host-resident (cold) experts off the engine thread.

Architecture: one dedicated worker thread per process owns the CPU expert
work; the engine thread ``submit``s a layer's cold work and keeps launching
GPU work, then waits for the result. The math runs in the C++ kernel
(``vllm_fiddler.kernels.cpu``, its own pinned thread pool) or torch, both of
which release the GIL, so the engine thread keeps going.

On CUDA the runtime also owns the pinned staging buffers a step needs: the
activations, ids and weights come down in one D2H copy, and the fp32 result
goes back up with an async H2D copy from pinned memory.

Constraints: compute threads = the process's cores less one
(FiddlerConfig.cpu_threads). On vLLM's CPU platform the engine thread's own
OpenMP team already occupies every core, and a second team spinning beside it
made a tiny model's warm-up 3x slower (49 s vs 15 s, 2 cores), so there the
runtime runs the same work inline (``inline=True``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time

import torch

from vllm_fiddler.logger import logger


def cpu_moe_forward(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                    topk_weights: torch.Tensor, out: torch.Tensor) -> None:
    """out [T, H] fp32 += the cold experts' weighted outputs (ids: local slot or -1)."""
    from vllm_fiddler.kernels import cpu as cpu_kernels

    # The native kernels are bf16-only; other dtypes take the torch path.
    isa = None if w13.dtype == torch.bfloat16 else "torch"
    cpu_kernels.moe_forward(x.contiguous(), w13, w2, topk_ids.to(torch.int32).contiguous(),
                            topk_weights.float().contiguous(), out, isa=isa)


@dataclasses.dataclass
class HostBuffers:
    x: torch.Tensor  # [T, H] model dtype
    ids: torch.Tensor  # [T, K] int32
    weights: torch.Tensor  # [T, K] fp32


class CPUExpertRuntime:
    def __init__(self, num_threads: int, inline: bool = False, pin_memory: bool = False):
        self.num_threads = num_threads
        self.inline = inline
        self.pin_memory = pin_memory
        self._pool = None if inline else concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="fiddler-cpu-experts", initializer=self._init_worker)
        self._buffers: dict[str, torch.Tensor] = {}
        self._result_in_flight: torch.cuda.Event | None = None  # H2D still reading the result buffer
        self.busy_s = 0.0  # CPU expert time, for metrics and benchmarks
        self.calls = 0
        # of busy_s: waiting for the previous result's H2D; and, before it, the
        # time a submitted call queued for the worker thread (benchmarks)
        self.result_wait_s = 0.0
        self.queue_s = 0.0

    def _init_worker(self) -> None:
        # OpenMP thread teams are per calling thread: size this thread's team.
        torch.set_num_threads(self.num_threads)
        from vllm_fiddler.kernels import cpu as cpu_kernels

        cpu_kernels.set_num_threads(self.num_threads)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A reusable (pinned on CUDA) host buffer, grown on demand."""
        numel = 1
        for d in shape:
            numel *= d
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=dtype, device="cpu", pin_memory=self.pin_memory)
            self._buffers[name] = buf
        return buf[:numel].view(shape)

    def host_buffers(self, tokens: int, top_k: int, hidden: int, dtype: torch.dtype) -> HostBuffers:
        return HostBuffers(x=self._buffer("x", (tokens, hidden), dtype),
                           ids=self._buffer("ids", (tokens, top_k), torch.int32),
                           weights=self._buffer("weights", (tokens, top_k), torch.float32))

    def submit(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
               topk_weights: torch.Tensor) -> concurrent.futures.Future:
        """Starts the cold experts on the worker; the future yields fp32 [T, H] on the host."""

        submitted = time.perf_counter()

        @torch.inference_mode()  # thread-local: the engine thread's mode does not carry over
        def run() -> torch.Tensor:
            start = time.perf_counter()
            self.queue_s += start - submitted
            if self._result_in_flight is not None:  # the last result's H2D must be done reading
                self._result_in_flight.synchronize()
                self.result_wait_s += time.perf_counter() - start
            out = self._buffer("result", tuple(x.shape), torch.float32) if self.pin_memory \
                else torch.empty(x.shape, dtype=torch.float32, device="cpu")
            out.zero_()
            cpu_moe_forward(x, w13, w2, topk_ids, topk_weights, out)
            self.busy_s += time.perf_counter() - start
            self.calls += 1
            return out

        if self._pool is not None:
            return self._pool.submit(run)
        done: concurrent.futures.Future = concurrent.futures.Future()
        try:
            done.set_result(run())
        except BaseException as e:  # surfaced by .result(), like the threaded path
            done.set_exception(e)
        return done

    def time_on_worker(self, fn, reps: int) -> float:
        """ms per call of fn() on the worker thread (after one warm-up call)."""

        @torch.inference_mode()
        def run() -> float:
            fn()
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - start) * 1e3 / reps

        return self._pool.submit(run).result() if self._pool is not None else run()

    def to_device(self, result: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Async H2D of a pinned result, cast on the device."""
        on_device = result.to(device, non_blocking=True)
        self._result_in_flight = torch.cuda.Event()
        self._result_in_flight.record()
        return on_device.to(dtype)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


_runtime: CPUExpertRuntime | None = None
_runtime_lock = threading.Lock()


def get_cpu_runtime(num_threads: int, inline: bool, pin_memory: bool = False) -> CPUExpertRuntime:
    """The process's one runtime (all layers share the CPU's cores)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = CPUExpertRuntime(num_threads, inline=inline, pin_memory=pin_memory)
            logger.info("fiddler: CPU expert runtime, %d compute threads%s", num_threads,
                        " (inline on the CPU platform)" if inline else " on a dedicated thread")
        return _runtime
