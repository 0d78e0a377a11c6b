"""The UDP endpoint: an ``asyncio.DatagramProtocol`` that hands each datagram to a handler.

Each datagram is one message. In ``auto`` and ``line`` framing one trailing line ending
is taken off and put back on the replies (``nc -u`` sends ``Bob\\n`` and gets
``Hello, Bob!\\n``); ``raw`` passes datagrams as they are. Each ``send`` is one datagram
back to the sender.

One handler instance serves the whole listener (UDP has no connections, and a handler
per source address would let spoofed traffic grow memory without bound).

The source address of a datagram can be forged, so every reply may land on a victim.
Before the handler sees a datagram it passes these guards, cheapest first, and a
datagram that fails one is dropped without a reply:

- size: larger than ``udp_max_datagram_bytes`` (and no reply larger than that is sent);
- source port below 1024 (DNS, NTP and other services: a reply there is a reflection),
  unless listed in ``udp_allow_ports``;
- rate: ``udp_rate`` datagrams a second per source address (the port does not count, so
  a client cannot reset its bucket by changing port; IPv6 sources count per /64, what
  one host usually holds), with a burst of as many;
- empty or blank, and bytes that do not decode for a text handler.

Replies are dropped too while the transport asks us to pause writing: UDP has nothing to
slow down, and queueing would only grow memory. Every drop is counted per reason and
summarised in a ``datagrams_dropped`` warning at most once a second.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Hashable
from typing import Any, Final, Protocol

from structlog.typing import FilteringBoundLogger

from netframe._awaiting import finish
from netframe._endpoint import (
    HANDLER_ERROR_EVENT,
    SUMMARY_INTERVAL_S,
    EndpointContext,
    format_peer,
    normalise_host,
)
from netframe.framing import split_terminator
from netframe.handlers import CloseReason, Handler, InetAddress, PeerAddress, TlsInfo
from netframe.limits import EventSummary, SourceRateLimiter

__all__ = ["UdpEndpoint"]

DROPPED_EVENT: Final = "datagrams_dropped"
#: Source ports below this are services' ports; see the module docstring.
_FIRST_CLIENT_PORT: Final = 1024


class UdpPeer:
    """The sender of one datagram, as a handler sees it (a :class:`~netframe.Connection`).

    Every send is one datagram back to ``addr``, ended as the datagram it answers was,
    also when a handler keeps the peer and sends to it later. ``close()`` and
    ``abort()`` both mean "no more replies to this datagram".
    """

    __slots__ = ("_closed", "_endpoint", "_peer", "_terminator", "addr")

    network: Final = "udp"
    id: Final = 0
    tls: Final[TlsInfo | None] = None
    via: Final[PeerAddress | None] = None
    close_reason: Final[CloseReason | None] = None

    def __init__(self, endpoint: UdpEndpoint, addr: tuple[Any, ...], terminator: bytes) -> None:
        self._endpoint = endpoint
        #: The source address as the socket gave it.
        self.addr = addr
        self._peer: InetAddress | None = None  # made on first use: most handlers never ask
        self._terminator = terminator
        self._closed = False

    @property
    def peer(self) -> InetAddress | None:
        if self._peer is None:
            self._peer = InetAddress.from_sockaddr(self.addr)
        return self._peer

    @property
    def local(self) -> PeerAddress | None:
        return self._endpoint.local

    @property
    def log(self) -> FilteringBoundLogger:
        return self._endpoint.log.bind(peer=format_peer(self.addr))

    def send(self, message: Any) -> None:  # str | bytes; a bytes-like is copied, never kept
        if self._closed:
            return
        if isinstance(message, str):
            ctx = self._endpoint.ctx
            message = message.encode() if ctx.utf8 else message.encode(ctx.encoding)
        elif type(message) is not bytes:
            message = bytes(memoryview(message))  # (TypeError for what is not bytes-like)
        self._endpoint.send_datagram(message + self._terminator, self.addr)

    def close(self) -> None:
        self._closed = True

    def abort(self) -> None:
        self._closed = True


def source_key(host: str) -> Hashable:
    """The rate limiter's key for a source: the IPv4 address, or the IPv6 /64."""
    if ":" not in host:
        return host
    host = normalise_host(host)
    if ":" not in host:
        return host
    try:
        return socket.inet_pton(socket.AF_INET6, host.partition("%")[0])[:8]
    except OSError:
        return host


class _DatagramTransport(Protocol):
    """What the endpoint uses of its transport (uvloop's does not subclass asyncio's)."""

    def sendto(self, data: bytes, addr: Any = None) -> None: ...
    def is_closing(self) -> bool: ...
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


class UdpEndpoint:
    """One UDP listener: an asyncio datagram protocol by its methods (see TcpEndpoint)."""

    __slots__ = (
        "_allow_ports",
        "_limiter",
        "_max_bytes",
        "_on_message",
        "_paused",
        "_summary",
        "_tasks",
        "_text",
        "_transport",
        "ctx",
        "handler",
        "local",
        "log",
    )

    def __init__(self, ctx: EndpointContext, handler: Handler) -> None:
        config = ctx.config
        self.ctx = ctx
        self.handler = handler
        # The one handler's method and text flag, looked up once for the listener's
        # life rather than by name for every datagram.
        self._on_message = handler.on_message
        self._text = bool(getattr(handler, "text", True))  # (as TCP reads a duck's)
        self.log: FilteringBoundLogger = ctx.log.bind(transport="udp")
        self._transport: _DatagramTransport | None = None
        #: The listener's own address, ``conn.local`` of every datagram it receives.
        self.local: InetAddress | None = None
        self._tasks: set[Any] = set()  # tasks of whatever kind the loop makes
        self._max_bytes = config.udp_max_datagram_bytes
        self._allow_ports = frozenset(config.udp_allow_ports)
        self._limiter = (
            SourceRateLimiter(config.udp_rate, config.udp_rate, config.udp_rate_sources)
            if config.udp_rate
            else None
        )
        self._paused = False
        self._summary = EventSummary(SUMMARY_INTERVAL_S)

    def connection_made(self, transport: _DatagramTransport) -> None:
        self._transport = transport
        self.local = InetAddress.from_sockaddr(transport.get_extra_info("sockname"))

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        ctx = self.ctx
        totals = ctx.counters.udp  # metrics
        totals.received += 1
        totals.bytes_in += len(data)
        if len(data) > self._max_bytes:
            self._drop("too_large", addr, size=len(data))
            return
        if addr[1] < _FIRST_CLIENT_PORT and addr[1] not in self._allow_ports:
            self._drop("low_source_port", addr)
            return
        limiter = self._limiter
        if limiter is not None and not limiter.allow(source_key(addr[0]), ctx.now):
            self._drop("rate_limited", addr)
            return
        if ctx.strip_datagram_terminator:
            payload, terminator = split_terminator(data)
        else:
            payload, terminator = data, b""
        if not payload or payload.isspace():
            self._drop("empty", addr)
            return
        if ctx.debug:
            self.log.debug("datagram_received", peer=format_peer(addr), size=len(data))
        message: str | bytes = payload
        if self._text:
            try:
                message = payload.decode() if ctx.utf8 else payload.decode(ctx.encoding)
            except UnicodeDecodeError:
                self._drop("undecodable", addr)
                return
        peer = UdpPeer(self, addr, terminator)
        try:
            result = self._on_message(peer, message)
        except Exception:
            self._handler_failed(addr)
            return
        if result is not None:
            self._start_async(result, peer)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable after a client left) are routine for a UDP server.
        if self.ctx.debug:
            self.log.debug("udp_error", error=str(exc))

    def connection_lost(self, exc: Exception | None) -> None:
        for task in self._tasks:
            task.cancel()
        self.flush_summaries(final=True)  # the listener is gone: nothing comes later

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False

    def send_datagram(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """Send one datagram unless it is too large, writing is paused or we are closing."""
        if len(data) > self._max_bytes:
            self._drop("reply_too_large", addr, size=len(data))
            return
        if self._paused:
            self._drop("send_paused", addr)
            return
        transport = self._transport
        if transport is not None and not transport.is_closing():
            try:
                transport.sendto(data, addr)
            except BlockingIOError:  # a transport that does not queue: the buffer is full
                self._drop("send_paused", addr)
                return
            totals = self.ctx.counters.udp  # metrics
            totals.sent += 1
            totals.bytes_out += len(data)

    def prune(self) -> None:
        """Forget rate-limit state that no longer matters (called by the server's tick)."""
        if self._limiter is not None and len(self._limiter) > self.ctx.config.udp_rate_sources // 2:
            self._limiter.prune(self.ctx.now)

    def flush_summaries(self, *, final: bool = False) -> None:
        """Log drop counts still waiting whose interval has passed, or all (``final``)."""
        for reason, total in self._summary.flush(self.ctx.now, final=final):
            self.log.warning(DROPPED_EVENT, reason=reason, dropped=total)

    def _start_async(self, awaitable: Any, peer: UdpPeer) -> None:
        if len(self._tasks) >= self.ctx.config.max_pending_messages:
            # Datagrams are not queued: past the limit the newest is dropped, as the
            # network would drop it under load.
            self._drop("async_handler_busy", peer.addr)
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            return
        # The awaiting itself is plain Python: see netframe._awaiting.
        task = asyncio.ensure_future(finish(awaitable, lambda: self._handler_failed(peer.addr)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _handler_failed(self, addr: tuple[Any, ...]) -> None:
        """A handler error costs one datagram; its traceback is logged once a second at most.

        Any sender, forged or not, can trigger one, so a flood of them must not become a
        flood of tracebacks.
        """
        self.ctx.counters.udp.drop(HANDLER_ERROR_EVENT)  # metrics
        total = self._summary.add(HANDLER_ERROR_EVENT, self.ctx.now)
        if total is not None:
            self.log.exception(
                HANDLER_ERROR_EVENT, hook="on_message", peer=format_peer(addr), dropped=total
            )

    def _drop(self, reason: str, addr: tuple[Any, ...], **fields: Any) -> None:
        """Count a datagram that gets no answer; summarise at most once a second a reason."""
        if self.ctx.debug:
            self.log.debug("datagram_dropped", reason=reason, peer=format_peer(addr), **fields)
        self.ctx.counters.udp.drop(reason)  # metrics
        total = self._summary.add(reason, self.ctx.now)
        if total is not None:
            self.log.warning(DROPPED_EVENT, reason=reason, dropped=total)
