"""The UDP endpoint: an ``asyncio.DatagramProtocol`` that hands each datagram to a handler.

Each datagram is one message. In ``auto`` and ``line`` framing one trailing line ending
is taken off and put back on the replies (``nc -u`` sends ``Bob\\n`` and gets
``Hello, Bob!\\n``); ``raw`` passes datagrams as they are. Each ``send`` is one datagram
back to the sender.

One handler instance serves the whole listener (UDP has no connections, and a handler
per source address would let spoofed traffic grow memory without bound). Datagrams that
do not decode are dropped, not answered: an error reply to a forged source address would
make us a reflector. Such drops are counted and logged at most once per
``_DROP_LOG_INTERVAL_S``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, Final, cast

from netframe._endpoint import (
    HANDLER_ERROR_EVENT,
    UNDECODABLE_EVENT,
    EndpointContext,
    format_peer,
)
from netframe.framing import split_terminator
from netframe.handlers import Handler

__all__ = ["UdpEndpoint"]

# Dropped-datagram warnings are summarised at most this often, so a flood of garbage
# cannot turn into a flood of log lines.
_DROP_LOG_INTERVAL_S: Final = 10.0


class UdpPeer:
    """The sender of one datagram, as a handler sees it (a :class:`~netframe.Connection`)."""

    __slots__ = ("_closed", "_endpoint", "_terminator", "peer")

    transport: Final = "udp"
    id: Final = 0

    def __init__(self, endpoint: UdpEndpoint, peer: tuple[Any, ...], terminator: bytes) -> None:
        self._endpoint = endpoint
        self.peer = peer
        self._terminator = terminator
        self._closed = False

    @property
    def log(self) -> Any:
        return self._endpoint.log.bind(peer=format_peer(self.peer))

    def send(self, message: str | bytes) -> None:
        if self._closed:
            return
        if isinstance(message, str):
            message = message.encode(self._endpoint.ctx.encoding)
        self._endpoint.send_datagram(message + self._terminator, self.peer)

    def close(self) -> None:
        self._closed = True


class UdpEndpoint(asyncio.DatagramProtocol):
    """One UDP listener."""

    __slots__ = (
        "_dropped",
        "_last_drop_log",
        "_tasks",
        "_transport",
        "ctx",
        "handler",
        "log",
    )

    def __init__(self, ctx: EndpointContext, handler: Handler) -> None:
        self.ctx = ctx
        self.handler = handler
        self.log: Any = ctx.log.bind(transport="udp")
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._dropped = 0
        self._last_drop_log = -_DROP_LOG_INTERVAL_S

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports implement the interface without subclassing it.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        ctx = self.ctx
        if ctx.strip_datagram_terminator:
            payload, terminator = split_terminator(data)
        else:
            payload, terminator = data, b""
        if ctx.debug:
            self.log.debug("datagram_received", peer=format_peer(addr), size=len(data))
        message: str | bytes = payload
        if self.handler.text:
            try:
                message = payload.decode(ctx.encoding)
            except UnicodeDecodeError:
                self._drop("datagrams_dropped", reason=UNDECODABLE_EVENT)
                return
        peer = UdpPeer(self, addr, terminator)
        try:
            result = self.handler.on_message(peer, message)
        except Exception:
            self._drop(
                HANDLER_ERROR_EVENT, exc_info=True, hook="on_message", peer=format_peer(addr)
            )
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

    def send_datagram(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """Send one datagram unless the listener is closing."""
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.sendto(data, addr)

    def _start_async(self, awaitable: Awaitable[None], peer: UdpPeer) -> None:
        if len(self._tasks) >= self.ctx.config.max_pending_messages:
            # Datagrams are not queued: past the limit the newest is dropped, as the
            # network would drop it under load.
            self._drop("datagrams_dropped", reason="async_handler_busy")
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            return
        task = asyncio.ensure_future(self._finish(awaitable, peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish(self, awaitable: Awaitable[None], peer: UdpPeer) -> None:
        try:
            await awaitable
        except Exception:
            self._drop(HANDLER_ERROR_EVENT, exc_info=True, hook="on_message",
                       peer=format_peer(peer.peer))  # fmt: skip

    def _drop(self, event: str, exc_info: bool = False, **fields: Any) -> None:
        """Count a datagram that got no answer; log at most one line per interval.

        Any sender, forged or not, can cause these, so a flood of them must not become
        a flood of log lines (or of tracebacks, for handler errors).
        """
        self._dropped += 1
        now = asyncio.get_running_loop().time()
        if now - self._last_drop_log >= _DROP_LOG_INTERVAL_S:
            self._last_drop_log = now
            log = self.log.exception if exc_info else self.log.warning
            log(event, dropped_total=self._dropped, **fields)
