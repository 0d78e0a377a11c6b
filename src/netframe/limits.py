"""Pure decisions about limits: deadlines, per-source rates, log summaries, descriptor budgets.

Nothing here reads a clock or touches a socket: every method that needs the time takes
``now`` (seconds, any monotonic origin), so the endpoints hand in one coarse clock
that the server advances a few times a second, and tests hand in whatever they like.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Hashable, Iterator
from typing import Final, Generic, TypeVar

__all__ = [
    "DeadlineWheel",
    "EventSummary",
    "SourceRateLimiter",
    "connection_budget",
]

T = TypeVar("T", bound=Hashable)


class DeadlineWheel(Generic[T]):
    """Items that want attention at a time, kept in coarse slots and handed out lazily.

    Each item has at most one entry: scheduling it again moves it. The hot path never
    touches the wheel: a connection stamps its activity on itself, and only when its
    slot comes due does it look at its own deadlines and either act or schedule itself
    again. So 10,000 busy connections cost a handful of wheel operations per idle-timeout
    period each, not a timer re-arm per message.

    ``resolution_s`` is the slot width: an item is handed out at the first :meth:`due`
    call at or after its time, and never before it.
    """

    __slots__ = ("_heap", "_resolution", "_slot_of", "_slots")

    def __init__(self, resolution_s: float) -> None:
        self._resolution = resolution_s
        self._slots: dict[int, dict[T, None]] = {}
        self._slot_of: dict[T, int] = {}
        self._heap: list[int] = []

    def __len__(self) -> int:
        return len(self._slot_of)

    def schedule(self, item: T, when: float) -> None:
        """Hand ``item`` out at the first :meth:`due` at or after ``when`` (moving it)."""
        slot = math.ceil(when / self._resolution)
        old = self._slot_of.get(item)
        if old == slot:
            return
        if old is not None:
            del self._slots[old][item]
        self._slot_of[item] = slot
        entries = self._slots.get(slot)
        if entries is None:
            entries = self._slots[slot] = {}
            heapq.heappush(self._heap, slot)
        entries[item] = None

    def cancel(self, item: T) -> None:
        """Forget ``item`` (nothing happens if it is not scheduled)."""
        # get and del rather than pop(item, None): the compiled build calls dict.get and
        # del natively, pop as a Python method.
        slot = self._slot_of.get(item)
        if slot is not None:
            del self._slot_of[item]
            del self._slots[slot][item]

    def due(self, now: float) -> list[T]:
        """Remove and return every item whose time has come, earliest slots first."""
        current = math.floor(now / self._resolution)
        heap, slots = self._heap, self._slots
        found: list[T] = []
        while heap and heap[0] <= current:
            entries = slots.pop(heapq.heappop(heap))
            for item in entries:
                del self._slot_of[item]
            found.extend(entries)
        return found


class SourceRateLimiter:
    """A token bucket per source, ``rate`` a second with a burst of ``burst``, in bounded memory.

    A source that has been quiet long enough to refill its bucket is no different from
    one never seen, so :meth:`prune` forgets those; when the table is full of sources
    that are all still busy, new sources share one overflow bucket instead of growing
    the table. A flood from forged addresses therefore costs at most ``max_sources``
    entries and gets at most ``rate`` answers a second between all the sources that do
    not fit.
    """

    __slots__ = ("_buckets", "_burst", "_full_after", "_max_sources", "_pruned", "_rate")

    def __init__(self, rate: float, burst: float, max_sources: int) -> None:
        self._rate = rate
        self._burst = burst
        self._max_sources = max_sources
        # How long an emptied bucket takes to fill again.
        self._full_after = burst / rate
        self._buckets: dict[Hashable, list[float]] = {}
        self._pruned = -math.inf

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, source: Hashable, now: float) -> bool:
        """Take one token from ``source``'s bucket; False when it has none."""
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self._max_sources and now - self._pruned >= _PRUNE_EVERY_S:
                # Full: forget the refilled sources first (a forged flood's one-offs),
                # at most once a short while, so new real sources get their own bucket.
                self._pruned = now
                self.prune(now)
            if len(self._buckets) >= self._max_sources:
                source = _OVERFLOW
                bucket = self._buckets.get(_OVERFLOW)
            if bucket is None:
                self._buckets[source] = [self._burst - 1.0, now]
                return True
        tokens = bucket[0] + (now - bucket[1]) * self._rate
        if tokens > self._burst:
            tokens = self._burst
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def prune(self, now: float) -> int:
        """Forget sources whose buckets are full again; return how many were forgotten."""
        full_after = self._full_after
        stale = [
            source
            for source, (tokens, stamp) in self._buckets.items()
            if now - stamp >= full_after * (1.0 - tokens / self._burst)
        ]
        for source in stale:
            del self._buckets[source]
        return len(stale)


# The shared bucket of sources that did not fit in the table.
_OVERFLOW: Final = ("overflow",)
# A full table is pruned on demand at most this often (a prune walks the whole table).
_PRUNE_EVERY_S: Final = 0.1


class EventSummary:
    """Counts of repeated events, to be logged at most once per ``interval_s`` per kind.

    :meth:`add` returns the count to log now (and starts counting again), or ``None``
    when the last line for that kind was too recent; :meth:`flush` returns the counts
    still waiting whose interval has passed, so the last of a burst is never lost.
    """

    __slots__ = ("_interval", "_last", "_pending")

    def __init__(self, interval_s: float) -> None:
        self._interval = interval_s
        self._last: dict[str, float] = {}
        self._pending: Counter[str] = Counter()

    def add(self, kind: str, now: float, count: int = 1) -> int | None:
        """Count ``count`` events of ``kind``; return the total to log now, if it is time."""
        self._pending[kind] += count
        if now - self._last.get(kind, -math.inf) < self._interval:
            return None
        self._last[kind] = now
        return self._pending.pop(kind)

    def flush(self, now: float, *, final: bool = False) -> Iterator[tuple[str, int]]:
        """Yield ``(kind, count)`` for waiting counts whose interval has passed, or for
        every waiting count when ``final`` (the server is stopping: nothing comes later)."""
        due = [k for k in self._pending if final or now - self._last[k] >= self._interval]
        for kind in due:
            self._last[kind] = now
            yield kind, self._pending.pop(kind)


def connection_budget(open_file_limit: int, descriptors_in_use: int) -> int:
    """How many connections fit under the open-file limit, with a reserve kept back.

    Each connection is one descriptor. The reserve (at least 16, or a twentieth of the
    limit) leaves room to accept a connection only to refuse it, and for what handlers
    and the runtime open along the way.
    """
    reserve = max(16, open_file_limit // 20)
    return max(1, open_file_limit - descriptors_in_use - reserve)
