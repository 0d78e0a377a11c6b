"""Hostile clients against a real netframe server, on both event loops.

Every test talks to a server started with :func:`netframe.testing.serving` over real
loopback sockets, and checks only what a client can see: the exact bytes that come back,
whether the connection is still open, whether other clients are still served, and
``server.connection_count``.

The harness is the suite's (``conftest.py``): each test runs on asyncio and on uvloop,
and ``loop_checked`` fails it when anything reached the loop's exception handler.
Well-behaved clients are ``conftest.Client`` and ``netframe.UdpClient``; raw sockets
appear only where a client must do what a well-behaved one does not (never read, reset,
half-close).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest
from conftest import (
    REPLY_TIMEOUT_S,
    WELCOME,
    Client,
    hello,
    push_until_stalled,
    raw_client,
    raw_receive,
    raw_receive_until_end,
    raw_send,
    reset,
    udp_client,
    wait_for_connections,
)
from structlog.testing import capture_logs

import netframe
from netframe import Server
from netframe.testing import serving

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.usefixtures("loop_checked"),
    pytest.mark.timeout(60),
]

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


async def check_still_serving(server: Server, framing: str) -> None:
    async with Client.connect(server) as client:
        await client.expect(WELCOME[framing])
        await client.send(b"Bob\nAlice\r\n")
        await client.expect(hello(b"Bob") + hello(b"Alice", b"\r\n"))
        await client.send(b"exit\n")
        await client.expect_closed()


# == greeting protocol over TCP ===============================================================


@pytest.mark.parametrize("framing", ["auto", "line"])
async def test_lines_get_exact_replies_however_they_are_chunked(framing: str) -> None:
    # A short bare-message delay, so that the pause below is well beyond it.
    async with (
        serving(handler="greeting", framing=framing, bare_message_delay_s=0.05) as server,
        Client.connect(server) as client,
    ):
        await client.expect(WELCOME[framing])
        # The first read holds several lines: each is answered with its own ending.
        await client.send(b"Bob\nAlice\r\nCarl\n")
        await client.expect(hello(b"Bob") + hello(b"Alice", b"\r\n") + hello(b"Carl"))
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
        # A pause in mid-line, four times the bare-message delay: still one line.
        await client.send(b"Da")
        await asyncio.sleep(0.2)
        await client.send(b"ve\n")
        await client.expect(hello(b"Dave"))
        # A long pipelined burst is answered in order, nothing lost or merged.
        count = 3000
        await client.send(b"".join(b"n%d\n" % i for i in range(count)))
        await client.expect(b"".join(hello(b"n%d" % i) for i in range(count)))
        await client.send(b"exit\n")
        await client.expect_closed()
        await wait_for_connections(server, 0)


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
async def test_exit_closes_without_reply_and_ignores_the_rest(
    framing: str, sent: bytes, replies: bytes
) -> None:
    async with serving(handler="greeting", framing=framing) as server:
        async with Client.connect(server) as client:
            await client.expect(WELCOME[framing])
            await client.send(sent)
            await client.expect(replies)
            await client.expect_closed()
        await wait_for_connections(server, 0)


@pytest.mark.parametrize("framing", ["auto", "line"])
async def test_invalid_utf8_gets_an_error_and_the_connection_keeps_serving(framing: str) -> None:
    error = b"Error: message is not valid utf-8"
    with capture_logs() as logs:
        async with serving(handler="greeting", framing=framing) as server:
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
    # Seventeen bad lines, one warning: the log is not the attacker's to fill.
    assert len([e for e in logs if e["event"] == "undecodable_message"]) == 1


@pytest.mark.parametrize("framing", ["auto", "raw"])
async def test_invalid_utf8_in_a_bare_message_gets_a_bare_error(framing: str) -> None:
    async with (
        serving(handler="greeting", framing=framing) as server,
        Client.connect(server) as client,
    ):
        await client.expect(b"Welcome!")
        await client.send(b"\xff\xfe")
        await client.expect(b"Error: message is not valid utf-8")
        await client.send(b"Bob")
        # The next bytes are the next reply: no stray line ending before it.
        await client.expect(b"Hello, Bob!")


# == overlong lines =============================================================================


@pytest.mark.parametrize("framing", ["auto", "line"])
@pytest.mark.parametrize(
    "overlong",
    [b"x" * 17 + b"\n", b"x" * 17 + b"\r\n", b"x" * 200, b"x" * 200 + b"\n"],
    ids=["limit+1-lf", "limit+1-crlf", "long-no-newline", "long-lf"],
)
async def test_overlong_line_gets_an_error_and_is_closed_others_unaffected(
    framing: str, overlong: bytes
) -> None:
    limit = 16
    async with serving(handler="greeting", framing=framing, max_line_bytes=limit) as server:
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


@pytest.mark.parametrize("framing", ["auto", "line"])
async def test_line_of_exactly_the_limit_is_accepted(framing: str) -> None:
    limit = 16
    full = b"x" * limit
    async with serving(handler="greeting", framing=framing, max_line_bytes=limit) as server:
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


@pytest.mark.parametrize("framing", ["auto", "line"])
async def test_one_byte_over_the_limit_without_newline_is_rejected(framing: str) -> None:
    limit = 16
    async with (
        serving(handler="greeting", framing=framing, max_line_bytes=limit) as server,
        Client.connect(server) as client,
    ):
        await client.expect(WELCOME[framing])
        await client.send(b"Bob\n")
        await client.expect(hello(b"Bob"))
        await client.send(b"x" * (limit + 1))
        try:
            received = await asyncio.wait_for(client.reader.read(100), REPLY_TIMEOUT_S)
        except TimeoutError:
            received = b"<nothing, and the connection still open>"
        assert received == b"Error: line exceeds 16 bytes\n"
        await client.expect_closed()


# == clients that do not read ===================================================================


@pytest.mark.parametrize(
    ("handler", "framing"), [("greeting", "line"), ("echo", "raw")], ids=["greeting", "echo"]
)
async def test_client_that_never_reads_is_throttled_and_others_are_served(
    handler: str, framing: str
) -> None:
    # With nobody reading, bytes can only pile up in the kernel's buffers on both ends
    # (a few MiB on Linux) and in the server's write buffer (about the high mark).
    # A server that kept reading would let the client push all of ``cap``.
    cap = 48 * 1024 * 1024
    bound = 32 * 1024 * 1024
    unit = b"x" * 999 + b"\n" if handler == "greeting" else bytes(range(256)) * 4

    async with serving(
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


async def test_shutdown_is_not_held_up_by_clients_that_do_not_read() -> None:
    shutdown_timeout = 0.5
    with capture_logs() as logs:
        server = Server(
            handler="greeting",
            framing="line",
            shutdown_timeout_s=shutdown_timeout,
            tcp=["127.0.0.1:0"],
        )
        await server.start()
        async with raw_client(server) as silent, raw_client(server, rcvbuf=4096) as hog:
            await push_until_stalled(hog, b"x" * 999 + b"\n", cap=32 * 1024 * 1024)
            await wait_for_connections(server, 2)
            # The stop ends: a server that waited for the hog to read would not.
            await asyncio.wait_for(server.close(), shutdown_timeout + REPLY_TIMEOUT_S)
            # The idle client was closed after its queued replies; the hog was cut.
            assert await raw_receive_until_end(silent) == b"Welcome!\n"
            await raw_receive_until_end(hog)
    finished = [e for e in logs if e["event"] == "shutdown_finished"]
    assert [(e["closed"], e["aborted"]) for e in finished] == [(1, 1)]


# == clients that leave badly ===================================================================


@pytest.mark.parametrize("framing", ["auto", "line"])
async def test_clients_that_reset_the_connection(framing: str) -> None:
    welcome = WELCOME[framing]

    async with serving(handler="greeting", framing=framing) as server:

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


@pytest.mark.parametrize("framing", ["auto", "line"])
async def test_clients_that_connect_and_close_at_once(framing: str) -> None:
    async with serving(handler="greeting", framing=framing) as server:

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


@pytest.mark.parametrize("framing", ["auto", "line"])
async def test_silent_clients_do_not_block_others(framing: str) -> None:
    silent_count = 30
    async with serving(handler="greeting", framing=framing) as server:
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


@pytest.mark.parametrize("framing", ["auto", "line"])
async def test_half_closed_clients_get_their_replies(framing: str) -> None:
    welcome = WELCOME[framing]
    async with serving(handler="greeting", framing=framing) as server:

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


@pytest.mark.parametrize("framing", ["auto", "line"])
async def test_connection_flood_is_served(framing: str) -> None:
    count = 400
    async with serving(handler="greeting", framing=framing) as server:
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
                # Lock-step round trips on every connection at once: each client gets
                # its own replies, none of another's.
                for n in range(3):
                    await client.send(b"c%d-%d\n" % (i, n))
                    await client.expect(hello(b"c%d-%d" % (i, n)))
                await client.send(b"exit\n")
                await client.expect_closed()

            await asyncio.gather(*(converse(i, c) for i, c in enumerate(clients)))
        await wait_for_connections(server, 0)
        await check_still_serving(server, framing)


# == echo over TCP ==============================================================================


async def test_echo_returns_binary_bytes_unchanged() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value, newlines included
    async with serving(handler="echo", framing="raw") as server, Client.connect(server) as client:
        _, received = await asyncio.gather(client.send(payload), client.receive(len(payload)))
        assert received == payload


async def test_echo_returns_lines_unchanged() -> None:
    lines = b"Bob\n\xff\xfe\x00\n\xc3\r\ncaf\xc3\xa9\r\nexit\n"
    async with serving(handler="echo", framing="line") as server, Client.connect(server) as client:
        await client.send(lines)
        await client.expect(lines)


# == UDP =======================================================================================


@pytest.mark.parametrize("framing", ["auto", "line"])
async def test_udp_datagrams_get_exact_replies(framing: str) -> None:
    async with (
        serving(handler="greeting", framing=framing) as server,
        await udp_client(server) as one,
        await udp_client(server) as two,
    ):
        assert await one.request(b"Bob") == b"Hello, Bob!"
        assert await two.request(b"Alice\n") == b"Hello, Alice!\n"
        assert await one.request(b"caf\xc3\xa9\n") == b"Hello, caf\xc3\xa9!\n"
        for i in range(50):
            assert await two.request(b"d%d\n" % i) == b"Hello, d%d!\n" % i


@pytest.mark.parametrize("framing", ["auto", "line"])
async def test_udp_invalid_utf8_is_dropped_and_others_answered(framing: str) -> None:
    async with serving(handler="greeting", framing=framing) as server:
        async with await udp_client(server) as attacker, await udp_client(server) as victim:
            for round_ in range(5):
                for bad in INVALID_UTF8:
                    attacker.send(bad)
                    attacker.send(bad + b"\n")
                assert await victim.request(b"v%d" % round_) == b"Hello, v%d!" % round_
            # The server answers a sender's datagrams in order: had any bad one
            # been answered, that reply would come before this one.
            attacker.send(b"exit")  # not answered over UDP either
            assert await attacker.request(b"sentinel\n") == b"Hello, sentinel!\n"
            attacker.timeout_s = 0.2
            with pytest.raises(netframe.ClientError, match="no reply within"):
                await attacker.receive()
        await check_still_serving(server, framing)


async def test_udp_echo_returns_bytes_unchanged() -> None:
    datagrams = [bytes(range(256)), b"\xff\xfe\n", b"a\r\n", b"x" * 60000]
    async with (
        serving(handler="echo", framing="raw", udp_max_datagram_bytes=65507) as server,
        await udp_client(server) as client,
    ):
        for datagram in datagrams:
            assert await client.request(datagram) == datagram
