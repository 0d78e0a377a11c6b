"""The server's tick: a callback on the event loop every ``TICK_S``, made the cheapest way
for the loop it runs on.

On asyncio's own loops (``asyncio.BaseEventLoop``: the selector loop, the proactor loop)
a timer that is merely pending costs every iteration of the loop: each one works out its
select timeout from the timer heap (the loop's clock read again, a ``min`` and a
``max``) and compares the heap's first deadline with the clock after polling. On a
1 KiB echo, one iteration per message, the raw Protocol server grew from 22,900 to
28,000 instructions a message when a 0.1 s timer was added to it (counted under
callgrind, ``benchmarks/served_instructions.py``'s method). There the tick is therefore
not a timer of the loop's:

- On Linux it is a kernel timer, a ``timerfd``, which the loop watches like a socket:
  readable once an interval has passed, it costs the loop nothing in between, and a
  loop that was busy for several intervals finds it readable once (one tick, not a
  backlog). ``os.timerfd_create`` from Python 3.13, the C library's by ``ctypes`` before.
- Elsewhere (or where that fails) a thread of its own sleeps between ticks and hands
  each one to the loop through ``call_soon_threadsafe``. It works everywhere, but a
  second thread costs every socket call a little on Linux: the kernel takes a reference
  on the file for each call while another thread shares the descriptor table, and
  skips that in a process of one thread (about 2% of the raw server's CPU on a 1 KiB
  echo, measured with an idle thread added to it).

Other loops (uvloop keeps its timers in libuv, in C) get an ordinary ``call_later``
chain, which costs them nothing per iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
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


class _TimerFdTicker(Ticker):
    """A Linux ``timerfd`` watched by the loop (``add_reader``)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, interval_s: float, callback: Callable[[], None]
    ) -> None:
        super().__init__(loop, interval_s, callback)
        self._fd = timerfd(interval_s)
        try:
            loop.add_reader(self._fd, self._fire)
        except BaseException:  # a loop with no add_reader (the proactor loop)
            os.close(self._fd)
            raise

    def _fire(self) -> None:
        try:
            os.read(self._fd, 8)  # the count of intervals passed: one tick for them all
        except BlockingIOError:
            return
        self._callback()

    def cancel(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1


def timerfd(interval_s: float) -> int:
    """A non-blocking ``timerfd`` on the monotonic clock, readable every ``interval_s``.

    Raises:
        OSError, AttributeError: not on Linux, or the kernel refused.
    """
    if sys.version_info >= (3, 13):
        fd = os.timerfd_create(time.CLOCK_MONOTONIC, flags=os.TFD_NONBLOCK | os.TFD_CLOEXEC)
        try:
            os.timerfd_settime(fd, initial=interval_s, interval=interval_s)
        except BaseException:
            os.close(fd)
            raise
        return fd
    import ctypes  # only here: on 3.11 and 3.12, for two calls when the server starts

    libc = ctypes.CDLL(None, use_errno=True)
    # (TFD_NONBLOCK and TFD_CLOEXEC are O_NONBLOCK and O_CLOEXEC by definition.)
    fd: int = libc.timerfd_create(time.CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "timerfd_create failed")
    whole = int(interval_s)
    nanos = int((interval_s - whole) * 1e9)
    # struct itimerspec: the interval, then the first expiry, each a struct timespec.
    spec = (ctypes.c_long * 4)(whole, nanos, whole, nanos)
    if libc.timerfd_settime(fd, 0, ctypes.byref(spec), None) < 0:
        error = ctypes.get_errno()
        os.close(fd)
        raise OSError(error, "timerfd_settime failed")
    return fd


def start_ticker(
    loop: asyncio.AbstractEventLoop, interval_s: float, callback: Callable[[], None]
) -> Ticker:
    """Call ``callback`` on ``loop`` every ``interval_s`` seconds until cancelled."""
    if isinstance(loop, asyncio.BaseEventLoop):
        try:
            return _TimerFdTicker(loop, interval_s, callback)
        except (OSError, AttributeError, NotImplementedError):
            return _ThreadTicker(loop, interval_s, callback)
    return _TimerTicker(loop, interval_s, callback)
