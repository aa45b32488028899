"""When an idle engine should wait a moment for requests still arriving.

Pure Python (no torch, no vLLM), so the policy is unit-tested in CPU CI; the
vLLM scheduler that consults it is ``plugin.CoalescingScheduler``.

Why: a fiddler step costs about as much for one token as for sixteen, since
each cold expert's weights are read once per step whatever its token count.
Requests that arrive together but a millisecond apart are then worth one
step, not two. ``LLM.beam_search`` is the common case: every beam step adds
``width`` one-token requests one after another from the client process,
the engine core starts its step as soon as the first arrives, and the rest
wait for another full step. On the H100 (benchmarks/results/e2e-h100.json,
run ``uniform``) width 8 ran 1.86 engine steps per beam step and reached
3.6 tokens/s, against 1.00 and 6.6 tokens/s with the engine core in the
client's process, where every beam is queued before the step starts.

The policy learns from arrivals rather than guessing: an idle engine starts
at once unless one of its last ``memory`` idle starts met a burst: a
*straggler* (a request stamped, by the client's clock in
``Request.arrival_time``, before that step began or within ``gap_s`` after
it, that reached the scheduler only after the step had been scheduled), or,
once it waits, requests that joined the wait. Then it holds the step while
requests keep coming, until ``gap_s`` passes without one or ``max_hold_s``
since the hold began. Lone requests (TTFT probes, serving at concurrency 1)
never meet a straggler and never wait; after a burst they wait one gap each
for at most ``memory`` idle starts. Only steps that start from idle ever
wait, so a running batch is never delayed.
"""

from __future__ import annotations

import collections
import dataclasses

# How many idle starts a straggler is remembered for: traffic that stops
# arriving in bursts stops waiting after this many starts without one.
MEMORY_IDLE_STARTS = 8
# A hold never lasts longer than this many gaps (a long stream of arrivals
# starts once the first ones have waited this long; the rest join it by
# continuous batching).
MAX_HOLD_GAPS = 8

# The engine's coalescer, for stats.model_stats (one engine per process).
last_coalescer: "ArrivalCoalescer | None" = None


@dataclasses.dataclass
class ArrivalCoalescer:
    gap_s: float
    max_hold_s: float | None = None  # default MAX_HOLD_GAPS * gap_s
    memory: int = MEMORY_IDLE_STARTS
    holds: int = 0  # idle starts that waited
    held_s: float = 0.0  # their total wait
    stragglers: int = 0

    def __post_init__(self) -> None:
        if self.max_hold_s is None:
            self.max_hold_s = MAX_HOLD_GAPS * self.gap_s
        self._start_stamp: float | None = None  # the last idle start's time
        # per idle start: did it meet a burst (requests joined its hold, or a straggler came)
        self._met_burst = collections.deque(maxlen=self.memory)
        self._hold_since: float | None = None
        self._joined_hold = 0  # requests that reached the scheduler during the current hold
        self._last_add = float("-inf")

    @property
    def enabled(self) -> bool:
        return self.gap_s > 0

    @property
    def bursty(self) -> bool:
        """A recent idle start met a burst: a straggler, or requests that joined its hold."""
        return any(self._met_burst)

    def on_add(self, arrival_stamp: float, now: float) -> None:
        """A request reached the scheduler at `now`, stamped `arrival_stamp` by the client."""
        self._last_add = now
        if self._hold_since is not None:
            self._joined_hold += 1
            return
        # _start_stamp is set with each idle start's entry in _met_burst
        if self._start_stamp is not None and arrival_stamp < self._start_stamp + self.gap_s \
                and not self._met_burst[-1]:
            self._met_burst[-1] = True
            self.stragglers += 1

    def hold(self, now: float, idle_with_waiting: bool) -> bool:
        """Called as a step is scheduled; True: schedule no waiting request this time.

        `idle_with_waiting`: no request is running and some are waiting, i.e.
        this step would start the engine from idle. Any other step neither
        waits nor counts as an idle start.
        """
        if not (self.enabled and idle_with_waiting):
            return False
        if self.bursty:
            if self._hold_since is None:
                self._hold_since = now
            if now - self._last_add < self.gap_s and now - self._hold_since < self.max_hold_s:
                return True
        joined = self._joined_hold > 0
        if self._hold_since is not None:
            self.holds += 1
            self.held_s += now - self._hold_since
            self._hold_since, self._joined_hold = None, 0
        self._start_stamp = now
        self._met_burst.append(joined)  # a burst gathered by waiting is still a burst
        return False
