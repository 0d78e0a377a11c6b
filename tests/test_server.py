"""The server over real loopback sockets, on both event loops."""

from __future__ import annotations

import asyncio
import socket

import pytest
from structlog.testing import capture_logs

import netframe
from netframe import Connection, Handler, ListenError, Server
from netframe.testing import serving

pytestmark = pytest.mark.asyncio

HAS_IPV6 = socket.has_ipv6 and bool(
    socket.getaddrinfo("::1", 0, socket.AF_INET6, socket.SOCK_STREAM)
)


async def expect(reader: asyncio.StreamReader, expected: bytes) -> None:
    data = await asyncio.wait_for(reader.readexactly(len(expected)), 10)
    assert data == expected


async def expect_closed(reader: asyncio.StreamReader) -> None:
    assert await asyncio.wait_for(reader.read(), 10) == b""


async def open_tcp(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = server.address("tcp")
    return await asyncio.open_connection(host, port)


async def test_auto_framing_gives_the_seeds_client_the_seeds_bytes() -> None:
    async with serving() as server:
        reader, writer = await open_tcp(server)
        await expect(reader, b"Welcome!")
        for name in [b"Michael", b"Tracy", b"Sarah"]:
            writer.write(name)  # bare, in lock-step, as the seeds' client sends
            await expect(reader, b"Hello, " + name + b"!")
        writer.write(b"exit")
        await expect_closed(reader)
        writer.close()


async def test_auto_framing_answers_line_clients_with_their_terminator() -> None:
    async with serving() as server:
        reader, writer = await open_tcp(server)
        await expect(reader, b"Welcome!")
        writer.write(b"Bob\nAlice\r\nCarl\n")  # pipelined lines in one write
        await expect(reader, b"Hello, Bob!\nHello, Alice!\r\nHello, Carl!\n")
        writer.write(b"Da")
        await asyncio.sleep(0.2)  # far beyond the bare-message delay: still one line
        writer.write(b"ve\nexit\nnever answered\n")
        await expect(reader, b"Hello, Dave!\n")
        await expect_closed(reader)
        writer.close()


async def test_line_framing_greets_with_a_line_and_reassembles() -> None:
    async with serving(framing="line") as server:
        reader, writer = await open_tcp(server)
        await expect(reader, b"Welcome!\n")
        for piece in [b"Bo", b"b", b"\r", b"\n"]:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        await expect(reader, b"Hello, Bob!\r\n")
        writer.write(b"exit\nBob\n")
        await expect_closed(reader)
        writer.close()


async def test_raw_framing_treats_each_chunk_as_a_message() -> None:
    async with serving(framing="raw") as server:
        reader, writer = await open_tcp(server)
        await expect(reader, b"Welcome!")
        writer.write(b"Bob\n")
        await expect(reader, b"Hello, Bob\n!")
        writer.write(b"exit")
        await expect_closed(reader)
        writer.close()


async def test_peer_that_closes_ends_its_session_quietly_and_is_logged() -> None:
    with capture_logs() as logs:
        async with serving() as server:
            reader, writer = await open_tcp(server)
            await expect(reader, b"Welcome!")
            writer.write(b"Bob\n")
            await expect(reader, b"Hello, Bob!\n")
            writer.close()
            await writer.wait_closed()
            for _ in range(200):
                if server.connection_count == 0:
                    break
                await asyncio.sleep(0.01)
            assert server.connection_count == 0
    opened = [e for e in logs if e["event"] == "connection_opened"]
    closed = [e for e in logs if e["event"] == "connection_closed"]
    assert len(opened) == len(closed) == 1
    assert closed[0]["conn"] == opened[0]["conn"]
    assert closed[0]["peer"] == opened[0]["peer"]
    assert closed[0]["bytes_in"] == 4
    assert closed[0]["bytes_out"] == len(b"Welcome!Hello, Bob!\n")
    assert closed[0]["messages_in"] == 1
    assert closed[0]["messages_out"] == 2
    assert closed[0]["duration_s"] >= 0
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]


async def test_many_clients_at_once_each_get_their_own_replies() -> None:
    async with serving() as server:

        async def session(i: int) -> None:
            reader, writer = await open_tcp(server)
            await expect(reader, b"Welcome!")
            for n in range(5):
                writer.write(b"c%d-%d\n" % (i, n))
                await expect(reader, b"Hello, c%d-%d!\n" % (i, n))
            writer.write(b"exit\n")
            await expect_closed(reader)
            writer.close()

        await asyncio.gather(*(session(i) for i in range(50)))


async def test_udp_answers_each_datagram_to_its_sender() -> None:
    async with serving() as server:
        host, port = server.address("udp")
        for framing_case, reply in [(b"Michael", b"Hello, Michael!"), (b"Bob\n", b"Hello, Bob!\n")]:
            async with await netframe.UdpClient.connect(host, port) as client:
                assert await client.request(framing_case) == reply


async def test_udp_raw_framing_keeps_the_datagram_whole() -> None:
    async with (
        serving(framing="raw", udp=["127.0.0.1:0"]) as server,
        await netframe.UdpClient.connect(*server.address("udp")) as client,
    ):
        assert await client.request(b"Bob\n") == b"Hello, Bob\n!"


async def test_port_zero_reports_the_bound_ports() -> None:
    async with serving(tcp=["127.0.0.1:0"], udp=["127.0.0.1:0"]) as server:
        kinds = [(a.transport, a.host) for a in server.addresses]
        assert kinds == [("tcp", "127.0.0.1"), ("udp", "127.0.0.1")]
        assert all(a.port > 0 for a in server.addresses)


@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback here")
async def test_ipv6_loopback_tcp_and_udp() -> None:
    async with serving(tcp=["[::1]:0"], udp=["[::1]:0"]) as server:
        host, port = server.address("tcp")
        assert host == "::1"
        reader, writer = await asyncio.open_connection(host, port)
        await expect(reader, b"Welcome!")
        writer.write(b"Bob\n")
        await expect(reader, b"Hello, Bob!\n")
        writer.close()
        async with await netframe.UdpClient.connect(*server.address("udp")) as client:
            assert await client.request(b"Bob") == b"Hello, Bob!"


async def test_other_encodings_such_as_gbk() -> None:
    async with serving(encoding="gbk") as server:
        reader, writer = await open_tcp(server)
        await expect(reader, b"Welcome!")
        writer.write("世界\n".encode("gbk"))
        await expect(reader, "Hello, 世界!\n".encode("gbk"))
        writer.close()


async def test_undecodable_bytes_get_an_error_line_and_the_session_goes_on() -> None:
    with capture_logs() as logs:
        async with serving() as server:
            reader, writer = await open_tcp(server)
            await expect(reader, b"Welcome!")
            writer.write(b"\xff\xfe\nok\n\xc3\n")
            await expect(
                reader,
                b"Error: message is not valid utf-8\nHello, ok!\n"
                b"Error: message is not valid utf-8\n",
            )
            writer.close()
    assert len([e for e in logs if e["event"] == "undecodable_message"]) == 1


async def test_udp_undecodable_datagrams_are_dropped_without_reply() -> None:
    async with (
        serving(udp=["127.0.0.1:0"]) as server,
        await netframe.UdpClient.connect(*server.address("udp"), timeout_s=0.3) as client,
    ):
        client.send(b"\xff\xfe")
        with pytest.raises(netframe.ClientError, match="no reply"):
            await client.receive()
        assert await client.request(b"Bob") == b"Hello, Bob!"


class SlowUpper(Handler):
    """An async handler: waits on a 'lookup' before answering."""

    async def on_message(self, conn: Connection, message: str) -> None:
        if message == "exit":
            conn.close()
            return
        await asyncio.sleep(0.05 if message.startswith("slow") else 0)
        conn.send(message.upper())


async def test_async_handler_keeps_order_and_does_not_block_other_clients() -> None:
    async with serving(handler=SlowUpper, tcp=["127.0.0.1:0"]) as server:
        slow_reader, slow_writer = await open_tcp(server)
        slow_writer.write(b"slow1\nfast\nslow2\n")
        reader, writer = await open_tcp(server)
        writer.write(b"other\n")
        await expect(reader, b"OTHER\n")
        await expect(slow_reader, b"SLOW1\nFAST\nSLOW2\n")
        slow_writer.write(b"exit\nafter\n")
        await expect_closed(slow_reader)
        writer.close()
        slow_writer.close()


async def test_async_handler_finishes_queued_messages_after_peer_half_closes() -> None:
    async with serving(handler=SlowUpper, tcp=["127.0.0.1:0"]) as server:
        reader, writer = await open_tcp(server)
        writer.write(b"slow\nlast\n")
        writer.write_eof()
        await expect(reader, b"SLOW\nLAST\n")
        await expect_closed(reader)
        writer.close()


class Broken(Handler):
    def on_message(self, conn: Connection, message: str) -> None:
        if message == "boom":
            raise RuntimeError("handler bug")
        conn.send(message)


async def test_handler_exception_closes_only_that_connection() -> None:
    with capture_logs() as logs:
        async with serving(handler=Broken, tcp=["127.0.0.1:0"]) as server:
            bad_reader, bad_writer = await open_tcp(server)
            good_reader, good_writer = await open_tcp(server)
            bad_writer.write(b"ok\nboom\nlater\n")
            await expect(bad_reader, b"ok\n")
            await expect_closed(bad_reader)
            good_writer.write(b"still\n")
            await expect(good_reader, b"still\n")
            bad_writer.close()
            good_writer.close()
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


async def test_close_lets_replies_drain_then_closes_every_connection() -> None:
    server = Server(tcp=["127.0.0.1:0"])
    await server.start()
    reader, writer = await open_tcp(server)
    await expect(reader, b"Welcome!")
    serve = asyncio.ensure_future(server.serve_forever())
    await asyncio.sleep(0)
    server.stop()
    await asyncio.wait_for(serve, 10)
    await expect_closed(reader)
    assert server.connection_count == 0
    writer.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(*server.address("tcp"))


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
            reader, writer = await open_tcp(server)
            await expect_closed(reader)
            writer.close()
            reader, writer = await open_tcp(server)  # the listener still accepts
            writer.write(b"hi\n")
            await expect(reader, b"hi\n")
            writer.close()
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
    lines = [b"m%d" % i for i in range(5000)]
    async with serving(handler=AsyncEcho, framing="line", tcp=["127.0.0.1:0"]) as server:
        reader, writer = await open_tcp(server)
        writer.write(b"".join(line + b"\n" for line in lines))
        await expect(reader, b"".join(line + b"\n" for line in lines))
        writer.close()


class Raises(Handler):
    def on_message(self, conn: Connection, message: str) -> None:
        raise RuntimeError("bug")


async def test_udp_handler_errors_are_logged_once_per_interval_not_per_datagram() -> None:
    with capture_logs() as logs:
        async with (
            serving(handler=Raises, udp=["127.0.0.1:0"]) as server,
            await netframe.UdpClient.connect(*server.address("udp")) as client,
        ):
            for i in range(50):
                client.send(b"x%d" % i)
            client.send(b"\xff")
            await asyncio.sleep(0.3)
    errors = [e for e in logs if e["event"] == "handler_error"]
    assert len(errors) == 1
    summaries = [e for e in logs if e["event"] == "datagrams_dropped"]
    assert [e["reason"] for e in summaries] == ["undecodable"]  # its own kind of drop


async def test_run_inside_a_running_loop_says_to_use_server_instead() -> None:
    with pytest.raises(netframe.RunInLoopError, match=r"use `async with netframe\.Server"):
        netframe.run(tcp=["127.0.0.1:0"], udp=[])


async def test_every_netframe_exception_shares_one_base_and_keeps_its_builtin_kind() -> None:
    kinds = {
        netframe.ConfigError: ValueError,
        netframe.HandlerError: LookupError,
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
