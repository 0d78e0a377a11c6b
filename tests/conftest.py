"""The shared test harness.

- Every ``@pytest.mark.asyncio`` test runs once on asyncio and once on uvloop
  (``pytest_asyncio_loop_factories``); ``loop_checked`` also checks that the test really
  runs on the loop its id names and that nothing reached the loop's exception handler.
  Tests that start a loop themselves (threads, subprocesses) take ``loop_name``.
- Clients for servers on loopback: :class:`Client` (a well-behaved TCP client on asyncio
  streams), ``raw_*`` helpers on non-blocking sockets for clients that misbehave,
  :func:`udp_client` (``netframe.UdpClient``), and ``recv_*`` helpers for blocking sockets.
  Every wait is bounded by ``REPLY_TIMEOUT_S`` (generous: a busy machine is slow, never
  this slow), every loop by a count or a size as well.
- ``netframe serve`` subprocesses read through their JSON log (:class:`CliServer`).
- A suite started with SIGINT ignored (a background job of a non-interactive shell) gives
  the processes it starts Ctrl+C back, or the tests of Ctrl+C would test the shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import pytest
import pytest_asyncio
import uvloop

import netframe
from netframe import Server
from netframe.config import Address
from netframe.logs import configure_logging

# Ignored signals stay ignored across exec, handled ones go back to their default: with a
# handler here, every child starts with SIGINT as an interactive shell would give it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

LOOPS: Mapping[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def pytest_report_header() -> str:
    return f"netframe: {netframe.__version__}, {netframe.BUILD}"


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    """Log as the CLI does by default (info, to stderr): no per-message debug events."""
    configure_logging("console", "info")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Run every ``@pytest.mark.asyncio`` test once on asyncio and once on uvloop."""
    return LOOPS


@pytest.fixture(params=list(LOOPS))
def loop_name(request: pytest.FixtureRequest) -> str:
    """The loop name, for tests that start a loop themselves (subprocesses, threads)."""
    return str(request.param)


class CliServer:
    """A ``python -m netframe serve`` subprocess, read through its JSON log on stderr."""

    def __init__(
        self,
        args: list[str],
        *,
        env: Mapping[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
        launcher: tuple[str, ...] = (),
        new_session: bool = False,
    ) -> None:
        """``env`` is added to this process's environment; ``launcher`` is a command
        that runs the server's command line (given as its arguments) itself;
        ``new_session`` gives it a process group of its own, to signal whole."""
        self.proc = subprocess.Popen(
            [*launcher, sys.executable, "-m", "netframe", "serve", "--log-format", "json", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            pass_fds=pass_fds,
            start_new_session=new_session,
        )
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            event = json.loads(raw)  # every stderr line must be one JSON object
            with self._changed:
                self.events.append(event)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, name: str, count: int = 1, timeout_s: float = 15) -> list[dict[str, Any]]:
        """Wait until ``count`` events called ``name`` were logged; return them."""

        def found() -> list[dict[str, Any]]:
            return [e for e in self.events if e["event"] == name]

        with self._changed:
            ok = self._changed.wait_for(
                lambda: len(found()) >= count or self.proc.poll() is not None, timeout_s
            )
        events = found()
        if not ok or len(events) < count:
            raise AssertionError(f"no {count} {name!r} events; log so far: {self.events}")
        return events

    def address(self, transport: str) -> tuple[str, int]:
        for event in self.wait_for("serving") and self.events:
            if event["event"] == "listening" and event["transport"] == transport:
                return event["host"], event["port"]
        raise AssertionError(f"no {transport} listener in {self.events}")

    def stop(self, timeout_s: float = 15) -> int:
        """SIGTERM the server; return its exit status once its log is read to the end."""
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(timeout_s)
        self._reader.join(timeout_s)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(15)
        self._reader.join(15)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture
def cli_server(loop_name: str) -> Iterator[Callable[..., CliServer]]:
    """Start ``netframe serve`` subprocesses on the parametrized loop; stopped after the test."""
    servers: list[CliServer] = []

    def start(*args: str) -> CliServer:
        server = CliServer(["--loop", loop_name, *args])
        servers.append(server)
        server.wait_for("serving")
        return server

    yield start
    for server in servers:
        server.kill()


@contextlib.contextmanager
def udp_responder(reply: Callable[[int, bytes], bytes | None]) -> Iterator[Address]:
    """A blocking UDP server in a thread: the n-th datagram (from 1) gets ``reply(n, data)``,
    or nothing when that is None."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        count = 0
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            count += 1
            answer = reply(count, data)
            if answer is not None:
                with contextlib.suppress(OSError):  # the client may be gone already
                    sock.sendto(answer, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield Address("127.0.0.1", sock.getsockname()[1])
    finally:
        stop.set()
        thread.join(10)
        sock.close()


def run_netframe(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m netframe ARGS`` as a subprocess, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "netframe", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(done: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    """The command failed with ``code`` and one stderr line containing ``text``."""
    assert done.returncode == code, done
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert text in lines[0], lines[0]


# == async tests against a server on loopback ================================================

#: Bound for any single reply, connect, close or condition: generous for a busy machine,
#: and only ever reached when something is wrong.
REPLY_TIMEOUT_S = 10.0

WELCOME = {"auto": b"Welcome!", "raw": b"Welcome!", "line": b"Welcome!\n"}


@pytest_asyncio.fixture
async def loop_checked(request: pytest.FixtureRequest) -> AsyncIterator[list[dict[str, Any]]]:
    """The test runs on the loop its id names, and nothing reaches that loop's exception
    handler (an exception in a callback, a task whose exception was never retrieved): a
    client, however hostile, must not make the server fail in the background either.

    Use it with ``pytestmark = pytest.mark.usefixtures("loop_checked")``.
    """
    loop = asyncio.get_running_loop()
    named = set(request.node.callspec.id.split("-")) & set(LOOPS)
    assert len(named) == 1, f"no loop in the test id {request.node.callspec.id!r}"
    assert isinstance(loop, uvloop.Loop) == (named == {"uvloop"}), (type(loop), named)
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        yield errors
    finally:
        loop.set_exception_handler(previous)
    assert errors == [], f"errors reported to the event loop: {errors!r}"


def hello(name: bytes, ending: bytes = b"\n") -> bytes:
    """The greeting handler's reply to ``name`` ended with ``ending``."""
    return b"Hello, " + name + b"!" + ending


async def wait_until(condition: Callable[[], object], what: str = "the condition") -> None:
    """Poll ``condition()`` until it holds; fail after ``REPLY_TIMEOUT_S``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REPLY_TIMEOUT_S
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"{what} did not hold within {REPLY_TIMEOUT_S} s")
        await asyncio.sleep(0.01)


async def wait_for_connections(server: Server, count: int) -> None:
    """``server.connection_count`` reaches ``count`` (clients come and go asynchronously)."""
    await wait_until(
        lambda: server.connection_count == count, f"server.connection_count == {count}"
    )


class Client:
    """A well-behaved TCP client that reads what it is sent, on asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, server: Server) -> AsyncIterator[Client]:
        host, port = server.address("tcp")
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), REPLY_TIMEOUT_S
        )
        client = cls(reader, writer)
        try:
            yield client
        finally:
            await client.close()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), REPLY_TIMEOUT_S)

    async def receive(self, size: int) -> bytes:
        """Exactly ``size`` bytes, or fewer if the server closes first."""
        try:
            return await asyncio.wait_for(self.reader.readexactly(size), REPLY_TIMEOUT_S)
        except asyncio.IncompleteReadError as exc:
            return exc.partial

    async def expect(self, data: bytes) -> None:
        assert await self.receive(len(data)) == data

    async def expect_closed(self) -> None:
        """The server closes the connection without sending anything more."""
        rest = await asyncio.wait_for(self.reader.read(1 << 16), REPLY_TIMEOUT_S)
        assert rest == b"", f"expected the connection to close, got {rest!r}"

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(self.writer.wait_closed(), REPLY_TIMEOUT_S)


async def udp_client(server: Server, timeout_s: float = REPLY_TIMEOUT_S) -> netframe.UdpClient:
    """A ``netframe.UdpClient`` aimed at the server's first UDP listener."""
    return await netframe.UdpClient.connect(*server.address("udp"), timeout_s=timeout_s)


# -- raw sockets, for the clients that misbehave --------------------------------------------


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
            asyncio.get_running_loop().sock_connect(sock, server.address("tcp")), REPLY_TIMEOUT_S
        )
        yield sock


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def raw_send(sock: socket.socket, data: bytes) -> None:
    await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(sock, data), REPLY_TIMEOUT_S)


async def raw_receive(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes, or fewer if the server closes first."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    while len(data) < size:
        chunk = await asyncio.wait_for(
            loop.sock_recv(sock, min(size - len(data), 1 << 16)), REPLY_TIMEOUT_S
        )
        if not chunk:
            break
        data += chunk
    return bytes(data)


async def raw_receive_until_end(sock: socket.socket, limit: int = 64 * 1024 * 1024) -> bytes:
    """Everything until the server ends the connection (by a FIN or a RST); at most
    ``limit`` bytes, and each read bounded by ``REPLY_TIMEOUT_S``."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), REPLY_TIMEOUT_S):
            data += chunk
            assert len(data) <= limit, f"more than {limit} bytes before the end"
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


# == blocking sockets (a server in another thread or process) ================================


def recv_exactly(sock: socket.socket, size: int, timeout_s: float = REPLY_TIMEOUT_S) -> bytes:
    """``size`` bytes from a blocking socket, or fewer if the peer closes first; the whole
    read bounded by ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    data = bytearray()
    while len(data) < size:
        sock.settimeout(_left(deadline, timeout_s))
        chunk = sock.recv(min(size - len(data), 1 << 16))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def recv_until_closed(
    sock: socket.socket, limit: int = 1 << 20, timeout_s: float = REPLY_TIMEOUT_S
) -> bytes:
    """Everything a blocking socket receives until the peer closes: at most ``limit``
    bytes, within ``timeout_s`` in all (a socket timeout is raised past it)."""
    deadline = time.monotonic() + timeout_s
    data = bytearray()
    while True:
        sock.settimeout(_left(deadline, timeout_s))
        chunk = sock.recv(1 << 16)
        if not chunk:
            return bytes(data)
        data += chunk
        assert len(data) <= limit, f"more than {limit} bytes before the close: {data[:80]!r}"


def _left(deadline: float, timeout_s: float) -> float:
    """The time left before ``deadline``; raises once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"not done within {timeout_s} s")
    return left
