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
"""

from __future__ import annotations

import torch


class WeightStager:
    def __init__(self, num_slots: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                 device: torch.device):
        H, I = hidden_size, intermediate_size
        self.num_slots = num_slots
        self.w13 = torch.empty(num_slots, 2 * I, H, dtype=dtype, device=device)  # [S, 2I, H]
        self.w2 = torch.empty(num_slots, H, I, dtype=dtype, device=device)  # [S, H, I]
        self.stream = torch.cuda.Stream(device=device)
        self._slot_free: list[torch.cuda.Event | None] = [None] * num_slots
        self._next = 0
        self.bytes_copied = 0

    def stage(self, w13: torch.Tensor, w2: torch.Tensor) -> tuple[int, torch.cuda.Event]:
        """Starts copying one expert (pinned host tensors) into a slot; returns (slot, ready event)."""
        slot = self._next
        self._next = (self._next + 1) % self.num_slots
        with torch.cuda.stream(self.stream):
            if self._slot_free[slot] is not None:
                self.stream.wait_event(self._slot_free[slot])
            self.w13[slot].copy_(w13, non_blocking=True)
            self.w2[slot].copy_(w2, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        self.bytes_copied += w13.numel() * w13.element_size() + w2.numel() * w2.element_size()
        return slot, ready

    def release(self, slot: int) -> None:
        """Marks the slot reusable once the work queued so far on the current stream is done."""
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream())
        self._slot_free[slot] = done
