"""The server's tick: a callback on the event loop every ``TICK_S``, made the cheapest way
for the loop it runs on.

On asyncio's own loops (``asyncio.BaseEventLoop``: the selector loop, the proactor loop)
a timer that is merely pending costs every iteration of the loop: each one works out its
select timeout from the timer heap (the loop's clock read again, a ``min`` and a
``max``) and compares the heap's first deadline with the clock after polling. On a
1 KiB echo, one iteration per message, the raw Protocol server grew from 22,900 to
28,000 instructions a message when a 0.1 s timer was added to it (counted under
callgrind, ``benchmarks/served_instructions.py``'s method). There the tick is therefore
driven by a thread of its own, which sleeps between ticks and hands each one to the loop
through ``call_soon_threadsafe``: the loop's heap stays empty, and ten wake-ups a second
through the loop's self-pipe cost nothing in between.

Other loops (uvloop keeps its timers in libuv, in C) get an ordinary ``call_later``
chain, which costs them nothing per iteration.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

__all__ = ["Ticker", "start_ticker"]


class Ticker:
    """A repeating callback on the loop; :meth:`cancel` stops it."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, interval_s: float, callback: Callable[[], None]
    ) -> None:
        self._loop = loop
        self._interval_s = interval_s
        self._callback = callback

    def cancel(self) -> None:
        raise NotImplementedError


class _TimerTicker(Ticker):
    """``call_later``, again before each call (so a failing callback does not end it)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, interval_s: float, callback: Callable[[], None]
    ) -> None:
        super().__init__(loop, interval_s, callback)
        self._handle = loop.call_later(interval_s, self._fire)

    def _fire(self) -> None:
        self._handle = self._loop.call_later(self._interval_s, self._fire)
        self._callback()

    def cancel(self) -> None:
        self._handle.cancel()


class _ThreadTicker(Ticker):
    """A daemon thread that queues each tick on the loop, one at a time: while a tick
    waits for a busy loop, no second one is queued behind it."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, interval_s: float, callback: Callable[[], None]
    ) -> None:
        super().__init__(loop, interval_s, callback)
        self._stopped = threading.Event()
        self._queued = False  # set by the thread, cleared on the loop when the tick runs
        self._thread = threading.Thread(target=self._run, name="netframe-tick", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            if self._queued:
                continue
            self._queued = True
            try:
                self._loop.call_soon_threadsafe(self._fire)
            except RuntimeError:  # the loop is closed: nothing left to tick
                return

    def _fire(self) -> None:
        self._queued = False
        if not self._stopped.is_set():
            self._callback()

    def cancel(self) -> None:
        self._stopped.set()
        self._thread.join(1.0)  # it wakes at once; bounded all the same


def start_ticker(
    loop: asyncio.AbstractEventLoop, interval_s: float, callback: Callable[[], None]
) -> Ticker:
    """Call ``callback`` on ``loop`` every ``interval_s`` seconds until cancelled."""
    if isinstance(loop, asyncio.BaseEventLoop):
        return _ThreadTicker(loop, interval_s, callback)
    return _TimerTicker(loop, interval_s, callback)
