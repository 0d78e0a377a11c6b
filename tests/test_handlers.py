"""Handlers: the built-ins, name resolution and the testing helper, driven in memory; and
how the server makes handlers (one per TCP connection, one per UDP listener), over real
loopback sockets on both loops."""

from __future__ import annotations

import asyncio

import pytest
from conftest import Client, udp_client, wait_until

from netframe import (
    Connection,
    EchoHandler,
    GreetingHandler,
    Handler,
    HandlerError,
    resolve_handler,
)
from netframe.testing import MemoryConnection, serving


def test_greeting_follows_the_seeds() -> None:
    conn = MemoryConnection(GreetingHandler)
    assert conn.connect() == [b"Welcome!"]
    assert conn.receive("Michael") == [b"Hello, Michael!"]
    assert conn.receive("exit") == []
    assert conn.closed
    assert conn.receive("Tracy") == []  # nothing after exit is answered


def test_greeting_replies_carry_the_line_ending_and_encoding() -> None:
    conn = MemoryConnection(GreetingHandler, terminator=b"\r\n", encoding="gbk")
    assert conn.receive("世界") == ["Hello, 世界!\r\n".encode("gbk")]


def test_echo_is_byte_exact_even_for_undecodable_bytes() -> None:
    conn = MemoryConnection(EchoHandler)
    assert conn.connect() == []
    assert conn.receive(b"\xff\x00abc") == [b"\xff\x00abc"]


@pytest.mark.asyncio
@pytest.mark.usefixtures("loop_checked")
async def test_each_tcp_connection_gets_its_own_handler_and_a_udp_listener_one() -> None:
    made: list[Handler] = []

    class Counter(Handler):
        """Answers each message with how many messages this instance has seen."""

        def __init__(self) -> None:
            self.seen = 0
            made.append(self)

        def on_message(self, conn: Connection, message: str) -> None:
            self.seen += 1
            conn.send(f"{message} {self.seen}")

    async with serving(handler=Counter, framing="line") as server:
        assert len(made) == 1  # the UDP listener's, made when it was bound
        async with Client.connect(server) as first, Client.connect(server) as second:
            # Interleaved on two open connections: neither count leaks into the other.
            await first.send(b"a\n")
            await first.expect(b"a 1\n")
            await second.send(b"a\n")
            await second.expect(b"a 1\n")
            await first.send(b"b\n")
            await first.expect(b"b 2\n")
            await second.send(b"b\n")
            await second.expect(b"b 2\n")
            await first.send(b"c\n")
            await first.expect(b"c 3\n")
        async with Client.connect(server) as third:  # a new connection starts afresh
            await third.send(b"a\n")
            await third.expect(b"a 1\n")
        await wait_until(lambda: len(made) == 4, "a handler made for each of three connections")
        assert len({id(handler) for handler in made}) == 4
        # UDP: one handler for the whole listener, whoever sends.
        async with await udp_client(server) as one, await udp_client(server) as two:
            assert await one.request(b"x") == b"x 1"
            assert await two.request(b"y") == b"y 2"
            assert await one.request(b"z") == b"z 3"
        assert len(made) == 4


@pytest.mark.asyncio
async def test_async_handler_needs_areceive() -> None:
    class Lookup(Handler):
        async def on_message(self, conn: object, message: str) -> None:
            await asyncio.sleep(0)
            conn.send(message.upper())  # type: ignore[attr-defined]

    conn = MemoryConnection(Lookup)
    with pytest.raises(TypeError, match="areceive"):
        conn.receive("x")
    assert await conn.areceive("bob") == [b"BOB"]


def test_resolve_builtin_and_dotted_names() -> None:
    assert resolve_handler("greeting") is GreetingHandler
    assert resolve_handler("echo") is EchoHandler
    assert resolve_handler("netframe.handlers.echo:EchoHandler") is EchoHandler
    assert resolve_handler(EchoHandler) is EchoHandler


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("nosuch", "unknown handler 'nosuch'"),
        ("no_such_module_xyz:Handler", "cannot import handler module"),
        ("netframe.handlers.echo:Nope", "has no attribute 'Nope'"),
        ("netframe.config:DEFAULT_PORT", "is not a class or callable"),
        ("netframe:", "unknown handler"),
    ],
)
def test_resolve_errors_are_one_line(spec: str, reason: str) -> None:
    with pytest.raises(HandlerError, match=reason) as info:
        resolve_handler(spec)
    assert "\n" not in str(info.value)


# -- however a handler defines its hooks, they are called as written ------------------------
# The endpoint looks a handler class's hooks up once (netframe._endpoint.HandlerHooks);
# these handlers define them in every other way a user might, and each must behave over
# a real socket exactly as its class says.


class _TextFromInit(Handler):
    """Sets ``text`` on the instance: messages arrive as bytes."""

    def __init__(self) -> None:
        self.text = False

    def on_message(self, conn: Connection, message: object) -> None:
        conn.send(type(message).__name__)


class _TextProperty(Handler):
    @property
    def text(self) -> bool:  # type: ignore[override]
        return False

    def on_message(self, conn: Connection, message: object) -> None:
        conn.send(type(message).__name__)


class _HookFromInit(Handler):
    """Binds its own ``on_message`` and ``on_connect`` per instance."""

    def __init__(self) -> None:
        self.on_message = self._shout  # type: ignore[method-assign]
        self.on_connect = self._greet  # type: ignore[method-assign]

    def _greet(self, conn: Connection) -> None:
        conn.send("hi")

    def _shout(self, conn: Connection, message: str) -> None:
        conn.send(message.upper())


class _Static(Handler):
    @staticmethod
    def on_message(conn: Connection, message: str) -> None:  # type: ignore[override]
        conn.send(f"static {message}")


class _Duck:
    """No Handler base class: only the hooks, as plain methods."""

    text = True

    def on_connect(self, conn: Connection) -> None:
        conn.send("duck")

    def on_message(self, conn: Connection, message: str) -> None:
        conn.send(f"quack {message}")

    def on_disconnect(self, conn: Connection) -> None:
        _DISCONNECTED.append(conn.close_reason)


class _Greets(GreetingHandler):
    """A subclass of a built-in handler that adds on_disconnect."""

    __slots__ = ()

    def on_disconnect(self, conn: Connection) -> None:
        _DISCONNECTED.append(conn.close_reason)


_DISCONNECTED: list[object] = []


@pytest.mark.asyncio
@pytest.mark.usefixtures("loop_checked")
@pytest.mark.parametrize(
    ("handler", "greeting", "reply"),
    [
        (_TextFromInit, b"", b"bytes\n"),
        (_TextProperty, b"", b"bytes\n"),
        (_HookFromInit, b"hi\n", b"BOB\n"),
        (_Static, b"", b"static bob\n"),
        (_Duck, b"duck\n", b"quack bob\n"),
        (_Greets, b"Welcome!\n", b"Hello, bob!\n"),
    ],
)
async def test_hooks_are_called_however_the_handler_defines_them(
    handler: type, greeting: bytes, reply: bytes
) -> None:
    _DISCONNECTED.clear()
    async with serving(handler=handler, framing="line") as server:
        for _ in range(2):  # the second connection meets the hooks the first looked up
            async with Client.connect(server) as client:
                await client.expect(greeting)
                await client.send(b"bob\n")
                await client.expect(reply)
        if handler in (_Duck, _Greets):
            await wait_until(lambda: len(_DISCONNECTED) == 2, "on_disconnect for each")
            assert {str(reason) for reason in _DISCONNECTED} == {"peer_closed"}


@pytest.mark.asyncio
@pytest.mark.usefixtures("loop_checked")
async def test_a_factory_making_handlers_of_two_classes_gets_each_class_hooks() -> None:
    made = 0

    def factory() -> Handler:
        nonlocal made
        made += 1
        return GreetingHandler() if made % 2 else _TextFromInit()

    async with serving(handler=factory, framing="line") as server:
        made = 0  # the UDP listener's handler and resolve_handler's trial are not counted
        for expected in (b"Welcome!\nHello, a!\n", b"bytes\n") * 2:
            async with Client.connect(server) as client:
                await client.send(b"a\n")
                await client.expect(expected)
