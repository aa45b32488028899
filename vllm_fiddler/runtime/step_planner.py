"""Per layer and step: which cold experts to copy to the GPU instead of computing on the CPU.

A thin adapter from the step's cold token counts (hybrid_moe.cold_token_counts) to the pure cost model
(vllm_fiddler.cost_model), which minimises the step's critical path
max(CPU queue, PCIe queue + GPU compute of copied experts, hot GPU work).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from vllm_fiddler.cost_model import CostModel


class StepPlanner:
    def __init__(self, cost: "CostModel", max_copies: int | None):
        self.cost = cost
        self.max_copies = max_copies
        self.copies = 0  # experts copied whole so far (metrics)
        self.splits = 0  # experts cut between the CPU and a copy so far
        # (slot counts, chunks, hot ms) -> (plan, whole copies, split): the cost model caches
        # plans on token counts and relabels them per call (~20 us on the dev box); this
        # answers a repeated step (batch-1 decode has ~1400 slot pairs) in ~2 us
        self._memo: dict = {}

    def plan_counts(self, token_counts: dict[int, int], chunks: int, hot_tokens: int = 0) -> list[tuple[int, int]]:
        """{cold slot: tokens routed to it} (slots with no token left out; hybrid_moe.
        cold_token_counts) -> (cold slot, chunks to copy) in copy order: all `chunks` of a
        copied expert, the first n of the one expert split with the CPU."""
        from vllm_fiddler.cost_model import plan_cold_chunks

        if self.max_copies == 0 or not token_counts:
            return []
        key = (tuple(sorted(token_counts.items())), chunks, hot_tokens)
        memo = self._memo.get(key)
        if memo is None:
            hot_ms = self.cost.gpu_ms(hot_tokens) if hot_tokens else 0.0
            plan = plan_cold_chunks(dict(key[0]), self.cost, chunks, gpu_busy_ms=hot_ms, max_copies=self.max_copies)
            memo = ([(slot, plan.on_gpu(slot)) for slot in plan.copy], len(plan.whole.copy), plan.split is not None)
            if len(self._memo) >= MEMO_ENTRIES:
                self._memo.clear()
            self._memo[key] = memo
        copies, whole, split = memo
        self.copies += whole
        self.splits += split
        return list(copies)


# plans remembered per planner: every slot pair of a batch-1 decode over 64 experts, times a few
# hot-token counts; cleared when full (a step's plan is cheap to make again)
MEMO_ENTRIES = 16384

_planner: StepPlanner | None = None
_planner_lock = threading.Lock()


def get_step_planner(layer) -> StepPlanner:
    """The process's planner; the first call calibrates the cost model on `layer` (CUDA)."""
    global _planner
    with _planner_lock:
        if _planner is None:
            from vllm_fiddler.runtime.calibrate import load_or_measure

            cost = load_or_measure(layer, layer.cpu_runtime, layer.stager, layer.cpu_runtime.num_threads)
            # Slots are reused once their expert is computed, so copies are bounded
            # by time (the cost model's PCIe queue), not by the slot count.
            _planner = StepPlanner(cost, max_copies=None)
        return _planner
