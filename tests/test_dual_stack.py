"""IPv6 listeners and IPv4 clients: what ``[::]`` serves, and IPv4-mapped peers.

``--tcp [::]:PORT`` and ``--udp [::]:PORT`` are IPv6 only (``IPV6_V6ONLY``), whatever
``net.ipv6.bindv6only`` says; IPv4 is a listener of its own (``0.0.0.0:PORT``), so both
can share a port. A dual-stack socket made elsewhere (systemd's ``BindIPv6Only=both``,
``Server(sockets=...)``) is served as it is, and its IPv4 clients, which the socket
reports as ``::ffff:a.b.c.d``, are IPv4 addresses to the handler, the logs and the
per-address limits. Every test runs on both loops.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from structlog.testing import capture_logs

from netframe import Connection, Handler, InetAddress, Server

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.usefixtures("loop_checked"),
    pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 here"),
]


class Peers(Handler):
    """Answers each message with the peer the connection reports."""

    def on_connect(self, conn: Connection) -> None:
        if conn.network == "tcp":
            conn.send(f"peer {conn.peer}")

    def on_message(self, conn: Connection, message: str) -> None:
        conn.send(f"peer {conn.peer}")


def dual_stack(kind: int) -> socket.socket:
    """A socket on [::], port 0, that also takes IPv4 (``V6ONLY`` off)."""
    sock = socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", 0))
    if kind == socket.SOCK_STREAM:
        sock.listen(16)
    sock.setblocking(False)
    return sock


async def read_line(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readline(), 10)


async def test_an_ipv6_wildcard_listener_takes_no_ipv4() -> None:
    async with Server(handler=Peers, tcp=["[::]:0"], udp=["[::]:0"], framing="line") as server:
        port = server.address("tcp")[1]
        with pytest.raises(ConnectionRefusedError):
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        # IPv6 is served.
        reader, writer = await asyncio.wait_for(asyncio.open_connection("::1", port), 10)
        assert (await read_line(reader)).startswith(b"peer [::1]:")
        writer.close()
        # UDP alike: an IPv4 datagram to the port finds nobody (ICMP port unreachable).
        udp_port = server.address("udp")[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(10)
            sock.connect(("127.0.0.1", udp_port))
            sock.send(b"Ann\n")
            with pytest.raises(ConnectionRefusedError):
                sock.recv(100)


async def test_ipv4_and_ipv6_wildcards_share_a_port() -> None:
    async with Server(handler=Peers, tcp=["0.0.0.0:0"], framing="line") as first:
        port = first.address("tcp")[1]
        async with Server(handler=Peers, tcp=[f"[::]:{port}"], framing="line") as second:
            assert second.address("tcp")[1] == port


async def test_a_dual_stack_socket_shows_ipv4_clients_as_ipv4() -> None:
    sock = dual_stack(socket.SOCK_STREAM)
    port = sock.getsockname()[1]
    with capture_logs() as logs:
        async with Server(handler=Peers, sockets=[sock], framing="line", max_per_ip=1):
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            client_port = writer.get_extra_info("sockname")[1]
            assert await read_line(reader) == f"peer 127.0.0.1:{client_port}\n".encode()
            # The per-address cap counts it as 127.0.0.1, the same client as a second
            # connection from there.
            other, other_writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), 10
            )
            assert await read_line(other) == b"Error: too many connections from your address\n"
            other_writer.close()
            # An IPv6 client of the same socket is itself.
            six, six_writer = await asyncio.wait_for(asyncio.open_connection("::1", port), 10)
            assert (await read_line(six)).startswith(b"peer [::1]:")
            six_writer.close()
            writer.close()
    peers = {event.get("peer") for event in logs if event.get("peer")}
    assert f"127.0.0.1:{client_port}" in peers
    assert not any(str(peer).startswith("[::ffff:") for peer in peers), peers


async def test_a_dual_stack_udp_socket_answers_ipv4_as_ipv4() -> None:
    sock = dual_stack(socket.SOCK_DGRAM)
    port = sock.getsockname()[1]
    seen: list[Any] = []

    class Record(Handler):
        def on_message(self, conn: Connection, message: str) -> None:
            seen.append(conn.peer)
            conn.send("ok")

    async with Server(handler=Record, sockets=[sock]):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(10)
            client.sendto(b"Ann\n", ("127.0.0.1", port))
            assert await asyncio.to_thread(client.recv, 100) == b"ok\n"
            assert seen == [InetAddress("127.0.0.1", client.getsockname()[1])]
