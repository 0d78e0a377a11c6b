"""Helpers for testing your own handlers and servers.

:class:`MemoryConnection` runs a handler with no socket and no event loop, the way a
unit test wants it::

    conn = MemoryConnection(GreetingHandler)
    assert conn.connect() == [b"Welcome!"]
    assert conn.receive("Bob") == [b"Hello, Bob!"]
    assert conn.receive("exit") == [] and conn.closed

:func:`serving` starts a real server on free loopback ports inside a running event loop;
:func:`server_thread` does the same in a background thread, for tests that use
blocking sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Final

from structlog.typing import FilteringBoundLogger

from netframe._endpoint import format_peer, line_limit_reply, undecodable_reply
from netframe.config import Config
from netframe.framing import make_framer
from netframe.handlers import (
    CloseReason,
    Handler,
    InetAddress,
    Message,
    Network,
    PeerAddress,
    TlsInfo,
)
from netframe.logs import get_logger
from netframe.loops import loop_factory
from netframe.server import Server

__all__ = ["MemoryConnection", "server_thread", "serving"]

_DEFAULTS: Final = Config()
_CLIENT: Final = InetAddress("127.0.0.1", 50000)
_SERVER: Final = InetAddress("127.0.0.1", 9999)
# Each MemoryConnection gets its own id, as each real connection does.
_ids = itertools.count(1)


class MemoryConnection:
    """An in-memory :class:`~netframe.Connection` that drives one handler as the server would.

    Replies are recorded as the bytes that would go on the wire, by the same framer the
    server uses (``framing``, ``auto`` by default) and by the same ending rule: a reply
    ends as the message it answers, the greeting with the framer's greeting ending, a
    push (a send while no message of this connection is being handled) with its push
    ending.

    Two ways in:

    - :meth:`receive` hands over one message, as if it arrived ended with
      ``terminator`` (``None``: ``\\n`` in ``line`` framing, nothing otherwise);
    - :meth:`feed` hands over raw bytes, which the framer cuts into messages exactly
      as on a socket: bytes that do not decode and an overlong message get the server's
      ``Error: ...`` replies.

    Like the real endpoints, messages after :meth:`close` are not handed to the handler.
    ``peer``, ``local``, ``via`` and ``tls`` are what the handler reads as ``conn.peer``
    and so on: pass a :class:`~netframe.TlsInfo` to test a handler as on a TLS
    connection.
    """

    def __init__(
        self,
        handler: Handler | Callable[[], Handler],
        *,
        network: Network = "tcp",
        peer: PeerAddress | None = _CLIENT,
        local: PeerAddress | None = _SERVER,
        via: PeerAddress | None = None,
        tls: TlsInfo | None = None,
        encoding: str = "utf-8",
        framing: str = "auto",
        terminator: bytes | None = None,
        max_line_bytes: int = _DEFAULTS.max_line_bytes,
    ) -> None:
        self.handler = handler if isinstance(handler, Handler) else handler()
        self.network: Network = network
        self.peer = peer
        self.local = local
        self.tls = tls
        self.via = via
        self.id = next(_ids) if network != "udp" else 0
        self.log: FilteringBoundLogger = get_logger().bind(
            transport=network, peer=format_peer(peer), conn=self.id
        )
        self.encoding = encoding
        self.max_line_bytes = max_line_bytes
        self._framer = make_framer(framing, max_line_bytes, _DEFAULTS.bare_message_delay_s)()
        self.terminator = (
            (b"\n" if framing == "line" else b"") if terminator is None else terminator
        )
        # The ending of the message being answered; None when none is (a send is a push).
        self._answering: bytes | None = None
        # Where the replies not yet "written" begin: those of the read being handled
        # synchronously (the endpoint writes them as one batch); None outside one.
        self._unwritten_from: int | None = None
        #: Every reply so far, in order, as wire bytes.
        self.sent: list[bytes] = []
        self.closed = False
        self.close_reason: CloseReason | None = None

    # -- the Connection interface ---------------------------------------------------------

    def send(self, message: Message) -> None:
        """Record ``message`` as the wire bytes the peer would get, ended by the rule."""
        if self.closed:
            return
        if isinstance(message, str):
            data = message.encode(self.encoding)
        else:  # a bytes-like is copied, as the server's connections do
            data = message if type(message) is bytes else bytes(memoryview(message))
        answering = self._answering
        ending = self._framer.push_terminator if answering is None else answering
        self.sent.append(self._framer.encode(data, ending))

    def close(self) -> None:
        """Mark the connection closed by the handler; later messages are not handled."""
        self._end(CloseReason.HANDLER_CLOSED)

    def abort(self) -> None:
        """Like :meth:`close`, and the replies to the message being handled are dropped."""
        # As on a socket, the replies of the read being handled are never written.
        if self._unwritten_from is not None:
            del self.sent[self._unwritten_from :]
        self._end(CloseReason.HANDLER_ABORTED)

    # -- driving the handler ----------------------------------------------------------------

    def connect(self) -> list[bytes]:
        """Call ``on_connect``; return the replies it made (the greeting).

        Raises:
            TypeError: ``on_connect`` is async; use :meth:`aconnect`.
        """
        with self._batch(), self._replying(self._framer.greeting_terminator) as replies:
            _no_await(self.handler.on_connect(self), "aconnect()")
        return replies

    async def aconnect(self) -> list[bytes]:
        """Like :meth:`connect`, awaiting an async ``on_connect``."""
        with self._replying(self._framer.greeting_terminator) as replies:
            await _maybe(self.handler.on_connect(self))
        return replies

    def receive(self, message: Message, terminator: bytes | None = None) -> list[bytes]:
        """Hand one message to ``on_message``; return the replies it made.

        Raises:
            TypeError: the handler is async; use :meth:`areceive`.
            UnicodeDecodeError: ``bytes`` for a text handler that do not decode.
        """
        with self._batch(), self._replying(self._ending(terminator)) as replies:
            _no_await(self._deliver(message), "areceive(...)")
        return replies

    async def areceive(self, message: Message, terminator: bytes | None = None) -> list[bytes]:
        """Like :meth:`receive`, awaiting an async ``on_message``."""
        with self._replying(self._ending(terminator)) as replies:
            await _maybe(self._deliver(message))
        return replies

    def feed(self, data: bytes) -> list[bytes]:
        """Hand over bytes as they would arrive on the socket; return the replies.

        Raises:
            TypeError: the handler is async; use :meth:`afeed`.
        """
        start = len(self.sent)
        with self._batch():
            for message, ending in self._frame(self._framer.feed(data)):
                self.receive(message, ending)
        return self.sent[start:]

    async def afeed(self, data: bytes) -> list[bytes]:
        """Like :meth:`feed`, awaiting an async ``on_message``."""
        start = len(self.sent)
        for message, ending in self._frame(self._framer.feed(data)):
            await self.areceive(message, ending)
        return self.sent[start:]

    def elapse(self) -> list[bytes]:
        """The time the framer asked to wait has passed with nothing new (on a server,
        ``--bare-message-delay`` after an ``auto`` connection's first long read with no
        newline): what it held is handled. Returns the replies (none if nothing waited).
        """
        start = len(self.sent)
        with self._batch():
            for message, ending in self._frame(self._framer.timeout()):
                self.receive(message, ending)
        return self.sent[start:]

    def feed_eof(self) -> list[bytes]:
        """The peer closed its side: what the framer still holds is handled (an ``auto``
        connection's last bare word), then ``on_disconnect`` is called."""
        start = len(self.sent)
        for message, ending in self._frame(self._framer.eof()):
            self.receive(message, ending)
        self.disconnect()
        return self.sent[start:]

    def disconnect(self) -> None:
        """Call ``on_disconnect``, as when the peer leaves (``close_reason`` is then
        ``peer_closed`` unless the handler closed first).

        Raises:
            TypeError: ``on_disconnect`` is async; use :meth:`adisconnect`.
        """
        self._end(CloseReason.PEER_CLOSED)
        _no_await(self.handler.on_disconnect(self), "adisconnect()")

    async def adisconnect(self) -> None:
        """Like :meth:`disconnect`, awaiting an async ``on_disconnect``."""
        self._end(CloseReason.PEER_CLOSED)
        await _maybe(self.handler.on_disconnect(self))

    # -- internals ----------------------------------------------------------------------------

    def _end(self, reason: CloseReason) -> None:
        self.closed = True
        if self.close_reason is None:
            self.close_reason = reason

    def _ending(self, terminator: bytes | None) -> bytes:
        return self.terminator if terminator is None else terminator

    @contextlib.contextmanager
    def _batch(self) -> Iterator[None]:
        """Replies made within the block are one batch, written at its end (outermost
        block only): until then an ``abort()`` drops them, as the endpoint's does."""
        if self._unwritten_from is not None:
            yield
            return
        self._unwritten_from = len(self.sent)
        try:
            yield
        finally:
            self._unwritten_from = None

    @contextlib.contextmanager
    def _replying(self, ending: bytes) -> Iterator[list[bytes]]:
        """Sends within the block answer a message ended by ``ending``; the list it
        gives fills with the replies made in the block."""
        start = len(self.sent)
        outer, self._answering = self._answering, ending
        replies: list[bytes] = []
        try:
            yield replies
        finally:
            self._answering = outer
            replies += self.sent[start:]

    def _frame(self, messages: list[tuple[bytes, bytes]]) -> Iterator[tuple[Message, bytes]]:
        """The framer's messages as the server hands them over: the held-back ones too,
        undecodable ones answered with an error line, an overflow ending the session."""
        framer = self._framer
        while True:
            for payload, ending in messages:
                if self.closed:
                    return
                message: Message = payload
                if self.handler.text:
                    try:
                        message = payload.decode(self.encoding)
                    except UnicodeDecodeError:
                        self._error(undecodable_reply(self.encoding), ending)
                        continue
                yield message, ending
            if framer.overflow and not self.closed:
                self._error(line_limit_reply(self.max_line_bytes), b"\n")
                self._end(CloseReason.LINE_TOO_LONG)
                return
            if not framer.unparsed or self.closed:
                return
            messages = framer.feed(b"")

    def _error(self, reply: bytes, ending: bytes) -> None:
        self.sent.append(self._framer.encode(reply, ending))

    def _deliver(self, message: Message) -> Awaitable[None] | None:
        if self.closed:
            return None
        if self.handler.text and isinstance(message, bytes):
            message = message.decode(self.encoding)
        elif not self.handler.text and isinstance(message, str):
            message = message.encode(self.encoding)
        return self.handler.on_message(self, message)


async def _maybe(result: Awaitable[None] | None) -> None:
    if result is not None:
        await result


def _no_await(result: Awaitable[None] | None, instead: str) -> None:
    if result is not None:
        if asyncio.iscoroutine(result):
            result.close()
        raise TypeError(f"the hook is async: use `await conn.{instead}`")


def _loopback_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """A free 127.0.0.1 port for each transport not given, unless the other transport was
    given listeners of its own: ``udp=[]`` means TCP only, ``tcp=[...]`` that TCP only.
    Unix socket paths or sockets handed over, given alone, are the only listeners."""
    given = dict(settings)
    if given.get("unix") or given.get("sockets"):
        return settings
    for transport, other in (("tcp", "udp"), ("udp", "tcp")):
        if transport not in given and not given.get(other):
            settings = {**settings, transport: ["127.0.0.1:0"]}
    return settings


@contextlib.asynccontextmanager
async def serving(config: Config | None = None, **settings: Any) -> AsyncIterator[Server]:
    """Run a :class:`~netframe.Server` for the ``async with`` block, then stop it.

    With no listeners given it binds TCP and UDP on free ports of 127.0.0.1; learn them
    with ``server.address("tcp")``. Given only ``unix`` paths (or ``sockets``), it
    listens on those alone.
    """
    if config is None:
        settings = _loopback_defaults(settings)
    async with Server(config, **settings) as server:
        yield server


@contextlib.contextmanager
def server_thread(config: Config | None = None, **settings: Any) -> Iterator[Server]:
    """Run a server on its own event loop in a background thread for the ``with`` block.

    The loop is ``config.loop`` (``auto`` by default). Startup errors (a bad address,
    an address in use) are raised here, in the calling thread.
    """
    if config is None:
        settings = _loopback_defaults(settings)
    server = Server(config, **settings)
    started = threading.Event()
    failure: list[BaseException] = []
    loop = loop_factory(server.config.loop)()

    async def main() -> None:
        try:
            await server.start()
        except BaseException as exc:
            failure.append(exc)
            return
        finally:
            started.set()
        await server.serve_forever()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    started.wait()
    try:
        if failure:
            raise failure[0]
        yield server
    finally:
        loop.call_soon_threadsafe(server.stop)
        thread.join()
        loop.close()
