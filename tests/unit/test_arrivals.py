"""The arrival-coalescing policy (vllm_fiddler.arrivals) on planted arrival timelines.

Times are seconds on one clock; the client's stamps and the scheduler's
clock agree here, as they do on one host (both are time.time()).
"""

from __future__ import annotations

import pytest

from vllm_fiddler.arrivals import MAX_HOLD_GAPS, MEMORY_IDLE_STARTS, ArrivalCoalescer

GAP = 0.002


def burst_step(c: ArrivalCoalescer, t: float, n: int, spacing: float, tick: float = 0.001) -> tuple[float, int]:
    """`n` requests stamped `spacing` apart from `t`; the engine polls every `tick`.

    Returns (when the step started, how many requests it took): what a
    scheduler that consults `c` at every poll would do.
    """
    stamps = [t + i * spacing for i in range(n)]
    added, now = 0, stamps[0]
    while True:
        while added < n and stamps[added] <= now:
            c.on_add(stamps[added], now)
            added += 1
        if added and not c.hold(now, idle_with_waiting=True):
            break
        now += tick
    for stamp in stamps[added:]:  # the rest reach the scheduler while the step runs
        c.on_add(stamp, max(stamp, now))
    return now, added


def test_lone_requests_never_wait():
    c = ArrivalCoalescer(GAP)
    for k in range(20):
        t = 10.0 * k
        start, taken = burst_step(c, t, 1, 0.0)
        assert (start, taken) == (t, 1)
    assert (c.holds, c.stragglers, c.bursty) == (0, 0, False)


def test_a_burst_split_once_is_then_coalesced():
    c = ArrivalCoalescer(GAP)
    start, taken = burst_step(c, 0.0, 8, 0.0003)
    assert taken == 1 and c.stragglers == 1 and c.bursty  # the first burst teaches it
    for k in range(1, 10):
        t = 0.1 * k
        start, taken = burst_step(c, t, 8, 0.0003)
        assert taken == 8, k
        assert start - (t + 7 * 0.0003) <= GAP + 0.001  # waits one gap after the last arrival, not more
    assert c.holds == 9 and c.stragglers == 1


def test_holds_only_from_idle_and_never_past_the_cap():
    c = ArrivalCoalescer(GAP)
    burst_step(c, 0.0, 2, 0.0005)
    assert c.bursty
    assert not c.hold(1.0, idle_with_waiting=False)  # a running batch is never delayed
    # an endless stream: one request every 0.5 ms
    start, taken = burst_step(c, 2.0, 1000, 0.0005)
    assert start - 2.0 == pytest.approx(MAX_HOLD_GAPS * GAP, abs=0.0015)
    assert 0 < taken < 1000


def test_forgets_bursts_after_quiet_idle_starts():
    c = ArrivalCoalescer(GAP)
    burst_step(c, 0.0, 4, 0.0003)
    assert c.bursty
    waits = []
    for k in range(1, MEMORY_IDLE_STARTS + 3):
        t = 1.0 * k
        start, _ = burst_step(c, t, 1, 0.0)
        waits.append(round(start - t, 4))
    # each lone request waits one gap while the burst is remembered, then none
    assert all(w > 0 for w in waits[:MEMORY_IDLE_STARTS - 1]) and waits[-1] == 0.0, waits
    assert not c.bursty


def test_requests_stamped_after_the_gap_are_not_stragglers():
    c = ArrivalCoalescer(GAP)
    c.hold(0.0, idle_with_waiting=True)  # a lone request starts the engine at t=0
    c.on_add(0.010, 0.010)  # a new request 10 ms later: a new arrival, not a late one
    assert c.stragglers == 0 and not c.bursty
    c.on_add(-0.001, 0.012)  # stamped before the step began but delivered late: a straggler
    assert c.stragglers == 1 and c.bursty


def test_disabled_never_holds():
    c = ArrivalCoalescer(0.0)
    start, taken = burst_step(c, 0.0, 8, 0.0003)
    assert taken == 1
    start, taken = burst_step(c, 1.0, 8, 0.0003)
    assert taken == 1 and c.holds == 0
