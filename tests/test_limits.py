"""The pure limit decisions in ``netframe.limits``, with the clock handed in."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given

from netframe.limits import DeadlineWheel, EventSummary, SourceRateLimiter, connection_budget


def test_wheel_hands_items_out_at_their_time_never_before() -> None:
    wheel: DeadlineWheel[str] = DeadlineWheel(0.1)
    wheel.schedule("a", 1.05)
    wheel.schedule("b", 0.5)
    assert wheel.due(0.49) == []
    assert wheel.due(0.5) == ["b"]
    assert wheel.due(1.0) == []
    assert wheel.due(1.1) == ["a"]
    assert len(wheel) == 0


@given(st.lists(st.floats(0, 100), min_size=1, max_size=50), st.floats(0, 120))
def test_wheel_is_never_early_and_never_loses_an_item(times: list[float], now: float) -> None:
    wheel: DeadlineWheel[int] = DeadlineWheel(0.25)
    for item, when in enumerate(times):
        wheel.schedule(item, when)
    due = wheel.due(now)
    assert all(times[item] <= now for item in due)
    # Whatever is left comes out once its time is reached, and only once.
    later = wheel.due(max(times) + 1)
    assert sorted(due + later) == list(range(len(times)))


def test_scheduling_again_moves_the_item_and_cancel_forgets_it() -> None:
    wheel: DeadlineWheel[str] = DeadlineWheel(1.0)
    wheel.schedule("a", 10)
    wheel.schedule("a", 2)
    wheel.schedule("b", 3)
    assert wheel.due(2) == ["a"]
    wheel.cancel("b")
    wheel.cancel("never scheduled")
    assert wheel.due(100) == []


def test_rate_limiter_allows_a_burst_then_the_rate() -> None:
    limiter = SourceRateLimiter(rate=10, burst=10, max_sources=100)
    assert [limiter.allow("a", 0.0) for _ in range(11)] == [True] * 10 + [False]
    assert limiter.allow("a", 0.05) is False  # half a token refilled
    assert limiter.allow("a", 0.1) is True  # one whole token
    assert limiter.allow("b", 0.1) is True  # another source has its own bucket


def test_rate_limiter_memory_is_bounded_and_overflow_sources_share_one_bucket() -> None:
    limiter = SourceRateLimiter(rate=1, burst=2, max_sources=3)
    for source in ("a", "b", "c"):
        assert limiter.allow(source, 0.0)
    # The table is full of busy sources: newcomers share one bucket of burst 2.
    assert [limiter.allow(f"x{i}", 0.0) for i in range(4)] == [True, True, False, False]
    assert len(limiter) == 4  # three sources and the shared bucket, however many forged
    # Refilled buckets are no different from new ones, so pruning forgets them.
    assert limiter.prune(10.0) == 4
    assert len(limiter) == 0


def test_prune_keeps_sources_still_refilling() -> None:
    limiter = SourceRateLimiter(rate=1, burst=4, max_sources=10)
    for _ in range(4):
        limiter.allow("busy", 0.0)
    limiter.allow("quiet", 0.0)
    assert limiter.prune(1.0) == 1  # quiet needed 1 s to refill; busy needs 4
    assert len(limiter) == 1


def test_event_summary_logs_the_first_then_at_most_once_an_interval() -> None:
    summary = EventSummary(1.0)
    assert summary.add("cap", 0.0) == 1
    assert [summary.add("cap", 0.1 * i) for i in range(1, 6)] == [None] * 5
    assert list(summary.flush(0.9)) == []
    assert list(summary.flush(1.0)) == [("cap", 5)]
    assert summary.add("cap", 1.5) is None
    assert summary.add("other", 1.5) == 1  # kinds are counted apart
    assert summary.add("cap", 2.0) == 2


def test_connection_budget_keeps_a_reserve() -> None:
    assert connection_budget(1024, 20) == 1024 - 20 - 51
    assert connection_budget(64, 12) == 64 - 12 - 16
    assert connection_budget(16, 12) == 1  # always at least one


def test_a_full_table_forgets_refilled_sources_before_sharing_the_overflow_bucket() -> None:
    limiter = SourceRateLimiter(rate=100, burst=1, max_sources=3)
    for source in ("forged1", "forged2", "forged3"):
        assert limiter.allow(source, 0.0)
    assert limiter.allow("real", 0.5)  # the forged one-offs have refilled: pruned
    assert limiter.allow("real2", 0.5)


def test_a_final_flush_gives_every_waiting_count_whatever_the_interval() -> None:
    summary = EventSummary(1.0)
    assert summary.add("rate_limited", 10.0) == 1  # the first is logged at once
    assert summary.add("rate_limited", 10.1, 4) is None
    assert summary.add("too_large", 10.2) == 1
    assert summary.add("too_large", 10.3) is None
    assert list(summary.flush(10.4)) == []  # within the interval: not yet
    assert sorted(summary.flush(10.4, final=True)) == [("rate_limited", 4), ("too_large", 1)]
    assert list(summary.flush(20.0, final=True)) == []  # nothing is given twice
