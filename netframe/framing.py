"""Turning a TCP byte stream into messages, and knowing how to end a reply.

This module is pure: bytes go in through :meth:`Framer.feed`, ``(payload, terminator)``
pairs come out, and no socket, loop or clock is touched. Every rule about how a stream
is cut into messages lives here.

A message's *terminator* is the line ending it arrived with (``b"\\n"``, ``b"\\r\\n"``)
or ``b""`` for a bare message; the endpoint ends each reply with the terminator of the
message it answers, so a line client gets lines back and a bare client gets bare bytes.

The modes:

``raw``
    Every received chunk is one message, exactly as the seeds' threaded server treats
    each ``recv()`` of at most 1,024 bytes; a chunk longer than the limit is cut into
    pieces of the limit.
``line``
    Strict newline framing. Lines split across reads are reassembled; ``\\r\\n`` and
    ``\\n`` both end a line. A line longer than ``max_line_bytes`` overflows the framer.
``auto``
    Line framing for clients that send newlines, bare messages for clients that do not
    (the seeds' clients send bare words in lock-step). Until a connection has sent a
    newline it is *undecided*: bytes without a newline wait, and when the endpoint's
    short timer finds them still waiting it calls :meth:`AutoFramer.flush`, which turns
    them into one bare message and marks the connection *bare*: from then on every
    chunk is one message, as in ``raw``. A newline at any point marks the connection
    *lines* for good.

End of input is not an event here: a partial line left when the peer closes is dropped,
as the peer never finished it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol

from netframe.config import Framing

__all__ = [
    "AutoFramer",
    "Framer",
    "LineFramer",
    "Message",
    "RawFramer",
    "make_framer",
    "split_terminator",
]

# (payload without its terminator, terminator)
Message = tuple[bytes, bytes]

LF: Final = b"\n"
#: Most messages one ``feed`` returns (see :class:`LineFramer`).
MAX_BATCH: Final = 1024
CRLF: Final = b"\r\n"
NONE: Final = b""


class Framer(Protocol):
    """What an endpoint needs from a framing mode."""

    #: The terminator for messages sent before the peer said anything (the greeting).
    greeting_terminator: bytes
    #: True once a message exceeded the limit; the framer then yields nothing more, and
    #: the messages returned with the call that set it are the last ones.
    overflow: bool

    @property
    def unparsed(self) -> bytes:
        """Received bytes not yet cut into messages: ``feed(b"")`` returns the next ones."""
        ...

    @property
    def partial(self) -> bytes | bytearray:
        """The unfinished message held so far (empty when the stream is at a boundary):
        the endpoint times a message that has started against its deadline."""
        ...

    def feed(self, data: bytes) -> list[Message]:
        """Take the next chunk of the stream and return the messages it completes."""
        ...

    #: True when unterminated bytes wait that :meth:`flush` would turn into a message.
    waiting_for_bare_flush: bool

    def flush(self) -> list[Message]:
        """Deliver waiting unterminated bytes as one bare message (``auto`` only)."""
        ...


def split_terminator(payload: bytes) -> Message:
    """Split one trailing line ending off ``payload``: ``b"Bob\\r\\n"`` -> ``(b"Bob", CRLF)``."""
    if payload.endswith(LF):
        if payload.endswith(CRLF):
            return payload[:-2], CRLF
        return payload[:-1], LF
    return payload, NONE


class RawFramer:
    """Every chunk is one message, with no terminator; a longer chunk is cut into pieces
    of ``max_bytes``.

    Raw framing has no message boundaries of its own (how bytes are grouped into reads is
    up to the network and the loop's read size), so nothing in it can be "overlong":
    the cap bounds what one message hands the handler, and never refuses a client.
    """

    __slots__ = ("max_bytes", "overflow", "waiting_for_bare_flush")
    greeting_terminator = NONE
    partial = unparsed = NONE

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.overflow = False
        self.waiting_for_bare_flush = False

    def feed(self, data: bytes) -> list[Message]:
        if len(data) <= self.max_bytes:
            return [(data, NONE)] if data else []
        return _pieces(data, self.max_bytes)

    def flush(self) -> list[Message]:
        return []


def _pieces(data: bytes, size: int) -> list[Message]:
    """``data`` as bare messages of at most ``size`` bytes."""
    return [(data[i : i + size], NONE) for i in range(0, len(data), size)]


class LineFramer:
    """Newline-delimited messages of at most ``max_line_bytes`` bytes each.

    One call returns at most ``MAX_BATCH`` messages; complete lines beyond those stay
    as bytes in :attr:`unparsed` until the next call (``feed(b"")`` asks for them), so a
    read of thousands of pipelined lines never becomes thousands of objects at once.
    """

    __slots__ = ("max_line_bytes", "overflow", "partial", "unparsed", "waiting_for_bare_flush")
    greeting_terminator = LF

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self.overflow = False
        self.waiting_for_bare_flush = False
        # A partial line, as a bytearray so that a line arriving a byte at a time costs
        # linear, not quadratic, copying; the shared empty bytes when there is none.
        self.partial: bytes | bytearray = NONE
        self.unparsed = NONE

    def feed(self, data: bytes) -> list[Message]:
        if self.overflow:
            return []
        if self.unparsed:
            data, self.unparsed = self.unparsed + data, NONE
        elif self.partial:
            if LF not in data:  # only the new bytes are searched
                self.partial += data
                self._check_partial()
                return []
            data = bytes(self.partial) + data
        elif data.find(LF) == len(data) - 1 >= 0 and len(data) <= self.max_line_bytes:
            return [split_terminator(data)]  # the common case: one whole line, no buffer
        elif LF not in data:
            self.partial = bytearray(data) if data else NONE
            self._check_partial()
            return []
        lines = data.split(LF, MAX_BATCH)
        rest = lines.pop()
        if len(lines) == MAX_BATCH and LF in rest:
            self.unparsed, self.partial = rest, NONE
        else:
            self.partial = bytearray(rest) if rest else NONE
        limit = self.max_line_bytes
        messages: list[Message] = []
        for line in lines:
            if line.endswith(b"\r"):
                line, terminator = line[:-1], CRLF
            else:
                terminator = LF
            if len(line) > limit:
                self._overflowed()
                return messages
            messages.append((line, terminator))
        if not self.unparsed:
            self._check_partial()
        return messages

    def flush(self) -> list[Message]:
        return []

    def _check_partial(self) -> None:
        excess = len(self.partial) - self.max_line_bytes
        # One byte over is allowed only if it is the "\r" of a "\r\n" still in flight.
        if excess > 1 or (excess == 1 and not self.partial.endswith(b"\r")):
            self._overflowed()

    def _overflowed(self) -> None:
        self.overflow = True
        self.partial = self.unparsed = NONE


_UNDECIDED: Final = 0
_LINES: Final = 1
_BARE: Final = 2


class AutoFramer(LineFramer):
    """Lines for line clients, bare messages for the seeds' bare-word clients."""

    __slots__ = ("_state",)

    greeting_terminator = NONE

    def __init__(self, max_line_bytes: int) -> None:
        super().__init__(max_line_bytes)
        self._state = _UNDECIDED

    def feed(self, data: bytes) -> list[Message]:
        state = self._state
        if state == _LINES:
            return super().feed(data)
        if LF in data:
            self._state = _LINES
            self.waiting_for_bare_flush = False
            return super().feed(data)
        if state == _BARE:  # every read is a message, as in raw, capped the same way
            if len(data) <= self.max_line_bytes:
                return [(data, NONE)] if data else []
            return _pieces(data, self.max_line_bytes)
        messages = super().feed(data)  # undecided: hold the bytes, within the line limit
        self.waiting_for_bare_flush = bool(self.partial)
        return messages

    def flush(self) -> list[Message]:
        if not self.waiting_for_bare_flush:
            return []
        message, self.partial = bytes(self.partial), NONE
        self._state = _BARE
        self.waiting_for_bare_flush = False
        return [(message, NONE)]


def make_framer(framing: Framing, max_line_bytes: int) -> Callable[[], Framer]:
    """Return a factory of fresh framers for one mode (one framer per connection)."""
    if framing == "raw":
        return lambda: RawFramer(max_line_bytes)
    cls = AutoFramer if framing == "auto" else LineFramer
    return lambda: cls(max_line_bytes)
