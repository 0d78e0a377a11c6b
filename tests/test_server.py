"""The server's behaviour and API over real loopback sockets, on both event loops.

Clients that misbehave are in test_hostile.py; the harness (both loops, the clients, the
bounded waits) is conftest.py's.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

import pytest
from conftest import (
    REPLY_TIMEOUT_S,
    Client,
    raw_client,
    raw_receive,
    raw_receive_until_end,
    raw_send,
    udp_client,
    wait_until,
)
from structlog.testing import capture_logs

import netframe
import netframe.udp
from netframe import Connection, Handler, ListenError, Server
from netframe.testing import serving

pytestmark = [pytest.mark.asyncio, pytest.mark.usefixtures("loop_checked")]

HAS_IPV6 = socket.has_ipv6 and bool(
    socket.getaddrinfo("::1", 0, socket.AF_INET6, socket.SOCK_STREAM)
)


async def test_auto_framing_gives_the_seeds_client_the_seeds_bytes() -> None:
    async with serving() as server, Client.connect(server) as client:
        await client.expect(b"Welcome!")
        for name in [b"Michael", b"Tracy", b"Sarah"]:
            await client.send(name)  # bare, in lock-step, as the seeds' client sends
            await client.expect(b"Hello, " + name + b"!")
        await client.send(b"exit")
        await client.expect_closed()


async def test_raw_framing_treats_each_chunk_as_a_message() -> None:
    async with serving(framing="raw") as server, Client.connect(server) as client:
        await client.expect(b"Welcome!")
        await client.send(b"Bob\n")
        await client.expect(b"Hello, Bob\n!")
        await client.send(b"exit")
        await client.expect_closed()


async def test_peer_that_closes_ends_its_session_quietly_and_is_logged() -> None:
    with capture_logs() as logs:
        async with serving() as server:
            began = time.monotonic()
            async with Client.connect(server) as client:
                await client.expect(b"Welcome!")
                await client.send(b"Bob\n")
                await client.expect(b"Hello, Bob!\n")
            await wait_until(lambda: server.connection_count == 0, "the server saw the close")
            ended = time.monotonic()
    opened = [e for e in logs if e["event"] == "connection_opened"]
    closed = [e for e in logs if e["event"] == "connection_closed"]
    assert len(opened) == len(closed) == 1
    assert closed[0]["conn"] == opened[0]["conn"]
    assert closed[0]["peer"] == opened[0]["peer"]
    assert closed[0]["reason"] == "peer_closed"
    assert closed[0]["bytes_in"] == 4
    assert closed[0]["bytes_out"] == len(b"Welcome!Hello, Bob!\n")
    assert closed[0]["messages_in"] == 1
    assert closed[0]["messages_out"] == 2
    # The session's own length: it took a round trip, and it lies within the test's
    # (a duration from the wrong clock or the wrong start would not).
    assert 0 < closed[0]["duration_s"] <= ended - began
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]


async def test_udp_raw_framing_keeps_the_datagram_whole() -> None:
    async with (
        serving(framing="raw", udp=["127.0.0.1:0"]) as server,
        await udp_client(server) as client,
    ):
        assert await client.request(b"Bob\n") == b"Hello, Bob\n!"


async def test_port_zero_reports_the_bound_ports() -> None:
    async with serving(tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"]) as server:
        kinds = [(a.transport, a.host) for a in server.addresses]
        assert kinds == [("tcp", "127.0.0.1"), ("udp", "127.0.0.1")]
        assert all(a.port > 0 for a in server.addresses)


async def greet_bob_over_tcp_and_udp(server: Server) -> None:
    """The tutorial's exchange with ``server``'s first TCP and first UDP listener."""
    async with Client.connect(server) as client:
        await client.expect(b"Welcome!")
        await client.send(b"Bob\n")
        await client.expect(b"Hello, Bob!\n")
    async with await udp_client(server) as udp:
        assert await udp.request(b"Bob") == b"Hello, Bob!"


async def test_sockets_bound_elsewhere_are_served_in_place_of_addresses() -> None:
    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    datagrams = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    datagrams.bind(("127.0.0.1", 0))
    given = {("tcp", port), ("udp", datagrams.getsockname()[1])}
    # The configured addresses are not bound: port 1 would need privilege.
    server = Server(tcp=["127.0.0.1:1"], udp=["127.0.0.1:1"], sockets=[listening, datagrams])
    async with server:
        assert {(a.transport, a.port) for a in server.addresses} == given
        await greet_bob_over_tcp_and_udp(server)
    # The server owned both and closed them.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert datagrams.fileno() == -1


async def test_a_socket_netframe_cannot_serve_is_refused() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right, pytest.raises(netframe.ConfigError, match="serves TCP and UDP sockets"):
        Server(sockets=[left])


@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback here")
async def test_ipv6_loopback_tcp_and_udp() -> None:
    async with serving(tcp=["[::1]:0"], udp=["[::1]:0"]) as server:
        assert server.address("tcp")[0] == "::1"
        await greet_bob_over_tcp_and_udp(server)


async def test_other_encodings_such_as_gbk() -> None:
    async with serving(encoding="gbk") as server, Client.connect(server) as client:
        await client.expect(b"Welcome!")
        await client.send("世界\n".encode("gbk"))
        await client.expect("Hello, 世界!\n".encode("gbk"))


# -- async handlers ----------------------------------------------------------------------

#: What a ``bigN`` message adds to its reply: more than the socket buffers of both ends
#: hold, four replies together.
BIG_REPLY_BYTES = 2 * 1024 * 1024


class Gated(Handler):
    """Answers each message in capitals and records, in order, each call and each reply.

    A message ``slowN`` is answered by an async call that waits for the test's ``gate``:
    an await in flight for as long as the test wants. ``bigN`` gets ``BIG_REPLY_BYTES``
    dots after its capitals. ``exit`` closes.
    """

    def __init__(self, gate: asyncio.Event, events: list[str]) -> None:
        self.gate = gate
        self.events = events

    def on_message(self, conn: Connection, message: str) -> Awaitable[None] | None:
        if message == "exit":
            conn.close()
            return None
        self.events.append(f"start {message}")
        if message.startswith("slow"):
            return self._after_the_gate(conn, message)
        self._reply(conn, message)
        return None

    async def _after_the_gate(self, conn: Connection, message: str) -> None:
        await self.gate.wait()
        self._reply(conn, message)

    def _reply(self, conn: Connection, message: str) -> None:
        conn.send(message.upper() + ("." * BIG_REPLY_BYTES if message.startswith("big") else ""))
        self.events.append(f"reply {message}")


def gated() -> tuple[asyncio.Event, list[str], Callable[[], Handler]]:
    """A closed gate, the list of events, and a factory of :class:`Gated` sharing them."""
    gate, events = asyncio.Event(), []
    return gate, events, lambda: Gated(gate, events)


async def test_a_client_in_an_async_call_or_in_mid_line_holds_up_no_other_client() -> None:
    gate, events, handler = gated()
    async with (
        serving(handler=handler, framing="line", tcp=["127.0.0.1:0"]) as server,
        Client.connect(server) as halfway,
        Client.connect(server) as waiting,
        Client.connect(server) as other,
    ):
        await halfway.send(b"hal")  # half a line, sent before the slow call begins
        await waiting.send(b"slow1\nfast\nslow2\n")
        await wait_until(lambda: "start slow1" in events, "the slow call has begun")
        # One call waits on the gate and one line is unfinished: another client has two
        # whole exchanges and leaves. A server serving one client, or one call, at a
        # time would wait here for the gate that is only opened afterwards.
        await other.send(b"one\n")
        await other.expect(b"ONE\n")
        await other.send(b"two\nexit\n")
        await other.expect(b"TWO\n")
        await other.expect_closed()
        events.append("other left")
        gate.set()
        # The messages behind the slow call are answered after it, in order.
        await waiting.expect(b"SLOW1\nFAST\nSLOW2\n")
        await halfway.send(b"f\n")
        await halfway.expect(b"HALF\n")
    assert events == [
        "start slow1",
        *("start one", "reply one", "start two", "reply two"),
        "other left",
        *("reply slow1", "start fast", "reply fast", "start slow2", "reply slow2"),
        *("start half", "reply half"),
    ]


async def test_async_handler_finishes_queued_messages_after_peer_half_closes() -> None:
    gate, events, handler = gated()
    async with (
        serving(handler=handler, framing="line", tcp=["127.0.0.1:0"]) as server,
        Client.connect(server) as client,
    ):
        await client.send(b"slow\nlast\n")
        await wait_until(lambda: "start slow" in events, "the slow call has begun")
        client.writer.write_eof()  # while the call is in flight, "last" queued behind it
        await asyncio.sleep(0.05)
        gate.set()
        await client.expect(b"SLOW\nLAST\n")
        await client.expect_closed()


async def test_a_stop_delivers_every_queued_reply_then_closes_every_connection() -> None:
    gate, events, handler = gated()
    bigs = [b"big%d" % i for i in range(4)]
    big_replies = b"".join(b"BIG%d" % i + b"." * BIG_REPLY_BYTES + b"\n" for i in range(4))
    with capture_logs() as logs:
        server = Server(handler=handler, framing="line", tcp=["127.0.0.1:0"])
        await server.start()
        serve = asyncio.ensure_future(server.serve_forever())
        async with (
            Client.connect(server) as idle,
            Client.connect(server) as waiting,
            raw_client(server, rcvbuf=64 * 1024) as not_reading,
        ):
            # Pipelined messages behind an async call in flight ...
            await waiting.send(b"slow\nafter1\nafter2\n")
            # ... and 8 MiB of replies to a client that has not read a byte: more than
            # the kernel buffers hold, so most of it waits in the server at the stop.
            await raw_send(not_reading, b"".join(big + b"\n" for big in bigs))
            await wait_until(
                lambda: "start slow" in events and "reply big3" in events,
                "every message has been read",
            )
            server.stop()
            await wait_until(
                lambda: any(e["event"] == "shutdown_started" for e in logs), "the stop began"
            )
            await idle.expect_closed()  # between messages: closed at once
            gate.set()  # only now can the async call finish
            assert await raw_receive(not_reading, len(big_replies)) == big_replies
            assert await raw_receive_until_end(not_reading) == b""
            await waiting.expect(b"SLOW\nAFTER1\nAFTER2\n")
            await waiting.expect_closed()
            await asyncio.wait_for(serve, REPLY_TIMEOUT_S)
    assert server.connection_count == 0
    with pytest.raises(ConnectionRefusedError):
        await asyncio.wait_for(asyncio.open_connection(*server.address("tcp")), REPLY_TIMEOUT_S)
    started = [e for e in logs if e["event"] == "shutdown_started"]
    assert [(e["connections"], e["draining"]) for e in started] == [(3, 1)]
    finished = [e for e in logs if e["event"] == "shutdown_finished"]
    assert [(e["closed"], e["aborted"]) for e in finished] == [(3, 0)]


class Broken(Handler):
    def on_message(self, conn: Connection, message: str) -> None:
        if message == "boom":
            raise RuntimeError("handler bug")
        conn.send(message)


async def test_handler_exception_closes_only_that_connection() -> None:
    with capture_logs() as logs:
        async with (
            serving(handler=Broken, tcp=["127.0.0.1:0"]) as server,
            Client.connect(server) as bad,
            Client.connect(server) as good,
        ):
            await bad.send(b"ok\nboom\nlater\n")
            await bad.expect(b"ok\n")
            await bad.expect_closed()
            await good.send(b"still\n")
            await good.expect(b"still\n")
    errors = [e for e in logs if e["event"] == "handler_error"]
    assert len(errors) == 1
    assert errors[0]["hook"] == "on_message"


async def test_address_in_use_names_the_address_and_binds_nothing() -> None:
    async with serving(tcp=["127.0.0.1:0"]) as first:
        host, port = first.address("tcp")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free_port = probe.getsockname()[1]
        second = Server(tcp=[f"127.0.0.1:{free_port}", f"{host}:{port}"])
        with pytest.raises(ListenError, match=f"tcp {host}:{port}"):
            await second.start()
        assert second.addresses == []
        # The free address it bound first was released again.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", free_port))


async def test_a_udp_port_bound_before_a_failing_tcp_bind_is_released_at_once() -> None:
    # UDP binds before TCP. When the TCP address is in use, the UDP port bound just
    # before must be free again once start() has raised (uvloop closes a datagram
    # socket one loop turn after close(): start() waits for that turn).
    async with serving(tcp=["127.0.0.1:0"]) as first:
        host, port = first.address("tcp")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            udp_port = probe.getsockname()[1]
        second = Server(tcp=[f"{host}:{port}"], udp=[f"127.0.0.1:{udp_port}"])
        with pytest.raises(ListenError, match=f"tcp {host}:{port}"):
            await second.start()
        assert second.addresses == []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", udp_port))


class FailsOnce(Handler):
    """A handler whose construction fails the first time (a transient error)."""

    made = 0

    def __init__(self) -> None:
        type(self).made += 1
        if type(self).made == 1:
            raise RuntimeError("not ready yet")

    def on_message(self, conn: Connection, message: str) -> None:
        conn.send(message)


async def test_a_failing_handler_factory_closes_one_connection_not_the_listener() -> None:
    FailsOnce.made = 0
    with capture_logs() as logs:
        async with serving(handler=FailsOnce, tcp=["127.0.0.1:0"]) as server:
            async with Client.connect(server) as client:
                await client.expect_closed()
            async with Client.connect(server) as client:  # the listener still accepts
                await client.send(b"hi\n")
                await client.expect(b"hi\n")
    errors = [e for e in logs if e["event"] == "handler_error"]
    assert [e["hook"] for e in errors] == ["handler_factory"]


async def test_a_failing_handler_factory_for_udp_fails_the_start() -> None:
    FailsOnce.made = 0
    with pytest.raises(netframe.HandlerError, match="not ready yet"):
        async with serving(handler=FailsOnce, udp=["127.0.0.1:0"]):
            pass


class AsyncEcho(Handler):
    async def on_message(self, conn: Connection, message: str) -> None:
        await asyncio.sleep(0)
        conn.send(message)


async def test_async_handler_answers_a_long_pipeline_in_order() -> None:
    lines = b"".join(b"m%d\n" % i for i in range(5000))
    async with (
        serving(handler=AsyncEcho, framing="line", tcp=["127.0.0.1:0"]) as server,
        Client.connect(server) as client,
    ):
        await client.send(lines)
        await client.expect(lines)


# -- UDP handler errors ------------------------------------------------------------------


class RaisesUnlessPinged(Handler):
    def on_message(self, conn: Connection, message: str) -> None:
        if message != "ping":
            raise RuntimeError("bug")
        conn.send("pong")


async def udp_handler_error_burst(server: Server) -> None:
    """Fifty datagrams that make the handler raise and one that does not decode; back
    once the server has handled them all (it answers one sender's datagrams in order)."""
    async with await udp_client(server) as client:
        for i in range(50):
            client.send(b"x%d" % i)
        client.send(b"\xff")
        assert await client.request(b"ping") == b"pong"


async def test_udp_handler_errors_are_logged_once_per_interval_not_per_datagram(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An interval no run reaches: what is logged within one is what this test sees.
    monkeypatch.setattr(netframe.udp, "SUMMARY_INTERVAL_S", 3600.0)
    with capture_logs() as logs:
        async with serving(handler=RaisesUnlessPinged, udp=["127.0.0.1:0"]) as server:
            await udp_handler_error_burst(server)
            errors = [e for e in logs if e["event"] == "handler_error"]
            summaries = [e for e in logs if e["event"] == "datagrams_dropped"]
    assert [(e["hook"], e["dropped"]) for e in errors] == [("on_message", 1)]
    assert errors[0].get("exc_info") is True  # logged with its traceback
    # The undecodable datagram is its own kind of drop, logged as the first of its kind.
    assert [(e["reason"], e["dropped"]) for e in summaries] == [("undecodable", 1)]


async def test_udp_drop_counts_still_waiting_are_logged_at_the_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(netframe.udp, "SUMMARY_INTERVAL_S", 3600.0)
    with capture_logs() as logs:
        async with serving(handler=RaisesUnlessPinged, udp=["127.0.0.1:0"]) as server:
            await udp_handler_error_burst(server)
    logged = sum(
        e["dropped"]
        for e in logs
        if e["event"] == "handler_error"
        or (e["event"] == "datagrams_dropped" and e["reason"] == "handler_error")
    )
    assert logged == 50


async def test_run_inside_a_running_loop_says_to_use_server_instead() -> None:
    with pytest.raises(netframe.RunInLoopError, match=r"use `async with netframe\.Server"):
        netframe.run(tcp=["127.0.0.1:0"], udp=[])


async def test_every_netframe_exception_shares_one_base_and_keeps_its_builtin_kind() -> None:
    kinds = {
        netframe.ConfigError: ValueError,
        netframe.HandlerError: ValueError,
        netframe.StartError: RuntimeError,
        netframe.ListenError: OSError,
        netframe.LoopUnavailable: RuntimeError,
        netframe.ClientError: ConnectionError,
        netframe.RunInLoopError: RuntimeError,
    }
    for error, builtin in kinds.items():
        assert issubclass(error, netframe.Error)
        assert issubclass(error, builtin)


async def test_a_handler_factory_is_checked_once_when_the_server_is_built() -> None:
    with pytest.raises(netframe.HandlerError, match="made a int, not a handler"):
        Server(handler=lambda: 42, tcp=["127.0.0.1:0"])


async def test_testing_helpers_take_an_empty_list_as_that_transport_off() -> None:
    async with serving(udp=[]) as server:
        assert [bound.transport for bound in server.addresses] == ["tcp"]
    async with serving(tcp=["127.0.0.1:0"]) as server:
        assert [bound.transport for bound in server.addresses] == ["tcp"]
    async with serving() as server:
        assert sorted(bound.transport for bound in server.addresses) == ["tcp", "udp"]


async def test_a_server_encoding_other_than_utf8_decodes_and_encodes_in_it() -> None:
    # UTF-8, the default, takes a fast path; every other encoding is named on each call.
    async with serving(encoding="latin-1", framing="line") as server:
        async with Client.connect(server) as client:
            await client.expect(b"Welcome!\n")
            await client.send(b"Zo\xeb\n")  # "Zoë" in latin-1: not valid UTF-8
            await client.expect(b"Hello, Zo\xeb!\n")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(10)
            sock.sendto(b"Zo\xeb\n", server.address("udp"))
            assert await asyncio.to_thread(sock.recv, 100) == b"Hello, Zo\xeb!\n"
    async with (
        serving(encoding="ascii", framing="line") as server,
        Client.connect(server) as client,
    ):
        await client.expect(b"Welcome!\n")
        await client.send(b"Zo\xc3\xab\n")
        await client.expect(b"Error: message is not valid ascii\n")
