"""The PROXY protocol in front of real TCP servers, on both event loops.

A test plays the load balancer: it connects from loopback (trusted or not) and writes a
header built with ``netframe.proxy``'s encoders, then talks as a client would. What is
checked is what a client, a handler and an operator can see: bytes on the wire, the
addresses a handler is given, the log events, and the per-address cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from conftest import (
    REPLY_TIMEOUT_S,
    CliServer,
    assert_one_line_error,
    raw_receive_until_end,
    raw_send,
    reset,
    run_netframe,
)
from structlog.testing import capture_logs

from netframe import Connection, Handler, InetAddress, Server, UnixAddress
from netframe.proxy import encode_v1, encode_v2
from netframe.testing import serving

pytestmark = pytest.mark.timeout(60)
#: Each test on asyncio and on uvloop, failing if anything reached the loop's handler.
on_both_loops = pytest.mark.usefixtures("loop_checked")

CLIENT = ("203.0.113.7", 4242)
FRONTEND = ("198.51.100.1", 9999)
CLIENT6 = ("2001:db8::7", 4242)
FRONTEND6 = ("2001:db8::1", 9999)
PROXIED: dict[str, Any] = {
    "tcp": ["127.0.0.1:0"],
    "udp": [],
    "proxy_protocol": "any",
    "proxy_allow": ["127.0.0.1"],
}


class Seen(Handler):
    """Records what each connection's handler was told, and echoes with a greeting."""

    connections: list[dict[str, Any]]

    def on_connect(self, conn: Connection) -> None:
        # "protocol": what the transport was handed over to (the buffered read path on
        # the standard loop), read from the endpoint's transport.
        protocol = type(conn._transport.get_protocol()).__name__  # type: ignore[attr-defined]
        type(self).connections.append(
            {"peer": conn.peer, "local": conn.local, "via": conn.via, "type": protocol}
        )
        conn.send("Welcome!")

    def on_message(self, conn: Connection, message: str) -> None:
        conn.send(f"{conn.peer.host if isinstance(conn.peer, InetAddress) else '?'} {message}")


@pytest.fixture
def seen() -> type[Seen]:
    class Recording(Seen):
        connections: list[dict[str, Any]] = []  # noqa: RUF012 - one list per test

    return Recording


@contextlib.asynccontextmanager
async def balancer(
    server: Server, source: str = "127.0.0.1"
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A connection to the server from ``source``, as a load balancer's would be."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(*server.address("tcp"), local_addr=(source, 0)), REPLY_TIMEOUT_S
    )
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(writer.wait_closed(), REPLY_TIMEOUT_S)


async def read_line(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readline(), REPLY_TIMEOUT_S)


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    with contextlib.suppress(ConnectionError):
        return await asyncio.wait_for(reader.read(), REPLY_TIMEOUT_S)
    return b""


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [event for event in logs if event["event"] == name]


# -- the real client, everywhere ----------------------------------------------------------


@pytest.mark.asyncio
@on_both_loops
@pytest.mark.parametrize(
    ("encode", "client", "frontend"),
    [
        (encode_v1, CLIENT, FRONTEND),
        (encode_v2, CLIENT, FRONTEND),
        (encode_v1, CLIENT6, FRONTEND6),
        (encode_v2, CLIENT6, FRONTEND6),
    ],
    ids=["v1-ipv4", "v2-ipv4", "v1-ipv6", "v2-ipv6"],
)
async def test_the_handler_and_the_logs_see_the_client_the_header_names(
    seen: type[Seen],
    encode: Callable[..., bytes],
    client: tuple[str, int],
    frontend: tuple[str, int],
) -> None:
    with capture_logs() as logs:
        async with (
            serving(handler=seen, framing="line", **PROXIED) as server,
            balancer(server) as (reader, writer),
        ):
            # The header and the first line in one write: the framer sees only the line.
            writer.write(encode(client, frontend) + b"one\n")
            assert await read_line(reader) == b"Welcome!\n"
            assert await read_line(reader) == f"{client[0]} one\n".encode()
            writer.write(b"two\n")  # later reads go straight to the endpoint
            assert await read_line(reader) == f"{client[0]} two\n".encode()
            proxy_port = writer.get_extra_info("sockname")[1]
    [conn] = seen.connections
    assert conn["peer"] == InetAddress(*client)
    assert conn["local"] == InetAddress(*frontend)
    assert conn["via"] == InetAddress("127.0.0.1", proxy_port)
    assert conn["type"] == "TcpEndpoint"
    peer = str(InetAddress(*client))
    assert [e["peer"] for e in events(logs, "connection_opened")] == [peer]
    assert [e["peer"] for e in events(logs, "connection_closed")] == [peer]
    assert events(logs, "proxy_header_rejected") == []


@pytest.mark.asyncio
@on_both_loops
async def test_nothing_is_sent_before_the_header_and_auto_framing_never_sees_it() -> None:
    async with serving(framing="auto", **PROXIED) as server, balancer(server) as (reader, writer):
        header = encode_v2(CLIENT, FRONTEND)
        # Half a header, then a pause: no greeting may come while the header is unread.
        writer.write(header[:9])
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.3)
        writer.write(header[9:20])
        await asyncio.sleep(0.05)
        # The rest with a bare word: auto framing's first read must be "Bob" alone
        # (a header byte would make it another message or a line).
        writer.write(header[20:] + b"Bob")
        assert await asyncio.wait_for(reader.readexactly(8), REPLY_TIMEOUT_S) == b"Welcome!"
        assert await asyncio.wait_for(reader.readexactly(11), REPLY_TIMEOUT_S) == b"Hello, Bob!"


@pytest.mark.asyncio
@on_both_loops
async def test_a_header_byte_by_byte_is_still_one_header(seen: type[Seen]) -> None:
    async with (
        serving(handler=seen, framing="line", **PROXIED) as server,
        balancer(server) as (reader, writer),
    ):
        for byte in encode_v1(CLIENT, FRONTEND):
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.001)
        assert await read_line(reader) == b"Welcome!\n"
    assert seen.connections[0]["peer"] == InetAddress(*CLIENT)


@pytest.mark.asyncio
@on_both_loops
async def test_the_per_address_cap_counts_real_clients_not_the_balancer() -> None:
    refusal = b"Error: too many connections from your address\n"
    async with (
        serving(framing="line", max_per_ip=1, **PROXIED) as server,
        balancer(server) as first,
        balancer(server) as second,
    ):
        first[1].write(encode_v2(CLIENT, FRONTEND))
        second[1].write(encode_v2(("203.0.113.8", 1), FRONTEND))  # another client
        for reader, _ in (first, second):
            assert await read_line(reader) == b"Welcome!\n"
        async with balancer(server) as (reader, writer):
            writer.write(encode_v2((CLIENT[0], 5555), FRONTEND))  # the first one again
            assert await read_to_end(reader) == refusal


@pytest.mark.asyncio
@on_both_loops
async def test_a_local_header_a_health_check_is_the_balancer_itself(seen: type[Seen]) -> None:
    async with (
        serving(handler=seen, framing="line", **PROXIED) as server,
        balancer(server) as (reader, writer),
    ):
        writer.write(encode_v2(command="local"))
        assert await read_line(reader) == b"Welcome!\n"
        own = writer.get_extra_info("sockname")
    [conn] = seen.connections
    assert conn["peer"] == InetAddress(*own[:2])
    assert conn["via"] is None
    assert conn["local"] == InetAddress(*server.address("tcp"))


@pytest.mark.asyncio
@on_both_loops
async def test_a_trusted_ipv6_balancer_on_an_ipv6_listener(seen: type[Seen]) -> None:
    settings = {**PROXIED, "tcp": ["[::1]:0"], "proxy_allow": ["::1/128"]}
    async with serving(handler=seen, framing="line", **settings) as server:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(*server.address("tcp")), REPLY_TIMEOUT_S
        )
        writer.write(encode_v1(CLIENT, FRONTEND))
        assert await read_line(reader) == b"Welcome!\n"
        writer.close()
    assert seen.connections[0]["peer"] == InetAddress(*CLIENT)
    assert seen.connections[0]["via"].host == "::1"


# -- Unix listeners: no header, ever ------------------------------------------------------


@pytest.fixture
def sock_path() -> Iterator[str]:
    """A socket path in a directory of its own, short enough for a socket address."""
    folder = tempfile.mkdtemp(prefix="nf-", dir="/tmp")
    path = os.path.join(folder, "app.sock")
    yield path
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.rmdir(folder)


def listening(family: int, address: Any) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind(address)
    sock.listen()
    return sock


@pytest.mark.asyncio
@on_both_loops
@pytest.mark.parametrize("listeners", ["bound", "handed_over"])
async def test_unix_listeners_read_no_header_while_tcp_ones_require_it(
    seen: type[Seen], sock_path: str, listeners: str
) -> None:
    """With the PROXY protocol on, a Unix client (its own listener, or a Unix socket
    handed over as systemd would) is served at once as itself, and a header it sends is
    a message like any other; TCP listeners beside it still need the header."""
    if listeners == "bound":
        settings: dict[str, Any] = {**PROXIED, "unix": [sock_path]}
    else:
        sockets = [
            listening(socket.AF_INET, ("127.0.0.1", 0)),
            listening(socket.AF_UNIX, sock_path),
        ]
        settings = {**PROXIED, "tcp": None, "udp": None, "sockets": sockets}
    with capture_logs() as logs:
        async with serving(handler=seen, framing="line", **settings) as server:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(sock_path), REPLY_TIMEOUT_S
            )
            assert await read_line(reader) == b"Welcome!\n"  # no header waited for
            header = encode_v1(CLIENT, FRONTEND)
            writer.write(header)
            assert await read_line(reader) == b"? " + header  # a message, not a claim
            writer.close()
            async with balancer(server) as (tcp_reader, tcp_writer):
                tcp_writer.write(b"one\n")  # no header on TCP: refused
                assert await read_to_end(tcp_reader) == b""
            async with balancer(server) as (tcp_reader, tcp_writer):
                tcp_writer.write(encode_v2(CLIENT, FRONTEND) + b"one\n")
                assert await read_line(tcp_reader) == b"Welcome!\n"
                assert await read_line(tcp_reader) == f"{CLIENT[0]} one\n".encode()
    unix, tcp = seen.connections
    assert unix["peer"] == UnixAddress("", os.getpid(), os.getuid(), os.getgid())
    assert (unix["local"], unix["via"]) == (UnixAddress(sock_path), None)
    assert tcp["peer"] == InetAddress(*CLIENT)
    assert [e["transport"] for e in events(logs, "connection_opened")] == ["unix", "tcp"]
    assert [e["reason"] for e in events(logs, "proxy_header_rejected")] == ["missing"]


# -- every refusal: a close and one log line -----------------------------------------------


async def write_and_half_close(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


REFUSALS: list[tuple[str, dict[str, Any], bytes, bool, str]] = [
    # (case, settings, bytes sent, half-close after them, the reason logged)
    ("untrusted", {"proxy_allow": ["10.0.0.0/8"]}, encode_v2(CLIENT, FRONTEND), False,
     "untrusted_source"),
    ("malformed-v1", {}, b"PROXY TCP4 203.0.113.7 198.51.100.1 99999 1\r\n", False,
     "malformed"),
    ("malformed-v2", {}, encode_v2(CLIENT, FRONTEND)[:12] + b"\x31\x11\x00\x0c", False,
     "malformed"),
    ("missing", {}, b"Bob\n", False, "missing"),
    ("wrong-version", {"proxy_protocol": "v2"}, encode_v1(CLIENT, FRONTEND), False,
     "wrong_version"),
    ("truncated", {}, encode_v2(CLIENT, FRONTEND)[:20], True, "truncated"),
    ("closed-at-once", {}, b"", True, "missing"),
    ("timeout", {"proxy_timeout_s": 0.3}, encode_v1(CLIENT, FRONTEND)[:12], False, "timeout"),
]  # fmt: skip


@pytest.mark.asyncio
@on_both_loops
@pytest.mark.parametrize(
    ("settings", "data", "half_close", "reason"),
    [case[1:] for case in REFUSALS],
    ids=[case[0] for case in REFUSALS],
)
async def test_a_refused_header_closes_with_one_log_line_and_others_are_served(
    seen: type[Seen], settings: dict[str, Any], data: bytes, half_close: bool, reason: str
) -> None:
    with capture_logs() as logs:
        async with serving(handler=seen, framing="line", **{**PROXIED, **settings}) as server:
            async with balancer(server) as (reader, writer):
                if half_close:
                    await write_and_half_close(writer, data)
                else:
                    writer.write(data)
                assert await read_to_end(reader) == b""  # no greeting, no error line
            assert server.connection_count == 0
            if reason != "untrusted_source":  # the next connection is served
                async with balancer(server) as (reader, writer):
                    writer.write(encode_v2(CLIENT, FRONTEND))
                    assert await read_line(reader) == b"Welcome!\n"
    [rejected] = events(logs, "proxy_header_rejected")
    assert rejected["reason"] == reason
    assert rejected["peer"].startswith("127.0.0.1:")
    assert rejected["log_level"] == "warning"
    assert "\n" not in rejected["error"]
    # No handler was made for it, and no connection lines were logged for it.
    served = 0 if reason == "untrusted_source" else 1
    assert len(seen.connections) == served
    assert len(events(logs, "connection_opened")) == served


@pytest.mark.asyncio
@on_both_loops
async def test_a_check_that_sends_local_and_resets_at_once_is_no_warning() -> None:
    # HAProxy's plain (layer 4) check: connect, a LOCAL header, then a reset at once.
    # On uvloop the peer cannot even be asked for by then; either way it is not a bad
    # header, and the server carries on.
    with capture_logs() as logs:
        async with serving(**PROXIED) as server:
            for _ in range(5):
                sock = socket.create_connection(server.address("tcp"), timeout=REPLY_TIMEOUT_S)
                sock.sendall(encode_v2(command="local"))
                reset(sock)
            async with balancer(server) as (reader, writer):
                writer.write(encode_v2(CLIENT, FRONTEND))
                assert await asyncio.wait_for(reader.readexactly(8), REPLY_TIMEOUT_S) == b"Welcome!"
    assert events(logs, "proxy_header_rejected") == []


@pytest.mark.asyncio
@on_both_loops
async def test_a_stopping_server_closes_connections_still_waiting_for_a_header() -> None:
    # The header deadline is far beyond every wait here: the close is the stop's doing.
    settings = {**PROXIED, "proxy_timeout_s": 300}
    async with serving(**settings) as server:
        sock = socket.create_connection(server.address("tcp"), timeout=REPLY_TIMEOUT_S)
        sock.setblocking(False)
        await raw_send(sock, b"PROXY ")
        await asyncio.sleep(0.05)  # the gate has it
    with sock:
        assert await raw_receive_until_end(sock) == b""


# -- the command line -----------------------------------------------------------------------


def test_serve_logs_the_real_client_and_each_refusal_as_json(
    cli_server: Callable[..., CliServer],
) -> None:
    server = cli_server(
        "--tcp", "127.0.0.1:0", "--udp", "127.0.0.1:0", "--framing", "line",
        "--proxy-protocol", "v2", "--proxy-allow", "127.0.0.0/8",
    )  # fmt: skip
    address = server.address("tcp")
    with socket.create_connection(address, timeout=REPLY_TIMEOUT_S) as sock:
        sock.sendall(encode_v2(CLIENT, FRONTEND) + b"Bob\nexit\n")
        assert recv_all(sock) == b"Welcome!\nHello, Bob!\n"
    with socket.create_connection(address, timeout=REPLY_TIMEOUT_S) as sock:
        sock.sendall(b"Bob\n")
        assert recv_all(sock) == b""
    [opened] = server.wait_for("connection_opened")
    assert opened["peer"] == "203.0.113.7:4242"
    [closed] = server.wait_for("connection_closed")
    assert closed["peer"] == "203.0.113.7:4242"
    [rejected] = server.wait_for("proxy_header_rejected")
    assert rejected["reason"] == "missing"
    assert rejected["level"] == "warning"
    assert server.stop() == 0


def recv_all(sock: socket.socket) -> bytes:
    data = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(4096):
            data += chunk
    return bytes(data)


def test_serve_refuses_a_proxy_protocol_it_does_not_know() -> None:
    done = run_netframe("serve", "--proxy-protocol", "v3", "--proxy-allow", "127.0.0.1")
    assert_one_line_error(done, 2, "argument --proxy-protocol: 'v3' is not one of off, v1, v2, any")
