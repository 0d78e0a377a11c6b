"""What the TCP and UDP endpoints share: the per-listener context and the error replies."""

from __future__ import annotations

import asyncio
import codecs
import inspect
import itertools
import logging
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from structlog.typing import FilteringBoundLogger

from netframe._logline import ConnectionLog
from netframe.config import Config
from netframe.framing import ForeignFramer, Framer, FramerFactory, make_framer, user_framers
from netframe.handlers import CloseReason, Handler, InetAddress, PeerAddress
from netframe.handlers._interface import unmapped_host as normalise_host
from netframe.limits import DeadlineWheel, EventSummary
from netframe.logs import connection_log

if TYPE_CHECKING:
    from netframe.tcp import TcpEndpoint

__all__ = [
    "TICK_S",
    "Counters",
    "DatagramTotals",
    "EndpointContext",
    "StreamTotals",
    "error_reply",
    "format_peer",
    "inet_text",
    "normalise_host",
]

#: How often the server advances its coarse clock and looks at due deadlines. Timeouts
#: fire up to about three ticks late (a stamp a tick old, a tick of slack, the slot),
#: never early; the hot path reads the clock as an attribute.
TICK_S: Final = 0.1
#: The shared read buffer's size: asyncio's own largest read.
READ_BUFFER_BYTES: Final = 256 * 1024
#: Repeated warnings (refused connections, dropped datagrams) are summarised at most this
#: often per kind, so a flood cannot become a flood of log lines.
SUMMARY_INTERVAL_S: Final = 1.0

# Connection ids are unique within the process, across listeners, for log correlation.
_connection_ids = itertools.count(1)


def format_peer(peer: PeerAddress | tuple[Any, ...] | None) -> str:
    """``("::1", 5000, 0, 0)`` or its :class:`InetAddress` -> ``"[::1]:5000"``; the form
    used in every log event."""
    if isinstance(peer, tuple):
        if (text := inet_text(peer)) is not None:
            return text
        peer = InetAddress.from_sockaddr(peer)
    return "unknown" if peer is None else str(peer)


def inet_text(sockaddr: object) -> str | None:
    """``str(InetAddress.from_sockaddr(sockaddr))`` for a socket's IP address tuple, made
    with no address object (a log line needs only the text); ``None`` for anything else."""
    if type(sockaddr) is not tuple or len(sockaddr) < 2:
        return None
    host = sockaddr[0]
    port = sockaddr[1]
    if type(host) is not str or type(port) is not int:
        return None
    if host.startswith("::ffff:") and "." in host:  # unmapped_host's rule, inlined: a
        host = host[7:]  # call to it is a Python frame (a property test holds the two equal)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def error_reply(reason: str) -> bytes:
    """The line netframe sends a client whose input it refuses (always ASCII)."""
    return f"Error: {reason}".encode("ascii")


def undecodable_reply(encoding: str) -> bytes:
    """The refusal of a message that is not text in ``encoding``."""
    return error_reply(f"message is not valid {encoding}")


def line_limit_reply(max_line_bytes: int) -> bytes:
    """The refusal of a message over ``max_line_bytes``."""
    return error_reply(f"line exceeds {max_line_bytes} bytes")


def _plain_function(cls: type, name: str) -> Any:
    """``cls``'s method ``name`` as the plain function its instances would bind, or
    ``None`` when it is anything else (a staticmethod, a callable object, missing)."""
    try:
        found = inspect.getattr_static(cls, name)
    except AttributeError:
        return None
    return found if isinstance(found, types.FunctionType) else None


class HandlerHooks:
    """The hooks of one handler class, looked up once for every connection it serves.

    Read through each instance, ``handler.on_message`` makes a bound method on every
    read, and ``handler.text`` is one more lookup. Found on the class once, a hook is
    called as ``function(handler, conn, ...)``, and a hook the class leaves to
    :class:`Handler` (which does nothing) is not called at all. Anything that is not a
    plain function or a plain ``bool`` on the class, and any hook or ``text`` an instance
    sets on itself (seen when the handler is made), is looked up on the instance as before.
    """

    __slots__ = ("cls", "instance_dict", "on_connect", "on_disconnect", "on_message", "text")

    def __init__(self, cls: type | None) -> None:
        """The hooks of ``cls``; with ``None``, hooks looked up on each instance."""
        self.cls = cls
        #: None: call it through the instance; NOTHING: Handler's own no-op, not called.
        self.on_connect: Any = None
        self.on_disconnect: Any = None
        self.on_message: Any = None
        #: 1 or 0: the class's plain ``text``; -1: read it from each handler.
        self.text = -1
        # Instances can carry their own hooks only if they have a __dict__.
        self.instance_dict = False
        if cls is None:
            return
        self.instance_dict = bool(getattr(cls, "__dictoffset__", 0))
        on_connect = _plain_function(cls, "on_connect")
        on_disconnect = _plain_function(cls, "on_disconnect")
        self.on_connect = NOTHING if on_connect is _HANDLER_ON_CONNECT else on_connect
        self.on_disconnect = NOTHING if on_disconnect is _HANDLER_ON_DISCONNECT else on_disconnect
        self.on_message = _plain_function(cls, "on_message")
        text = inspect.getattr_static(cls, "text", True)
        if isinstance(text, bool):
            self.text = int(text)

    def shadowed(self, handler: object) -> bool:
        """True if ``handler`` sets a hook or ``text`` on itself."""
        if not self.instance_dict:
            return False
        own: dict[str, Any] | None = getattr(handler, "__dict__", None)
        if not own:
            return False
        return any(name in own for name in _HOOK_NAMES)


#: Stands for a hook that is :class:`Handler`'s own no-op.
NOTHING: Final = object()
_HANDLER_ON_CONNECT: Final = _plain_function(Handler, "on_connect")
_HANDLER_ON_DISCONNECT: Final = _plain_function(Handler, "on_disconnect")
_HOOK_NAMES: Final = ("on_connect", "on_message", "on_disconnect", "text")
#: The hooks of a handler that sets its own: every one looked up on the instance.
DYNAMIC_HOOKS: Final = HandlerHooks(None)


# -- metrics: shared counters that nothing on the per-message path of TCP touches --------

# The most common ends of a session, counted in fields of their own: told apart by
# identity, they cost a few instructions where a dict would cost a few hundred.
_PEER_CLOSED: Final = CloseReason.PEER_CLOSED
_HANDLER_CLOSED: Final = CloseReason.HANDLER_CLOSED
_RESET: Final = CloseReason.RESET


class StreamTotals:
    """What the stream connections of one transport (``tcp`` or ``unix``) that have
    closed did, for :mod:`netframe.metrics`.

    Each connection counts its own bytes and messages on its endpoint; when it closes,
    :meth:`fold` adds them here, once. A scrape adds the open connections' own counters
    to these, so the sum only ever grows and no message touches anything shared.
    """

    __slots__ = (
        "bytes_in", "bytes_out", "closed", "connections", "handler_closed", "messages_in",
        "messages_out", "peer_closed", "reset",
    )  # fmt: skip

    def __init__(self) -> None:
        self.connections = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.messages_in = 0
        self.messages_out = 0
        self.peer_closed = 0
        self.handler_closed = 0
        self.reset = 0
        #: Closed connections by any other close reason (a ``CloseReason`` is a ``str``).
        self.closed: dict[str, int] = {}

    def fold(
        self, bytes_in: int, bytes_out: int, messages_in: int, messages_out: int, reason: str
    ) -> None:
        """Add one closed connection's counters (``TcpEndpoint.connection_lost``)."""
        self.connections += 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        self.messages_in += messages_in
        self.messages_out += messages_out
        if reason is _PEER_CLOSED:
            self.peer_closed += 1
        elif reason is _HANDLER_CLOSED:
            self.handler_closed += 1
        elif reason is _RESET:
            self.reset += 1
        else:
            closed = self.closed
            closed[reason] = closed.get(reason, 0) + 1

    def closes(self) -> dict[str, int]:
        """Closed connections by close reason, every reason in one dict."""
        closes = {
            _PEER_CLOSED.value: self.peer_closed,
            _HANDLER_CLOSED.value: self.handler_closed,
            _RESET.value: self.reset,
        }
        for reason, count in self.closed.items():
            closes[str(reason)] = count
        return closes


class DatagramTotals:
    """What the UDP listeners of one server received, sent and dropped, for
    :mod:`netframe.metrics`: UDP has no connection to fold at its end, so these are
    counted per datagram (two native integer additions in the compiled build)."""

    __slots__ = ("bytes_in", "bytes_out", "dropped", "received", "sent")

    def __init__(self) -> None:
        self.received = 0
        self.sent = 0
        self.bytes_in = 0
        self.bytes_out = 0
        #: Datagrams dropped (received, or replies not sent) by reason.
        self.dropped: dict[str, int] = {}

    def drop(self, reason: str) -> None:
        dropped = self.dropped
        dropped[reason] = dropped.get(reason, 0) + 1


class Counters:
    """Everything one server counts for :mod:`netframe.metrics`, in one attribute of
    its :class:`EndpointContext` (a plain class with more than 30 attributes loses
    CPython's shared-key dictionary, and every attribute read of it gets slower)."""

    __slots__ = ("proxy_rejected", "refusals", "tcp", "udp", "unix")

    def __init__(self) -> None:
        self.tcp = StreamTotals()
        self.unix = StreamTotals()
        self.udp = DatagramTotals()
        #: Connections refused, by (transport, reason).
        self.refusals: dict[tuple[str, str], int] = {}
        #: PROXY protocol headers refused, by reason.
        self.proxy_rejected: dict[str, int] = {}


class EndpointContext:
    """Everything the endpoints of one server share, computed once at start.

    A plain class rather than a dataclass: it is a native class in the compiled build,
    where the endpoints read its fields as struct members. Its ``__slots__`` serve the
    pure build: kept in a ``__dict__``, an instance of more than 30 attributes loses
    CPython 3.11's shared-key dict and with it the fast attribute reads (measured: about
    200 instructions more per TCP message), where a slot is read as fast at any count.
    """

    __slots__ = (
        "all_closed",
        "arrivals",
        "background",
        "config",
        "connection_log",
        "connections",
        "counters",
        "debug",
        "encoding",
        "eof_before_close",
        "framer_encodes",
        "framer_factory",
        "handler_factory",
        "hooks",
        "idle_timeout_s",
        "info",
        "line_limit_reply",
        "log",
        "max_connections",
        "max_pending_messages",
        "max_per_ip",
        "message_timeout_s",
        "next_id",
        "now",
        "per_ip",
        "read_buffer",
        "read_size",
        "send_timeout_s",
        "stopping",
        "strip_datagram_terminator",
        "summary",
        "undecodable_reply",
        "utf8",
        "wheel",
        "whole_reads",
        "write_buffer_high_bytes",
        "write_buffer_low_bytes",
    )

    def __init__(
        self,
        config: Config,
        handler_factory: Callable[[], Handler],
        log: FilteringBoundLogger,
        framers: Callable[[], Framer] | None = None,
    ) -> None:
        self.config = config
        # The limits the TCP endpoint reads on every connection or message, as native
        # fields: read through the frozen Config, each would be a Python attribute lookup.
        self.max_per_ip = config.max_per_ip
        self.idle_timeout_s = config.idle_timeout_s
        self.message_timeout_s = config.message_timeout_s
        self.send_timeout_s = config.send_timeout_s
        self.max_pending_messages = config.max_pending_messages
        # Any, here and in read_size: values only ever handed to the transport, kept as
        # the Python ints they are. Typed int, the compiled build would store them unboxed
        # and make a new int object (above 256) for every call that passes one.
        self.write_buffer_high_bytes: Any = config.write_buffer_high_bytes
        self.write_buffer_low_bytes: Any = config.write_buffer_low_bytes
        self.handler_factory = handler_factory
        # The hooks of the handler class met last (usually the only one).
        self.hooks = DYNAMIC_HOOKS
        # Resolve structlog's lazy proxy once: every connection binds from a real logger.
        self.log: FilteringBoundLogger = log.bind()
        # Live TCP endpoints, for graceful shutdown and stats.
        self.connections: set[TcpEndpoint] = set()
        # Open TCP connections per client address, kept only when max_per_ip is set.
        self.per_ip: dict[str, int] = {}
        # Most TCP connections at once; the server resolves "auto" when it starts.
        self.max_connections = 2**31
        # The coarse clock (loop time), advanced every TICK_S by the server.
        self.now = 0.0
        # The read buffer every TLS connection of the server reads into, in turn (_tls).
        self.read_buffer = memoryview(bytearray(READ_BUFFER_BYTES))
        # Bytes the loop's transport reads per recv() for a plain Protocol, when the
        # server sets it (the standard loop, see Server._serve_stream); 0: the loop's own.
        self.read_size: Any = 0
        # Connections opened since the last tick: their first deadline check enters the
        # wheel at the tick, so a connection that closes before it never touches the wheel.
        # A dict (kept in order), so that one that closes leaves it at once: held here
        # until the tick, a short session's objects would outlive two collections of the
        # garbage collector and be moved to its oldest generation, which is then scanned
        # in full far more often.
        self.arrivals: dict[TcpEndpoint, None] = {}
        # Connections waiting for their next deadline check.
        self.wheel: DeadlineWheel[TcpEndpoint] = DeadlineWheel(TICK_S)
        # async on_disconnect calls still running; a stopping server waits for them.
        self.background: set[asyncio.Task[None]] = set()
        # Set by a stopping server; the last connection to close sets it.
        self.all_closed: asyncio.Event | None = None
        # True once the server stops: a connection accepted in that instant closes at
        # once, and connections that finish their message close.
        self.stopping = False
        self.summary = EventSummary(SUMMARY_INTERVAL_S)
        # Made by the server (where a user framer's errors are reported); else from config.
        factory = framers or make_framer(
            config.framing,
            config.max_line_bytes,
            config.bare_message_delay_s,
            config.length_prefix_bytes,
        )
        # A FramerFactory, whose make() the compiled endpoint calls directly.
        self.framer_factory: FramerFactory = (
            factory
            if isinstance(factory, FramerFactory)
            else user_framers(factory, config.max_line_bytes)
        )
        # netframe's own raw, line or auto framers: a read may be taken whole (Framer._whole).
        self.whole_reads = self.framer_factory.whole_reads
        # The framer's own reply encoding, when it has one (length framing, user
        # framers); False: replies are payload + terminator, with no call.
        trial = self.framer_factory()
        own = trial.inner if isinstance(trial, ForeignFramer) else trial
        self.framer_encodes = getattr(type(own), "encode", None) is not Framer.encode
        self.encoding = config.encoding
        # UTF-8 (the default) by name: decode() and encode() with no argument take
        # CPython's UTF-8 path straight, where a name is looked up on every call.
        self.utf8 = codecs.lookup(config.encoding).name == "utf-8"
        # netframe's own per-connection and per-message events follow config.log_level
        # even where the application's structlog set-up would let everything through.
        floor = logging.getLevelNamesMapping()[config.log_level.upper()]
        enabled = getattr(self.log, "is_enabled_for", lambda level: True)
        # Per-message debug events are built only when debug is on: the hot path pays
        # one attribute test instead of a logger call.
        self.debug = floor <= logging.DEBUG and bool(enabled(logging.DEBUG))
        # Whether per-connection info events (opened, closed) are logged at all, and the
        # cheap way to log them when netframe's own logging set-up is in force.
        self.info = floor <= logging.INFO and bool(enabled(logging.INFO))
        self.connection_log: ConnectionLog | None = connection_log() if self.info else None
        self.undecodable_reply = undecodable_reply(config.encoding)
        self.line_limit_reply = line_limit_reply(config.max_line_bytes)
        self.next_id: Callable[[], int] = _connection_ids.__next__
        self.strip_datagram_terminator = config.framing in ("auto", "line")
        # Set by the server on a loop whose transport.close() leaves the peer without an
        # end of stream (rloop): the endpoint sends write_eof() first.
        self.eof_before_close = False
        # What netframe.metrics reads: closed connections' totals, UDP's counts, refusals.
        self.counters = Counters()

    def hooks_of(self, handler: object) -> HandlerHooks:
        """The :class:`HandlerHooks` for a new ``handler``."""
        hooks = self.hooks
        if hooks.cls is not type(handler):
            hooks = self.hooks = HandlerHooks(type(handler))
        return DYNAMIC_HOOKS if hooks.shadowed(handler) else hooks

    def refused(self, reason: str, count: int = 1, network: str = "tcp") -> None:
        """Count connections refused for ``reason``; log a summary at most once a second."""
        refusals = self.counters.refusals
        refusals[network, reason] = refusals.get((network, reason), 0) + count
        total = self.summary.add(reason, self.now, count)
        if total is not None:
            self.log.warning(REFUSED_EVENT, reason=reason, refused=total)

    def flush_summaries(self, *, final: bool = False) -> None:
        """Log the refusal counts still waiting whose interval has passed (each tick), or
        all of them (``final``, at the stop)."""
        for reason, total in self.summary.flush(self.now, final=final):
            self.log.warning(REFUSED_EVENT, reason=reason, refused=total)


REFUSED_EVENT: Final = "connections_refused"
UNDECODABLE_EVENT: Final = "undecodable_message"
HANDLER_ERROR_EVENT: Final = "handler_error"
