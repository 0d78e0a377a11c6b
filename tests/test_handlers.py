"""Handlers, driven in memory: the built-ins, name resolution, and the testing helper."""

from __future__ import annotations

import asyncio

import pytest

from netframe import EchoHandler, GreetingHandler, Handler, HandlerError, resolve_handler
from netframe.testing import MemoryConnection


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


def test_handler_instances_hold_per_connection_state() -> None:
    class Counter(Handler):
        def __init__(self) -> None:
            self.seen = 0

        def on_message(self, conn: object, message: str) -> None:
            self.seen += 1
            conn.send(str(self.seen))  # type: ignore[attr-defined]

    first, second = MemoryConnection(Counter), MemoryConnection(Counter)
    first.receive("a")
    assert first.receive("b") == [b"2"]
    assert second.receive("a") == [b"1"]


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
