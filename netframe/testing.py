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
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from netframe._endpoint import format_peer
from netframe.config import Config
from netframe.handlers import Handler, Message, Transport
from netframe.logs import get_logger
from netframe.loops import loop_factory
from netframe.server import Server

__all__ = ["MemoryConnection", "server_thread", "serving"]


class MemoryConnection:
    """An in-memory :class:`~netframe.Connection` that drives one handler.

    Replies are recorded as the bytes that would go on the wire: encoded, and ended with
    ``terminator`` (``b""`` like a bare or raw client, ``b"\\n"`` like a line client).
    Like the real endpoints, messages after :meth:`close` are not handed to the handler,
    and text handlers never see bytes that do not decode (``receive`` raises instead,
    since that is the server's business, not the handler's).
    """

    def __init__(
        self,
        handler: Handler | Callable[[], Handler],
        *,
        transport: Transport = "tcp",
        peer: tuple[Any, ...] = ("127.0.0.1", 50000),
        encoding: str = "utf-8",
        terminator: bytes = b"",
    ) -> None:
        self.handler = handler if isinstance(handler, Handler) else handler()
        self.transport: Transport = transport
        self.peer = peer
        self.id = 1 if transport == "tcp" else 0
        self.log: Any = get_logger().bind(transport=transport, peer=format_peer(peer), conn=self.id)
        self.encoding = encoding
        self.terminator = terminator
        #: Every reply so far, in order.
        self.sent: list[bytes] = []
        self.closed = False

    # -- the Connection interface ---------------------------------------------------------

    def send(self, message: Message) -> None:
        if not self.closed:
            data = message.encode(self.encoding) if isinstance(message, str) else message
            self.sent.append(data + self.terminator)

    def close(self) -> None:
        self.closed = True

    # -- driving the handler ----------------------------------------------------------------

    def connect(self) -> list[bytes]:
        """Call ``on_connect``; return the replies it made.

        Raises:
            TypeError: ``on_connect`` is async; use :meth:`aconnect`.
        """
        return self._replies(lambda: _no_await(self.handler.on_connect(self), "aconnect()"))

    async def aconnect(self) -> list[bytes]:
        """Like :meth:`connect`, awaiting an async ``on_connect``."""
        start = len(self.sent)
        result = self.handler.on_connect(self)
        if result is not None:
            await result
        return self.sent[start:]

    def receive(self, message: Message) -> list[bytes]:
        """Hand one message to ``on_message``; return the replies it made.

        Raises:
            TypeError: the handler is async; use :meth:`areceive`.
            UnicodeDecodeError: ``bytes`` for a text handler that do not decode.
        """

        return self._replies(lambda: _no_await(self._deliver(message), "areceive(...)"))

    async def areceive(self, message: Message) -> list[bytes]:
        """Like :meth:`receive`, awaiting an async ``on_message``."""
        start = len(self.sent)
        result = self._deliver(message)
        if result is not None:
            await result
        return self.sent[start:]

    def disconnect(self) -> None:
        """Call ``on_disconnect``, as when the peer leaves.

        Raises:
            TypeError: ``on_disconnect`` is async; use :meth:`adisconnect`.
        """
        self.closed = True
        _no_await(self.handler.on_disconnect(self), "adisconnect()")

    async def adisconnect(self) -> None:
        """Like :meth:`disconnect`, awaiting an async ``on_disconnect``."""
        self.closed = True
        result = self.handler.on_disconnect(self)
        if result is not None:
            await result

    def _deliver(self, message: Message) -> Awaitable[None] | None:
        if self.closed:
            return None
        if self.handler.text and isinstance(message, bytes):
            message = message.decode(self.encoding)
        elif not self.handler.text and isinstance(message, str):
            message = message.encode(self.encoding)
        return self.handler.on_message(self, message)

    def _replies(self, call: Callable[[], None]) -> list[bytes]:
        start = len(self.sent)
        call()
        return self.sent[start:]


def _no_await(result: Awaitable[None] | None, instead: str) -> None:
    if result is not None:
        if asyncio.iscoroutine(result):
            result.close()
        raise TypeError(f"the hook is async: use `await conn.{instead}`")


def _loopback_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """A free 127.0.0.1 port for each transport not given, unless the other transport was
    given listeners of its own: ``udp=[]`` means TCP only, ``tcp=[...]`` that TCP only."""
    given = dict(settings)
    for transport, other in (("tcp", "udp"), ("udp", "tcp")):
        if transport not in given and not given.get(other):
            settings = {**settings, transport: ["127.0.0.1:0"]}
    return settings


@contextlib.asynccontextmanager
async def serving(config: Config | None = None, **settings: Any) -> AsyncIterator[Server]:
    """Run a :class:`~netframe.Server` for the ``async with`` block, then stop it.

    With no listeners given it binds TCP and UDP on free ports of 127.0.0.1; learn them
    with ``server.address("tcp")``.
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
