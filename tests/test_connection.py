"""The connection interface a handler sees, over real sockets on both loops: addresses,
close and abort, why a connection ended, how sends that answer no message end, the
server's start and stop hooks, and MemoryConnection checked against the real endpoint."""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import pytest
from structlog.testing import capture_logs

from netframe import (
    CloseReason,
    Connection,
    EchoHandler,
    GreetingHandler,
    Handler,
    InetAddress,
    ListenError,
    Server,
    StartError,
)
from netframe.testing import MemoryConnection, serving

pytestmark = pytest.mark.timeout(60)

BOUND_S = 15  # every wait for the server is bounded; none measures its speed


async def exactly(reader: asyncio.StreamReader, size: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(size), BOUND_S)


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), BOUND_S)


class Recorder(Handler):
    """Records what the handler was shown; ``abort``/``close``/``boom`` act on the peer."""

    seen: ClassVar[list[dict[str, Any]]] = []
    ended: ClassVar[list[CloseReason | None]] = []

    def on_connect(self, conn: Connection) -> None:
        self.seen.append(
            {"peer": conn.peer, "local": conn.local, "network": conn.network, "tls": conn.tls}
        )
        conn.send("hi")

    def on_message(self, conn: Connection, message: str) -> None:
        if message == "abort":
            conn.send("never seen")
            conn.abort()
        elif message == "close":
            conn.send("bye")
            conn.close()
        elif message == "boom":
            raise RuntimeError("boom")
        else:
            self.seen.append({"peer": conn.peer, "network": conn.network, "via": conn.via})
            conn.send(str(conn.peer))

    def on_disconnect(self, conn: Connection) -> None:
        self.ended.append(conn.close_reason)


@pytest.fixture
def recorder() -> type[Recorder]:
    Recorder.seen = []
    Recorder.ended = []
    return Recorder


# -- addresses ----------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.asyncio
async def test_peer_and_local_are_typed_addresses(recorder: type[Recorder], host: str) -> None:
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    listen = f"[{host}]:0" if ":" in host else f"{host}:0"
    async with serving(handler=recorder, framing="line", tcp=[listen], udp=[listen]) as server:
        port = server.address("tcp")[1]
        reader, writer = await asyncio.open_connection(host, port)
        assert await exactly(reader, 3) == b"hi\n"
        client_port = writer.get_extra_info("sockname")[1]
        writer.write(b"who\n")
        expected = str(InetAddress(host, client_port)).encode() + b"\n"
        assert await exactly(reader, len(expected)) == expected
        writer.close()

        udp_port = server.address("udp")[1]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.settimeout(BOUND_S)
            udp.bind((host, 0))
            udp.sendto(b"who\n", (host, udp_port))
            reply, _ = await asyncio.to_thread(udp.recvfrom, 1024)  # the loop serves
            assert reply == str(InetAddress(host, udp.getsockname()[1])).encode() + b"\n"

    greeted, asked, by_udp = recorder.seen
    assert greeted == {
        "peer": InetAddress(host, client_port),
        "local": InetAddress(host, port),
        "network": "tcp",
        "tls": None,
    }
    assert asked == {"peer": InetAddress(host, client_port), "network": "tcp", "via": None}
    assert by_udp["network"] == "udp"
    assert by_udp["via"] is None


def test_addresses_print_as_logs_show_them() -> None:
    assert str(InetAddress("10.0.0.1", 80)) == "10.0.0.1:80"
    assert str(InetAddress("::1", 80)) == "[::1]:80"
    assert InetAddress.from_sockaddr(("::ffff:10.0.0.1", 80, 0, 0)) == InetAddress("10.0.0.1", 80)
    assert InetAddress.from_sockaddr(("fe80::1%eth0", 80, 0, 2)) == InetAddress("fe80::1%eth0", 80)
    assert InetAddress.from_sockaddr(()) is None
    assert str(InetAddress("fe80::1%eth0", 80).ip) == "fe80::1"


# -- how a connection ends, and why --------------------------------------------------------


@pytest.mark.asyncio
async def test_abort_drops_unsent_replies_and_resets(recorder: type[Recorder]) -> None:
    async with serving(handler=recorder, framing="line", udp=[]) as server:
        reader, writer = await asyncio.open_connection(*server.address("tcp"))
        assert await exactly(reader, 3) == b"hi\n"
        writer.write(b"abort\n")
        with pytest.raises(ConnectionResetError):
            await until_closed(reader)  # "never seen" was made, and dropped
        writer.close()
        await _closed(lambda: recorder.ended)
    assert recorder.ended == [CloseReason.HANDLER_ABORTED]


async def _closed(ended: Callable[[], list[Any]], count: int = 1) -> None:
    for _ in range(BOUND_S * 50):
        if len(ended()) >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("on_disconnect was never called")


@pytest.mark.parametrize(
    ("client_does", "reason"),
    [
        ("close", CloseReason.HANDLER_CLOSED),
        ("boom", CloseReason.HANDLER_ERROR),
        ("half-close", CloseReason.PEER_CLOSED),
        ("reset", CloseReason.RESET),
        ("stay", CloseReason.SERVER_SHUTDOWN),
        ("idle", CloseReason.IDLE_TIMEOUT),
    ],
)
@pytest.mark.asyncio
async def test_on_disconnect_knows_why_the_connection_ended(
    recorder: type[Recorder], client_does: str, reason: CloseReason
) -> None:
    idle = 0.3 if client_does == "idle" else 300
    async with serving(handler=recorder, framing="line", idle_timeout_s=idle, udp=[]) as server:
        reader, writer = await asyncio.open_connection(*server.address("tcp"))
        assert await exactly(reader, 3) == b"hi\n"
        if client_does in ("close", "boom"):
            writer.write(f"{client_does}\n".encode())
        elif client_does == "half-close":
            writer.write_eof()
        elif client_does == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            writer.transport.abort()
        if client_does != "stay":
            await _closed(lambda: recorder.ended)
    assert recorder.ended == [reason]
    writer.close()


@pytest.mark.asyncio
async def test_close_reason_is_logged_with_the_same_name() -> None:
    with capture_logs() as logs:
        async with serving(framing="line", udp=[]) as server:
            reader, writer = await asyncio.open_connection(*server.address("tcp"))
            writer.write(b"exit\n")
            assert await until_closed(reader) == b"Welcome!\n"
            writer.close()
            for _ in range(BOUND_S * 50):
                if any(e["event"] == "connection_closed" for e in logs):
                    break
                await asyncio.sleep(0.02)
    closed = [e for e in logs if e["event"] == "connection_closed"]
    assert [e["reason"] for e in closed] == ["handler_closed"]
    assert type(closed[0]["reason"]) is str  # a plain string in JSON and console logs


# -- how sends end ------------------------------------------------------------------------


class Room(Handler):
    """Broadcasts each message to the others; ``later`` answers after an await."""

    members: ClassVar[list[Connection]] = []

    def on_connect(self, conn: Connection) -> None:
        conn.send(f"welcome #{len(self.members)}")
        self.members.append(conn)

    def on_message(self, conn: Connection, message: str) -> Awaitable[None] | None:
        if message == "later":
            return self.later(conn)
        conn.send(f"sent: {message}")
        for member in self.members:
            if member is not conn:
                member.send(f"{conn.id}: {message}")
        return None

    async def later(self, conn: Connection) -> None:
        await asyncio.sleep(0)
        conn.send("answered after an await")

    def on_disconnect(self, conn: Connection) -> None:
        self.members.remove(conn)


@pytest.mark.parametrize(
    ("framing", "greeting", "push"),
    [("auto", b"", b"\n"), ("line", b"\n", b"\n"), ("raw", b"", b"")],
)
@pytest.mark.asyncio
async def test_a_push_ends_with_the_framers_push_ending_and_a_reply_as_its_message(
    framing: str, greeting: bytes, push: bytes
) -> None:
    Room.members = []
    async with serving(handler=Room, framing=framing, udp=[]) as server:
        listener_reader, listener = await asyncio.open_connection(*server.address("tcp"))
        assert await exactly(listener_reader, 10 + len(greeting)) == b"welcome #0" + greeting
        talker_reader, talker = await asyncio.open_connection(*server.address("tcp"))
        assert await exactly(talker_reader, 10 + len(greeting)) == b"welcome #1" + greeting
        # The listener has sent nothing: what reaches it answers none of its messages.
        ids = [member.id for member in Room.members]
        for word in (b"hello", b"again"):
            talker.write(word + (b"\r\n" if framing != "raw" else b""))
            reply = b"sent: " + word + (b"\r\n" if framing != "raw" else b"")
            assert await exactly(talker_reader, len(reply)) == reply
        expected = b"".join(b"%d: %s%s" % (ids[1], word, push) for word in (b"hello", b"again"))
        assert await exactly(listener_reader, len(expected)) == expected
        # A reply made after an await still ends as its message did.
        talker.write(b"later" + (b"\r\n" if framing != "raw" else b""))
        reply = b"answered after an await" + (b"\r\n" if framing != "raw" else b"")
        assert await exactly(talker_reader, len(reply)) == reply
        listener.close()
        talker.close()


class BytesLike(Handler):
    """Answers with a bytearray it changes after sending, then a memoryview."""

    text = False

    def on_message(self, conn: Connection, message: bytes) -> None:
        reply = bytearray(b"got " + message)
        conn.send(reply)  # type: ignore[arg-type]  # bytes-like: accepted, and copied
        reply[:] = b"changed"
        conn.send(memoryview(b"[" + message + b"]")[1:-1])  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_a_bytes_like_reply_is_copied_when_sent_over_tcp_udp_and_in_memory() -> None:
    async with serving(handler=BytesLike, framing="line") as server:
        reader, writer = await asyncio.open_connection(*server.address("tcp"))
        writer.write(b"ab\n")
        assert await exactly(reader, 10) == b"got ab\nab\n"
        writer.close()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.setblocking(False)
            udp.connect(server.address("udp"))
            udp.send(b"cd\n")
            loop = asyncio.get_running_loop()
            first = await asyncio.wait_for(loop.sock_recv(udp, 100), BOUND_S)
            second = await asyncio.wait_for(loop.sock_recv(udp, 100), BOUND_S)
            assert (first, second) == (b"got cd\n", b"cd\n")
        finally:
            udp.close()
    memory = MemoryConnection(BytesLike, framing="line")
    assert memory.feed(b"ef\n") == [b"got ef\n", b"ef\n"]


class SendsNumbers(Handler):
    """Sends what is not bytes-like when asked to, else echoes."""

    text = False

    def on_message(self, conn: Connection, message: bytes) -> None:
        conn.send(42 if message == b"bad" else message)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_a_send_of_what_is_not_bytes_like_closes_only_that_connection() -> None:
    async with serving(handler=SendsNumbers, framing="line", udp=[]) as server:
        good_reader, good = await asyncio.open_connection(*server.address("tcp"))
        bad_reader, bad = await asyncio.open_connection(*server.address("tcp"))
        with capture_logs() as logs:
            bad.write(b"bad\n")
            assert await until_closed(bad_reader) == b""
        errors = [e for e in logs if e["event"] == "handler_error"]
        assert [e["hook"] for e in errors] == ["on_message"]
        good.write(b"still here\n")
        assert await exactly(good_reader, 11) == b"still here\n"
        good.close()
        bad.close()


def test_memory_connections_push_as_the_server_does() -> None:
    Room.members = []
    listener, talker = MemoryConnection(Room), MemoryConnection(Room)
    assert listener.connect() == [b"welcome #0"]  # auto framing: the greeting is bare
    talker.connect()
    assert talker.receive("hello", b"\r\n") == [b"sent: hello\r\n"]
    assert listener.sent[-1] == b"%d: hello\n" % talker.id  # a push is a line


# -- the server's start and stop hooks ------------------------------------------------------


class Pool(Handler):
    """Opens a shared resource with the server and closes it after the last connection."""

    events: ClassVar[list[str]] = []
    fail: ClassVar[str] = ""

    @classmethod
    async def on_start(cls, server: Server) -> None:
        await asyncio.sleep(0)
        if cls.fail == "start":
            raise ConnectionRefusedError("database down")
        with pytest.raises(LookupError):
            server.address("tcp")  # nothing is bound yet: no client can come before us
        cls.events.append("start")

    @classmethod
    async def on_stop(cls, server: Server) -> None:
        await asyncio.sleep(0)
        cls.events.append("stop")
        if cls.fail == "stop":
            raise RuntimeError("close failed")

    def on_connect(self, conn: Connection) -> None:
        self.events.append("connect")
        conn.send("ok")

    async def on_disconnect(self, conn: Connection) -> None:
        await asyncio.sleep(0.05)
        self.events.append("disconnect")


@pytest.fixture
def pool() -> type[Pool]:
    Pool.events = []
    Pool.fail = ""
    return Pool


@pytest.mark.asyncio
async def test_start_and_stop_hooks_bracket_every_connection(pool: type[Pool]) -> None:
    async with serving(handler=pool, framing="line", udp=[]) as server:
        reader, writer = await asyncio.open_connection(*server.address("tcp"))
        assert await exactly(reader, 3) == b"ok\n"
    writer.close()
    assert pool.events == ["start", "connect", "disconnect", "stop"]


@pytest.mark.asyncio
async def test_a_failing_start_hook_stops_the_start_and_binds_nothing(pool: type[Pool]) -> None:
    pool.fail = "start"
    server = Server(handler=pool, tcp=["127.0.0.1:0"], udp=[])
    with capture_logs() as logs, pytest.raises(StartError, match="database down") as caught:
        await server.start()
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)
    assert server.addresses == []
    assert pool.events == []  # on_stop is not called for a start that never happened
    assert [(e["event"], e["hook"]) for e in logs] == [("handler_error", "on_start")]


@pytest.mark.asyncio
async def test_a_failed_bind_after_the_start_hook_runs_the_stop_hook(pool: type[Pool]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = Server(handler=pool, tcp=[f"127.0.0.1:{taken.getsockname()[1]}"], udp=[])
        with pytest.raises(ListenError):
            await server.start()
    assert pool.events == ["start", "stop"]


@pytest.mark.asyncio
async def test_a_failing_stop_hook_is_logged_and_the_stop_completes(pool: type[Pool]) -> None:
    pool.fail = "stop"
    with capture_logs() as logs:
        async with serving(handler=pool, udp=[]):
            pass
    events = [e["event"] for e in logs]
    assert events.index("handler_error") < events.index("shutdown_finished")
    assert pool.events == ["start", "stop"]


@pytest.mark.asyncio
async def test_a_factory_with_hooks_gets_them_called() -> None:
    calls: list[str] = []

    class Factory:
        def __call__(self) -> Handler:
            return EchoHandler()

        def on_start(self, server: Server) -> None:
            calls.append("start")

        def on_stop(self, server: Server) -> None:
            calls.append("stop")

    async with serving(handler=Factory(), udp=[]):
        assert calls == ["start"]
    assert calls == ["start", "stop"]


# -- MemoryConnection against the real endpoint -------------------------------------------


class AsyncGreeting(GreetingHandler):
    """The greeting handler with an async on_connect, as a handler awaiting a lookup."""

    async def on_connect(self, conn: Connection) -> None:  # type: ignore[override]
        await asyncio.sleep(0.01)
        conn.send("Welcome!")


# (handler, framing, what the client sends, one step at a time; None: it half-closes)
SCENARIOS: list[tuple[type[Handler], str, list[bytes | None]]] = [
    (GreetingHandler, "auto", [b"Michael", b"Tracy", b"Sarah", b"exit"]),
    (GreetingHandler, "auto", [b"Bob\n", b"Al", b"ice\r\nCarol\n", b"\xff\n", b"exit\n"]),
    (GreetingHandler, "auto", [b"Michael", b"Tra\ncy", b"last word", None]),
    (GreetingHandler, "line", [b"Bob\nAlice\n", b"x" * 40 + b"\n"]),
    (GreetingHandler, "raw", [b"Bob", b"exit"]),
    (GreetingHandler, "length", [b"\0\0\0\x03Bob\0\0\0", b"\x05Alice", None]),
    (EchoHandler, "line", [b"one\ntwo\r\n", b"\xff\xfe\n", b"part", b"ial\n", None]),
    (EchoHandler, "auto", [b"bare bytes \xff", None]),
    (AsyncGreeting, "auto", [b"Bob", b"exit"]),
]


@pytest.mark.parametrize(
    "scenario", SCENARIOS, ids=[f"{i}-{h.__name__}-{f}" for i, (h, f, _) in enumerate(SCENARIOS)]
)
@pytest.mark.asyncio
async def test_memory_connection_answers_as_the_real_endpoint(
    scenario: tuple[type[Handler], str, list[bytes | None]],
) -> None:
    handler, framing, steps = scenario
    memory = MemoryConnection(handler, framing=framing, max_line_bytes=32)
    async with serving(handler=handler, framing=framing, max_line_bytes=32, udp=[]) as server:
        reader, writer = await asyncio.open_connection(*server.address("tcp"))
        expected = b"".join(await memory.aconnect())
        assert await exactly(reader, len(expected)) == expected
        for step in steps:
            if step is None:
                writer.write_eof()
                expected = b"".join(memory.feed_eof())
                break
            writer.write(step)
            expected = b"".join(await memory.afeed(step))
            if memory.closed:
                break
            assert await exactly(reader, len(expected)) == expected, step
        # The session ended (the handler closed, the line overflowed or the client
        # half-closed): the last replies, then the close, exactly as in memory.
        assert memory.closed
        assert await until_closed(reader) == expected
        writer.close()


def test_memory_connection_reports_the_interface() -> None:
    conn = MemoryConnection(Recorder, network="udp")
    assert (conn.network, conn.id, conn.tls, conn.via) == ("udp", 0, None, None)
    assert conn.peer == InetAddress("127.0.0.1", 50000)
    assert conn.local == InetAddress("127.0.0.1", 9999)
    first, second = MemoryConnection(Recorder), MemoryConnection(Recorder)
    assert first.id != second.id  # as real connections' ids are
    first.receive("abort")
    assert first.closed
    assert first.close_reason is CloseReason.HANDLER_ABORTED
    second.disconnect()
    assert second.close_reason is CloseReason.PEER_CLOSED
    balancer = InetAddress("10.0.1.5", 40000)
    proxied = MemoryConnection(Recorder, peer=InetAddress("203.0.113.7", 1), via=balancer)
    assert proxied.via == balancer


class Kill(Handler):
    """Echoes, and aborts on ``kill``."""

    def on_message(self, conn: Connection, message: str) -> None:
        if message == "kill":
            conn.abort()
        else:
            conn.send(f"echo {message}")


@pytest.mark.parametrize(
    ("reads", "received"), [([b"one\nkill\n"], b""), ([b"one\n", b"kill\n"], b"echo one\n")]
)
@pytest.mark.asyncio
async def test_abort_drops_the_replies_of_its_read_in_memory_as_on_a_socket(
    reads: list[bytes], received: bytes
) -> None:
    memory = MemoryConnection(Kill, framing="line")
    for data in reads:
        memory.feed(data)
    assert b"".join(memory.sent) == received
    async with serving(handler=Kill, framing="line", udp=[]) as server:
        reader, writer = await asyncio.open_connection(*server.address("tcp"))
        for data in reads:
            writer.write(data)
            if data != reads[-1]:
                assert await exactly(reader, len(b"echo one\n")) == b"echo one\n"
        with pytest.raises(ConnectionResetError):
            await until_closed(reader)
        writer.close()


def test_abort_outside_a_message_drops_nothing_already_sent() -> None:
    conn = MemoryConnection(Kill, framing="line")
    assert conn.receive("hi") == [b"echo hi\n"]
    conn.send("push")
    conn.abort()  # from elsewhere (a kick): what was written stays written
    assert conn.sent == [b"echo hi\n", b"push\n"]
    assert conn.close_reason is CloseReason.HANDLER_ABORTED


def test_a_long_bare_first_word_is_answered_when_the_wait_elapses() -> None:
    conn = MemoryConnection(GreetingHandler)
    word = b"y" * 600  # one segment's worth or more: perhaps part of a longer line
    assert conn.feed(word) == []
    assert conn.elapse() == [b"Hello, " + word + b"!"]


@pytest.mark.asyncio
async def test_a_close_during_a_slow_start_hook_binds_nothing_and_stops_the_hook(
    pool: type[Pool],
) -> None:
    gate = asyncio.Event()

    class SlowPool(Pool):
        @classmethod
        async def on_start(cls, server: Server) -> None:
            await gate.wait()
            cls.events.append("start")

    server = Server(handler=SlowPool, tcp=["127.0.0.1:0"], udp=[])
    starting = asyncio.ensure_future(server.start())
    await asyncio.sleep(0.05)
    closing = asyncio.ensure_future(server.close())
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.wait_for(asyncio.gather(starting, closing), BOUND_S)
    assert server.addresses == []
    assert pool.events == ["start", "stop"]


@pytest.mark.asyncio
async def test_hooks_of_a_partial_handler_class_are_called(pool: type[Pool]) -> None:
    async with serving(handler=functools.partial(Pool), udp=[]):
        assert pool.events == ["start"]
    assert pool.events == ["start", "stop"]
