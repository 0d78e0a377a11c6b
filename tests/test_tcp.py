"""The TCP endpoint's protections and its handler contract, over real sockets on both loops.

Timeouts here are short settings on a library server; every wait has a bound well above
them, so the tests check what happens, never how fast.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import threading
import time
from typing import Any

import pytest
from structlog.testing import capture_logs

from netframe import Connection, Handler, Server
from netframe.testing import serving

pytestmark = pytest.mark.timeout(60)

TCP_ONLY: dict[str, Any] = {"tcp": ["127.0.0.1:0"], "udp": []}


async def connect(server: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*server.address("tcp"))


async def read_until_closed(reader: asyncio.StreamReader, bound_s: float = 15) -> bytes:
    return await asyncio.wait_for(reader.read(), bound_s)


async def wait_until(condition: Any, bound_s: float = 15) -> None:
    """Poll ``condition()`` until it holds; fail after ``bound_s``."""
    deadline = time.monotonic() + bound_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.02)


def closed_reasons(logs: list[dict[str, Any]]) -> list[str]:
    return [e["reason"] for e in logs if e["event"] == "connection_closed"]


# -- deadlines ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_an_idle_connection_is_closed_at_the_idle_timeout_with_its_reason() -> None:
    with capture_logs() as logs:
        async with serving(idle_timeout_s=0.5, framing="line", **TCP_ONLY) as server:
            reader, writer = await connect(server)
            started = time.monotonic()
            assert await read_until_closed(reader) == b"Welcome!\n"
            assert time.monotonic() - started >= 0.5  # never early
            writer.close()
    assert closed_reasons(logs) == ["idle_timeout"]


@pytest.mark.asyncio
async def test_traffic_keeps_a_connection_open_past_the_idle_timeout() -> None:
    async with serving(idle_timeout_s=0.6, framing="line", **TCP_ONLY) as server:
        reader, writer = await connect(server)
        await reader.readexactly(len(b"Welcome!\n"))
        for i in range(6):  # 1.2 s of traffic, twice the idle timeout
            writer.write(b"n%d\n" % i)
            assert await asyncio.wait_for(reader.readline(), 10) == b"Hello, n%d!\n" % i
            await asyncio.sleep(0.2)
        writer.close()


@pytest.mark.asyncio
async def test_a_trickled_message_is_cut_off_at_its_deadline_not_kept_alive_by_bytes() -> None:
    with capture_logs() as logs:
        async with serving(message_timeout_s=0.8, framing="line", **TCP_ONLY) as server:
            reader, writer = await connect(server)
            await reader.readexactly(len(b"Welcome!\n"))
            started = time.monotonic()
            for _ in range(40):  # a byte every 0.1 s: far longer than the deadline
                if reader.at_eof() or writer.is_closing():
                    break
                writer.write(b"x")
                await asyncio.sleep(0.1)
                if reader._buffer:  # type: ignore[attr-defined]  # the reply has come
                    break
            assert await read_until_closed(reader) == b"Error: message timed out\n"
            assert time.monotonic() - started >= 0.8  # never early; the read above bounds it
            writer.close()
    assert closed_reasons(logs) == ["message_timeout"]
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["message_timeout"]


@pytest.mark.asyncio
async def test_complete_lines_with_a_partial_one_behind_each_never_time_out() -> None:
    # A client streaming lines where every read ends inside the next line has a message
    # under way all the time, but never the same one for long.
    async with serving(message_timeout_s=0.5, framing="line", **TCP_ONLY) as server:
        reader, writer = await connect(server)
        await reader.readexactly(len(b"Welcome!\n"))
        writer.write(b"a")
        for i in range(8):
            await asyncio.sleep(0.15)
            writer.write(b"%d\na" % i)
            assert await asyncio.wait_for(reader.readline(), 10) == b"Hello, a%d!\n" % i
        writer.close()
        await asyncio.wait_for(reader.read(), 10)  # gone before the stop: no drain to wait for


@pytest.mark.asyncio
async def test_a_client_that_never_reads_is_aborted_at_the_send_timeout() -> None:
    with capture_logs() as logs:
        async with serving(
            send_timeout_s=0.5, write_buffer_high_bytes=4096, write_buffer_low_bytes=1024,
            handler="echo", framing="raw", **TCP_ONLY,
        ) as server:  # fmt: skip
            _, writer = await connect(server)
            writer.transport.set_write_buffer_limits(high=1 << 30)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            chunk = b"x" * 65536
            for _ in range(400):  # at most 26 MB; the server stops reading long before
                writer.write(chunk)
                await asyncio.sleep(0.005)
                if server.connection_count == 0:
                    break
            await wait_until(lambda: server.connection_count == 0)
            writer.transport.abort()
    assert closed_reasons(logs) == ["send_timeout"]


# -- caps --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_over_the_connection_cap_a_client_is_told_and_capacity_returns() -> None:
    with capture_logs() as logs:
        async with serving(max_connections=2, framing="line", **TCP_ONLY) as server:
            first, second = await connect(server), await connect(server)
            for reader, _ in (first, second):
                await reader.readexactly(len(b"Welcome!\n"))
            refused, refused_writer = await connect(server)
            assert await read_until_closed(refused) == b"Error: too many connections\n"
            first[1].close()
            await wait_until(lambda: server.connection_count == 1)
            again, again_writer = await connect(server)
            assert await again.readexactly(len(b"Welcome!\n")) == b"Welcome!\n"
            for writer in (second[1], refused_writer, again_writer):
                writer.close()
    refusals = [e for e in logs if e["event"] == "connections_refused"]
    assert [(e["reason"], e["refused"]) for e in refusals] == [("max_connections", 1)]


@pytest.mark.asyncio
async def test_the_per_address_cap_counts_each_address_apart() -> None:
    async with serving(max_per_ip=1, framing="line", **TCP_ONLY) as server:
        host, port = server.address("tcp")
        one = await asyncio.open_connection(host, port, local_addr=("127.0.0.2", 0))
        two = await asyncio.open_connection(host, port, local_addr=("127.0.0.3", 0))
        for reader, _ in (one, two):
            assert await reader.readexactly(9) == b"Welcome!\n"
        extra, extra_writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.2", 0))
        expected = b"Error: too many connections from your address\n"
        assert await read_until_closed(extra) == expected
        for writer in (one[1], two[1], extra_writer):
            writer.close()


# -- async handlers ----------------------------------------------------------------------


class CancelledLookup(Handler):
    """``slow`` awaits a lookup that another task cancels."""

    async def on_message(self, conn: Connection, message: str) -> None:
        if message == "slow":
            lookup = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(0.05, lookup.cancel)
            await lookup
        conn.send(message.upper())


@pytest.mark.asyncio
async def test_a_cancelled_await_closes_the_connection_after_earlier_replies() -> None:
    with capture_logs() as logs:
        async with serving(handler=CancelledLookup, framing="line", **TCP_ONLY) as server:
            reader, writer = await connect(server)
            writer.write(b"one\nslow\nthree\n")
            assert await read_until_closed(reader) == b"ONE\n"
            other_reader, other_writer = await connect(server)
            other_writer.write(b"still\n")
            assert await asyncio.wait_for(other_reader.readline(), 10) == b"STILL\n"
            writer.close()
            other_writer.close()
    errors = [e for e in logs if e["event"] == "handler_error"]
    assert [(e["hook"], e["error"]) for e in errors] == [("on_message", "an await was cancelled")]


class AsyncUpper(Handler):
    async def on_message(self, conn: Connection, message: str) -> None:
        await asyncio.sleep(0.01)
        conn.send(message.upper())


@pytest.mark.asyncio
async def test_an_overlong_line_behind_async_calls_is_refused_after_them() -> None:
    async with serving(handler=AsyncUpper, framing="line", max_line_bytes=8, **TCP_ONLY) as srv:
        reader, writer = await connect(srv)
        writer.write(b"a\nb\n" + b"x" * 20 + b"\nnever\n")
        expected = b"A\nB\nError: line exceeds 8 bytes\n"
        assert await read_until_closed(reader) == expected
        writer.close()


class SlowGreeting(Handler):
    """Greets only after an awaited lookup; says goodbye asynchronously too."""

    goodbyes: list[int]

    async def on_connect(self, conn: Connection) -> None:
        await asyncio.sleep(0.05)
        conn.send("Welcome, after a lookup")

    def on_message(self, conn: Connection, message: str) -> None:
        conn.send(f"Hello, {message}!")

    async def on_disconnect(self, conn: Connection) -> None:
        await asyncio.sleep(0.05)
        SlowGreeting.goodbyes.append(conn.id)


@pytest.mark.asyncio
async def test_async_on_connect_greets_before_any_reply_and_on_disconnect_runs() -> None:
    SlowGreeting.goodbyes = []
    async with serving(handler=SlowGreeting, framing="line", **TCP_ONLY) as server:
        reader, writer = await connect(server)
        writer.write(b"Bob\n")  # sent before the greeting exists
        assert await asyncio.wait_for(reader.readline(), 10) == b"Welcome, after a lookup\n"
        assert await asyncio.wait_for(reader.readline(), 10) == b"Hello, Bob!\n"
        writer.close()
    assert len(SlowGreeting.goodbyes) == 1  # the stopping server waited for it


# -- graceful shutdown -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_shutdown_lets_a_partial_line_finish_and_closes_idle_clients_at_once() -> None:
    with capture_logs() as logs:
        server = Server(framing="line", shutdown_timeout_s=10, **TCP_ONLY)
        await server.start()
        idle_reader, idle_writer = await connect(server)
        busy_reader, busy_writer = await connect(server)
        for reader in (idle_reader, busy_reader):
            await reader.readexactly(9)
        busy_writer.write(b"Bo")
        await asyncio.sleep(0.1)
        closing = asyncio.create_task(server.close())
        assert await read_until_closed(idle_reader) == b""
        await asyncio.sleep(0.2)
        assert not closing.done()  # still waiting for the partial line
        busy_writer.write(b"b\nignored\n")
        assert await read_until_closed(busy_reader) == b"Hello, Bob!\n"
        await asyncio.wait_for(closing, 10)
        for writer in (idle_writer, busy_writer):
            writer.close()
    started = next(e for e in logs if e["event"] == "shutdown_started")
    finished = next(e for e in logs if e["event"] == "shutdown_finished")
    assert (started["connections"], started["idle_closed"], started["draining"]) == (2, 1, 1)
    assert (finished["closed"], finished["aborted"]) == (2, 0)


class GatedUpper(Handler):
    """An async handler whose first call waits until the test opens the gate."""

    started: asyncio.Event
    gate: asyncio.Event

    async def on_message(self, conn: Connection, message: str) -> None:
        GatedUpper.started.set()
        await GatedUpper.gate.wait()
        conn.send(message.upper())


@pytest.mark.asyncio
async def test_shutdown_waits_for_an_async_call_in_flight_and_sends_its_reply() -> None:
    GatedUpper.started, GatedUpper.gate = asyncio.Event(), asyncio.Event()
    server = Server(handler=GatedUpper, framing="line", **TCP_ONLY)
    await server.start()
    reader, writer = await connect(server)
    writer.write(b"a\nb\nc\n")
    await asyncio.wait_for(GatedUpper.started.wait(), 10)
    closing = asyncio.create_task(server.close())
    await asyncio.sleep(0.2)
    assert not closing.done()
    GatedUpper.gate.set()
    assert await read_until_closed(reader) == b"A\nB\nC\n"
    await asyncio.wait_for(closing, 10)
    writer.close()


@pytest.mark.asyncio
async def test_shutdown_aborts_what_is_still_busy_at_the_deadline() -> None:
    with capture_logs() as logs:
        async with serving(framing="line", shutdown_timeout_s=0.3, **TCP_ONLY) as server:
            reader, writer = await connect(server)
            assert await asyncio.wait_for(reader.readline(), 15) == b"Welcome!\n"
            writer.write(b"never finished")
            await asyncio.sleep(0.1)
    with pytest.raises(ConnectionResetError):  # aborted: a reset, not an orderly close
        await read_until_closed(reader)
    writer.close()
    finished = next(e for e in logs if e["event"] == "shutdown_finished")
    assert finished["aborted"] == 1


def test_stop_works_from_another_thread_and_from_a_signal_handler(loop_name: str) -> None:
    from conftest import LOOPS

    async def main(trigger: str) -> None:
        server = Server(**TCP_ONLY)
        await server.start()
        if trigger == "thread":
            threading.Timer(0.2, server.stop).start()
        else:
            previous = signal.signal(signal.SIGUSR1, lambda *_: server.stop())
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        try:
            await asyncio.wait_for(server.serve_forever(), 10)
        finally:
            if trigger == "signal":
                signal.signal(signal.SIGUSR1, previous)

    for trigger in ("thread", "signal"):
        with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
            runner.run(main(trigger))  # serve_forever returns: bounded by its wait_for


@pytest.mark.asyncio
async def test_a_bare_client_thinking_after_its_first_word_is_not_timed_out() -> None:
    async with serving(message_timeout_s=0.4, **TCP_ONLY) as server:  # auto framing
        reader, writer = await connect(server)
        assert await reader.readexactly(8) == b"Welcome!"
        writer.write(b"Bob")
        assert await asyncio.wait_for(reader.readexactly(11), 10) == b"Hello, Bob!"
        await asyncio.sleep(1.0)  # longer than the message timeout, between messages
        writer.write(b"Ann")
        assert await asyncio.wait_for(reader.readexactly(11), 10) == b"Hello, Ann!"
        writer.close()


class SlowWelcome(Handler):
    async def on_connect(self, conn: Connection) -> None:
        await asyncio.sleep(0.2)
        conn.send("Welcome!")

    def on_message(self, conn: Connection, message: str) -> None:
        conn.send(f"Hello, {message}!")


@pytest.mark.asyncio
async def test_a_bare_word_sent_during_an_async_greeting_is_answered_after_it() -> None:
    async with serving(handler=SlowWelcome, **TCP_ONLY) as server:
        reader, writer = await connect(server)
        writer.write(b"Bob")
        expected = b"Welcome!Hello, Bob!"
        assert await asyncio.wait_for(reader.readexactly(len(expected)), 10) == expected
        writer.close()


@pytest.mark.asyncio
async def test_the_message_clock_stops_while_the_server_is_not_reading() -> None:
    # 40 queued lines behind a 20 ms lookup each hold reading paused for about 0.8 s, longer
    # than the message timeout, while the last line is half sent.
    async with serving(
        handler=AsyncUpper, framing="line", max_pending_messages=4, message_timeout_s=0.5,
        **TCP_ONLY,
    ) as server:  # fmt: skip
        reader, writer = await connect(server)
        writer.write(b"".join(b"m%d\n" % i for i in range(40)) + b"ha")
        await asyncio.sleep(0.2)
        writer.write(b"lf\n")
        replies = [await asyncio.wait_for(reader.readline(), 10) for _ in range(41)]
        assert replies == [b"M%d\n" % i for i in range(40)] + [b"HALF\n"]
        writer.close()


@pytest.mark.asyncio
async def test_a_cancelled_stop_still_aborts_what_it_was_waiting_for() -> None:
    server = Server(framing="line", shutdown_timeout_s=30, **TCP_ONLY)
    await server.start()
    _, writer = await connect(server)
    writer.write(b"never finished")
    await asyncio.sleep(0.1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(server.close(), 0.3)
    await wait_until(lambda: server.connection_count == 0)
    writer.close()


HOG_HANDLER = """
import os
import netframe

held = []


class Hog(netframe.Handler):
    '''Takes descriptors for itself, as a handler opening files would, until none are left.'''

    def on_connect(self, conn):
        for _ in range(3):
            try:
                held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        conn.send("Welcome!")

    def on_disconnect(self, conn):
        while held:
            os.close(held.pop())
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("network", ["tcp", "unix"])
def test_out_of_descriptors_refusals_are_answered_counted_and_service_returns(
    loop_name: str, tmp_path: Any, network: str
) -> None:
    """Handlers use up the descriptors: on both loops later clients get the busy line, the
    refusals are counted in the configured format, and service returns when they free.
    Unix-socket listeners are guarded the same way as TCP ones."""
    import json
    import resource
    import subprocess
    import sys

    (tmp_path / "hog.py").write_text(HOG_HANDLER)
    path = str(tmp_path / "hog.sock")
    listener = ["--tcp", "127.0.0.1:0"] if network == "tcp" else ["--unix", path]

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    server = subprocess.Popen(
        [sys.executable, "-m", "netframe", "serve", "--log-format", "json", "--loop", loop_name,
         *listener, "--udp", "127.0.0.1:0", "--handler", "hog:Hog"],
        stderr=subprocess.PIPE, text=True, preexec_fn=low_limit,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip

    def connect() -> socket.socket:
        if network == "tcp":
            return socket.create_connection(("127.0.0.1", port), timeout=10)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(10)
        client.connect(path)
        return client

    try:
        assert server.stderr is not None
        port = None
        while port is None:
            event = json.loads(server.stderr.readline())
            if event["event"] == "listening" and event["transport"] == network:
                port = event.get("port", 0)
        clients, answers = [], []
        for _ in range(40):
            client = connect()
            clients.append(client)
            answers.append(client.recv(100))
            time.sleep(0.03)  # arriving over a second, not in one burst
        assert answers.count(b"Welcome!") >= 5
        refused = answers.count(b"Error: too many connections\n")
        assert refused >= 20
        for client in clients:
            client.close()
        time.sleep(1.0)
        with connect() as again:
            assert again.recv(100) == b"Welcome!"
    finally:
        server.terminate()
        _, log = server.communicate(timeout=30)
    events = [json.loads(line) for line in log.splitlines()]  # every line is JSON
    counted = [e for e in events if e["event"] == "connections_refused"]
    assert {e["reason"] for e in counted} == {"no_file_descriptors"}
    assert sum(e["refused"] for e in counted) >= refused
    assert any(e["event"] == "file_descriptors_exhausted" for e in events)


# -- auto framing over real sockets --------------------------------------------------------


@pytest.mark.asyncio
async def test_auto_a_bare_word_is_answered_without_any_wait() -> None:
    # A wait of 30 s would fail this test's bounds: bare words must not wait at all.
    async with serving(bare_message_delay_s=30, **TCP_ONLY) as server:
        reader, writer = await connect(server)
        assert await asyncio.wait_for(reader.readexactly(8), 10) == b"Welcome!"
        for name in (b"Michael", b"Tracy", b"Sarah"):
            writer.write(name)
            reply = b"Hello, " + name + b"!"
            assert await asyncio.wait_for(reader.readexactly(len(reply)), 10) == reply
        writer.write(b"exit")
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()


@pytest.mark.asyncio
async def test_auto_a_long_first_line_in_small_segments_is_one_message() -> None:
    async with serving(**TCP_ONLY) as server:
        reader, writer = await connect(server)
        await reader.readexactly(8)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        name = bytes(range(97, 123)) * 154  # 4,004 bytes
        stream = name + b"\n"
        # One write of a 4,005-byte line as TCP would cut it over a path with the
        # smallest IPv4 MSS: 536-byte segments, then the rest, a little apart.
        for start in range(0, len(stream), 536):
            writer.write(stream[start : start + 536])
            await writer.drain()
            await asyncio.sleep(0.0005)
        reply = await asyncio.wait_for(reader.readline(), 10)
        assert reply == b"Hello, " + name + b"!\n"
        writer.write(b"next\n")
        assert await asyncio.wait_for(reader.readline(), 10) == b"Hello, next!\n"
        writer.close()


@pytest.mark.asyncio
async def test_auto_a_bare_client_that_sends_a_newline_is_still_answered() -> None:
    async with serving(**TCP_ONLY) as server:
        reader, writer = await connect(server)
        await reader.readexactly(8)
        writer.write(b"Michael")
        await asyncio.wait_for(reader.readexactly(len(b"Hello, Michael!")), 10)
        writer.write(b"Tra\ncy")
        reply = b"Hello, Tra\ncy!"
        assert await asyncio.wait_for(reader.readexactly(len(reply)), 10) == reply
        writer.write(b"Sarah")
        reply = b"Hello, Sarah!"
        assert await asyncio.wait_for(reader.readexactly(len(reply)), 10) == reply
        writer.close()


@pytest.mark.asyncio
async def test_length_framing_frames_the_greeting_replies_and_refusals() -> None:
    async with serving(
        framing="length", length_prefix_bytes=2, max_line_bytes=64, **TCP_ONLY
    ) as srv:
        reader, writer = await connect(srv)
        assert await asyncio.wait_for(reader.readexactly(10), 10) == b"\x00\x08Welcome!"
        writer.write(b"\x00\x03Bob\x00\x05Al")
        writer.write(b"ice")
        expected = b"\x00\x0bHello, Bob!\x00\x0dHello, Alice!"
        assert await asyncio.wait_for(reader.readexactly(len(expected)), 10) == expected
        writer.write(b"\xff\xff")  # 65,535 bytes announced: over the limit at once
        error = b"Error: line exceeds 64 bytes"
        assert await read_until_closed(reader) == len(error).to_bytes(2, "big") + error
        writer.close()


@pytest.mark.asyncio
async def test_many_connections_reading_at_once_never_mix_their_bytes() -> None:
    async with serving(handler="echo", framing="raw", max_line_bytes=1 << 20, **TCP_ONLY) as server:

        async def echo(index: int) -> bytes:
            reader, writer = await connect(server)
            payload = bytes([index]) * 300_000
            writer.write(payload)
            received = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
            writer.close()
            return received

        results = await asyncio.gather(*(echo(i) for i in range(1, 21)))
    assert [set(result) for result in results] == [{i} for i in range(1, 21)]
    assert {len(result) for result in results} == {300_000}


@pytest.mark.asyncio
async def test_the_standard_loop_reads_at_most_64_kib_at_a_time() -> None:
    # Its own 256 KiB reads can cost a page mapping each (cpython#85451); uvloop reads
    # into a buffer of its own, made once.
    if not isinstance(asyncio.get_running_loop(), asyncio.BaseEventLoop):
        pytest.skip("only the standard loop allocates a bytes of transport.max_size per read")
    sizes: list[int] = []

    class Sizes(Handler):
        text = False

        def on_message(self, conn: Connection, message: bytes) -> None:
            sizes.append(len(message))
            if sum(sizes) == 1_000_000:
                conn.send(b"done")

    async with serving(handler=Sizes, framing="raw", max_line_bytes=1 << 20, **TCP_ONLY) as server:
        reader, writer = await connect(server)
        writer.write(b"x" * 1_000_000)
        assert await asyncio.wait_for(reader.readexactly(4), 30) == b"done"
        writer.close()
    assert max(sizes) <= 64 * 1024


class _Writes:
    """Counts what goes through a transport's own ``write`` (an instance attribute in
    front of the class's method), and hands it on."""

    def __init__(self, transport: Any) -> None:
        self.calls: list[int] = []
        self._write = transport.write
        transport.write = self

    def __call__(self, data: bytes) -> None:
        self.calls.append(len(data))
        self._write(data)


def _standard_loop_only() -> None:
    if not isinstance(asyncio.get_running_loop(), asyncio.BaseEventLoop):
        pytest.skip("the endpoint reads and writes the socket itself on the standard loop only")


@pytest.mark.asyncio
async def test_on_the_standard_loop_replies_go_straight_to_the_socket() -> None:
    _standard_loop_only()
    writes: list[_Writes] = []

    class Echo(Handler):
        text = False

        def on_connect(self, conn: Connection) -> None:
            writes.append(_Writes(conn._transport))  # type: ignore[attr-defined]

        def on_message(self, conn: Connection, message: bytes) -> None:
            conn.send(message)

    async with serving(handler=Echo, framing="line", **TCP_ONLY) as server:
        reader, writer = await connect(server)
        for number in range(50):
            writer.write(b"%d\n" % number)
            assert await asyncio.wait_for(reader.readline(), 15) == b"%d\n" % number
        writer.close()
    # Nothing was ever left unsent, so the transport's write was never needed.
    assert writes[0].calls == []


@pytest.mark.asyncio
async def test_on_the_standard_loop_what_the_socket_does_not_take_is_queued_in_order() -> None:
    # A reply far larger than the socket's buffers, to a client not reading yet: the
    # socket takes what it can, the transport queues the rest, and every later reply
    # queues behind it (never straight to the socket ahead of it) until it drains.
    _standard_loop_only()
    big = bytes(range(256)) * (16 * 1024)  # 4 MiB
    writes: list[_Writes] = []

    class Bulk(Handler):
        text = False

        def on_connect(self, conn: Connection) -> None:
            transport = conn._transport  # type: ignore[attr-defined]
            # Small, so that the reply cannot fit in the kernel's buffers on any host.
            transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 65536
            )
            writes.append(_Writes(transport))

        def on_message(self, conn: Connection, message: bytes) -> None:
            conn.send(big if message == b"big" else message)

    settings = {"write_buffer_high_bytes": 64 << 20, "write_buffer_low_bytes": 1 << 20}
    async with serving(handler=Bulk, framing="line", **settings, **TCP_ONLY) as server:
        sock = socket.socket()
        # Small before connecting (shrunk on an open connection, the window can stall).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.connect(server.address("tcp"))
        sock.sendall(b"big\n")
        await wait_until(lambda: len(writes) == 1 and len(writes[0].calls) == 1)
        small = b"".join(b"after %d\n" % n for n in range(200))
        sock.sendall(small)
        # Every later reply went through the transport's queue, none around it.
        await wait_until(lambda: sum(writes[0].calls[1:]) == len(small))
        expected = big + b"\n" + small
        received = bytearray()
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        while len(received) < len(expected):
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 15)
            assert chunk
            received += chunk
        sock.close()
    assert received == expected
    assert writes[0].calls[0] < len(big) + 1  # the big reply went out in part


@pytest.mark.asyncio
async def test_a_connection_is_freed_when_it_ends_not_left_to_the_cyclic_collector() -> None:
    # Its endpoint (and with it the handler, the framer, what it held) goes by reference
    # counting as the connection ends, however it ends: no cycle through the transport.
    from netframe.tcp import TcpEndpoint

    def endpoints() -> int:
        return sum(1 for obj in gc.get_objects() if type(obj) is TcpEndpoint)

    gc.collect()
    gc.disable()
    try:
        async with serving(framing="line", **TCP_ONLY) as server:
            before = endpoints()
            for ending in ("exit", "close", "reset"):
                for _ in range(5):
                    reader, writer = await connect(server)
                    writer.write(b"name\n" + (b"exit\n" if ending == "exit" else b""))
                    await asyncio.wait_for(reader.readuntil(b"Hello, name!\n"), 15)
                    if ending == "reset":
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                    writer.close()
            await wait_until(lambda: server.connection_count == 0)
            for _ in range(10):  # the loop's own callbacks that still hold them
                await asyncio.sleep(0)
            assert endpoints() == before
    finally:
        gc.enable()


# -- user framers, wrapped for the compiled endpoint (netframe.framing.ForeignFramer) -------


class DuckFramer:
    """A framer that does not subclass netframe.Framer: ``;``-ended messages, replies
    in brackets, a greeting ended by ``!``, pushes by ``?``, and ``partial`` a property."""

    greeting_terminator = b"!"
    push_terminator = b"?"
    overflow = False
    unparsed = b""
    wake_after = None

    def __init__(self) -> None:
        self.buffer = b""

    @property
    def partial(self) -> bytes:
        return self.buffer

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        *whole, self.buffer = (self.buffer + data).split(b";")
        self.overflow = any(len(message) > 64 for message in [*whole, self.buffer])
        return [(message, b";") for message in whole]

    def eof(self) -> list[tuple[bytes, bytes]]:
        return []

    def timeout(self) -> list[tuple[bytes, bytes]]:
        return []

    def encode(self, payload: bytes, terminator: bytes) -> bytes:
        return b"[" + payload + b"]" + terminator


@pytest.mark.asyncio
async def test_a_framer_that_does_not_subclass_framer_frames_over_tcp() -> None:
    async with serving(framing="test_tcp:DuckFramer") as server:
        host, port = server.address("tcp")
        reader, writer = await asyncio.open_connection(host, port)
        try:
            assert await asyncio.wait_for(reader.readexactly(11), 10) == b"[Welcome!]!"
            writer.write(b"Bo")  # partial: held until the ";"
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"b;Al;")
            assert await asyncio.wait_for(reader.readexactly(27), 10) == (
                b"[Hello, Bob!];[Hello, Al!];"
            )
            writer.write(b"x" * 65)  # over the framer's own limit: its overflow
            rest = await asyncio.wait_for(reader.read(), 10)
            assert rest.startswith(b"[Error: ")
            assert rest.endswith(b"]\n")
        finally:
            writer.close()
