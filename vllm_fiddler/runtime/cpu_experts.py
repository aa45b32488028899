"""CPU expert runtime: computes host-resident (cold) experts off the engine thread.

Architecture: one dedicated worker thread per process owns the CPU expert
work; the engine thread ``submit``s a layer's cold work and keeps launching
GPU work, then waits for the result. The math runs in the C++ kernel
(``vllm_fiddler.kernels.cpu``, its own pinned thread pool) or torch, both of
which release the GIL, so the engine thread keeps going.

On CUDA the runtime also owns the pinned staging buffers a step needs: the
activations, ids and weights come down in one D2H copy, and the fp32 result
goes back up with an async H2D copy from pinned memory. By default the
compute stream, not the engine thread, waits for that result
(``result_on_device``, vllm_fiddler.runtime.device_wait): the engine thread
returns from the MoE op at once and launches the next attention block while
the CPU computes. An exception in such a job then fails the next ``submit``
(the step's next layer, or the next step), and the job still releases the
stream.

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

from vllm_fiddler.kernels import cpu as cpu_kernels  # light: builds its native code on first use
from vllm_fiddler.kernels.reference import SILU, ExpertMath
from vllm_fiddler.logger import logger


_warned_torch_formats: set[str] = set()


def _warn_quantized_in_torch(x, w13, math, biases) -> None:
    """Says once per format that host experts dequantize in torch (two orders of magnitude
    slower than the native kernels: 60-90 ms against 0.2-0.5 ms a 13-44 MB expert at 1
    token on the H100 box's 16 cores), with what the native kernels refused."""
    if w13.fmt in _warned_torch_formats:
        return
    _warned_torch_formats.add(w13.fmt)
    logger.warning("fiddler: host %s experts dequantize in torch (slow): native kernels %s, x %s, activation %s, "
                   "biases %s", w13.fmt, "loaded" if cpu_kernels.quantized_available() else "not loaded", x.dtype,
                   getattr(math, "activation", "silu"),
                   None if biases is None else tuple(str(b.dtype) + str(list(b.shape)) for b in biases))


def cpu_moe_forward(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                    topk_weights: torch.Tensor, out: torch.Tensor, math: ExpertMath = SILU,
                    biases: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """out [T, H] fp32 += the cold experts' weighted outputs (ids: local slot or -1); biases
    (b13 [Ex, 2I], b2 [Ex, H]) where math.has_bias."""
    # native kernels: bf16 tensors of SiLU-gated experts without biases; quantized experts
    # (kernels.quant.QuantizedExperts: FP8 block-scaled, MXFP4) with either activation and
    # biases; everything else dequantizes in torch
    if not isinstance(w13, torch.Tensor):
        if cpu_kernels.moe_forward_quantized(x, w13, w2, topk_ids, topk_weights, out, math, biases):
            return
        _warn_quantized_in_torch(x, w13, math, biases)
    if not math.plain_silu or not isinstance(w13, torch.Tensor):
        from vllm_fiddler.kernels.torch_moe import moe_forward

        moe_forward(x, w13, w2, topk_ids.long(), topk_weights.float(), out, math, *(biases or (None, None)))
        return
    # The native kernels are bf16-only; other dtypes take the torch path.
    isa = None if w13.dtype == torch.bfloat16 else "torch"
    cpu_kernels.moe_forward(x.contiguous(), w13, w2, topk_ids.to(torch.int32).contiguous(),
                            topk_weights.float().contiguous(), out, isa=isa)


@dataclasses.dataclass
class CPUJob:
    """A submitted cold-expert job: its fp32 [T, H] result buffer, the sequence number
    signalled when it is done (None: nobody waits on the device), and its future (None:
    a native job, see CPUExpertRuntime.submit)."""
    out: torch.Tensor
    seq: int | None
    future: concurrent.futures.Future | None
    runtime: "CPUExpertRuntime"

    def result(self) -> torch.Tensor:
        if self.future is not None:
            return self.future.result()
        self.runtime._finish_native()
        return self.out


@dataclasses.dataclass
class HostBuffers:
    x: torch.Tensor  # [T, H] model dtype
    ids: torch.Tensor  # [T, K] int32
    weights: torch.Tensor  # [T, K] fp32


class CPUExpertRuntime:
    def __init__(self, num_threads: int, inline: bool = False, pin_memory: bool = False,
                 wait_on_device: bool = False):
        """wait_on_device: CUDA jobs submitted with ``device_wait=True`` are waited for by the
        compute stream (if the driver allows, see device_wait.available)."""
        self.num_threads = num_threads
        self.inline = inline
        self.pin_memory = pin_memory
        self.wait_on_device = wait_on_device and not inline
        self._signal = None  # device_wait.DeviceSignal, made at the first job that uses it
        self._routing_mark = None  # device_wait.StreamMark: routed jobs' "routing landed" word
        self._routed_ok: bool | None = None  # whether routed jobs work here (checked once)
        self._unchecked: concurrent.futures.Future | None = None  # the last device-waited job
        self._pool = None if inline else concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="fiddler-cpu-experts", initializer=self._init_worker)
        if not inline:
            # Here, not in the worker's initializer: native jobs go to the kernel's own job
            # thread, and one that came before any worker job started the native pool at every
            # core (H100 box: a compiled engine ran 16 expert threads beside its busy
            # engine thread on 16 cores, 25 preemptions of them a step).
            cpu_kernels.set_num_threads(num_threads)
        self._buffers: dict[str, torch.Tensor] = {}
        self._result_in_flight: torch.cuda.Event | None = None  # H2D still reading the result buffer
        self._native_jobs = 0  # submitted to the native job thread (see submit)
        # Python-worker jobs (native jobs add theirs in the properties below)
        self._busy_s = 0.0
        self._calls = 0
        self._queue_s = 0.0
        # waiting for the previous result's H2D (benchmarks)
        self.result_wait_s = 0.0

    # CPU expert time and calls, for metrics and benchmarks; queue_s: from submit
    # until a worker took the job (behind earlier jobs); routing_wait_s: routed jobs'
    # wait for their routing after that (the GPU's layer before it, benchmarks)
    @property
    def busy_s(self) -> float:
        return self._busy_s + self._native_stats()[1]

    @property
    def calls(self) -> int:
        return self._calls + self._native_stats()[0]

    @property
    def queue_s(self) -> float:
        return self._queue_s + self._native_stats()[2]

    @property
    def routing_wait_s(self) -> float:
        return self._native_stats()[3]

    def _native_stats(self) -> tuple[int, float, float, float]:
        if not self._native_jobs:
            return 0, 0.0, 0.0, 0.0
        return cpu_kernels.async_stats()

    def _init_worker(self) -> None:
        # OpenMP thread teams are per calling thread: size this thread's team.
        torch.set_num_threads(self.num_threads)

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

    def _device_signal(self):
        """The signal jobs set for the device to wait on, or None (host waits)."""
        if self._signal is None and self.wait_on_device and not torch.cuda.is_current_stream_capturing():
            from vllm_fiddler.runtime import device_wait

            if device_wait.available():
                self._signal = device_wait.DeviceSignal()
            else:
                self.wait_on_device = False
        return self._signal if self.wait_on_device else None

    def submit(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
               topk_weights: torch.Tensor, device_wait: bool = False, math: ExpertMath = SILU,
               biases: tuple[torch.Tensor, torch.Tensor] | None = None) -> CPUJob:
        """Starts the cold experts; the job's result is fp32 [T, H] on the host.

        device_wait: the result will go to the device through ``result_on_device``, whose
        stream waits for it there (when this runtime waits on the device). Such a job runs
        on the native kernels' own job thread when they take it (bf16 SiLU-gated experts, or
        quantized ones): it needs no GIL, so it starts and signals while the engine thread
        runs Python; otherwise on the Python worker thread."""
        self._raise_unchecked()
        signal = self._device_signal() if device_wait else None
        seq = signal.next_seq() if signal is not None else None
        # allocated here, on the engine thread, which owns the buffers (the worker only writes them)
        out = self._buffer("result", tuple(x.shape), torch.float32) if self.pin_memory \
            else torch.empty(x.shape, dtype=torch.float32, device="cpu")
        # the previous result's H2D, taken now: the one to_device records after this submit
        # is this job's own, which (device-waited) runs only after this job signals
        in_flight = self._result_in_flight
        if seq is not None:
            native = self._submit_native(x, w13, w2, topk_ids, topk_weights, out, in_flight, signal, seq, math,
                                         biases)
            if native is not None:
                return native
        self._finish_native()  # Python jobs run after the native ones: they share `out`
        submitted = time.perf_counter()

        @torch.inference_mode()  # thread-local: the engine thread's mode does not carry over
        def run() -> torch.Tensor:
            try:
                start = time.perf_counter()
                self._queue_s += start - submitted
                if in_flight is not None:  # the last result's H2D must be done reading
                    in_flight.synchronize()
                    self.result_wait_s += time.perf_counter() - start
                out.zero_()
                cpu_moe_forward(x, w13, w2, topk_ids, topk_weights, out, math, biases)
                self._busy_s += time.perf_counter() - start
                self._calls += 1
                return out
            finally:  # also on failure: a stream waiting for this job must not hang
                if seq is not None:
                    signal.set(seq)

        if self._pool is not None:
            future = self._pool.submit(run)
        else:
            future = concurrent.futures.Future()
            try:
                future.set_result(run())
            except BaseException as e:  # surfaced by .result(), like the threaded path
                future.set_exception(e)
        if seq is not None:
            self._unchecked = future
        return CPUJob(out, seq, future, self)

    def takes_routed_jobs(self) -> bool:
        """Whether submit_routed works here: the device waits for results, streams can write
        host words, and the native kernels run bf16 jobs on their own thread (quantized
        layers also need their own kernels: submit_routed says)."""
        if self._routed_ok is None:
            if torch.cuda.is_current_stream_capturing():
                return False
            from vllm_fiddler.runtime import device_wait

            self._routed_ok = (self._device_signal() is not None and device_wait.marks_available()
                               and cpu_kernels.isa() != "torch")
            if self._routed_ok:
                self._routing_mark = device_wait.StreamMark()
        return self._routed_ok and not torch.cuda.is_current_stream_capturing()

    def submit_routed(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, slots: torch.Tensor,
                      weights: torch.Tensor, chunks: int, counts: torch.Tensor,
                      first_chunks: tuple[int, ...] | None = None,
                      out: torch.Tensor | None = None, math: ExpertMath = SILU,
                      biases: tuple[torch.Tensor, torch.Tensor] | None = None) -> CPUJob | None:
        """A device-waited job whose routing is still on its way: x [T, H] bf16, slots [T, K]
        int32 (host slot or -1) and weights [T, K] fp32 are pinned buffers that copies already
        queued on the current stream fill. The stream marks when they have landed and the
        native job thread starts then, expanding each slot into its chunk-experts
        first_chunks[k]..chunks-1 of w13 / w2 itself (k: the pair's top-k position; the GPU
        may compute the chunks below; None: none); nobody on the host waits for the copy. It
        adds the (token, k) pairs of host slots, the distinct chunk-experts of theirs the GPU
        streams, and those the CPU reads, to `counts` (int64 [3]; [3 + 2^K]: then also each
        token under its cold-position mask, HybridMoE.routed_cold_patterns). The result goes
        to the device through result_on_device. None (nothing queued) if the native kernels
        do not take it; only call when takes_routed_jobs(). out: the pinned fp32 [T, H] result
        buffer (default: the runtime's shared one). Experts, math and biases as submit's.

        The shared buffers are safe without the host waiting: the next job's routing copy
        into them is queued behind this job's stream wait and result copy."""
        self._raise_unchecked()
        signal = self._signal
        if out is None:
            out = self._buffer("result", tuple(x.shape), torch.float32)
        seq = signal.next_seq()
        self._routing_mark.mark(seq)
        if not cpu_kernels.moe_forward_routed_async(x, w13, w2, slots, weights, chunks, out,
                                                    self._routing_mark.word, signal.word, seq, counts,
                                                    first_chunks=first_chunks, math=math, biases=biases):
            signal.set(seq)  # nobody will run it: no stream may wait for it
            return None
        self._native_jobs += 1
        return CPUJob(out, seq, None, self)

    def _submit_native(self, x, w13, w2, topk_ids, topk_weights, out, in_flight, signal, seq, math,
                       biases) -> CPUJob | None:
        """The job on the native job thread, which stores seq into the signal's word when done;
        None if the native kernels do not take it."""
        if in_flight is not None:  # done already when a layer submits (its routing copy came after it)
            start = time.perf_counter()
            in_flight.synchronize()
            self.result_wait_s += time.perf_counter() - start
        if not cpu_kernels.moe_forward_async(x, w13, w2, topk_ids, topk_weights, out, signal.word, seq, math=math,
                                             biases=biases):
            return None
        self._native_jobs += 1
        return CPUJob(out, seq, None, self)

    def _finish_native(self) -> None:
        """Waits for the native jobs submitted so far; raises the first failure among them."""
        if self._native_jobs:
            cpu_kernels.async_wait_idle()
            self._raise_native_error()

    def _raise_native_error(self) -> None:
        if self._native_jobs:
            error = cpu_kernels.async_take_error()
            if error:
                raise RuntimeError(f"fiddler CPU experts failed: {error}")

    def _raise_unchecked(self) -> None:
        """Re-raises the failure of an earlier device-waited job, whose result nobody read on the host."""
        self._raise_native_error()  # a native job that failed has signalled: its stream went on
        future, self._unchecked = self._unchecked, None
        if future is not None:
            future.result()  # done or nearly: its layer's stream wait has passed

    def result_on_device(self, job: CPUJob, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The job's result on the device in `dtype`, ordered on the current stream. With a
        device-waited job this returns at once (the stream waits for the worker's signal);
        otherwise the calling thread waits for the job here."""
        if job.seq is not None:
            self.wait_on_stream(job)
            result = job.out
        else:
            result = job.result()
        return self.to_device(result, device, dtype)

    def wait_on_stream(self, job: CPUJob) -> None:
        """The current stream's later work waits (on the device) until the device-waited job is done."""
        self._signal.wait(job.seq)

    def time_on_worker(self, fn, reps: int) -> float:
        """ms per call of fn() on the worker thread (after one warm-up call)."""

        self._finish_native()

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
        cpu_kernels.graph_jobs_detach()  # graph steps (runtime.graph_jobs): a waiting stream goes on
        if self._native_jobs:  # queued native jobs read this runtime's buffers
            if self._routing_mark is not None:  # no stream may come to mark their routing now
                cpu_kernels.async_cancel_ready_waits()
            cpu_kernels.async_wait_idle()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._signal is not None:  # cancelled jobs never signal: release their streams
            self._signal.release_all()


_runtime: CPUExpertRuntime | None = None
_runtime_lock = threading.Lock()


def get_cpu_runtime(num_threads: int, inline: bool, pin_memory: bool = False,
                    wait_on_device: bool = False) -> CPUExpertRuntime:
    """The process's one runtime (all layers share the CPU's cores)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = CPUExpertRuntime(num_threads, inline=inline, pin_memory=pin_memory,
                                        wait_on_device=wait_on_device)
            logger.info("fiddler: CPU expert runtime, %d compute threads%s%s", num_threads,
                        " (inline on the CPU platform)" if inline else " on a dedicated thread",
                        "; the GPU waits for their results on the device" if _runtime.wait_on_device else "")
        return _runtime
