"""Hostile clients against a real netframe server, on both event loops.

Every test talks to a server started with :func:`netframe.testing.serving` over real
loopback sockets, and checks only what a client can see: the exact bytes that come back,
whether the connection is still open, whether other clients are still served, and
``server.connection_count``.

Each test is a plain function that runs its scenario with :class:`asyncio.Runner` on
each loop in ``conftest.LOOPS`` (the parametrized ``run`` fixture), and also checks that
nothing reached the loop's exception handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop
from conftest import LOOPS

from netframe import Server
from netframe.testing import serving

pytestmark = pytest.mark.timeout(30)

LOOPBACK = "127.0.0.1"
ANY_PORT = f"{LOOPBACK}:0"

#: Upper bound for a whole scenario (the test fails, rather than hangs, past it).
SCENARIO_TIMEOUT = 9.0
#: Generous bound for any single reply, connect or close on a busy machine.
REPLY_TIMEOUT = 5.0


WELCOME = {"auto": b"Welcome!", "raw": b"Welcome!", "line": b"Welcome!\n"}

#: Byte strings that are not valid UTF-8, each a different way of getting it wrong.
INVALID_UTF8 = [
    b"\xff",  # never valid
    b"\xfe\xff",  # a UTF-16 byte order mark
    b"caf\xc3",  # sequence cut short at the end
    b"\xe2\x82x",  # sequence cut short in the middle
    b"\xc0\xaf",  # overlong encoding of "/"
    b"\xed\xa0\x80",  # a UTF-16 surrogate
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\x80abc",  # a lone continuation byte
]

Scenario = Callable[[], Awaitable[None]]


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Scenario], None]:
    """Run an async scenario to completion on a fresh loop of the parametrized kind.

    Also fails the test when anything reaches the loop's exception handler (an exception
    in a callback, a task whose exception was never retrieved): a hostile client must
    not make the server blow up in the background either.
    """
    name: str = request.param
    factory = LOOPS[name]

    def run_scenario(scenario: Scenario) -> None:
        async def main() -> None:
            loop = asyncio.get_running_loop()
            assert isinstance(loop, uvloop.Loop) == (name == "uvloop")
            errors: list[dict[str, Any]] = []
            loop.set_exception_handler(lambda _loop, context: errors.append(context))
            await asyncio.wait_for(scenario(), SCENARIO_TIMEOUT)
            assert errors == [], f"errors reported to the event loop: {errors!r}"

        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main())

    return run_scenario


def serve(**settings: Any) -> contextlib.AbstractAsyncContextManager[Server]:
    """``serving`` on free loopback ports (TCP and UDP unless given)."""
    settings.setdefault("tcp", [ANY_PORT])
    settings.setdefault("udp", [ANY_PORT])
    return serving(**settings)


def hello(name: bytes, ending: bytes = b"\n") -> bytes:
    return b"Hello, " + name + b"!" + ending


async def wait_for_connections(server: Server, count: int) -> None:
    """``server.connection_count`` reaches ``count`` (clients come and go asynchronously)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REPLY_TIMEOUT
    while server.connection_count != count:
        if loop.time() > deadline:
            raise AssertionError(
                f"server.connection_count is {server.connection_count}, expected {count}"
            )
        await asyncio.sleep(0.02)


# -- a well-behaved client on asyncio streams ----------------------------------------------


class Client:
    """A TCP client that reads what it is sent, on asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, server: Server) -> AsyncIterator[Client]:
        host, port = server.address("tcp")
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), REPLY_TIMEOUT)
        client = cls(reader, writer)
        try:
            yield client
        finally:
            await client.close()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), REPLY_TIMEOUT)

    async def receive(self, size: int) -> bytes:
        """Exactly ``size`` bytes, or fewer if the server closes first."""
        try:
            return await asyncio.wait_for(self.reader.readexactly(size), REPLY_TIMEOUT)
        except asyncio.IncompleteReadError as exc:
            return exc.partial

    async def expect(self, data: bytes) -> None:
        assert await self.receive(len(data)) == data

    async def expect_closed(self) -> None:
        """The server closes the connection without sending anything more."""
        rest = await asyncio.wait_for(self.reader.read(), REPLY_TIMEOUT)
        assert rest == b"", f"expected the connection to close, got {rest!r}"

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(self.writer.wait_closed(), REPLY_TIMEOUT)


# -- raw sockets for the clients that misbehave ---------------------------------------------


@contextlib.asynccontextmanager
async def raw_client(
    server: Server, *, rcvbuf: int | None = None, sndbuf: int | None = None
) -> AsyncIterator[socket.socket]:
    """A connected non-blocking socket, closed on the way out (if not closed before)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_connect(sock, server.address("tcp")), REPLY_TIMEOUT
        )
        yield sock


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def raw_send(sock: socket.socket, data: bytes) -> None:
    await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(sock, data), REPLY_TIMEOUT)


async def raw_receive(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes, or fewer if the server closes first."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    while len(data) < size:
        chunk = await asyncio.wait_for(
            loop.sock_recv(sock, min(size - len(data), 1 << 16)), REPLY_TIMEOUT
        )
        if not chunk:
            break
        data += chunk
    return bytes(data)


async def raw_receive_until_end(sock: socket.socket) -> bytes:
    """Everything until the server ends the connection (by a FIN or a RST)."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), REPLY_TIMEOUT):
            data += chunk
    return bytes(data)


async def push_until_stalled(
    sock: socket.socket, unit: bytes, *, cap: int, idle_s: float = 1.0
) -> int:
    """Send ``unit`` over and over, never reading, until the peer stops taking bytes.

    Returns how many bytes the kernel accepted: the stream sent is ``unit`` repeated,
    cut at that length. Stops early at ``cap`` bytes (the peer never pushed back) or
    once no byte could be sent for ``idle_s`` seconds (the peer stopped reading).
    """
    loop = asyncio.get_running_loop()
    chunk = memoryview(unit * max(1, (256 * 1024) // len(unit)))
    sent = 0
    last_progress = loop.time()
    while sent < cap:
        try:
            sent += sock.send(chunk[sent % len(chunk) :])
        except BlockingIOError:
            if loop.time() - last_progress > idle_s:
                break
            await asyncio.sleep(0.01)
        else:
            last_progress = loop.time()
            await asyncio.sleep(0)  # the server runs on this loop too
    return sent


# -- UDP --------------------------------------------------------------------------------------


class Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait(data)


class UdpClient:
    def __init__(self, transport: asyncio.DatagramTransport, protocol: Datagrams) -> None:
        self.transport = transport
        self.protocol = protocol

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, server: Server) -> AsyncIterator[UdpClient]:
        transport, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
            Datagrams, remote_addr=server.address("udp")
        )
        try:
            yield cls(transport, protocol)
        finally:
            transport.close()

    def send(self, data: bytes) -> None:
        self.transport.sendto(data)

    async def receive(self) -> bytes:
        return await asyncio.wait_for(self.protocol.received.get(), REPLY_TIMEOUT)

    async def ask(self, data: bytes) -> bytes:
        self.send(data)
        return await self.receive()


# == greeting protocol over TCP ===============================================================


@pytest.mark.parametrize("framing", ["auto", "line"])
def test_lines_get_exact_replies_however_they_are_chunked(
    run: Callable[[Scenario], None], framing: str
) -> None:
    async def scenario() -> None:
        async with (
            serve(handler="greeting", framing=framing) as server,
            Client.connect(server) as client,
        ):
            await client.expect(WELCOME[framing])
            # One line, then the line ending is kept as the client sent it.
            await client.send(b"Bob\n")
            await client.expect(hello(b"Bob"))
            await client.send(b"Bob\r\n")
            await client.expect(hello(b"Bob", b"\r\n"))
            # Many lines in one write, endings mixed, odd but valid content.
            await client.send(b"a\nb\r\nNUL\x00byte\ncaf\xc3\xa9\r\n")
            await client.expect(
                hello(b"a")
                + hello(b"b", b"\r\n")
                + hello(b"NUL\x00byte")
                + hello(b"caf\xc3\xa9", b"\r\n")
            )
            # A line dribbled one byte at a time, a UTF-8 character split between writes.
            for byte in b"Z\xc3\xa9ta\r\n":
                await client.send(bytes([byte]))
                await asyncio.sleep(0.005)
            await client.expect(hello(b"Z\xc3\xa9ta", b"\r\n"))
            # A long pipelined burst is answered in order, nothing lost or merged.
            count = 3000
            await client.send(b"".join(b"n%d\n" % i for i in range(count)))
            await client.expect(b"".join(hello(b"n%d" % i) for i in range(count)))
            await client.send(b"exit\n")
            await client.expect_closed()
            await wait_for_connections(server, 0)

    run(scenario)


@pytest.mark.parametrize("framing", ["auto", "line"])
@pytest.mark.parametrize(
    ("sent", "replies"),
    [
        (b"exit\n", b""),
        (b"exit\r\n", b""),
        (b"Bob\nexit\nAlice\n", hello(b"Bob")),
        (b"Bob\nexit\r\nAlice\nexit\nCarol\n", hello(b"Bob")),
    ],
    ids=["exit", "exit-crlf", "lines-after-exit", "crlf-exit-then-more"],
)
def test_exit_closes_without_reply_and_ignores_the_rest(
    run: Callable[[Scenario], None], framing: str, sent: bytes, replies: bytes
) -> None:
    async def scenario() -> None:
        async with serve(handler="greeting", framing=framing) as server:
            async with Client.connect(server) as client:
                await client.expect(WELCOME[framing])
                await client.send(sent)
                await client.expect(replies)
                await client.expect_closed()
            await wait_for_connections(server, 0)

    run(scenario)


@pytest.mark.parametrize("framing", ["auto", "line"])
def test_invalid_utf8_gets_an_error_and_the_connection_keeps_serving(
    run: Callable[[Scenario], None], framing: str
) -> None:
    error = b"Error: message is not valid utf-8"

    async def scenario() -> None:
        async with serve(handler="greeting", framing=framing) as server:
            async with Client.connect(server) as client:
                await client.expect(WELCOME[framing])
                await client.send(b"hi\n")
                await client.expect(hello(b"hi"))
                for bad in INVALID_UTF8:
                    await client.send(bad + b"\n")
                    await client.expect(error + b"\n")
                    await client.send(bad + b"\r\n")
                    await client.expect(error + b"\r\n")
                    await client.send(b"ok\n")
                    await client.expect(hello(b"ok"))
                # Bad and good lines in one write: each answered on its own.
                await client.send(b"one\n\xff\ntwo\r\n")
                await client.expect(hello(b"one") + error + b"\n" + hello(b"two", b"\r\n"))
                await client.send(b"exit\n")
                await client.expect_closed()
            await wait_for_connections(server, 0)

    run(scenario)


@pytest.mark.parametrize("framing", ["auto", "raw"])
def test_invalid_utf8_in_a_bare_message_gets_a_bare_error(
    run: Callable[[Scenario], None], framing: str
) -> None:
    async def scenario() -> None:
        async with (
            serve(handler="greeting", framing=framing) as server,
            Client.connect(server) as client,
        ):
            await client.expect(b"Welcome!")
            await client.send(b"\xff\xfe")
            await client.expect(b"Error: message is not valid utf-8")
            await client.send(b"Bob")
            # The next bytes are the next reply: no stray line ending before it.
            await client.expect(b"Hello, Bob!")

    run(scenario)


# == overlong lines =============================================================================


@pytest.mark.parametrize("framing", ["auto", "line"])
@pytest.mark.parametrize(
    "overlong",
    [b"x" * 17 + b"\n", b"x" * 17 + b"\r\n", b"x" * 200, b"x" * 200 + b"\n"],
    ids=["limit+1-lf", "limit+1-crlf", "long-no-newline", "long-lf"],
)
def test_overlong_line_gets_an_error_and_is_closed_others_unaffected(
    run: Callable[[Scenario], None], framing: str, overlong: bytes
) -> None:
    limit = 16

    async def scenario() -> None:
        async with serve(handler="greeting", framing=framing, max_line_bytes=limit) as server:
            async with Client.connect(server) as bystander, Client.connect(server) as attacker:
                await bystander.expect(WELCOME[framing])
                await attacker.expect(WELCOME[framing])
                # (A first line with its newline: in auto framing, a first message that
                # stays without one is taken as a bare word after a short wait.)
                await bystander.send(b"Hi\n")
                await bystander.expect(hello(b"Hi"))
                # The bystander has half a line buffered while the attacker is thrown out.
                await bystander.send(b"Hal")
                await attacker.send(b"Bob\n")
                await attacker.expect(hello(b"Bob"))
                await attacker.send(overlong)
                await attacker.expect(b"Error: line exceeds 16 bytes\n")
                await attacker.expect_closed()
                await wait_for_connections(server, 1)
                await bystander.send(b"lo\n")
                await bystander.expect(hello(b"Hallo"))
                async with Client.connect(server) as newcomer:
                    await newcomer.expect(WELCOME[framing])
                    await newcomer.send(b"New\n")
                    await newcomer.expect(hello(b"New"))
            await wait_for_connections(server, 0)

    run(scenario)


@pytest.mark.parametrize("framing", ["auto", "line"])
def test_line_of_exactly_the_limit_is_accepted(
    run: Callable[[Scenario], None], framing: str
) -> None:
    limit = 16
    full = b"x" * limit

    async def scenario() -> None:
        async with serve(handler="greeting", framing=framing, max_line_bytes=limit) as server:
            async with Client.connect(server) as client:
                await client.expect(WELCOME[framing])
                await client.send(full + b"\n")
                await client.expect(hello(full))
                await client.send(full + b"\r\n")
                await client.expect(hello(full, b"\r\n"))
                # Exactly the limit, then the CR, then the LF, each arriving alone.
                for piece in (full, b"\r", b"\n"):
                    await client.send(piece)
                    await asyncio.sleep(0.05)
                await client.expect(hello(full, b"\r\n"))
                await client.send(b"exit\n")
                await client.expect_closed()
            await wait_for_connections(server, 0)

    run(scenario)


@pytest.mark.parametrize("framing", ["auto", "line"])
def test_one_byte_over_the_limit_without_newline_is_rejected(
    run: Callable[[Scenario], None], framing: str
) -> None:
    limit = 16

    async def scenario() -> None:
        async with (
            serve(handler="greeting", framing=framing, max_line_bytes=limit) as server,
            Client.connect(server) as client,
        ):
            await client.expect(WELCOME[framing])
            await client.send(b"Bob\n")
            await client.expect(hello(b"Bob"))
            await client.send(b"x" * (limit + 1))
            try:
                received = await asyncio.wait_for(client.reader.read(100), 3.0)
            except TimeoutError:
                received = b"<nothing for 3 s, connection still open>"
            assert received == b"Error: line exceeds 16 bytes\n"
            await client.expect_closed()

    run(scenario)


# == clients that do not read ===================================================================


@pytest.mark.parametrize(
    ("handler", "framing"), [("greeting", "line"), ("echo", "raw")], ids=["greeting", "echo"]
)
def test_client_that_never_reads_is_throttled_and_others_are_served(
    run: Callable[[Scenario], None], handler: str, framing: str
) -> None:
    # With nobody reading, bytes can only pile up in the kernel's buffers on both ends
    # (a few MiB on Linux) and in the server's write buffer (about the high mark).
    # A server that kept reading would let the client push all of ``cap``.
    cap = 48 * 1024 * 1024
    bound = 32 * 1024 * 1024
    unit = b"x" * 999 + b"\n" if handler == "greeting" else bytes(range(256)) * 4

    async def scenario() -> None:
        async with serve(
            handler=handler,
            framing=framing,
            max_line_bytes=4096,
            write_buffer_high_bytes=64 * 1024,
            write_buffer_low_bytes=16 * 1024,
        ) as server:
            async with raw_client(server, rcvbuf=64 * 1024, sndbuf=64 * 1024) as hog:
                sent = await push_until_stalled(hog, unit, cap=cap)
                assert sent < bound, f"the server kept reading: it took {sent} bytes"

                # Someone else is served while the hog is stuck.
                async with Client.connect(server) as other:
                    if handler == "greeting":
                        await other.expect(b"Welcome!\n")
                        await other.send(b"Bob\n")
                        await other.expect(hello(b"Bob"))
                    else:
                        await other.send(b"ping\n")
                        await other.expect(b"ping\n")
                await wait_for_connections(server, 1)  # the hog is still connected

                # The hog reads at last: it gets every reply, in order, and is served on.
                stream = unit * (sent // len(unit) + 1)
                if handler == "greeting":
                    whole, part = divmod(sent, len(unit))
                    lines = whole + (1 if part else 0)
                    expected = b"Welcome!\n" + hello(unit[:-1]) * lines
                    rest = unit[part:] if part else b""
                    _, received = await asyncio.gather(
                        raw_send(hog, rest + b"exit\n"), raw_receive_until_end(hog)
                    )
                    assert len(received) == len(expected)
                    assert received == expected
                else:
                    received = await raw_receive(hog, sent)
                    assert len(received) == sent
                    assert received == stream[:sent]
                    await raw_send(hog, b"more")
                    assert await raw_receive(hog, 4) == b"more"
            await wait_for_connections(server, 0)

    run(scenario)


def test_shutdown_is_not_held_up_by_clients_that_do_not_read(
    run: Callable[[Scenario], None],
) -> None:
    shutdown_timeout = 1.0

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            async with serve(
                handler="greeting", framing="line", shutdown_timeout_s=shutdown_timeout
            ) as server:
                silent = await stack.enter_async_context(raw_client(server))
                hog = await stack.enter_async_context(raw_client(server, rcvbuf=4096))
                await push_until_stalled(hog, b"x" * 999 + b"\n", cap=32 * 1024 * 1024)
                await wait_for_connections(server, 2)
                stopping = loop.time()
            assert loop.time() - stopping < shutdown_timeout + 4.0
            # The idle client was closed after its queued replies; the hog was cut.
            assert await raw_receive_until_end(silent) == b"Welcome!\n"
            await raw_receive_until_end(hog)

    run(scenario)


# == clients that leave badly ===================================================================


async def check_still_serving(server: Server, framing: str) -> None:
    async with Client.connect(server) as client:
        await client.expect(WELCOME[framing])
        await client.send(b"Bob\nAlice\r\n")
        await client.expect(hello(b"Bob") + hello(b"Alice", b"\r\n"))
        await client.send(b"exit\n")
        await client.expect_closed()


@pytest.mark.parametrize("framing", ["auto", "line"])
def test_clients_that_reset_the_connection(run: Callable[[Scenario], None], framing: str) -> None:
    welcome = WELCOME[framing]

    async def scenario() -> None:
        async with serve(handler="greeting", framing=framing) as server:

            async def reset_at_once() -> None:
                async with raw_client(server) as sock:
                    reset(sock)

            async def reset_mid_line() -> None:
                async with raw_client(server) as sock:
                    assert await raw_receive(sock, len(welcome)) == welcome
                    await raw_send(sock, b"Bo")
                    reset(sock)

            async def reset_right_after_a_request() -> None:
                async with raw_client(server) as sock:
                    await raw_send(sock, b"Bob\n")
                    reset(sock)

            async def reset_with_replies_pending() -> None:
                # More replies than the client's small receive buffer holds.
                async with raw_client(server, rcvbuf=4096) as sock:
                    await raw_send(sock, (b"x" * 200 + b"\n") * 500)
                    await asyncio.sleep(0.05)
                    reset(sock)

            async with Client.connect(server) as bystander:
                await bystander.expect(welcome)
                kinds = [
                    reset_at_once,
                    reset_mid_line,
                    reset_right_after_a_request,
                    reset_with_replies_pending,
                ]
                await asyncio.gather(*(kind() for kind in kinds for _ in range(10)))
                await wait_for_connections(server, 1)
                await bystander.send(b"still here\n")
                await bystander.expect(hello(b"still here"))
            await check_still_serving(server, framing)
            await wait_for_connections(server, 0)

    run(scenario)


@pytest.mark.parametrize("framing", ["auto", "line"])
def test_clients_that_connect_and_close_at_once(
    run: Callable[[Scenario], None], framing: str
) -> None:
    async def scenario() -> None:
        async with serve(handler="greeting", framing=framing) as server:

            async def close_at_once() -> None:
                async with raw_client(server):
                    pass

            async def ask_and_close() -> None:
                async with raw_client(server) as sock:
                    await raw_send(sock, b"Bob\n")

            await asyncio.gather(
                *(kind() for kind in (close_at_once, ask_and_close) for _ in range(40))
            )
            await wait_for_connections(server, 0)
            await check_still_serving(server, framing)
            await wait_for_connections(server, 0)

    run(scenario)


@pytest.mark.parametrize("framing", ["auto", "line"])
def test_silent_clients_do_not_block_others(run: Callable[[Scenario], None], framing: str) -> None:
    silent_count = 30

    async def scenario() -> None:
        async with serve(handler="greeting", framing=framing) as server:
            async with contextlib.AsyncExitStack() as stack:
                silent = [
                    await stack.enter_async_context(raw_client(server)) for _ in range(silent_count)
                ]
                await wait_for_connections(server, silent_count)
                await check_still_serving(server, framing)
                await wait_for_connections(server, silent_count)
                # A silent client that finally speaks is still served, greeting first.
                late = silent[0]
                await raw_send(late, b"late\n")
                expected = WELCOME[framing] + hello(b"late")
                assert await raw_receive(late, len(expected)) == expected
            await wait_for_connections(server, 0)

    run(scenario)


@pytest.mark.parametrize("framing", ["auto", "line"])
def test_half_closed_clients_get_their_replies(
    run: Callable[[Scenario], None], framing: str
) -> None:
    welcome = WELCOME[framing]

    async def scenario() -> None:
        async with serve(handler="greeting", framing=framing) as server:

            async def half_close(name: bytes) -> None:
                async with raw_client(server) as sock:
                    await raw_send(sock, name + b"\n" + name + b"2\r\n")
                    sock.shutdown(socket.SHUT_WR)
                    # Lines sent before the half-close are answered, then the server
                    # closes its side too.
                    expected = welcome + hello(name) + hello(name + b"2", b"\r\n")
                    assert await raw_receive_until_end(sock) == expected

            await asyncio.gather(*(half_close(b"c%d" % i) for i in range(20)))
            await wait_for_connections(server, 0)
            await check_still_serving(server, framing)
            await wait_for_connections(server, 0)

    run(scenario)


@pytest.mark.parametrize("framing", ["auto", "line"])
def test_connection_flood_is_served(run: Callable[[Scenario], None], framing: str) -> None:
    count = 400

    async def scenario() -> None:
        async with serve(handler="greeting", framing=framing) as server:
            async with contextlib.AsyncExitStack() as stack:
                clients = await asyncio.gather(
                    *(stack.enter_async_context(Client.connect(server)) for _ in range(count))
                )
                welcomes = await asyncio.gather(
                    *(client.receive(len(WELCOME[framing])) for client in clients)
                )
                assert welcomes == [WELCOME[framing]] * count
                await wait_for_connections(server, count)

                async def converse(i: int, client: Client) -> None:
                    await client.send(b"c%d\nexit\n" % i)
                    await client.expect(hello(b"c%d" % i))
                    await client.expect_closed()

                await asyncio.gather(*(converse(i, c) for i, c in enumerate(clients)))
            await wait_for_connections(server, 0)
            await check_still_serving(server, framing)

    run(scenario)


# == echo over TCP ==============================================================================


def test_echo_returns_binary_bytes_unchanged(run: Callable[[Scenario], None]) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value, newlines included

    async def scenario() -> None:
        async with serve(handler="echo", framing="raw") as server, Client.connect(server) as client:
            _, received = await asyncio.gather(client.send(payload), client.receive(len(payload)))
            assert received == payload

    run(scenario)


def test_echo_returns_lines_unchanged(run: Callable[[Scenario], None]) -> None:
    lines = b"Bob\n\xff\xfe\x00\n\xc3\r\ncaf\xc3\xa9\r\nexit\n"

    async def scenario() -> None:
        async with (
            serve(handler="echo", framing="line") as server,
            Client.connect(server) as client,
        ):
            await client.send(lines)
            await client.expect(lines)

    run(scenario)


# == UDP =======================================================================================


@pytest.mark.parametrize("framing", ["auto", "line"])
def test_udp_datagrams_get_exact_replies(run: Callable[[Scenario], None], framing: str) -> None:
    async def scenario() -> None:
        async with (
            serve(handler="greeting", framing=framing) as server,
            UdpClient.connect(server) as one,
            UdpClient.connect(server) as two,
        ):
            assert await one.ask(b"Bob") == b"Hello, Bob!"
            assert await two.ask(b"Alice\n") == b"Hello, Alice!\n"
            assert await one.ask(b"caf\xc3\xa9\n") == b"Hello, caf\xc3\xa9!\n"
            for i in range(50):
                assert await two.ask(b"d%d\n" % i) == b"Hello, d%d!\n" % i

    run(scenario)


@pytest.mark.parametrize("framing", ["auto", "line"])
def test_udp_invalid_utf8_is_dropped_and_others_answered(
    run: Callable[[Scenario], None], framing: str
) -> None:
    async def scenario() -> None:
        async with serve(handler="greeting", framing=framing) as server:
            async with UdpClient.connect(server) as attacker, UdpClient.connect(server) as victim:
                for round_ in range(5):
                    for bad in INVALID_UTF8:
                        attacker.send(bad)
                        attacker.send(bad + b"\n")
                    assert await victim.ask(b"v%d" % round_) == b"Hello, v%d!" % round_
                # The server answers a sender's datagrams in order: had any bad one
                # been answered, that reply would come before this one.
                attacker.send(b"exit")  # not answered over UDP either
                assert await attacker.ask(b"sentinel\n") == b"Hello, sentinel!\n"
                await asyncio.sleep(0.2)
                assert attacker.protocol.received.empty()
            await check_still_serving(server, framing)

    run(scenario)


def test_udp_echo_returns_bytes_unchanged(run: Callable[[Scenario], None]) -> None:
    datagrams = [bytes(range(256)), b"\xff\xfe\n", b"a\r\n", b"x" * 60000]

    async def scenario() -> None:
        async with (
            serve(handler="echo", framing="raw", udp_max_datagram_bytes=65507) as server,
            UdpClient.connect(server) as client,
        ):
            for datagram in datagrams:
                assert await client.ask(datagram) == datagram

    run(scenario)
