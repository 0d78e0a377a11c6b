"""The per-connection log lines and the queue they wait in, compiled with the hot path.

At the default level a server logs a line when a connection opens and one when it
closes: thousands a second on a busy server. Through structlog's processor chain such a
line costs some 10 µs; :class:`ConnectionLog` makes each one by a single string build,
exactly as netframe's structlog set-up would render it (``tests/test_logs.py`` holds the
two forms equal), and puts it straight into the :class:`LineQueue` that
:class:`netframe.logs.LineWriter`'s thread empties. Where mypyc compiled this module
(see ``netframe._build``), the endpoint calls both as C functions; the timestamp's date
and time to the second are made once a second, the microseconds by integer arithmetic.
"""

from __future__ import annotations

import collections
import datetime
import json
import time
from collections.abc import Callable
from typing import Any, Final

__all__ = ["ConnectionLog", "LineQueue", "seconds_text", "timestamp"]

#: Characters that make the console renderer quote a string value (as structlog does).
_QUOTED: Final = frozenset(" \t=\r\n\"'")
#: JSON's string quoting with non-ASCII escaped, as ``json.dumps`` does by default (C).
_json_string: Final[Callable[[str], str]] = json.encoder.encode_basestring_ascii


class LineQueue:
    """The bounded queue between the event loop, which puts rendered lines, and the
    writer thread, which takes them (:class:`netframe.logs.LineWriter`).

    :meth:`put` never blocks: a line that finds the queue full is counted in
    ``dropped_full`` instead. The first line after the writer last drained wakes it
    (``wake``, a ``threading.Event``'s ``set``), and later ones do not: one wake-up, a
    futex call and a thread switch, per burst rather than per line.
    """

    def __init__(self, max_lines: int, wake: Callable[[], object]) -> None:
        self.lines: collections.deque[str] = collections.deque()
        self.max_lines = max_lines
        self.wake = wake
        #: Set here when a line wakes the writer, cleared by the writer before it drains.
        self.wake_pending = False
        #: Lines refused because the queue was full (counted on the event-loop side only).
        self.dropped_full = 0
        #: True while the writer thread queues its own report of dropped lines, which must
        #: not be dropped itself for want of room.
        self.reporting = False

    def put(self, line: str) -> None:
        """Queue one rendered line, or count it as dropped if the queue is full."""
        if len(self.lines) >= self.max_lines and not self.reporting:
            self.dropped_full += 1
            return
        self.lines.append(line)
        if not self.wake_pending:
            self.wake_pending = True
            self.wake()


def timestamp(now: float) -> str:
    """``now`` as ``TimeStamper(fmt="iso", utc=True)`` writes it, to the microsecond."""
    second = int(now)
    moment = datetime.datetime.fromtimestamp(second, datetime.UTC)
    return f"{moment.strftime('%Y-%m-%dT%H:%M:%S.')}{_micros(now, second)}Z"


def _micros(now: float, second: int) -> str:
    """The six digits of microseconds after ``second`` (by integer arithmetic: a format
    specification such as ``:06d`` is parsed at every call)."""
    return str(int((now - second) * 1_000_000) + 1_000_000)[1:]


def seconds_text(micros: int) -> str:
    """``repr(micros / 1_000_000)``, the duration as structlog writes the float, made from
    the integer: ``repr`` of a float runs the shortest-digits algorithm, the dearest part
    of a ``connection_closed`` line. From 0.0001 s up, the float of a whole number of
    microseconds is written as its decimal with the trailing zeros dropped (a test holds
    the two equal); below that ``repr`` writes an exponent, and is asked."""
    if micros < 100 or micros >= 10**15:
        # Python's division, correctly rounded: compiled, an int / int of native ints is
        # a division of two doubles, and an int above 2**53 loses its last digits first.
        exact: Any = micros
        return repr(exact / 1_000_000)
    whole = micros // 1_000_000  # (divmod is a generic call for mypyc; these are native)
    fraction = micros - whole * 1_000_000
    if not fraction:
        return f"{whole}.0"
    digits = str(fraction + 1_000_000)[1:].rstrip("0")
    return f"{whole}.{digits}"


def _console_string(value: str) -> str:
    """A string value as the console renderer writes it: quoted if it must be."""
    return value if _QUOTED.isdisjoint(value) else repr(value)


class ConnectionLog:
    """``connection_opened`` and ``connection_closed``, each made by one string build.

    The fields are in the order structlog writes them: the bound context, the event's own
    fields, then ``event``, ``level`` and ``timestamp`` in JSON; sorted by name on the
    console. ``worker`` (several worker processes) goes where structlog's set-up puts it:
    after ``event`` in JSON, last of the sorted fields on the console.
    """

    def __init__(self, queue: LineQueue, *, json: bool, worker: str | None = None) -> None:
        self._queue = queue
        self._json = json
        self._json_tail = "" if worker is None else f', "worker": {_json_string(worker)}'
        self._console_tail = "" if worker is None else f" worker={_console_string(worker)}"
        # The timestamp's date and time to the second, made once a second.
        self._second = -1
        self._second_text = ""

    def now(self) -> str:
        """The time now, as :func:`timestamp` writes it."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second_text = timestamp(now)[:-8]  # without ".ffffffZ"
            self._second = second
        return f"{self._second_text}.{_micros(now, second)}Z"

    def opened(self, transport: str, peer: str, conn: int) -> str:
        """Log ``connection_opened``; returns ``peer`` as the line wrote it (quoted where
        it must be), which :meth:`closed` takes back instead of quoting it again."""
        if self._json:
            # An address needs no escaping; anything else goes through json's own.
            if peer.isascii() and peer.isprintable() and '"' not in peer and "\\" not in peer:
                shown = f'"{peer}"'
            else:
                shown = _json_string(peer)
            self._queue.put(
                f'{{"transport": "{transport}", "peer": {shown}, "conn": {conn}, '
                f'"event": "connection_opened"{self._json_tail}, "level": "info", '
                f'"timestamp": "{self.now()}"}}'
            )
        else:
            shown = _console_string(peer)
            self._queue.put(
                f"{self.now()} [info     ] connection_opened              conn={conn} "
                f"peer={shown} transport={transport}{self._console_tail}"
            )
        return shown

    def closed(
        self,
        transport: str,
        shown_peer: str,
        conn: int,
        reason: str,
        duration_us: int,
        bytes_in: int,
        bytes_out: int,
        messages_in: int,
        messages_out: int,
    ) -> None:
        """Log ``connection_closed``; ``shown_peer`` is what :meth:`opened` returned, and
        ``duration_us`` the connection's life in whole microseconds (written in seconds).

        (No conversion such as ``!r`` in these f-strings: mypyc builds one of plain fields
        as a single join, and falls back to ``str.format`` for all of it otherwise.)"""
        duration = seconds_text(duration_us)
        if self._json:
            self._queue.put(
                f'{{"transport": "{transport}", "peer": {shown_peer}, "conn": {conn}, '
                f'"reason": "{reason}", "duration_s": {duration}, "bytes_in": {bytes_in}, '
                f'"bytes_out": {bytes_out}, "messages_in": {messages_in}, '
                f'"messages_out": {messages_out}, "event": "connection_closed"'
                f'{self._json_tail}, "level": "info", "timestamp": "{self.now()}"}}'
            )
        else:
            self._queue.put(
                f"{self.now()} [info     ] connection_closed              bytes_in={bytes_in} "
                f"bytes_out={bytes_out} conn={conn} duration_s={duration} "
                f"messages_in={messages_in} messages_out={messages_out} "
                f"peer={shown_peer} reason={reason} transport={transport}"
                f"{self._console_tail}"
            )
