"""The TCP endpoint: an ``asyncio.Protocol`` that moves bytes between a socket and a handler.

One :class:`TcpEndpoint` per connection. It is also the :class:`~netframe.Connection`
its handler sees, so a connection costs one protocol object, one handler and one framer.

The walk of a chunk: ``data_received`` -> ``Framer.feed`` -> for each message, decode
and ``handler.on_message`` -> replies collect in a list -> one ``transport.write`` for
the batch. Plain handlers run inline with no task. A handler whose hook returns an
awaitable gets one task per connection, started only then, and this connection's later
messages wait in ``_pending`` behind it so replies keep their order.

Protection, each bounded and each with a reason in ``connection_closed``:

- caps: over ``max_connections`` or ``max_per_ip`` a new connection gets one
  ``Error: ...`` line and is closed before any handler is made;
- flow control: a client that sends but never reads fills our write buffer past the
  high mark; handling stops mid-read (the rest waits in ``_pending``) and reading
  pauses until it drains, and if it does not drain within ``send_timeout_s`` the
  connection is aborted;
- deadlines (idle, message, send, lingering close) are stamped on the endpoint from the
  server's coarse clock and checked only when the connection's slot in the server's
  :class:`~netframe.limits.DeadlineWheel` comes due: no timer per message;
- an overlong message gets ``Error: ...`` after the messages before it are answered, then
  a close; bytes that do not decode get an ``Error: ...`` line and the session goes on.
"""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import collections
import contextlib
import math
import socket
import struct
import time
from typing import Any, Final, Protocol

from structlog.typing import FilteringBoundLogger

from netframe._awaiting import finish, run_handler_calls
from netframe._endpoint import (
    DYNAMIC_HOOKS,
    HANDLER_ERROR_EVENT,
    NOTHING,
    TICK_S,
    UNDECODABLE_EVENT,
    EndpointContext,
    error_reply,
    format_peer,
    inet_text,
)
from netframe._unix import limit_key, unix_address
from netframe.framing import CRLF, LF, NONE, Framer, Message
from netframe.handlers import CloseReason, Handler, InetAddress, PeerAddress, TlsInfo
from netframe.handlers._interface import Network

__all__ = ["TcpEndpoint"]

_PAUSED_BY_WRITES: Final = 1
_PAUSED_BY_QUEUE: Final = 2
#: Replies collected before they are written out in the middle of one read's messages,
#: so a read of thousands of pipelined lines never holds thousands of replies at once.
_BATCH_FLUSH: Final = 64
#: Messages taken from ``_pending`` per call of ``_handle`` when catching up.
_DRAIN_CHUNK: Final = 64
# What handling one message of a batch says about the next (TcpEndpoint._handle_one).
_NEXT: Final = 0
_STOP: Final = 1
_HOLD: Final = 2
#: How long a closing connection may wait to deliver its last replies when no send
#: timeout is set.
_LINGER_S: Final = 30.0

TOO_MANY_REPLY: Final = error_reply("too many connections")
TOO_MANY_FROM_IP_REPLY: Final = error_reply("too many connections from your address")
MESSAGE_TIMEOUT_REPLY: Final = error_reply("message timed out")


#: The fields of ``connection_closed`` after the bound ones, in order.
_CLOSED_FIELDS: Final = (
    "reason", "duration_s", "bytes_in", "bytes_out", "messages_in", "messages_out"
)  # fmt: skip
#: SO_LINGER on, zero seconds: ``close()`` sends a reset and discards unsent bytes.
_RESET_LINGER: Final = struct.pack("ii", 1, 0)
# The close reasons of every session, as module constants: read through the enum's class
# each costs a call of EnumType.__getattr__ (on Python 3.11), a constant next to nothing.
_PEER_CLOSED: Final = CloseReason.PEER_CLOSED
_HANDLER_CLOSED: Final = CloseReason.HANDLER_CLOSED
_SERVER_SHUTDOWN: Final = CloseReason.SERVER_SHUTDOWN
_RESET: Final = CloseReason.RESET

#: The payload of the marker that stands where an overlong message was cut off, told
#: apart by identity: a bytes object of its own, never one a framer returns.
_OVERFLOW_PAYLOAD: Final = bytes(bytearray(b"overflow"))
#: Queued after the last message before an overlong one, so that the refusal keeps its
#: place in the stream: earlier messages are answered first, later ones never.
_OVERFLOW: Final[Message] = (_OVERFLOW_PAYLOAD, b"")
#: ``_peer_raw`` before the transport was asked (it may answer None).
_UNREAD: Final = object()


def _selector_transport() -> type | None:
    """Stock asyncio's socket transport class, where it has the methods ``_adopt`` and
    ``_on_readable`` rely on (CPython 3.11 to 3.13 do); else None, and no adopting."""
    cls = getattr(asyncio.selector_events, "_SelectorSocketTransport", None)
    if not isinstance(cls, type):
        return None
    needed = ("_read_ready", "_read_ready__on_eof", "_fatal_error", "write")
    return cls if all(callable(getattr(cls, name, None)) for name in needed) else None


_SELECTOR_TRANSPORT: Final = _selector_transport()
# The socket's own methods, called with the (adopted, exactly socket.socket) socket: from
# compiled code, ``sock.recv(n)`` looks the method up by name on every call, where a
# method descriptor held here is called as it is.
_RECV: Final = socket.socket.recv
_SEND: Final = socket.socket.send


class _Transport(Protocol):
    """What the endpoint uses of its transport. A protocol, not ``asyncio.Transport``:
    uvloop's transports implement the interface without subclassing it, and compiled
    code checks the class of what it stores."""

    def write(self, data: bytes | memoryview) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def is_closing(self) -> bool: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def get_write_buffer_size(self) -> int: ...
    def can_write_eof(self) -> bool: ...
    def write_eof(self) -> None: ...
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...
    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...


class EndpointFactory:
    """A listener's protocol factory: a new :class:`TcpEndpoint` for each connection.

    Compiled, the loop's call reaches a native constructor with no arguments to parse;
    ``functools.partial(TcpEndpoint, ctx, network)`` called the class, whose arguments
    then go through the generic tuple-and-keywords parser on every connection.
    """

    __slots__ = ("ctx", "network")

    def __init__(self, ctx: EndpointContext, network: Network = "tcp") -> None:
        self.ctx = ctx
        self.network: Network = network

    def __call__(self) -> TcpEndpoint:
        return TcpEndpoint(self.ctx, self.network)


class TcpEndpoint:
    """One TCP connection: asyncio transport on one side, framer and handler on the other.

    An asyncio protocol by its methods (the loop calls them by name), not by subclassing
    ``asyncio.Protocol``: the compiled build makes it a native class, which cannot
    inherit from a Python one.
    """

    __slots__ = (
        "_batch",
        "_check_at",
        "_closed_at",
        "_closing",
        "_ctx",
        "_encode",
        "_eof",
        "_framer",
        "_framer_timer",
        "_handler",
        "_hooks",
        "_ip",
        "_local",
        "_local_read",
        "_log",
        "_log_peer",
        "_message_started",
        "_pause_reasons",
        "_paused_at",
        "_peer",
        "_peer_raw",
        "_peer_read",
        "_pending",
        "_registered",
        "_reply",
        "_replying",
        "_seen",
        "_sock",
        "_started",
        "_task",
        "_terminator",
        "_transport",
        "_undecodable",
        "_waiting",
        "_waiting_hook",
        "_writes_paused",
        "bytes_in",
        "bytes_out",
        "close_reason",
        "id",
        "messages_in",
        "messages_out",
        "network",
        "tls",
        "via",
    )

    def __init__(self, ctx: EndpointContext, network: Network = "tcp") -> None:
        self._ctx = ctx
        self._framer: Framer = ctx.framer_factory.make()
        framer = self._framer
        #: ``"tcp"``, or ``"unix"`` on a Unix-domain listener (the same endpoint serves
        #: both): a per-connection attribute, not a class constant.
        self.network = network
        # The framer's reply encoding if it has its own; else a reply is payload + ending.
        self._encode = framer.encode if ctx.framer_encodes else None
        self._handler: Handler | None = None  # made in connection_made, where errors are caught
        self._hooks = DYNAMIC_HOOKS  # how its hooks are called (see HandlerHooks)
        self._transport: _Transport | None = None
        # The socket of a stock asyncio selector transport, which this endpoint reads
        # and writes itself while the transport holds nothing unsent (see _adopt).
        self._sock: socket.socket | None = None
        # While a batch of input is handled (or on_connect runs) replies are collected
        # and written out in one piece at its end: the first in _reply, and all of them
        # in _batch once there is a second (a read is mostly one message, one reply, and
        # then no list is made). Outside a batch, sends write straight through (async
        # handlers after an await, pushes).
        self._replying = False
        self._reply: bytes | None = None
        self._batch: list[bytes] | None = None
        self._terminator = self._framer.greeting_terminator
        self._closing = False
        self._registered = False
        self._eof = False
        self._pause_reasons = 0
        self._writes_paused = False
        # A loop timer handle (uvloop's is not an asyncio.TimerHandle).
        self._framer_timer: Any = None
        # The handler's async call in flight, the task awaiting it, and the messages not
        # handled yet (behind an async call, or held while the peer does not read).
        # (Any: an awaitable of any kind, and a task of whatever the loop's task factory makes.)
        self._waiting: Any = None
        self._waiting_hook = "on_message"
        self._task: Any = None
        self._pending: collections.deque[Message] | None = None
        self._undecodable = 0
        # Coarse-clock stamps for the deadlines (0.0: not running), and the time this
        # connection's next deadline check is scheduled for.
        self._seen = ctx.now
        self._started = 0.0  # time.monotonic() at connection_made, for the logged duration
        self._message_started = 0.0
        self._paused_at = 0.0
        self._closed_at = 0.0
        self._check_at = math.inf
        self._ip: str | None = None
        #: Why the connection ended, once it is known (``idle_timeout``, ``reset``, ...).
        self.close_reason: CloseReason | None = None
        # Bound and read on first use: a connection that logs nothing, or never asks
        # for its addresses, does not pay for them.
        self._log: FilteringBoundLogger | None = None
        # The peer as connection_opened showed it, for connection_closed (the fast path).
        self._log_peer = ""
        self._peer: PeerAddress | None = None
        self._local: PeerAddress | None = None
        self._peer_read = self._local_read = False
        self._peer_raw: Any = _UNREAD  # the transport's peername, once asked
        self.id = ctx.next_id()
        self.bytes_in = self.bytes_out = self.messages_in = self.messages_out = 0
        #: The load balancer, when a PROXY header named the client (see set_proxied).
        self.via: PeerAddress | None = None
        #: What TLS negotiated; set by the TLS gate (netframe._tls) before
        #: connection_made, None on a plain connection.
        self.tls: TlsInfo | None = None

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: _Transport) -> None:
        ctx = self._ctx
        self._transport = transport
        if ctx.info:  # only the logged duration needs a fine clock
            self._started = time.monotonic()
        if ctx.stopping:
            self._closing = True
            self._end(transport)
            return
        if len(ctx.connections) >= ctx.max_connections:
            self._refuse(TOO_MANY_REPLY, CloseReason.MAX_CONNECTIONS)
            return
        limit = ctx.max_per_ip
        if limit:
            peer = self.peer
            # A Unix peer counts under its user id (see netframe._unix.limit_key).
            self._ip = ip = peer.host if isinstance(peer, InetAddress) else limit_key(peer)
            if ctx.per_ip.get(ip, 0) >= limit:
                self._refuse(TOO_MANY_FROM_IP_REPLY, CloseReason.MAX_PER_IP)
                return
            ctx.per_ip[ip] = ctx.per_ip.get(ip, 0) + 1
        self._registered = True
        if ctx.read_size:  # the standard loop's read size, per transport
            transport_any: Any = transport
            transport_any.max_size = ctx.read_size
            if type(transport) is _SELECTOR_TRANSPORT:
                self._adopt(transport_any)
        transport.set_write_buffer_limits(ctx.write_buffer_high_bytes, ctx.write_buffer_low_bytes)
        ctx.connections.add(self)
        if ctx.idle_timeout_s:
            self._check_at = ctx.now + ctx.idle_timeout_s + TICK_S
            ctx.arrivals[self] = None  # into the wheel at the next tick, if still open
        if ctx.info:
            if (fast := ctx.connection_log) is not None:
                self._log_peer = fast.opened(self.network, self._peer_text(), self.id)
            else:
                self.log.info("connection_opened")
        self._replying = True
        try:
            # The user's factory runs here, not in the listener's protocol factory: an
            # exception there would stop uvloop from accepting any further connection.
            self._handler = handler = ctx.handler_factory()
            hooks = self._hooks = ctx.hooks_of(handler)
            if hooks.on_connect is None:
                result = handler.on_connect(self)
            elif hooks.on_connect is NOTHING:
                result = None
            else:
                result = hooks.on_connect(handler, self)
        except Exception:
            self._handler_failed("handler_factory" if self._handler is None else "on_connect")
        else:
            if result is not None:
                self._await(result, "on_connect")
        self._replying = False
        greeting = self._take_replies()
        if greeting is not None:
            self.bytes_out += len(greeting)
            self._send_out(transport, greeting)
        if self._closing:  # on_connect closed, or failed
            self._close_transport()

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self._closing:
            return
        ctx = self._ctx
        if ctx.stopping:
            data = self._finishing(data)
        now = self._seen = ctx.now
        if self._framer_timer is not None:
            self._framer_timer.cancel()
            self._framer_timer = None
        framer = self._framer
        if (
            ctx.whole_reads
            and self._waiting is None
            and not self._pending
            and not self._writes_paused
            and (payload := framer._whole(data)) is not None
        ):
            # The read is one whole message and nothing else: no list, no pair.
            self._message_started = 0.0
            ending = len(data) - len(payload)
            self._terminator = NONE if not ending else LF if ending == 1 else CRLF
            self._replying = True
            if self._handler is not None:
                self._handle_one(payload)
            self._end_batch()
            return
        messages = framer.feed(data)
        if framer.partial:
            # A message has begun; it has begun now unless the same one was already
            # under way (no message completed in this read).
            if messages or not self._message_started:
                self._message_started = now
                timeout = ctx.message_timeout_s
                if timeout and now + timeout + TICK_S < self._check_at:
                    self._schedule_check(now + timeout + TICK_S)
        elif self._message_started:
            self._message_started = 0.0
        if framer.overflow:
            messages = [*messages, _OVERFLOW]
        elif framer.wake_after is not None:  # the framer wants to hear if nothing comes
            self._framer_timer = asyncio.get_running_loop().call_later(
                framer.wake_after, self._framer_timeout
            )
        # _handle, inlined: this is the path of every read.
        if self._pending or self._waiting is not None or self._writes_paused:
            self._queue(messages)
            return
        self._dispatch(messages)
        if framer.unparsed:
            self._pump()

    def eof_received(self) -> bool:
        # The peer finished sending. Bytes an `auto` framer holds as a possible bare
        # message are one now (the seeds' server answers a last word before the close).
        if self.close_reason is None:
            self.close_reason = _PEER_CLOSED
        if self._framer_timer is not None:
            self._framer_timer.cancel()
            self._framer_timer = None
        if not self._closing and (messages := self._framer.eof()):
            self._handle(messages)
        # A partial line can never finish now; queued and unparsed messages still can.
        if (self._waiting is not None or self._pending or self._framer.unparsed) and (
            not self._closing
        ):
            self._eof = True
            return True  # keep the transport open until the queued messages are answered
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        ctx = self._ctx
        self._closing = True
        if self._sock is not None:
            # The hook names this endpoint: left in place, transport and endpoint (and
            # its handler) would wait for the cyclic collector instead of going now.
            self._sock = None
            transport_any: Any = self._transport
            transport_any._read_ready_cb = None
        if not self._registered:
            return
        self._registered = False
        ctx.connections.discard(self)
        if self._check_at != math.inf:  # in the wheel, or waiting for it among the arrivals
            arrivals = ctx.arrivals
            if self in arrivals:  # (compiled: in and del are native, pop is a method call)
                del arrivals[self]
            ctx.wheel.cancel(self)
        if self._ip is not None:
            left = ctx.per_ip[self._ip] - 1
            if left:
                ctx.per_ip[self._ip] = left
            else:
                del ctx.per_ip[self._ip]
        if not ctx.connections and ctx.all_closed is not None:
            ctx.all_closed.set()
        if exc is not None and self.close_reason in (None, _PEER_CLOSED):
            self.close_reason = _RESET
        elif self.close_reason is None:
            self.close_reason = _PEER_CLOSED
        # Metrics: the connection's counters join its transport's totals, once.
        counters = ctx.counters
        (counters.unix if self.network == "unix" else counters.tcp).fold(
            self.bytes_in, self.bytes_out, self.messages_in, self.messages_out, self.close_reason
        )
        if self._framer_timer is not None:
            self._framer_timer.cancel()
        if self._task is not None:
            self._task.cancel()
        handler = self._handler
        on_disconnect = self._hooks.on_disconnect
        if handler is not None and on_disconnect is not NOTHING:
            try:
                if on_disconnect is None:
                    result = handler.on_disconnect(self)
                else:
                    result = on_disconnect(handler, self)
            except Exception:
                self._handler_failed("on_disconnect")
            else:
                if result is not None:
                    self._background(result, "on_disconnect")
        if not ctx.info:
            return
        # The duration to the microsecond: a whole number, written in seconds.
        micros = int((time.monotonic() - self._started) * 1_000_000 + 0.5)
        if (fast := ctx.connection_log) is not None:
            fast.closed(
                self.network, self._log_peer, self.id, self.close_reason.value, micros,
                self.bytes_in, self.bytes_out, self.messages_in, self.messages_out,
            )  # fmt: skip
        else:
            fields = (
                self.close_reason.value,
                micros / 1_000_000,
                self.bytes_in,
                self.bytes_out,
                self.messages_in,
                self.messages_out,
            )
            self.log.info("connection_closed", **dict(zip(_CLOSED_FIELDS, fields, strict=True)))

    def pause_writing(self) -> None:
        self._writes_paused = True
        self._paused_at = now = self._ctx.now
        self._pause_reading(_PAUSED_BY_WRITES)
        timeout = self._ctx.send_timeout_s
        if timeout and now + timeout + TICK_S < self._check_at:
            self._schedule_check(now + timeout + TICK_S)

    def resume_writing(self) -> None:
        self._writes_paused = False
        self._paused_at = 0.0
        self._seen = self._ctx.now
        self._pump()
        if not self._writes_paused:  # _pump's writes may have filled the buffer again
            self._resume_reading(_PAUSED_BY_WRITES)

    # -- Connection, as the handler sees it ---------------------------------------------

    @property
    def peer(self) -> PeerAddress | None:
        """The client's address; ``None`` when the socket could not tell (reset at once)."""
        if not self._peer_read:
            self._peer = self._address(self._raw_peer(), "peername")
            self._peer_read = True
        return self._peer

    @property
    def local(self) -> PeerAddress | None:
        """The listener's address the client reached."""
        if not self._local_read:
            self._local = self._address(self._extra("sockname"), "sockname")
            self._local_read = True
        return self._local

    def _raw_peer(self) -> Any:
        """The transport's ``peername``, asked once."""
        raw = self._peer_raw
        if raw is _UNREAD:
            raw = self._peer_raw = self._extra("peername")
        return raw

    def _peer_text(self) -> str:
        """The peer as the log lines show it. An IP peer nothing has asked ``peer`` for is
        written from the socket's tuple, with no :class:`InetAddress` made for it."""
        if not self._peer_read:
            text = inet_text(self._raw_peer())
            if text is not None:
                return text
        return format_peer(self.peer)

    def _extra(self, name: str) -> Any:
        transport = self._transport
        try:
            return transport.get_extra_info(name) if transport else None
        except OSError:  # uvloop asks the socket, which may be closed already
            return None

    def _address(self, raw: Any, name: str) -> PeerAddress | None:
        transport = self._transport
        if isinstance(raw, str | bytes):  # AF_UNIX: a path, empty for an unnamed end
            # The peer's process credentials come with it (netframe._unix).
            sock = transport.get_extra_info("socket") if name == "peername" and transport else None
            return unix_address(raw, sock)
        return InetAddress.from_sockaddr(raw)

    def set_proxied(
        self, peer: PeerAddress | None, local: PeerAddress | None, via: PeerAddress | None
    ) -> None:
        """PROXY protocol hook (``netframe._proxy_gate``), called before
        :meth:`connection_made`: the client and the address it reached, as the header
        names them, and the load balancer's own address. The caps, the logs and the
        handler then see these instead of the socket's."""
        self._peer = peer
        self._local = local
        self._peer_read = self._local_read = True
        self.via = via

    @property
    def log(self) -> FilteringBoundLogger:
        """This connection's logger: ``transport``, ``peer`` and ``conn`` bound."""
        if self._log is None:
            self._log = self._ctx.log.bind(
                transport=self.network, peer=self._peer_text(), conn=self.id
            )
        return self._log

    def send(self, message: Any) -> None:  # str | bytes; a bytes-like is copied, never kept
        if self._closing:
            return
        if isinstance(message, str):
            ctx = self._ctx
            message = message.encode() if ctx.utf8 else message.encode(ctx.encoding)
        elif type(message) is not bytes:
            message = bytes(memoryview(message))  # (TypeError for what is not bytes-like)
        self.messages_out += 1
        if self._replying:  # a reply, or the greeting: the common case
            terminator = self._terminator
        elif self._task is not None and asyncio.current_task() is self._task:
            terminator = self._terminator  # a reply after an await in async on_message
        else:
            terminator = self._framer.push_terminator  # a push: answers no message
        encode = self._encode
        if encode is not None:
            data = encode(message, terminator)
        elif terminator:
            data = message + terminator
        else:
            data = message  # a bare or raw reply: no copy
        if self._replying:
            self._add_reply(data)
        else:
            self._write(data)

    def close(self) -> None:
        self._close(_HANDLER_CLOSED)

    def abort(self) -> None:
        """Close at once: replies not yet written are dropped, and the peer gets a reset."""
        self._abort(CloseReason.HANDLER_ABORTED)

    def terminate(self) -> None:
        """The server's abort, when its shutdown deadline passes or a second signal comes."""
        self._abort(_SERVER_SHUTDOWN)

    # -- server shutdown ----------------------------------------------------------------

    def shut_down(self) -> bool:
        """The server is stopping: close now if between messages (True), else let the
        message in progress finish first (False); ``_handle`` closes it when it does."""
        if self._closing:
            return True
        if self._busy():
            return False
        self._close(_SERVER_SHUTDOWN)
        return True

    def _finishing(self, data: bytes) -> bytes:
        """While the server stops, only the bytes that finish the message in progress
        are taken; a message that starts after the stop is not."""
        if not self._framer.partial:
            return b""
        end = data.find(LF)
        return data if end < 0 else data[: end + 1]

    def _busy(self) -> bool:
        """True while a message is under way: a partial one, an async call, queued ones."""
        framer = self._framer
        return bool(framer.partial or framer.unparsed or self._waiting is not None or self._pending)

    # -- deadlines ----------------------------------------------------------------------

    def _schedule_check(self, when: float | None = None) -> None:
        """Ask the server's wheel to call :meth:`check_deadlines` at ``when`` (default:
        the next deadline). Only ever moves the check earlier, or sets it after a check."""
        if when is None:
            when = self._next_deadline()
            if when == math.inf:
                self._check_at = when
                return
        self._check_at = when
        self._ctx.wheel.schedule(self, when)

    def _next_deadline(self) -> float:
        # Each deadline gets one tick of slack: the stamps come from a clock that may be
        # a tick old, and a timeout must never fire early.
        limits = self._ctx
        deadline = math.inf
        if self._closing:
            linger = limits.send_timeout_s or _LINGER_S
            return self._closed_at + linger + TICK_S
        if limits.idle_timeout_s:
            deadline = self._seen + limits.idle_timeout_s + TICK_S
        if self._message_running() and limits.message_timeout_s:
            deadline = min(deadline, self._message_started + limits.message_timeout_s + TICK_S)
        if self._writes_paused and limits.send_timeout_s:
            deadline = min(deadline, self._paused_at + limits.send_timeout_s + TICK_S)
        return deadline

    def _message_running(self) -> bool:
        """A message has begun and the client can finish it: its clock is running.

        While the server itself has stopped reading (writes or queued messages hold it
        up), the client cannot finish anything; the clock restarts when reading does.
        """
        return bool(self._message_started and self._framer.partial and not self._pause_reasons)

    def enter_wheel(self) -> None:
        """At the first tick after it opened: put the first deadline check in the wheel
        (a check scheduled earlier since, by a message or a pause, is already there)."""
        if self._registered and self._check_at != math.inf:
            self._ctx.wheel.schedule(self, self._check_at)

    def check_deadlines(self, now: float) -> None:
        """Called by the server when this connection's check comes due."""
        self._check_at = math.inf
        if not self._registered:
            return
        if self._next_deadline() > now:
            self._schedule_check()
            return
        limits = self._ctx
        if self._closing:
            # Closed, but its last replies could not be delivered in time.
            self._reset()
        elif self._writes_paused and self._paused_at + limits.send_timeout_s + TICK_S <= now:
            self.log.warning("send_timeout", send_timeout_s=limits.send_timeout_s)
            self._abort(CloseReason.SEND_TIMEOUT)
        elif (
            self._message_running()
            and limits.message_timeout_s
            and (self._message_started + limits.message_timeout_s + TICK_S <= now)
        ):
            self.log.warning("message_timeout", message_timeout_s=limits.message_timeout_s)
            self._reply_error(MESSAGE_TIMEOUT_REPLY)
            self._close(CloseReason.MESSAGE_TIMEOUT)
        else:
            self._close(CloseReason.IDLE_TIMEOUT)

    # -- the message path ---------------------------------------------------------------

    def _handle(self, messages: list[Message]) -> None:
        """Hand new messages to the handler in order, then write their replies out.

        When something older still waits (an async call in flight, messages held while
        the peer does not read) they queue behind it instead. Handling stops at an async
        call or when the write buffer fills; what is left waits in ``_pending`` and in
        the framer, and :meth:`_pump` carries on when the obstacle is gone.
        """
        if self._pending or self._waiting is not None or self._writes_paused:
            self._queue(messages)
            return
        self._dispatch(messages)
        if self._framer.unparsed:
            self._pump()

    def _dispatch(self, messages: list[Message]) -> None:
        """Handle ``messages``, which come before everything in ``_pending``."""
        self._replying = True
        if self._waiting is None and self._handler is not None:
            # By index over the list: a compiled loop with no iterator object, and what
            # is left on an early stop is a slice.
            count = len(messages)
            index = 0
            while index < count:
                payload, self._terminator = messages[index]
                index += 1
                step = self._handle_one(payload)
                if step != _NEXT:
                    if step == _HOLD:
                        self._requeue(messages[index:])
                    break
        self._end_batch()

    def _handle_one(self, payload: bytes) -> int:
        """Hand one message (ended by ``self._terminator``) to the handler, inside a
        batch. Returns _NEXT to go on with the next message, _STOP to handle no more
        (the connection is closing: it was, or this message overflowed the framer, or the
        handler failed), or _HOLD when the next ones must wait: for an async call, or for
        a peer that does not read its replies."""
        if self._closing:
            return _STOP
        if payload is _OVERFLOW_PAYLOAD:
            self._refuse_overlong()
            return _STOP
        self.messages_in += 1
        ctx = self._ctx
        if ctx.debug:
            self.log.debug("message_received", size=len(payload))
        handler: Any = self._handler
        hooks = self._hooks
        message: str | bytes = payload
        if hooks.text > 0 or (hooks.text < 0 and handler.text):
            try:
                message = payload.decode() if ctx.utf8 else payload.decode(ctx.encoding)
            except UnicodeDecodeError:
                self._refuse_undecodable()
                return _NEXT
        # The class's function, called with the handler; else the bound method.
        function = hooks.on_message
        try:
            if function is None:
                result = handler.on_message(self, message)
            else:
                result = function(handler, self, message)
        except Exception:
            self._handler_failed("on_message")
            return _STOP
        if result is not None:
            self._await(result)
            return _HOLD
        batch = self._batch
        if batch is not None and len(batch) >= _BATCH_FLUSH:
            self._flush()
            if self._writes_paused:
                return _HOLD
        return _NEXT

    def _end_batch(self) -> None:
        """Write the batch's replies out in one piece; then close, if that is due."""
        self._replying = False
        data = self._take_replies()
        transport = self._transport
        if data is not None and transport is not None:  # _flush, inlined
            self.bytes_out += len(data)
            self._seen = self._ctx.now
            if self._sock is None:  # not stock asyncio's transport: no call to _send_out
                transport.write(data)
            else:
                self._send_out(transport, data)
        if self._closing:
            self._close_transport()
        elif self._ctx.stopping and not self._busy():
            self._close(_SERVER_SHUTDOWN)

    def _add_reply(self, data: bytes) -> None:
        """One more reply of the batch being handled."""
        first = self._reply
        if first is None:
            self._reply = data
        elif self._batch is None:
            self._batch = [first, data]
        else:
            self._batch.append(data)

    def _take_replies(self) -> bytes | None:
        """The batch's replies so far as one ``bytes`` (None if there are none); the
        batch holds none after."""
        batch = self._batch
        if batch is not None:
            self._batch = None
            self._reply = None
            return b"".join(batch)
        data = self._reply
        self._reply = None
        return data

    def _flush(self) -> None:
        """Write the batch so far (every ``_BATCH_FLUSH`` replies within one read)."""
        data = self._take_replies()
        transport = self._transport
        if data is None or transport is None:
            return
        if transport.is_closing():  # the peer reset: nothing more is worth handling
            self._closing = True
            return
        self.bytes_out += len(data)
        self._send_out(transport, data)

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            self.bytes_out += len(data)
            self._seen = self._ctx.now
            self._send_out(transport, data)

    def _send_out(self, transport: _Transport, data: bytes) -> None:
        """``transport.write(data)``; straight to the socket when the transport is stock
        asyncio's and holds nothing unsent, as its own ``write`` would do, minus the
        Python frame. Anything but a whole send goes through ``write`` as usual."""
        sock = self._sock
        if sock is not None:
            state: Any = transport
            if not state._buffer and not state._conn_lost:
                try:
                    sent = _SEND(sock, data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError as exc:  # as write() itself fails the transport
                    state._fatal_error(exc, "Fatal write error on socket transport")
                    return
                if sent == len(data):
                    return
                if sent:
                    transport.write(memoryview(data)[sent:])  # the rest, not a copy
                    return
        transport.write(data)

    def _adopt(self, transport: Any) -> None:
        """Read and write a stock asyncio selector transport's socket here (compiled)
        rather than through its Python methods. The transport keeps its registration,
        buffer, flow control and closing; only the plain read and the unbuffered send are
        taken over, with its own code for everything else (errors, end of input)."""
        # (No write_eof() on this loop, where netframe never sends one, and no sendfile():
        # the two states of the transport's write() that _send_out does not check.)
        if not (hasattr(transport, "_buffer") and hasattr(transport, "_conn_lost")):
            return  # what _send_out reads, per reply
        try:
            sock = transport._sock
            if type(sock) is not socket.socket:  # its recv and send may be its own
                return
            transport._read_ready_cb = self._on_readable
        except AttributeError:
            return
        self._sock = sock

    def _on_readable(self) -> None:
        # asyncio's _read_ready__data_received, with the protocol's method called natively.
        transport: Any = self._transport
        if transport._conn_lost:
            return
        sock = self._sock
        assert sock is not None
        try:
            data = _RECV(sock, self._ctx.read_size)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            transport._fatal_error(exc, "Fatal read error on socket transport")
            return
        if not data:
            transport._read_ready__on_eof()
            return
        try:
            self.data_received(data)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            transport._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")

    def _framer_timeout(self) -> None:
        self._framer_timer = None
        if not self._closing and (messages := self._framer.timeout()):
            if not self._framer.partial:
                self._message_started = 0.0  # the waiting bytes are a whole message now
            self._handle(messages)

    def _queue(self, messages: list[Message]) -> None:
        if self._pending is None:
            self._pending = collections.deque()
        self._pending.extend(messages)
        if len(self._pending) >= self._ctx.max_pending_messages:
            self._pause_reading(_PAUSED_BY_QUEUE)

    def _requeue(self, left: list[Message]) -> None:
        """Put the messages not yet handled back at the front of ``_pending``."""
        if not left:
            return
        if self._pending is None:
            self._pending = collections.deque()
        self._pending.extendleft(reversed(left))
        if len(self._pending) >= self._ctx.max_pending_messages:
            self._pause_reading(_PAUSED_BY_QUEUE)

    def _pump(self) -> None:
        """Handle what waits, queued messages first and then the framer's unparsed
        input, while nothing holds it up; resume reading when little is left."""
        pending = self._pending
        framer = self._framer
        while self._waiting is None and not self._writes_paused and not self._closing:
            if pending:
                chunk = [pending.popleft() for _ in range(min(len(pending), _DRAIN_CHUNK))]
            elif framer.unparsed:
                chunk = framer.feed(b"")
                if framer.overflow:
                    chunk.append(_OVERFLOW)
            else:
                break
            self._dispatch(chunk)
            pending = self._pending  # _dispatch may have made the queue
        if not pending or len(pending) <= self._ctx.max_pending_messages // 2:
            self._resume_reading(_PAUSED_BY_QUEUE)
        if self._closing or self._waiting is not None or self._pending or framer.unparsed:
            return
        if self._eof or (self._ctx.stopping and not framer.partial):
            stopping = self._ctx.stopping
            self._close(_SERVER_SHUTDOWN if stopping else _PEER_CLOSED)

    # -- async handlers -----------------------------------------------------------------

    def _await(self, awaitable: Any, hook: str = "on_message") -> None:
        self._waiting = awaitable
        self._waiting_hook = hook
        if self._task is None:
            # The awaiting itself is plain Python: see netframe._awaiting.
            self._task = asyncio.ensure_future(run_handler_calls(self))

    def _background(self, awaitable: Any, hook: str) -> None:
        """Run an async ``on_disconnect`` to the end; a stopping server waits for it."""

        task = asyncio.ensure_future(finish(awaitable, lambda: self._handler_failed(hook)))
        self._ctx.background.add(task)
        task.add_done_callback(self._ctx.background.discard)

    # -- refusing bad input -------------------------------------------------------------

    def _refuse(self, reply: bytes, reason: CloseReason) -> None:
        """Turn away a new connection over a cap: one error line, then close."""
        self._closing = True
        self.close_reason = reason
        transport = self._transport
        if transport is not None:
            transport.write(self._framer.encode(reply, LF))
            self._end(transport)
        self._ctx.refused(reason.value, 1, self.network)

    def _refuse_undecodable(self) -> None:
        self._undecodable += 1
        if self._undecodable == 1:
            self.log.warning(UNDECODABLE_EVENT, encoding=self._ctx.encoding)
        # Answered like any reply: with the message's own line ending, or none if bare.
        self._reply_error(self._ctx.undecodable_reply, self._terminator)

    def _refuse_overlong(self) -> None:
        limit = self._ctx.config.max_line_bytes
        self.log.warning("line_too_long", max_line_bytes=limit)
        self._reply_error(self._ctx.line_limit_reply)
        self._close(CloseReason.LINE_TOO_LONG)

    def _reply_error(self, text: bytes, terminator: bytes = LF) -> None:
        """An ``Error: ...`` reply, framed as the connection frames replies (a line by
        default, whatever message it answers: the client must be able to read it)."""
        self.messages_out += 1
        line = self._framer.encode(text, terminator)
        if self._replying:
            self._add_reply(line)
        else:
            self._write(line)

    def _handler_failed(self, hook: str, *, cancelled: bool = False) -> None:
        if cancelled:
            self.log.error(HANDLER_ERROR_EVENT, hook=hook, error="an await was cancelled")
        else:
            self.log.exception(HANDLER_ERROR_EVENT, hook=hook)
        self._close(CloseReason.HANDLER_ERROR)

    # -- closing ------------------------------------------------------------------------

    def _close(self, reason: CloseReason) -> None:
        """Close after the queued replies are written; ``reason`` goes in the log."""
        if self._closing:
            return
        self._closing = True
        if self.close_reason in (None, _PEER_CLOSED):
            self.close_reason = reason
        self._closed_at = self._ctx.now
        if not self._replying:  # else the batch's end closes, once its replies are written
            self._close_transport()

    def _close_transport(self) -> None:
        transport = self._transport
        if transport is None:
            return
        if self._registered and transport.get_write_buffer_size():
            self._schedule_check()  # a peer that never reads must not hold the close open
        self._end(transport)

    def _end(self, transport: _Transport) -> None:
        """``transport.close()``, after ``write_eof()`` on a loop that needs it (rloop)."""
        if self._ctx.eof_before_close and transport.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                transport.write_eof()
        transport.close()

    def _abort(self, reason: CloseReason) -> None:
        self._closing = True
        if self.close_reason in (None, _PEER_CLOSED):
            self.close_reason = reason
        if self._replying:  # replies of the batch being handled are not written
            self._reply = self._batch = None
        self._reset()

    def _reset(self) -> None:
        """Abort the transport with a reset: the peer learns the session failed, and the
        kernel drops unsent bytes instead of holding them for a peer that does not read."""
        transport = self._transport
        if transport is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock = transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_LINGER)
            transport.abort()

    # -- flow control -------------------------------------------------------------------

    def _pause_reading(self, reason: int) -> None:
        if not self._pause_reasons and self._transport is not None:
            self._transport.pause_reading()
        self._pause_reasons |= reason

    def _resume_reading(self, reason: int) -> None:
        if not self._pause_reasons & reason:
            return
        self._pause_reasons &= ~reason
        if not self._pause_reasons and self._transport is not None and not self._closing:
            self._transport.resume_reading()
            if self._message_started:  # the client could not send while we did not read
                self._message_started = self._ctx.now
