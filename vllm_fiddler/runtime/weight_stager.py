"""GPU staging slots for cold experts' weights (the weight-copy path).

When a cold expert gets many tokens in a step (long prefill, big batches),
copying its weights over PCIe and computing on the GPU beats the CPU. The
stager owns a few expert-sized GPU slots and a copy stream:

  copy stream:     [copy e1 -> slot0][copy e2 -> slot1][copy e3 -> slot0] ...
  compute stream:              [e1 on slot0]    [e2 on slot1]   [e3 on slot0]

Double buffering: a slot is overwritten only after the compute that read it
(an event recorded on the compute stream), so copies run ahead by one expert
while the GPU computes the previous one. Process-wide: every layer shares the
slots, which are allocated at model construction so vLLM's memory profiling
sees them.

Slots hold an expert in the host's chunked layout (see HybridMoE): chunk c
is a small expert of intermediate size I/C, so a slot can hold a whole
expert (C chunks) or the first j chunks of one (an expert split between the
CPU and the GPU), and the Triton kernel computes chunks as experts.
"""

from __future__ import annotations

import torch


class WeightStager:
    def __init__(self, num_slots: int, hidden_size: int, intermediate_size: int, chunks: int,
                 dtype: torch.dtype, device: torch.device):
        H, I, C = hidden_size, intermediate_size, chunks
        Ic = I // C
        self.num_slots, self.chunks = num_slots, C
        self.w13 = torch.empty(num_slots, C, 2 * Ic, H, dtype=dtype, device=device)  # [S, C, 2Ic, H]
        self.w2 = torch.empty(num_slots, C, H, Ic, dtype=dtype, device=device)  # [S, C, H, Ic]
        # every chunk of every slot as an expert: slot s chunk c is expert s * C + c
        self.w13_chunks = self.w13.view(num_slots * C, 2 * Ic, H)  # [S*C, 2Ic, H]
        self.w2_chunks = self.w2.view(num_slots * C, H, Ic)  # [S*C, H, Ic]
        self.stream = torch.cuda.Stream(device=device)
        self._slot_free: list[torch.cuda.Event | None] = [None] * num_slots
        self._next = 0
        self.bytes_copied = 0
        # [S, C + 1, C] int32: row (s, n) holds the chunk-experts of slot s's first n
        # chunks (s * C + c) and -1 past them; built here, so a step never copies it in
        chunk = torch.arange(C, dtype=torch.int32)  # [C]
        first = torch.arange(C + 1, dtype=torch.int32).view(1, C + 1, 1)  # [1, C+1, 1]
        base = (torch.arange(num_slots, dtype=torch.int32) * C).view(num_slots, 1, 1)  # [S, 1, 1]
        self._chunk_ids = torch.where(chunk < first, base + chunk, -1).to(device)  # [S, C+1, C]

    def chunk_ids(self, slot: int, n: int) -> torch.Tensor:
        """[C] int32 on the device: the chunk-experts of the first n chunks of `slot`, -1 past them."""
        return self._chunk_ids[slot, n]

    @property
    def chunk_id_rows(self) -> torch.Tensor:
        """[S * (C + 1), C]: every chunk_ids(slot, n), at row chunk_row(slot, n) (CUDA graphs
        select a row on the device)."""
        return self._chunk_ids.view(-1, self.chunks)

    def chunk_row(self, slot: int, n: int) -> int:
        return slot * (self.chunks + 1) + n

    def stage(self, w13: torch.Tensor, w2: torch.Tensor) -> tuple[int, torch.cuda.Event]:
        """Starts copying the first j chunks of one expert (pinned host tensors w13 [j, 2Ic, H],
        w2 [j, H, Ic]) into a slot's first j chunks; returns (slot, ready event)."""
        j = w13.shape[0]
        slot = self._next
        self._next = (self._next + 1) % self.num_slots
        with torch.cuda.stream(self.stream):
            if self._slot_free[slot] is not None:
                self.stream.wait_event(self._slot_free[slot])
            self.w13[slot, :j].copy_(w13, non_blocking=True)
            self.w2[slot, :j].copy_(w2, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        self.bytes_copied += w13.numel() * w13.element_size() + w2.numel() * w2.element_size()
        return slot, ready

    def release(self, slot: int) -> None:
        """Marks the slot reusable once the work queued so far on the current stream is done."""
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream())
        self._slot_free[slot] = done
