"""The GPU, not the engine thread, waits for the CPU experts' result.

Why: with the engine thread blocked on the CPU experts, every layer's
attention block is launched only after that layer's CPU work is done, so its
host time (~1.1-1.6 ms a layer in eager vLLM on the H100 box,
benchmarks/results/decode-overhead-h100.json) adds to the CPU's on the
critical path: 10-15 ms of a 43 ms batch-1 decode step. Here the compute
stream waits instead, and the engine thread goes on to launch the next
attention block while the CPU computes:

  engine thread: [route, submit, launch]            [attention L+1 launch][route L+1: blocks]
  CPU worker:                            [cold experts of layer L.........][signal L]
  compute stream:                        [hot experts][wait L ............][H2D, add][attention L+1]...

How: a pinned 32-bit word that the CPU worker sets to each job's sequence
number once the job's result is in its pinned buffer, and a driver stream
wait (cuStreamWaitValue32, "greater or equal", a cyclic compare, so the
counter may wrap) on the compute stream before the result's host-to-device
copy. The engine thread only enqueues; nothing on the GPU spins (the wait is
the copy engine's front end polling host memory).

Ordering: the worker writes the word after its kernel threads have joined, and
x86 keeps one thread's stores in order, so the GPU that sees the word also
sees the result. A job's result buffer is written again only by a later job,
which is submitted after its layer's routing copy, which the stream runs after
this wait and copy.

Needs the CUDA driver's stream memory operations (CUDA 12+ on Linux has them);
``available()`` says whether the driver takes them, and callers fall back to
waiting on the host.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from vllm_fiddler.logger import logger

CU_STREAM_WAIT_VALUE_GEQ = 0x0  # (int32_t)(*addr - value) >= 0: a cyclic compare
CU_POINTER_ATTRIBUTE_DEVICE_POINTER = 3
_CUDA_SUCCESS = 0


class _Driver:
    """The two driver entry points, through ctypes (torch does not expose stream memory operations)."""

    def __init__(self):
        lib = ctypes.CDLL("libcuda.so.1")
        # CUDA 12 headers map cuStreamWaitValue32 to its _v2 symbol; older drivers have only v1
        wait = getattr(lib, "cuStreamWaitValue32_v2", None) or lib.cuStreamWaitValue32
        wait.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        wait.restype = ctypes.c_int
        self.wait_value32 = wait
        write = getattr(lib, "cuStreamWriteValue32_v2", None) or getattr(lib, "cuStreamWriteValue32", None)
        if write is not None:
            write.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
            write.restype = ctypes.c_int
        self.write_value32 = write
        get_attr = lib.cuPointerGetAttribute
        get_attr.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64]
        get_attr.restype = ctypes.c_int
        self.pointer_get_attribute = get_attr

    def device_pointer(self, host_ptr: int) -> int:
        dptr = ctypes.c_uint64(0)
        rc = self.pointer_get_attribute(ctypes.byref(dptr), CU_POINTER_ATTRIBUTE_DEVICE_POINTER, host_ptr)
        if rc != _CUDA_SUCCESS:
            raise RuntimeError(f"cuPointerGetAttribute(DEVICE_POINTER) failed: CUresult {rc}")
        return dptr.value


class DeviceSignal:
    """A host-set sequence number that CUDA streams wait for on the device.

    One producer (the CPU worker calls ``set``) and one consumer thread (the
    engine thread calls ``next_seq`` and ``wait``)."""

    def __init__(self):
        self._driver = _Driver()
        self.word = torch.zeros(1, dtype=torch.int32, device="cpu", pin_memory=True)
        self._word_u32 = self.word.numpy().view("uint32")  # host writes without a torch op
        self._device_ptr = self._driver.device_pointer(self.word.data_ptr())
        self.last_seq = 0  # the last sequence number handed out (mod 2^32)
        self._lock = threading.Lock()

    def next_seq(self) -> int:
        self.last_seq = (self.last_seq + 1) & 0xFFFFFFFF
        return self.last_seq

    def set(self, seq: int) -> None:
        """Releases every wait for seq and earlier (the producer)."""
        with self._lock:  # `release_all` may race a late job's set: the word only moves forward
            if ((seq - int(self._word_u32[0])) & 0xFFFFFFFF) < 0x80000000:
                self._word_u32[0] = seq

    def release_all(self) -> None:
        """Sets the word to the last sequence number handed out (shutdown: no stream may wait forever)."""
        self.set(self.last_seq)

    def wait(self, seq: int, stream: torch.cuda.Stream | None = None) -> None:
        """The stream's later work starts once ``set(s)`` ran for some s >= seq (cyclically)."""
        stream = stream or torch.cuda.current_stream()
        rc = self._driver.wait_value32(ctypes.c_void_p(stream.cuda_stream), self._device_ptr,
                                       seq & 0xFFFFFFFF, CU_STREAM_WAIT_VALUE_GEQ)
        if rc != _CUDA_SUCCESS:
            raise RuntimeError(f"cuStreamWaitValue32 failed: CUresult {rc}")


class StreamMark:
    """The other direction: a pinned 32-bit word a CUDA stream writes a sequence number into
    (cuStreamWriteValue32) once the work queued before it is done, for a host thread to poll.

    The routed CPU jobs (CPUExpertRuntime.submit_routed) wait on it for their layer's routing
    copy: the engine thread queues the copy and the mark, submits the job and goes on, so no
    host thread has to wake up, plan and hand the CPU its work between the routing and the
    CPU's start. The stream's write follows the copy's in stream order; the job thread reads
    the word with acquire semantics before the routing."""

    def __init__(self):
        self._driver = _Driver()
        if self._driver.write_value32 is None:
            raise RuntimeError("this CUDA driver has no cuStreamWriteValue32")
        self.word = torch.zeros(1, dtype=torch.int32, device="cpu", pin_memory=True)
        self._device_ptr = self._driver.device_pointer(self.word.data_ptr())

    def mark(self, seq: int, stream: torch.cuda.Stream | None = None) -> None:
        """The stream stores seq (mod 2^32) into the word after the work queued on it so far."""
        stream = stream or torch.cuda.current_stream()
        rc = self._driver.write_value32(ctypes.c_void_p(stream.cuda_stream), self._device_ptr,
                                        seq & 0xFFFFFFFF, 0)
        if rc != _CUDA_SUCCESS:
            raise RuntimeError(f"cuStreamWriteValue32 failed: CUresult {rc}")


_checked: bool | None = None
_marks_checked: bool | None = None


def marks_available() -> bool:
    """Whether streams can write host words here (StreamMark; checked once, on a side stream)."""
    global _marks_checked
    if _marks_checked is None:
        _marks_checked = available() and _mark_self_test()
    return _marks_checked


def _mark_self_test() -> bool:
    try:
        mark = StreamMark()
        stream = torch.cuda.Stream()
        mark.mark(0x9E3779B9, stream)
        stream.synchronize()
        if int(mark.word.numpy().view("uint32")[0]) != 0x9E3779B9:
            raise RuntimeError("the stream's write did not reach the host word")
        return True
    except (OSError, AttributeError, RuntimeError) as e:
        logger.warning("fiddler: CUDA streams cannot write host words (%s); the engine thread hands "
                       "the CPU experts their routing instead", e)
        return False


def available() -> bool:
    """Whether this process's driver takes stream waits on host memory (checked once, on a side stream)."""
    global _checked
    if _checked is None:
        _checked = _self_test()
    return _checked


def _self_test() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        signal = DeviceSignal()
        stream = torch.cuda.Stream()
        signal.set(signal.next_seq())  # already set: the wait passes at once
        signal.wait(signal.last_seq, stream)
        stream.synchronize()
        return True
    except (OSError, AttributeError, RuntimeError) as e:
        logger.warning("fiddler: the GPU cannot wait for the CPU experts on the device (%s); "
                       "the engine thread waits instead", e)
        return False
