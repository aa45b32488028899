"""The device chain between two layers' CPU jobs, in isolation: how long a stream takes
from the CPU's "done" to the next layer's routing mark, by how long it waited.

A routed decode step's stream, per cold layer (HybridMoE._forward_routed):

  [wait for CPU job L (host word)][H2D result, add][attention L+1, router][D2H routing][mark L+1]

The CPU idles over that chain. Served engines measured it at 0.16 ms a layer on one
H100 machine and ~1.0 ms on another, for the same GPU work. This script times the chain
alone, without vLLM, after the stream waited `idle` ms (the CPU job's length):

  rtt_ms       host: the word written -> the stream's mark seen (what the CPU idles)
  chain_gpu_ms GPU events around the chain's work, after the wait (its kernels' time)
  wake_ms      rtt - chain_gpu (the wait's release + the mark's write, PCIe both ways)
  sm_mhz       the SM clock (NVML) just before the release

for two ways of waiting:

  driver       cuStreamWaitValue32 on the pinned word (the GPU's front end polls host
               memory; the SMs idle), what the runtime does
  spin         a one-program Triton kernel that polls the word through a zero-copy view
               (one SM busy while it waits)

If chain_gpu grows with `idle`, the GPU ran the chain slower after idling (clocks); if
wake grows, the wait's release did.

`--queued` adds the engine's pattern: the engine thread runs layers ahead of the GPU, so a
whole step's waits, chains and marks are queued before the first release, and the chain
replays a CUDA graph (as the routed steps' graphs and vLLM's piecewise graphs do). Each
layer is released `idle` ms after the previous layer's mark was seen:

  queued_eager / queued_graph   rtt_ms per layer, with the step's 8 layers queued up front
                                (not yet run on a GPU)

    python benchmarks/investigations/device_chain.py --out benchmarks/results/device-chain-h100.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

H, QKV, I_ROUTER = 4096, 6144, 8  # Mixtral-8x7B: hidden, q + k + v rows, experts


def nvml_sm_clock():
    """A callable returning the SM clock in MHz, or None where NVML is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        return lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)
    except Exception:  # noqa: BLE001 - any NVML failure: no clock column
        return None


class LayerChain:
    """One layer's device work between two CPU jobs, at Mixtral-8x7B's decode shapes."""

    def __init__(self):
        dev, bf16 = "cuda", torch.bfloat16
        self.x = torch.randn(1, H, device=dev, dtype=bf16)  # [T, H]
        self.qkv = torch.randn(QKV, H, device=dev, dtype=bf16) * 0.01
        self.o = torch.randn(H, H, device=dev, dtype=bf16) * 0.01
        self.gate = torch.randn(I_ROUTER, H, device=dev, dtype=bf16) * 0.01
        self.norm = torch.ones(H, device=dev, dtype=bf16)
        self.result_host = torch.zeros(1, H, dtype=bf16).pin_memory()  # the CPU's share
        self.routing_host = torch.zeros(1, H + 8, dtype=bf16).pin_memory()  # x + ids + weights
        self.result = torch.empty(1, H, device=dev, dtype=bf16)

    def rms(self, x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(x.dtype) * self.norm

    def run(self) -> None:
        self.result.copy_(self.result_host, non_blocking=True)  # the CPU's share up
        h = self.x + self.result
        q = self.rms(h) @ self.qkv.T  # [T, QKV]; stands in for attention's projections
        a = q[:, :H] * torch.sigmoid(q[:, H:H + 1024].repeat(1, 4))  # a few pointwise kernels
        h = h + a @ self.o.T
        logits = self.rms(h) @ self.gate.T  # [T, E] router
        w, ids = torch.topk(torch.softmax(logits.float(), -1), 2)
        self.routing_host[:, :H].copy_(h, non_blocking=True)
        self.routing_host[:, H:H + 2].copy_(ids.to(torch.bfloat16), non_blocking=True)
        self.routing_host[:, H + 2:H + 4].copy_(w.to(torch.bfloat16), non_blocking=True)


def spin_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _spin_until_kernel(word_ptr, target):
        # cyclic >=, as cuStreamWaitValue32's GEQ: (int32)(word - target) >= 0
        v = tl.load(word_ptr, volatile=True)
        while v - target < 0:
            v = tl.load(word_ptr, volatile=True)

    return _spin_until_kernel


def release_after(idle_ms: float, word, seen, seq: int, what: str, before_release=None) -> dict:
    """Busy-waits `idle_ms` (the CPU job's length), writes `seq` into the word the stream
    waits on and spins until the stream's mark shows it: {"rtt_ms", "before_release": what
    before_release() returned just before the write (None without one)}."""
    deadline = time.perf_counter() + idle_ms / 1e3
    while time.perf_counter() < deadline:
        pass
    sampled = before_release() if before_release else None
    released = time.perf_counter()
    word[0] = seq
    while seen[0] != seq:
        if time.perf_counter() - released > 10:
            raise RuntimeError(f"{what}: the stream's mark never came (seq {seq})")
    return {"rtt_ms": (time.perf_counter() - released) * 1e3, "before_release": sampled}


def measure(mode: str, idles_ms, reps: int, chain: LayerChain, sm_clock) -> dict:
    from vllm_fiddler.runtime.device_wait import DeviceSignal, StreamMark
    from vllm_fiddler.runtime.host_view import device_view

    signal, mark = DeviceSignal(), StreamMark()
    word = signal.word.numpy().view("uint32")
    seen = mark.word.numpy().view("uint32")
    kernel, word_view = (spin_kernel(), device_view(signal.word)) if mode == "spin" else (None, None)
    stream = torch.cuda.Stream()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    rows = {idle: {"rtt_ms": [], "chain_gpu_ms": [], "wake_ms": [], "sm_mhz": []} for idle in idles_ms}
    order = [idle for _ in range(reps + 2) for idle in idles_ms]  # interleaved; 2 warm-up rounds
    with torch.cuda.stream(stream):
        for i, idle in enumerate(order):
            seq = signal.next_seq()
            if kernel is None:
                signal.wait(seq, stream)
            else:
                kernel[(1,)](word_view, seq)
            begin.record(stream)
            chain.run()
            end.record(stream)
            mark.mark(seq, stream)
            timed = release_after(idle, word, seen, seq, mode, before_release=sm_clock)
            rtt, mhz = timed["rtt_ms"], timed["before_release"]
            end.synchronize()
            if i >= 2 * len(idles_ms):
                gpu = begin.elapsed_time(end)
                row = rows[idle]
                row["rtt_ms"].append(rtt)
                row["chain_gpu_ms"].append(gpu)
                row["wake_ms"].append(rtt - gpu)
                if mhz is not None:
                    row["sm_mhz"].append(mhz)
    return {str(idle): {k: summary(v) for k, v in row.items() if v} for idle, row in rows.items()}


def measure_queued(chain_mode: str, idles_ms, reps: int, chain: LayerChain, layers: int = 8) -> dict:
    """rtt per layer (the word written -> that layer's mark seen) with `layers` layers queued
    on the stream before the first release; the chain launched eagerly or replayed as a graph."""
    from vllm_fiddler.runtime.device_wait import DeviceSignal, StreamMark

    signal, mark = DeviceSignal(), StreamMark()
    word = signal.word.numpy().view("uint32")
    seen = mark.word.numpy().view("uint32")
    stream = torch.cuda.Stream()
    run = chain.run
    if chain_mode == "graph":
        with torch.cuda.stream(stream):
            chain.run()
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            chain.run()
        run = graph.replay
    rows = {idle: [] for idle in idles_ms}
    order = [idle for _ in range(reps + 2) for idle in idles_ms]
    with torch.cuda.stream(stream):
        for i, idle in enumerate(order):
            seqs = []
            for _ in range(layers):  # the engine thread, a step ahead
                seq = signal.next_seq()
                signal.wait(seq, stream)
                run()
                mark.mark(seq, stream)
                seqs.append(seq)
            for seq in seqs:  # the CPU jobs, one after another
                rtt = release_after(idle, word, seen, seq, f"queued {chain_mode}")["rtt_ms"]
                if i >= 2 * len(idles_ms):
                    rows[idle].append(rtt)
            stream.synchronize()
    return {str(idle): {"rtt_ms": summary(v)} for idle, v in rows.items()}


def summary(values):
    values = sorted(values)
    n = len(values)
    return {"p10": round(values[n // 10], 4), "p50": round(statistics.median(values), 4),
            "p90": round(values[min(n - 1, 9 * n // 10)], 4), "mean": round(statistics.fmean(values), 4)}


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/
    from results_io import command_line, write_result

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/device-chain-h100.json")
    p.add_argument("--idles-ms", default="0.02,0.2,0.5,1,2,3,5")
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--modes", default="driver,spin")
    p.add_argument("--queued", default="eager,graph", help="chain launches for the queued runs ('' for none)")
    args = p.parse_args()
    idles = [float(v) for v in args.idles_ms.split(",")]
    chain, sm_clock = LayerChain(), nvml_sm_clock()
    for _ in range(20):
        chain.run()
    torch.cuda.synchronize()
    result = {"what": __doc__.split("\n\n")[0], "command": command_line("investigations/device_chain.py", args),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "modes": {}}
    for mode in filter(None, args.modes.split(",")):
        result["modes"][mode] = measure(mode, idles, args.reps, chain, sm_clock)
        for idle, row in result["modes"][mode].items():
            print(mode, idle, {k: v["p50"] for k, v in row.items()}, flush=True)
    for chain_mode in filter(None, args.queued.split(",")):
        mode = f"queued_{chain_mode}"
        result["modes"][mode] = measure_queued(chain_mode, idles, args.reps, chain)
        for idle, row in result["modes"][mode].items():
            print(mode, idle, {k: v["p50"] for k, v in row.items()}, flush=True)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
