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
