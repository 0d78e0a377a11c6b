"""The load generator's protocols: one asyncio Protocol per connection, every reply checked.

Each protocol knows the exact bytes it must get back and compares every received byte
against them; a difference is counted as an error and the connection is dropped, so a
wrong server can never look fast. Latency is measured from the *intended* send time: in
closed loop that is when the request was written, in open loop (``--rate``) it is the
time the schedule said to send it, so a stalled server shows as latency instead of
quietly slowing the load down (no coordinated omission). Every latency is counted in
an HdrHistogram-layout histogram (``_histogram``), in batches, so that counting stays a
list append per operation.
"""

from __future__ import annotations

import array
import asyncio
import collections
import time
from typing import Any

import numpy as np

from netframe.bench._histogram import Histogram

__all__ = ["DatagramLoad", "SessionLoad", "StreamLoad", "Tally"]

# Latencies wait in a plain array and are counted into the histogram this many at a
# time: numpy counts a batch of 8,192 in about 0.06 ms (7 ns a value, measured), where
# counting them one by one in Python would cost a microsecond each; a larger batch
# spills the processor's caches and costs more per value.
RECORD_BATCH = 8192
# Throughput timeline resolution.
BUCKET_NS = 100_000_000


class Tally:
    """What one worker counts. Only events that complete inside the window count,
    except errors, counted whenever they happen (the timelines hold those in the window)."""

    def __init__(self, window_start_ns: int, window_end_ns: int) -> None:
        self.start_ns = self.end_ns = 0
        self.ops = 0
        self.errors = 0
        self.connect_errors = 0
        self.lost = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.histogram = Histogram()
        self._pending_ns = array.array("q")
        self.timeline: list[int] = []
        self.error_timeline: list[int] = []
        self.lost_timeline: list[int] = []
        self.set_window(window_start_ns, window_end_ns)
        self.first_error: str | None = None

    def set_window(self, start_ns: int, end_ns: int) -> None:
        """Measure from ``start_ns`` to ``end_ns``, in 100 ms steps for the timelines."""
        self.start_ns = start_ns
        self.end_ns = end_ns
        buckets = max(1, -(-(end_ns - start_ns) // BUCKET_NS))
        self.timeline = [0] * buckets
        self.error_timeline = [0] * buckets
        self.lost_timeline = [0] * buckets

    def done(self, now_ns: int, latency_ns: int, bytes_in: int, bytes_out: int) -> None:
        """One operation completed at ``now_ns`` after ``latency_ns``, having moved
        ``bytes_in`` and ``bytes_out``: bytes are counted by operation, so they cover
        exactly the operations the window counts."""
        if not self.start_ns <= now_ns < self.end_ns:
            return
        self.ops += 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        self.timeline[(now_ns - self.start_ns) // BUCKET_NS] += 1
        pending = self._pending_ns
        pending.append(latency_ns)
        if len(pending) >= RECORD_BATCH:
            self.record_pending()

    def record_pending(self) -> Histogram:
        """Count the buffered latencies into :attr:`histogram`; return it."""
        if self._pending_ns:
            self.histogram.record(np.frombuffer(self._pending_ns, dtype=np.int64))
            self._pending_ns = array.array("q")
        return self.histogram

    def _bucket(self, now_ns: int) -> int | None:
        """The timeline step of ``now_ns``, or None outside the window."""
        if self.start_ns <= now_ns < self.end_ns:
            return (now_ns - self.start_ns) // BUCKET_NS
        return None

    def error(self, reason: str) -> None:
        """A wrong reply or a broken session: always counted, whenever it happens."""
        self.errors += 1
        if self.first_error is None:
            self.first_error = reason
        bucket = self._bucket(time.monotonic_ns())
        if bucket is not None:
            self.error_timeline[bucket] += 1

    def lose(self, now_ns: int) -> None:
        """A datagram unanswered past its timeout at ``now_ns`` (counted in the window)."""
        bucket = self._bucket(now_ns)
        if bucket is not None:
            self.lost += 1
            self.lost_timeline[bucket] += 1

    def in_window(self) -> bool:
        return time.monotonic_ns() < self.end_ns


class StreamLoad(asyncio.Protocol):
    """A persistent TCP connection sending ``request`` and expecting ``reply`` each time.

    First it expects ``greeting`` (may be empty). Then, in closed loop, it keeps
    ``pipeline`` requests in flight; in open loop the worker's ticker calls
    :meth:`schedule` with intended send times and at most ``pipeline`` are in flight.
    """

    def __init__(
        self,
        tally: Tally,
        request: bytes,
        reply: bytes,
        greeting: bytes,
        pipeline: int,
        open_loop: bool,
    ) -> None:
        self.tally = tally
        self.request = request
        self.reply = reply
        self.pipeline = pipeline
        self.open_loop = open_loop
        self.transport: Any = None
        self.ready = asyncio.get_running_loop().create_future()
        self.closed = False
        self._target = greeting or reply
        self._in_greeting = bool(greeting)
        self._pos = 0
        self._inflight: collections.deque[int] = collections.deque()  # intended send times
        self._due: collections.deque[int] = collections.deque()  # open loop: not yet sent

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if not self._in_greeting:
            self.ready.set_result(None)

    def start(self) -> None:
        """Begin the closed-loop load: fill the pipeline."""
        if not self.open_loop and not self.closed:
            self._send(self.pipeline, time.monotonic_ns())

    def schedule(self, intended_ns: list[int]) -> None:
        """Open loop: requests whose time has come; send what the pipeline allows."""
        self._due.extend(intended_ns)
        self._send_due()

    def _send_due(self) -> None:
        room = self.pipeline - len(self._inflight)
        if room > 0 and self._due and not self.closed:
            due = self._due
            n = min(room, len(due))
            self._inflight.extend(due.popleft() for _ in range(n))
            self._write(n)

    def _send(self, n: int, now_ns: int) -> None:
        self._inflight.extend([now_ns] * n)
        self._write(n)

    def _write(self, n: int) -> None:
        self.transport.write(self.request * n if n > 1 else self.request)

    def data_received(self, data: bytes) -> None:
        target, pos = self._target, self._pos
        if not pos and data == target and not self._in_greeting:
            self._complete(1)  # the usual case: exactly one whole reply
            return
        size = len(target)
        completed = 0
        view = memoryview(data)
        offset, end = 0, len(data)
        while offset < end:
            n = min(size - pos, end - offset)
            if view[offset : offset + n] != target[pos : pos + n]:
                got = bytes(view[offset : offset + 40])
                self._fail(f"unexpected reply bytes {got!r}, expected {target[pos : pos + 40]!r}")
                return
            offset += n
            pos += n
            if pos == size:
                pos = 0
                if self._in_greeting:
                    self._in_greeting = False
                    target = self._target = self.reply
                    size = len(target)
                    self.ready.set_result(None)
                else:
                    completed += 1
        self._pos = pos
        if completed:
            self._complete(completed)

    def _complete(self, n: int) -> None:
        now = time.monotonic_ns()
        tally, inflight = self.tally, self._inflight
        if len(inflight) < n:
            self._fail("more replies than requests")
            return
        size_in, size_out = len(self.reply), len(self.request)
        for _ in range(n):
            tally.done(now, now - inflight.popleft(), size_in, size_out)
        if now >= tally.end_ns:
            return
        if self.open_loop:
            self._send_due()
        elif n == 1:
            inflight.append(now)
            self.transport.write(self.request)
        else:
            self._send(n, now)

    def _fail(self, reason: str) -> None:
        self.tally.error(reason)
        self.closed = True
        if not self.ready.done():  # a wrong greeting: say what came instead
            self.ready.set_exception(ConnectionError(reason))
        self.transport.abort()

    def stop(self) -> None:
        """Close at the end of the run (not an error, whenever it lands)."""
        self.closed = True
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed and self.tally.in_window():
            self.tally.error(f"connection lost: {exc or 'closed by server'}")
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before the greeting: {exc}"))


class SessionLoad(asyncio.Protocol):
    """One whole seeds' session: greeting, one name, its reply, ``exit``, the close."""

    def __init__(self, greeting: bytes, request: bytes, reply: bytes, exit_request: bytes) -> None:
        self.expected = greeting + reply
        self.request = request
        self.exit_request = exit_request
        self.greeting_size = len(greeting)
        self.buffer = b""
        self.transport: Any = None
        self.done: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.sent_exit = False
        self.bytes_in = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        before = len(self.buffer)
        self.buffer += data
        expected = self.expected
        if self.buffer != expected[: len(self.buffer)]:
            self._finish(f"unexpected reply bytes {self.buffer[:60]!r}, expected {expected!r}")
            self.transport.abort()
            return
        if before < self.greeting_size <= len(self.buffer):
            self.transport.write(self.request)
        if len(self.buffer) == len(expected) and not self.sent_exit:
            self.sent_exit = True
            self.transport.write(self.exit_request)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sent_exit and exc is None:
            self._finish(None)
        else:
            self._finish(f"session cut short after {self.buffer!r}: {exc or 'closed'}")

    def _finish(self, error: str | None) -> None:
        if not self.done.done():
            self.done.set_result(error)


class DatagramLoad(asyncio.DatagramProtocol):
    """A UDP socket keeping ``pipeline`` numbered requests in flight; a reply that does not
    come within ``timeout_ns`` is counted lost and replaced."""

    def __init__(
        self, tally: Tally, conn_id: int, pipeline: int, timeout_ns: int, size: int
    ) -> None:
        self.tally = tally
        self.prefix = b"u%d-" % conn_id
        self.size = size
        self.pipeline = pipeline
        self.timeout_ns = timeout_ns
        self.transport: Any = None
        self.seq = 0
        self.outstanding: dict[bytes, int] = {}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def start(self) -> None:
        now = time.monotonic_ns()
        for _ in range(self.pipeline):
            self._send(now)

    def _send(self, now_ns: int) -> None:
        self.seq += 1
        name = self.prefix + b"%d" % self.seq
        if len(name) < self.size:  # pad to --size; the sequence number keeps it unique
            name += b"-" * (self.size - len(name))
        self.outstanding[name] = now_ns
        self.transport.sendto(name)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        now = time.monotonic_ns()
        tally = self.tally
        if not (data.startswith(b"Hello, ") and data.endswith(b"!")):
            tally.error(f"unexpected datagram {data[:60]!r}")
            return
        sent = self.outstanding.pop(data[7:-1], None)
        if sent is None:
            return  # a late reply to a request already counted lost
        tally.done(now, now - sent, len(data), len(data) - len(b"Hello, !"))
        if tally.in_window():
            self._send(now)

    def sweep(self, now_ns: int) -> None:
        """Count requests older than the timeout as lost, and replace them."""
        expired = [k for k, t in self.outstanding.items() if now_ns - t > self.timeout_ns]
        for key in expired:
            del self.outstanding[key]
            self.tally.lose(now_ns)
            if self.tally.in_window():
                self._send(now_ns)

    def error_received(self, exc: Exception) -> None:
        self.tally.error(f"udp error: {exc}")

    def stop(self) -> None:
        """Close the socket at the end of the run."""
        self.transport.close()
