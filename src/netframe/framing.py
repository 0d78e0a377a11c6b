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
    (the tutorial's clients send bare words in lock-step), told apart without waiting
    by what TCP guarantees about segment sizes: see :class:`AutoFramer`, where every
    rule of the mode lives.

``length``
    A big-endian length prefix (4 or 2 bytes) before each message and each reply.

Users frame other formats with a :class:`Framer` subclass, named as ``module:attribute``.

End of input and elapsed time are events a framer receives (:meth:`Framer.eof`,
:meth:`Framer.timeout`), never something it looks up: the framer reads no clock.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any, Final, Protocol

from mypy_extensions import mypyc_attr

__all__ = [
    "AutoFramer",
    "Framer",
    "FramerFactory",
    "FramerLike",
    "LengthFramer",
    "LineFramer",
    "Message",
    "RawFramer",
    "make_framer",
    "split_terminator",
]

# (payload without its terminator, terminator)
Message = tuple[bytes, bytes]

LF: Final = b"\n"
#: The newline as an int: ``_NEWLINE in data`` takes the bytes type's single-byte
#: ``memchr`` path, where ``LF in data`` goes through the buffer protocol (about 8x
#: the work on a short read, measured in instructions).
_NEWLINE: Final = 10
_RETURN: Final = 13  # b"\r"[0]
#: Most messages one ``feed`` returns (see :class:`LineFramer`).
MAX_BATCH: Final = 1024
CRLF: Final = b"\r\n"
NONE: Final = b""


@mypyc_attr(allow_interpreted_subclasses=True)
class Framer:
    """The interface between the byte stream and messages; subclass it for your own framing.

    A framer is sans-IO: bytes in through :meth:`feed`, ``(payload, terminator)``
    messages out, replies out through :meth:`encode`, and two events that are not bytes,
    end of input (:meth:`eof`) and "the time you asked for has passed" (:meth:`timeout`).
    It opens no socket and reads no clock. One framer serves one connection.

    Only :meth:`feed` must be written; every other member has a default that fits a
    framer with no timer, no held input and replies ended by their terminator. Keep the
    attributes true after each call, because the endpoint reads them:

    - :attr:`overflow`: set it when the stream can no longer be framed (a message over
      the limit). The messages returned by that call are the last ones handled; the
      client gets an error line and the connection closes.
    - :attr:`partial`: the bytes of a message that has begun and is not complete. While
      it is not empty the message deadline runs, and at a graceful stop the connection
      is left to finish it.
    - :attr:`unparsed`: received bytes holding further complete messages not returned
      yet (a framer may return messages in batches); ``feed(b"")`` must return them.
    - :attr:`wake_after`: seconds after which :meth:`timeout` is wanted, or ``None``.
      The endpoint calls :meth:`timeout` that long after a call unless more bytes (or
      the end) come first; a framer that keeps ``None`` never costs a timer.

    Raise nothing from :meth:`feed`: bad input is :attr:`overflow`, or a message the
    handler can refuse.
    """

    #: Ends what ``on_connect`` sends (the greeting), before the peer said anything.
    greeting_terminator: bytes = b"\n"
    #: Ends a send that answers no message: a push, a broadcast, a send from a task.
    push_terminator: bytes = b"\n"
    overflow: bool = False
    partial: bytes | bytearray = b""
    unparsed: bytes = b""
    wake_after: float | None = None

    __slots__ = ()

    def feed(self, data: bytes) -> list[Message]:
        """Take the next bytes of the stream (``b""``: only what is held); return the
        messages they complete, each ``(payload, terminator)``."""
        raise NotImplementedError

    def eof(self) -> list[Message]:
        """The peer will send no more: return what the held bytes amount to, if anything."""
        return []

    def timeout(self) -> list[Message]:
        """The time asked for in :attr:`wake_after` has passed with nothing new."""
        return []

    def encode(self, payload: bytes, terminator: bytes) -> bytes:
        """The bytes that carry one reply: by default the payload and the terminator of
        the message it answers (``b"\\n"`` for a line client, nothing for a bare one)."""
        return payload + terminator

    def _whole(self, data: bytes) -> bytes | None:
        """The endpoint's fast path for a read that is one whole message, which is most
        reads: no list and no ``(payload, terminator)`` pair is made for it.

        When ``data`` is exactly one complete message and the framer holds nothing
        before it or after it, return the message's payload, which is ``data`` with at
        most one line ending (``\\n`` or ``\\r\\n``) taken off its end: what was taken
        off is the terminator. The framer is then left as :meth:`feed` would leave it.
        Otherwise return None, having changed nothing, and the endpoint calls
        :meth:`feed`. Only netframe's own framer classes are asked (see
        :attr:`FramerFactory.whole_reads`): for a subclass, this would go around its
        ``feed``.
        """
        return None


class FramerLike(Protocol):
    """What the endpoint relies on in a framer: :class:`Framer`'s members, by shape.

    A user's framer is usually a :class:`Framer` subclass, but any object with these
    members will do: it reaches the endpoint inside a :class:`ForeignFramer`.
    """

    @property
    def greeting_terminator(self) -> bytes: ...
    @property
    def push_terminator(self) -> bytes: ...
    @property
    def overflow(self) -> bool: ...
    @property
    def partial(self) -> bytes | bytearray: ...
    @property
    def unparsed(self) -> bytes: ...
    @property
    def wake_after(self) -> float | None: ...
    def feed(self, data: bytes) -> list[Message]: ...
    def eof(self) -> list[Message]: ...
    def timeout(self) -> list[Message]: ...
    def encode(self, payload: bytes, terminator: bytes) -> bytes: ...


class ForeignFramer(Framer):
    """A framer netframe did not compile, behind the compiled endpoint's interface.

    In the compiled build the endpoint reads a framer's attributes as struct fields of
    the native :class:`Framer`, which would miss what a user's class defines in Python
    (``partial`` as a property, ``greeting_terminator`` as a class attribute) and could
    not hold a framer that does not subclass :class:`Framer` at all. So a user's framer
    is wrapped in this one: each call is passed on, and the attributes are copied back
    after it. netframe's own framers are used directly.
    """

    __slots__ = (
        "greeting_terminator",
        "inner",
        "overflow",
        "partial",
        "push_terminator",
        "unparsed",
        "wake_after",
    )

    def __init__(self, inner: FramerLike) -> None:
        #: The user's framer.
        self.inner = inner
        self._sync()

    def _sync(self) -> None:
        inner = self.inner
        self.greeting_terminator = inner.greeting_terminator
        self.push_terminator = inner.push_terminator
        self.overflow = bool(inner.overflow)
        self.partial = inner.partial
        self.unparsed = inner.unparsed
        self.wake_after = inner.wake_after

    def feed(self, data: bytes) -> list[Message]:
        messages = self.inner.feed(data)
        self._sync()
        return messages

    def eof(self) -> list[Message]:
        messages = self.inner.eof()
        self._sync()
        return messages

    def timeout(self) -> list[Message]:
        messages = self.inner.timeout()
        self._sync()
        return messages

    def encode(self, payload: bytes, terminator: bytes) -> bytes:
        return self.inner.encode(payload, terminator)


def split_terminator(payload: bytes) -> Message:
    """Split one trailing line ending off ``payload``: ``b"Bob\\r\\n"`` -> ``(b"Bob", CRLF)``."""
    if payload.endswith(LF):
        if payload.endswith(CRLF):
            return payload[:-2], CRLF
        return payload[:-1], LF
    return payload, NONE


class RawFramer(Framer):
    """Every chunk is one message, with no terminator; a longer chunk is cut into pieces
    of ``max_bytes``.

    Raw framing has no message boundaries of its own (how bytes are grouped into reads is
    up to the network and the loop's read size), so nothing in it can be "overlong":
    the cap bounds what one message hands the handler, and never refuses a client.
    """

    __slots__ = ("max_bytes",)
    greeting_terminator: bytes = NONE
    push_terminator: bytes = NONE

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def feed(self, data: bytes) -> list[Message]:
        if len(data) <= self.max_bytes:
            return [(data, NONE)] if data else []
        return _pieces(data, self.max_bytes)

    def _whole(self, data: bytes) -> bytes | None:
        return data if 0 < len(data) <= self.max_bytes else None

    def eof(self) -> list[Message]:
        return []

    def timeout(self) -> list[Message]:
        return []


def _pieces(data: bytes, size: int) -> list[Message]:
    """``data`` as bare messages of at most ``size`` bytes."""
    return [(data[i : i + size], NONE) for i in range(0, len(data), size)]


class LineFramer(Framer):
    """Newline-delimited messages of at most ``max_line_bytes`` bytes each.

    One call returns at most ``MAX_BATCH`` messages; complete lines beyond those stay
    as bytes in :attr:`unparsed` until the next call (``feed(b"")`` asks for them), so a
    read of thousands of pipelined lines never becomes thousands of objects at once.
    """

    __slots__ = ("max_line_bytes", "overflow", "partial", "unparsed")
    greeting_terminator: bytes = LF

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self.overflow = False
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
            if _NEWLINE not in data:  # only the new bytes are searched
                self.partial += data
                self._check_partial()
                return []
            data = bytes(self.partial) + data
        elif data.find(LF) == len(data) - 1 >= 0 and len(data) <= self.max_line_bytes:
            return [split_terminator(data)]  # the common case: one whole line, no buffer
        elif _NEWLINE not in data:
            self.partial = bytearray(data) if data else NONE
            self._check_partial()
            return []
        lines = data.split(LF, MAX_BATCH)
        rest = lines.pop()
        if len(lines) == MAX_BATCH and _NEWLINE in rest:
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

    def _whole(self, data: bytes) -> bytes | None:
        # feed's common case: one whole line and nothing held.
        if self.partial or self.unparsed or self.overflow:
            return None
        end = len(data) - 1
        if data.find(_NEWLINE) != end or end < 0 or end >= self.max_line_bytes:
            return None
        return data[: end - 1] if end and data[end - 1] == _RETURN else data[:end]

    def eof(self) -> list[Message]:
        """A partial line is dropped: the peer never finished it."""
        self.partial = NONE
        return []

    def timeout(self) -> list[Message]:
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

#: The smallest maximum segment size TCP allows over IPv4 (RFC 1122; 1,220 over IPv6):
#: TCP never cuts a write into a segment shorter than this unless the sender wrote less.
#: So a read shorter than this with no newline is where the sender's write ended.
SEGMENT_FLOOR: Final = 536


class AutoFramer(LineFramer):
    """Lines for line clients, bare messages for bare-word clients, decided without waiting.

    Every rule of ``auto`` framing is here:

    - Until a connection has sent a newline it is *undecided*. A read with a newline
      makes it a *line* connection, from then on framed exactly as ``line`` framing
      frames (partial lines wait for the rest, however long it takes).
    - An undecided read with no newline that is shorter than :data:`SEGMENT_FLOOR` is
      where the sender's write ended: TCP does not cut a write into a segment shorter
      than that unless the sender wrote less. The bytes held so far are one *bare*
      message at once, and the connection is *bare* from then on.
    - An undecided read of :data:`SEGMENT_FLOOR` bytes or more with no newline may be one
      segment of a longer write (a long first line over a small-MSS path). The bytes
      wait for more; a later short read, or ``delay_s`` with nothing new
      (:meth:`timeout`), makes them one bare message. Only a bare client whose first
      word is that long pays the wait.
    - On a bare connection every read is one message, with one trailing line ending
      taken off and put back on the reply, as the tutorial's server treats each
      ``recv()`` and as UDP does. A newline inside such a read is part of the message,
      so a bare client that sends one is still answered, once, for the whole read.
    - At the end of input, bytes an undecided connection holds are a bare message (the
      tutorial's server answers a last word before the close); a line connection's
      partial line is dropped, as in ``line`` framing.

    The greeting has no terminator: nothing is known about the client yet, and the
    tutorial's ``Welcome!`` is bare. A push (a send that answers no message) is a line,
    ``\n``-ended whatever the client is: a line client needs the ending to find the
    message, and a bare client reading whatever one ``recv()`` returns can still tell
    two pushes apart.
    """

    __slots__ = ("_delay", "_state", "wake_after")
    greeting_terminator: bytes = NONE

    def __init__(self, max_line_bytes: int, delay_s: float) -> None:
        # LineFramer's fields, set here: one framer is made per connection.
        self.max_line_bytes = max_line_bytes
        self.overflow = False
        self.partial = self.unparsed = NONE
        self._state = _UNDECIDED
        self._delay = delay_s
        self.wake_after = None

    def feed(self, data: bytes) -> list[Message]:
        state = self._state
        if state == _LINES:
            return super().feed(data)
        if state == _BARE:
            if len(data) > self.max_line_bytes:  # cut up, the line ending kept for the last
                payload, ending = split_terminator(data)
                if not payload:  # only a line ending ("\r\n" over a limit of 1)
                    return [(payload, ending)]
                pieces = _pieces(payload, self.max_line_bytes)
                pieces[-1] = (pieces[-1][0], ending)
                return pieces
            if data.endswith(LF):
                return [split_terminator(data)]
            return [(data, NONE)] if data else []  # the tutorial's words: no call
        if not data:  # nothing new: what is held stays held
            return []
        self.wake_after = None
        if _NEWLINE in data:
            self._state = _LINES
            return super().feed(data)
        if not self.partial and 0 < len(data) < SEGMENT_FLOOR and len(data) <= self.max_line_bytes:
            self._state = _BARE  # the common case, the tutorial's first word: no buffer
            return [(data, NONE)]
        messages = super().feed(data)  # held as a partial line, within the line limit
        if self.overflow:
            self._state = _LINES  # frames nothing more, as a line framer that overflowed
            return messages
        if not self.partial:
            return messages
        if len(data) < SEGMENT_FLOOR:
            return self._bare()
        self.wake_after = self._delay
        return messages

    def _whole(self, data: bytes) -> bytes | None:
        state = self._state
        if state == _LINES:
            return super()._whole(data)
        size = len(data)
        if state == _BARE:  # every read of at most the limit is one message
            if not 0 < size <= self.max_line_bytes:
                return None
            if data[size - 1] != _NEWLINE:
                return data
            return data[: size - 2] if size > 1 and data[size - 2] == _RETURN else data[:-1]
        # Undecided: the tutorial's first word, as in feed.
        if self.partial or not 0 < size < SEGMENT_FLOOR or size > self.max_line_bytes:
            return None
        if _NEWLINE in data:
            return None
        self._state = _BARE
        self.wake_after = None
        return data

    def eof(self) -> list[Message]:
        if self._state == _UNDECIDED and self.partial:
            return self._bare()
        return super().eof()

    def timeout(self) -> list[Message]:
        if self._state == _UNDECIDED and self.partial:
            return self._bare()
        return []

    def _bare(self) -> list[Message]:
        message, self.partial = bytes(self.partial), NONE
        self._state = _BARE
        self.wake_after = None
        # A held line may be one byte over the limit (a "\r" whose "\n" may follow); as
        # a bare message it is cut to the limit like any other bare read.
        return _pieces(message, self.max_line_bytes)


class LengthFramer(Framer):
    """Messages behind a big-endian length prefix of ``prefix_bytes`` (4 or 2) bytes.

    As Netty's ``LengthFieldBasedFrameDecoder`` and Erlang's ``{packet, 4}``: the
    prefix gives the payload's length, without counting itself. A length over
    ``max_bytes`` overflows the framer as soon as the prefix is read, before anything is
    allocated for the payload. Replies carry the same prefix; a reply too long for a
    2-byte prefix raises ``ValueError`` (a handler error: that connection closes).
    """

    __slots__ = ("_buffer", "_limit", "_prefix", "overflow", "partial", "unparsed")
    # The prefix frames every send.
    greeting_terminator: bytes = NONE
    push_terminator: bytes = NONE

    def __init__(self, max_bytes: int, prefix_bytes: int = 4) -> None:
        if prefix_bytes not in (2, 4):
            raise ValueError(f"prefix_bytes must be 2 or 4, not {prefix_bytes!r}")
        self._prefix = prefix_bytes
        self._limit = min(max_bytes, 2 ** (8 * prefix_bytes) - 1)
        self._buffer = bytearray()
        self.overflow = False
        # Attributes, not properties: the compiled endpoint reads them as fields.
        self.partial: bytes | bytearray = NONE
        self.unparsed = NONE

    def _complete(self) -> bool:
        buffer, prefix = self._buffer, self._prefix
        return len(buffer) >= prefix and (
            len(buffer) - prefix >= int.from_bytes(buffer[:prefix], "big")
        )

    def _settle(self) -> None:
        """Make ``partial`` and ``unparsed`` true of what the buffer holds now."""
        if not self._buffer:
            self.partial = self.unparsed = NONE
        elif self._complete():  # a whole message waits: more than one call returns
            self.partial, self.unparsed = NONE, bytes(self._buffer)
        else:
            self.partial, self.unparsed = self._buffer, NONE

    def feed(self, data: bytes) -> list[Message]:
        if self.overflow:
            return []
        buffer, prefix, limit = self._buffer, self._prefix, self._limit
        buffer += data
        messages: list[Message] = []
        start = 0
        while len(buffer) - start >= prefix and len(messages) < MAX_BATCH:
            size = int.from_bytes(buffer[start : start + prefix], "big")
            if size > limit:
                self.overflow = True
                del buffer[:]
                self.partial = self.unparsed = NONE
                return messages
            end = start + prefix + size
            if end > len(buffer):
                break
            messages.append((bytes(buffer[start + prefix : end]), NONE))
            start = end
        del buffer[:start]
        self._settle()
        return messages

    def encode(self, payload: bytes, terminator: bytes) -> bytes:
        return len(payload).to_bytes(self._prefix, "big") + payload


_RAW: Final = 0
_LINE: Final = 1
_AUTO: Final = 2
_LENGTH: Final = 3
_USER: Final = 4
_BUILT_IN: Final = {"raw": _RAW, "line": _LINE, "auto": _AUTO, "length": _LENGTH}


class FramerFactory:
    """Makes the framer of each new connection: callable, or :meth:`make` from compiled
    code, which then calls the built-in framers' constructors directly."""

    __slots__ = ("_delay", "_kind", "_limit", "_prefix", "_user", "whole_reads")

    def __init__(
        self,
        kind: int,
        max_line_bytes: int,
        bare_delay_s: float = 0.0,
        length_prefix_bytes: int = 4,
        user: Callable[[], Framer] | None = None,
    ) -> None:
        self._kind = kind
        self._limit = max_line_bytes
        self._delay = bare_delay_s
        self._prefix = length_prefix_bytes
        self._user = user
        #: Its framers are netframe's own raw, line or auto framers, whose
        #: :meth:`Framer._whole` the endpoint may ask before :meth:`Framer.feed`.
        self.whole_reads = kind in (_RAW, _LINE, _AUTO)

    def make(self) -> Framer:
        kind = self._kind
        if kind == _AUTO:
            return AutoFramer(self._limit, self._delay)
        if kind == _LINE:
            return LineFramer(self._limit)
        if kind == _RAW:
            return RawFramer(self._limit)
        if kind == _LENGTH:
            return LengthFramer(self._limit, self._prefix)
        assert self._user is not None
        return self._user()

    def __call__(self) -> Framer:
        return self.make()


def make_framer(
    framing: str, max_line_bytes: int, bare_delay_s: float, length_prefix_bytes: int = 4
) -> FramerFactory:
    """Return a factory of fresh framers for one mode (one framer per connection).

    ``framing`` is a built-in name or ``module:attribute``: a :class:`Framer` subclass,
    or any callable, called with ``max_message_bytes`` (``max_line_bytes``) as its one
    keyword argument if it takes it, and with no argument otherwise. Its framers come
    wrapped in a :class:`ForeignFramer`.

    Raises:
        ValueError: with a one-line reason when ``module:attribute`` cannot be imported
            or does not make framers (one is made here to check).
    """
    kind = _BUILT_IN.get(framing)
    if kind is not None:
        if kind == _LENGTH:  # checked here, not on the first connection
            LengthFramer(max_line_bytes, length_prefix_bytes)
        return FramerFactory(kind, max_line_bytes, bare_delay_s, length_prefix_bytes)
    return user_framers(_user_framer(framing, max_line_bytes), max_line_bytes)


def user_framers(make: Callable[[], Framer], max_line_bytes: int) -> FramerFactory:
    """A :class:`FramerFactory` that calls ``make`` for each connection."""
    return FramerFactory(_USER, max_line_bytes, user=make)


def _user_framer(spec: str, max_bytes: int) -> Callable[[], Framer]:
    module_name, _, attribute = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load framer {spec!r}: {exc}") from None
    try:
        takes_limit = "max_message_bytes" in inspect.signature(target).parameters
    except (TypeError, ValueError):  # not introspectable: call it with no argument
        takes_limit = False

    def make() -> Any:
        return target(max_message_bytes=max_bytes) if takes_limit else target()

    try:
        trial = make()
    except Exception as exc:
        raise ValueError(f"framer {spec!r} failed: {exc!r}") from None
    if not callable(getattr(trial, "feed", None)):
        raise ValueError(f"framer {spec!r} made a {type(trial).__name__}, not a framer")
    for name in vars(Framer):
        if not name.startswith("_") and not hasattr(trial, name):
            raise ValueError(f"framer {spec!r} has no {name!r}: subclass netframe.Framer")

    def factory() -> Framer:
        return ForeignFramer(make())

    return factory
