"""The TCP endpoint: an ``asyncio.Protocol`` that moves bytes between a socket and a handler.

One :class:`TcpEndpoint` per connection. It is also the :class:`~netframe.Connection`
its handler sees, so a connection costs one protocol object, one handler and one framer.

The walk of a chunk: ``data_received`` -> ``Framer.feed`` -> for each message, decode
and ``handler.on_message`` -> replies collect in a list -> one ``transport.write`` for
the batch. Plain handlers run inline with no task. A handler whose ``on_message``
returns an awaitable gets one task per connection, started only then, and this
connection's later messages queue behind it so replies keep their order.

Protection: a client that sends but never reads fills our write buffer past the high
mark, and we stop reading from it until it drains; an async handler's queue past
``max_pending_messages`` pauses reading the same way. An overlong line and bytes that do
not decode get an ``Error: ...`` line; the first closes the connection, the second does
not. Each logs one warning per connection, never one per message.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Iterable
from typing import Any, Final, cast

from netframe._endpoint import (
    HANDLER_ERROR_EVENT,
    UNDECODABLE_EVENT,
    EndpointContext,
    format_peer,
)
from netframe.framing import LF, Message
from netframe.handlers import Handler

__all__ = ["TcpEndpoint"]

_PAUSED_BY_WRITES: Final = 1
_PAUSED_BY_QUEUE: Final = 2


class TcpEndpoint(asyncio.Protocol):
    """One TCP connection: asyncio transport on one side, framer and handler on the other."""

    __slots__ = (
        "_bare_timer",
        "_batch",
        "_closing",
        "_ctx",
        "_eof",
        "_framer",
        "_handler",
        "_log",
        "_pause_reasons",
        "_peer",
        "_pending",
        "_started",
        "_task",
        "_terminator",
        "_transport",
        "_undecodable",
        "_waiting",
        "bytes_in",
        "bytes_out",
        "id",
        "messages_in",
        "messages_out",
    )

    transport: Final = "tcp"

    def __init__(self, ctx: EndpointContext) -> None:
        self._ctx = ctx
        self._framer = ctx.framer_factory()
        self._handler: Handler | None = None  # made in connection_made, where errors are caught
        self._transport: asyncio.Transport | None = None
        # Replies made while a batch of input is handled; None outside a batch, when
        # sends write straight through (async handlers, after an await).
        self._batch: list[bytes] | None = None
        self._terminator = self._framer.greeting_terminator
        self._closing = False
        self._eof = False
        self._pause_reasons = 0
        self._bare_timer: asyncio.TimerHandle | None = None
        # The handler's async call in flight, the task awaiting it, and what waits behind.
        self._waiting: Awaitable[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: collections.deque[Message] | None = None
        self._undecodable = 0
        self._started = 0.0
        # Bound on first use: a connection that logs nothing never pays for a logger.
        self._log: Any = None
        self._peer: tuple[Any, ...] | None = None
        self.id = ctx.next_id()
        self.bytes_in = self.bytes_out = self.messages_in = self.messages_out = 0

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ctx = self._ctx
        # uvloop transports implement the interface without subclassing it.
        self._transport = transport = cast(asyncio.Transport, transport)
        self._started = time.monotonic()
        if ctx.stopping:
            self._closing = True
            transport.close()
            return
        transport.set_write_buffer_limits(
            high=ctx.config.write_buffer_high_bytes, low=ctx.config.write_buffer_low_bytes
        )
        ctx.connections.add(self)
        if ctx.info:
            self.log.info("connection_opened")
        self._batch = []
        try:
            # The user's factory runs here, not in the listener's protocol factory: an
            # exception there would stop uvloop from accepting any further connection.
            self._handler = ctx.handler_factory()
            self._handler.on_connect(self)
        except Exception:
            self._handler_failed("handler_factory" if self._handler is None else "on_connect")
        self._handle(())

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self._closing:
            return
        if self._bare_timer is not None:
            self._bare_timer.cancel()
            self._bare_timer = None
        self._handle(self._framer.feed(data))

    def eof_received(self) -> bool:
        # The peer finished sending. Bytes an `auto` framer holds as a possible bare
        # message are one now (the seeds' server answers a last word before the close).
        if self._framer.waiting_for_bare_flush and not self._closing:
            self._handle(self._framer.flush())
        if self._waiting is not None and not self._closing:
            self._eof = True
            return True  # keep the transport open until the async handler catches up
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        ctx = self._ctx
        ctx.connections.discard(self)
        if not ctx.connections and ctx.all_closed is not None:
            ctx.all_closed.set()
        self._closing = True
        if self._bare_timer is not None:
            self._bare_timer.cancel()
        if self._task is not None:
            self._task.cancel()
        try:
            if self._handler is not None:
                self._handler.on_disconnect(self)
        except Exception:
            self._handler_failed("on_disconnect")
        if not ctx.info:
            return
        self.log.info(
            "connection_closed",
            reason="reset" if exc is not None else "closed",
            duration_s=round(time.monotonic() - self._started, 6),
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            messages_in=self.messages_in,
            messages_out=self.messages_out,
        )

    def pause_writing(self) -> None:
        self._pause_reading(_PAUSED_BY_WRITES)

    def resume_writing(self) -> None:
        self._resume_reading(_PAUSED_BY_WRITES)

    # -- Connection, as the handler sees it ---------------------------------------------

    @property
    def peer(self) -> tuple[Any, ...]:
        """The peer's address, ``()`` when the socket cannot tell."""
        if self._peer is None:
            try:
                peer = self._transport.get_extra_info("peername") if self._transport else None
            except OSError:  # uvloop asks the closed socket
                peer = None
            self._peer = tuple(peer or ())
        return self._peer

    @property
    def log(self) -> Any:
        """This connection's logger: ``transport``, ``peer`` and ``conn`` bound."""
        if self._log is None:
            self._log = self._ctx.log.bind(
                transport="tcp", peer=format_peer(self.peer), conn=self.id
            )
        return self._log

    def send(self, message: str | bytes) -> None:
        if self._closing:
            return
        if isinstance(message, str):
            message = message.encode(self._ctx.encoding)
        self.messages_out += 1
        batch = self._batch
        if batch is not None:
            batch.append(message + self._terminator)
        else:
            self._write(message + self._terminator)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._batch is None and self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Close at once, dropping unsent replies (used when a shutdown deadline passes)."""
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    # -- the message path ---------------------------------------------------------------

    def _handle(self, messages: Iterable[Message]) -> None:
        """Hand messages to the handler in order, then write all their replies at once.

        When ``on_message`` returns an awaitable, the messages after it wait in
        ``_pending`` until the runner task has awaited it, so replies keep their order.
        """
        if self._batch is None:
            self._batch = []
        if self._waiting is not None:
            self._queue(messages)
        elif not self._closing and (handler := self._handler) is not None:
            ctx = self._ctx
            on_message = handler.on_message
            encoding = ctx.encoding if handler.text else None
            rest = iter(messages)
            for payload, self._terminator in rest:
                if self._closing:
                    break
                self.messages_in += 1
                if ctx.debug:
                    self.log.debug("message_received", size=len(payload))
                message: str | bytes = payload
                if encoding is not None:
                    try:
                        message = payload.decode(encoding)
                    except UnicodeDecodeError:
                        self._refuse_undecodable()
                        continue
                try:
                    result = on_message(self, message)
                except Exception:
                    self._handler_failed("on_message")
                    break
                if result is not None:
                    self._waiting = result
                    self._queue(rest)
                    if self._task is None:
                        self._task = asyncio.ensure_future(self._run_async())
                    break
        framer = self._framer
        if (framer.overflow or framer.waiting_for_bare_flush) and not self._closing:
            self._framer_needs_attention()
        batch, self._batch = self._batch, None
        transport = self._transport
        if transport is None:
            return
        if batch:
            data = batch[0] if len(batch) == 1 else b"".join(batch)
            self.bytes_out += len(data)
            transport.write(data)
        if self._closing:
            transport.close()

    def _framer_needs_attention(self) -> None:
        if self._framer.overflow:
            self._refuse_overlong_line()
        else:
            delay = self._ctx.config.bare_message_delay_s
            self._bare_timer = asyncio.get_running_loop().call_later(delay, self._bare_flush)

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            self.bytes_out += len(data)
            transport.write(data)

    def _bare_flush(self) -> None:
        self._bare_timer = None
        if not self._closing:
            self._handle(self._framer.flush())

    # -- async handlers -----------------------------------------------------------------

    def _queue(self, messages: Iterable[Message]) -> None:
        if self._pending is None:
            self._pending = collections.deque()
        self._pending.extend(messages)
        if len(self._pending) >= self._ctx.config.max_pending_messages:
            self._pause_reading(_PAUSED_BY_QUEUE)

    async def _run_async(self) -> None:
        """Await the handler's pending call, then hand over what queued behind it, one
        message at a time, until the queue is empty or the handler awaits again."""
        resume_below = self._ctx.config.max_pending_messages // 2
        try:
            while (waiting := self._waiting) is not None:
                await waiting
                self._waiting = None
                pending = self._pending
                while pending and self._waiting is None and not self._closing:
                    self._handle((pending.popleft(),))
                    if len(pending) <= resume_below:
                        self._resume_reading(_PAUSED_BY_QUEUE)
                if self._closing:
                    break
        except Exception:
            self._handler_failed("on_message")
        finally:
            self._task = None
            self._waiting = None
        if self._eof and not self._closing:
            self.close()

    # -- refusing bad input -------------------------------------------------------------

    def _refuse_undecodable(self) -> None:
        self._undecodable += 1
        if self._undecodable == 1:
            self.log.warning(UNDECODABLE_EVENT, encoding=self._ctx.encoding)
        # Answered like any reply: with the message's own line ending, or none if bare.
        self._reply_error(self._ctx.undecodable_reply + self._terminator)

    def _refuse_overlong_line(self) -> None:
        limit = self._ctx.config.max_line_bytes
        self.log.warning("line_too_long", max_line_bytes=limit)
        self._reply_error(self._ctx.line_limit_reply + LF)
        self.close()

    def _reply_error(self, line: bytes) -> None:
        self.messages_out += 1
        if self._batch is not None:
            self._batch.append(line)
        else:
            self._write(line)

    def _handler_failed(self, hook: str) -> None:
        self.log.exception(HANDLER_ERROR_EVENT, hook=hook)
        self.close()

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
