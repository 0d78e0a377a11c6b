"""Hostile clients against ``netframe serve``: the hardening contract, from the outside.

Written against the behaviour contract only (the hardening spec), blind to the code it
attacks. Every test starts real ``python -m netframe serve --log-format json`` subprocesses,
once on each event loop (the ``cli_server`` fixture of conftest, or, where a test must own
the server's stderr or its descriptor limit, the ``raw_server`` fixture below), talks to
them over loopback sockets only (127.0.0.0/8), and checks what a client or an operator can
observe: the bytes that come back, when the connection ends, the JSON log lines, and the
server process's RSS, descriptors, sockets and CPU time (psutil).

Timeouts are generous (several seconds) and no test asserts on throughput. A few cases are
scaled to keep the module fast; each says so where it is done.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import random
import resource
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import CliServer

pytestmark = pytest.mark.timeout(60)

LOCAL = "127.0.0.1"
ANY_PORT = f"{LOCAL}:0"
#: Generous bound for any single connect, reply or close on a busy machine.
STEP = 5.0
MiB = 1024 * 1024

WELCOME = {"auto": b"Welcome!", "raw": b"Welcome!", "line": b"Welcome!\n"}
UTF8_ERROR = b"Error: message is not valid utf-8"
#: Text that must never appear on a server's stderr.
FORBIDDEN_ON_STDERR = ("Traceback", "ResourceWarning", "Task was destroyed")

StartServer = Callable[..., CliServer]


def hello(name: bytes, ending: bytes = b"\n") -> bytes:
    return b"Hello, " + name + b"!" + ending


# -- TCP clients on plain blocking sockets ---------------------------------------------------


def connect(
    addr: tuple[str, int],
    *,
    source: str = LOCAL,
    rcvbuf: int | None = None,
    sndbuf: int | None = None,
    timeout: float = STEP,
) -> socket.socket:
    """A connected TCP socket from ``source`` (an address of 127.0.0.0/8)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def wait_readable(sock: socket.socket, timeout: float) -> bool:
    """The socket has bytes, an end of stream or an error to report within ``timeout``."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))


def receive(sock: socket.socket, size: int, timeout: float = STEP) -> bytes:
    """Exactly ``size`` bytes, or fewer if the server ends the connection or time runs out."""
    deadline = time.monotonic() + timeout
    data = bytearray()
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not wait_readable(sock, remaining):
            break
        try:
            chunk = sock.recv(min(size - len(data), 1 << 20))
        except ConnectionError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def expect(sock: socket.socket, data: bytes, timeout: float = STEP) -> None:
    got = receive(sock, len(data), timeout)
    assert got == data, f"expected {data[:300]!r}, got {got[:300]!r}"


def receive_until_closed(sock: socket.socket, timeout: float = STEP) -> tuple[bytes, bool]:
    """Everything until the server ends the connection (FIN or RST), and whether it did."""
    deadline = time.monotonic() + timeout
    data = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not wait_readable(sock, remaining):
            return bytes(data), False
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionError:
            return bytes(data), True
        if not chunk:
            return bytes(data), True
        data += chunk


def still_open(sock: socket.socket) -> bool:
    """Nothing to read and no end of stream right now."""
    return not wait_readable(sock, 0)


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def assert_served(
    addr: tuple[str, int],
    framing: str = "line",
    *,
    source: str = LOCAL,
    name: bytes = b"Probe",
    timeout: float = STEP,
) -> None:
    """A well-behaved client is greeted and answered, then leaves with ``exit``."""
    with connect(addr, source=source, timeout=timeout) as sock:
        expect(sock, WELCOME[framing], timeout)
        sock.sendall(name + b"\n")
        expect(sock, hello(name), timeout)
        sock.sendall(b"exit\n")


def push_until_stalled(sock: socket.socket, unit: bytes, *, cap: int, idle_s: float) -> int:
    """Send ``unit`` over and over on a non-blocking socket, never reading.

    Stops at ``cap`` bytes, or once no byte could be sent for ``idle_s`` seconds (the peer
    stopped reading), or when the peer ends the connection. Returns the bytes sent.
    """
    chunk = memoryview(unit * max(1, (256 * 1024) // len(unit)))
    sent = 0
    last_progress = time.monotonic()
    deadline = last_progress + 60
    while sent < cap and time.monotonic() < deadline:
        try:
            sent += sock.send(chunk[sent % len(chunk) :][: cap - sent])
        except BlockingIOError:
            if time.monotonic() - last_progress > idle_s:
                break
            time.sleep(0.01)
        except OSError:
            break
        else:
            last_progress = time.monotonic()
    return sent


class Bystanders:
    """Well-behaved clients served one after another in a thread, while a test misbehaves."""

    def __init__(self, addr: tuple[str, int], framing: str = "line", pause_s: float = 0.2):
        self.addr = addr
        self.framing = framing
        self.pause_s = pause_s
        self.served = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.failures) < 5:
            try:
                assert_served(self.addr, self.framing, name=b"Bystander%d" % self.served)
            except (AssertionError, OSError) as exc:
                self.failures.append(repr(exc))
            else:
                self.served += 1
            self._stop.wait(self.pause_s)

    def __enter__(self) -> Bystanders:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


# -- the JSON log ------------------------------------------------------------------------------


def logged(server: CliServer, name: str, **fields: Any) -> list[dict[str, Any]]:
    """The events called ``name`` so far whose ``fields`` have the values given."""
    return [
        e
        for e in list(server.events)
        if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())
    ]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def wait_logged(
    server: CliServer, name: str, *, count: int = 1, timeout: float = 10, **fields: Any
) -> list[dict[str, Any]]:
    """Wait until ``count`` events ``name`` with ``fields`` were logged; return them."""
    try:
        return wait_until(  # type: ignore[no-any-return]
            lambda: (found := logged(server, name, **fields)) and len(found) >= count and found,
            timeout,
            f"{count} {name!r} events with {fields}",
        )
    except AssertionError as exc:
        tail = list(server.events)[-30:]
        raise AssertionError(f"{exc}; last events: {tail}") from None


def timestamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def assert_at_most_one_line_a_second(events: list[dict[str, Any]], *keys: str) -> None:
    """Events with equal values of ``keys`` are at least (almost) a second apart."""
    groups: dict[tuple[Any, ...], list[float]] = {}
    for event in events:
        groups.setdefault(tuple(event.get(k) for k in keys), []).append(timestamp(event))
    for key, times in groups.items():
        times.sort()
        gaps = [round(b - a, 3) for a, b in itertools.pairwise(times)]
        assert all(gap >= 0.9 for gap in gaps), f"{dict(zip(keys, key, strict=True))}: {gaps}"


def assert_clean_log(server: CliServer) -> None:
    """Every stderr line was a JSON object, and none mentions a traceback or a leak."""
    if server.proc.poll() is not None:
        server._reader.join(5)
    assert server.proc.poll() is not None or server._reader.is_alive(), (
        "the server wrote a stderr line that is not a JSON object"
    )
    text = json.dumps(list(server.events))
    for bad in FORBIDDEN_ON_STDERR:
        assert bad not in text, f"{bad!r} on the server's stderr"


# -- process measurements ----------------------------------------------------------------------


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


class RssSampler:
    """The peak RSS of a process, sampled in a thread every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = int(self.process.memory_info().rss)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, int(self.process.memory_info().rss))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def close_wait_sockets(pid: int) -> list[Any]:
    return [
        c
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_CLOSE_WAIT
    ]


# -- a server whose stderr (and descriptor limit) the test controls ----------------------------


class RawServer:
    """``netframe serve`` with stderr read (or not read, or closed) by the test itself."""

    def __init__(
        self,
        loop_name: str,
        *args: str,
        log_format: str = "json",
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "netframe",
                "serve",
                "--log-format",
                log_format,
                "--loop",
                loop_name,
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=preexec_fn,
        )
        assert self.proc.stderr is not None
        self._fd = self.proc.stderr.fileno()
        self._partial = b""
        self._lock = threading.Lock()
        self.lines: list[bytes] = []
        self.eof = False
        #: Cleared: the reader thread stops reading, and the pipe fills up.
        self.reading = threading.Event()
        self.reading.set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read_once(self, timeout: float) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        if not poller.poll(timeout * 1000):
            return
        chunk = os.read(self._fd, 1 << 16)
        with self._lock:
            if not chunk:
                self.eof = True
                if self._partial:
                    self.lines.append(self._partial)
                    self._partial = b""
                return
            *complete, self._partial = (self._partial + chunk).split(b"\n")
            self.lines.extend(complete)

    def _run(self) -> None:
        while not self._stop.is_set() and not self.eof:
            if not self.reading.wait(0.1):
                continue
            self._read_once(0.1)

    def start_reader(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def read_until(self, name: str, timeout: float = 15) -> None:
        """Read stderr in this thread (no reader thread) until event ``name`` was logged."""
        deadline = time.monotonic() + timeout
        while not any(e.get("event") == name for e in self.events()):
            assert time.monotonic() < deadline, f"no {name!r}: {self.lines}"
            assert not self.eof, f"stderr ended before {name!r}: {self.lines}"
            self._read_once(0.1)

    def close_stderr(self) -> None:
        """Close the read end of the server's stderr pipe (only without a reader thread)."""
        assert self._thread is None
        assert self.proc.stderr is not None
        self.proc.stderr.close()

    def text(self) -> str:
        with self._lock:
            return b"\n".join([*self.lines, self._partial]).decode("utf-8", "replace")

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            lines = list(self.lines)
        events = []
        for line in lines:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    events.append(event)
        return events

    def bad_lines(self) -> list[bytes]:
        """Complete stderr lines that are not one JSON object each."""
        with self._lock:
            lines = list(self.lines)
        bad = []
        for line in lines:
            try:
                ok = isinstance(json.loads(line), dict)
            except ValueError:
                ok = False
            if not ok:
                bad.append(line)
        return bad

    def wait_event(self, name: str, timeout: float = 15, **fields: Any) -> list[dict[str, Any]]:
        def found() -> list[dict[str, Any]]:
            return [
                e
                for e in self.events()
                if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())
            ]

        return wait_until(found, timeout, f"{name!r} {fields}; log: {self.text()[-3000:]}")  # type: ignore[no-any-return]

    def address(self, transport: str) -> tuple[str, int]:
        self.wait_event("serving")
        for event in self.events():
            if event.get("event") == "listening" and event.get("transport") == transport:
                return str(event["host"]), int(event["port"])
        raise AssertionError(f"no {transport} listener: {self.text()}")

    def kill(self) -> None:
        self._stop.set()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(15)
        if self._thread is not None:
            self._thread.join(15)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def raw_server(loop_name: str) -> Iterator[Callable[..., RawServer]]:
    """Start ``RawServer`` subprocesses on the parametrized loop; killed after the test."""
    servers: list[RawServer] = []

    def start(*args: str, **options: Any) -> RawServer:
        server = RawServer(loop_name, *args, **options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOCAL, 0))
        return int(probe.getsockname()[1])


# -- handlers of our own, served with --handler limits_handlers:NAME ----------------------------

HANDLERS_MODULE = '''
"""Handlers for test_limits: slow, failing and cancelled ones."""

import asyncio

from netframe import Handler


class SlowGreeter(Handler):
    """Greets; a message starting with "slow" is answered after a one-second await."""

    def on_connect(self, conn):
        conn.send("Welcome!")

    async def on_message(self, conn, message):
        if message.startswith("slow"):
            await asyncio.sleep(1.0)
        conn.send(f"Hello, {message}!")


class Fragile(Handler):
    """Greets; a message starting with "boom" raises (with the message in local variables)."""

    def on_connect(self, conn):
        conn.send("Welcome!")

    def on_message(self, conn, message):
        if message.startswith("boom"):
            reversed_message = message[::-1]
            self.explode(reversed_message)
        conn.send(f"Hello, {message}!")

    def explode(self, value):
        raise ValueError("handler failed on purpose")


class Awaiting(Handler):
    """Async: "NAME:DELAY" is answered after DELAY s; "cancel:D" and "fail:D" send
    "partial" and then have their await cancelled, or fail."""

    def on_connect(self, conn):
        conn.send("Welcome!")

    async def on_message(self, conn, message):
        kind, _, delay = message.partition(":")
        await asyncio.sleep(float(delay or 0))
        if kind == "cancel":
            conn.send("partial")
            loop = asyncio.get_running_loop()
            never = loop.create_future()
            loop.call_soon(never.cancel)
            await never
        elif kind == "fail":
            conn.send("partial")
            await asyncio.sleep(0.01)
            raise RuntimeError("await failed on purpose")
        conn.send(f"Hello, {message}!")
'''


@pytest.fixture
def handlers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Put ``limits_handlers`` on the servers' PYTHONPATH; returns the module name."""
    (tmp_path / "limits_handlers.py").write_text(HANDLERS_MODULE)
    path = [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    return "limits_handlers"


# == settings ======================================================================================


@pytest.mark.parametrize(
    "flags",
    [
        ["--idle-timeout", "-1"],
        ["--message-timeout", "soon"],
        ["--max-connections", "lots"],
        ["--max-per-ip", "-1"],
        ["--write-buffer", "-1"],
        ["--send-timeout", "-2"],
        ["--shutdown-timeout", "-1"],
        ["--udp-max-datagram", "-1"],
        ["--udp-rate", "-1"],
        ["--udp-allow-port", "70000"],
    ],
    ids=lambda flags: flags[0],
)
def test_bad_values_of_the_new_flags_are_one_line_and_status_2(flags: list[str]) -> None:
    """Bad flag values: one stderr line and exit status 2 (no server is started)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "netframe", "serve", "--tcp", ANY_PORT, *flags],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"{flags} was accepted: the server started")
    assert proc.returncode == 2, (proc.returncode, stderr)
    assert "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


# == 1. overlong messages ==========================================================================


@pytest.mark.timeout(60)
def test_01_overlong_message_gets_one_error_line_after_earlier_replies_then_close(
    cli_server: StartServer,
) -> None:
    """Line and auto framing: `Error: line exceeds N bytes` then close; earlier complete
    messages answered first, in order; nothing after the limit; others unaffected;
    `line_too_long` warning and `connection_closed` reason `line_too_long`."""
    limit = 16
    for framing in ("line", "auto"):
        server = cli_server("--tcp", ANY_PORT, "--framing", framing, "--max-line-bytes", "16")
        addr = server.address("tcp")
        welcome = WELCOME[framing]
        error = b"Error: line exceeds 16 bytes\n"
        with connect(addr) as bystander:
            expect(bystander, welcome)
            bystander.sendall(b"Hi\n")
            expect(bystander, hello(b"Hi"))
            bystander.sendall(b"Hal")  # half a line held while the attackers are thrown out

            # Complete lines, one of exactly the limit, then an overlong one, then more:
            # all in one write.
            with connect(addr) as attacker:
                expect(attacker, welcome)
                attacker.sendall(
                    b"one\ntwo\r\n" + b"x" * limit + b"\n" + b"y" * (limit + 1) + b"\nafter\n"
                )
                data, closed = receive_until_closed(attacker)
                assert data == (
                    hello(b"one") + hello(b"two", b"\r\n") + hello(b"x" * limit) + error
                ), framing
                assert closed, f"{framing}: still open after the error"

            # An overlong line that never ends, arriving in pieces.
            with connect(addr) as dribbler:
                expect(dribbler, welcome)
                dribbler.sendall(b"ok\n")
                expect(dribbler, hello(b"ok"))
                dribbler.sendall(b"z" * 10)
                time.sleep(0.1)
                dribbler.sendall(b"z" * 10)
                data, closed = receive_until_closed(dribbler)
                assert data == error, framing
                assert closed, framing

            bystander.sendall(b"lo\n")
            expect(bystander, hello(b"Hallo"))
        assert_served(addr, framing)

        warnings = wait_logged(server, "line_too_long", count=2)
        assert all(e["level"] == "warning" for e in warnings), warnings
        wait_logged(server, "connection_closed", count=2, reason="line_too_long")
        assert_clean_log(server)


@pytest.mark.timeout(60)
def test_01_raw_chunks_are_capped_at_the_limit_never_refused(cli_server: StartServer) -> None:
    """Raw framing has no message boundaries, so nothing in it is overlong: with
    --max-line-bytes 16 a 1000-byte write reaches the handler as pieces of at most 16 bytes,
    and the connection goes on (the cap bounds what one message hands over)."""
    server = cli_server("--tcp", ANY_PORT, "--framing", "raw", "--max-line-bytes", "16")
    addr = server.address("tcp")
    with connect(addr) as client:
        expect(client, b"Welcome!")
        client.sendall(b"x" * 1000)
        expected_length = sum(len(hello(b"x" * 16)) - 1 for _ in range(1000 // 16)) + len(
            b"Hello, " + b"x" * (1000 % 16) + b"!"
        )
        data = receive(client, expected_length)
        pieces = data.split(b"!")[:-1]
        assert pieces, data
        assert all(p.startswith(b"Hello, ") and 0 < len(p) - 7 <= 16 for p in pieces), data
        assert sum(len(p) - 7 for p in pieces) == 1000
        client.sendall(b"Bob")
        expect(client, b"Hello, Bob!")
    assert_clean_log(server)


# == 2. undecodable and odd bytes ==================================================================


@pytest.mark.timeout(90)
def test_02_undecodable_bytes_get_an_error_and_odd_bytes_are_ordinary(
    cli_server: StartServer,
) -> None:
    """Invalid UTF-8: `Error: message is not valid utf-8` + the message's own ending, the
    connection goes on; NUL and a bare CR are message bytes; 100,000 empty lines get 100,000
    replies; 64 KiB of random bytes cause no traceback and others are still served."""
    server = cli_server("--tcp", ANY_PORT, "--framing", "line")
    addr = server.address("tcp")
    with connect(addr) as client:
        expect(client, b"Welcome!\n")
        for sent, reply in [
            (b"\xff\xfe\n", UTF8_ERROR + b"\n"),
            (b"caf\xc3\r\n", UTF8_ERROR + b"\r\n"),
            (b"ok\n", hello(b"ok")),
            (b"NUL\x00byte\n", hello(b"NUL\x00byte")),
            (b"\x00\n", hello(b"\x00")),
            (b"bare\rcr\n", hello(b"bare\rcr")),
            (b"\rlead\r\n", hello(b"\rlead", b"\r\n")),
            (b"one\n\xc0\xaf\r\ntwo\n", hello(b"one") + UTF8_ERROR + b"\r\n" + hello(b"two")),
        ]:
            client.sendall(sent)
            expect(client, reply)

        # 100,000 empty lines, sent while the replies are read.
        count = 100_000
        sender = threading.Thread(target=client.sendall, args=(b"\n" * count,), daemon=True)
        sender.start()
        received = receive(client, count * len(hello(b"")), timeout=60)
        sender.join(10)
        assert len(received) == count * len(hello(b""))
        assert received == hello(b"") * count
        client.sendall(b"still\n")
        expect(client, hello(b"still"))

    # 64 KiB of random bytes (a fixed seed), then a marker line.
    payload = random.Random(20240607).randbytes(64 * 1024)
    with connect(addr) as noisy, connect(addr) as other:
        expect(noisy, b"Welcome!\n")
        expect(other, b"Welcome!\n")
        stream = payload + b"\nend-marker\n"
        sender = threading.Thread(target=noisy.sendall, args=(stream,), daemon=True)
        sender.start()
        marker = hello(b"end-marker")
        replies = bytearray()
        deadline = time.monotonic() + 30
        while not replies.endswith(marker) and time.monotonic() < deadline:
            if not wait_readable(noisy, 1.0):
                continue
            chunk = noisy.recv(1 << 16)
            if not chunk:
                break
            replies += chunk
        sender.join(10)
        assert replies.endswith(marker), replies[-200:]
        # One reply (an answer or the utf-8 error) per line, each with exactly one LF.
        assert replies.count(b"\n") == stream.count(b"\n")
        other.sendall(b"Bob\n")
        expect(other, hello(b"Bob"))
    assert_served(addr)
    assert logged(server, "handler_error") == []
    assert_clean_log(server)


# == 3. idle connections ===========================================================================


@pytest.mark.timeout(60)
def test_03_idle_connection_is_closed_after_idle_timeout_and_traffic_keeps_it(
    cli_server: StartServer,
) -> None:
    """--idle-timeout 1: a silent client is closed after about a second (not before),
    logged `connection_closed` reason `idle_timeout`; a client that talks stays open."""
    server = cli_server("--tcp", ANY_PORT, "--framing", "line", "--idle-timeout", "1")
    addr = server.address("tcp")
    with connect(addr) as quiet, connect(addr) as chatty:
        expect(quiet, b"Welcome!\n")
        expect(chatty, b"Welcome!\n")
        time.sleep(0.4)
        assert still_open(quiet), "closed well before --idle-timeout"
        for i in range(3):  # 1.2 s of traffic (after 0.4 s), every 0.4 s
            chatty.sendall(b"c%d\n" % i)
            expect(chatty, hello(b"c%d" % i))
            time.sleep(0.4)
        _, closed = receive_until_closed(quiet, timeout=STEP)
        assert closed, "a silent connection outlived --idle-timeout 1 by seconds"
        chatty.sendall(b"still here\n")
        expect(chatty, hello(b"still here"))
    wait_logged(server, "connection_closed", reason="idle_timeout")
    assert_clean_log(server)


# == 4. slowloris ==================================================================================


@pytest.mark.timeout(90)
def test_04_slowloris_times_out_from_the_first_byte_and_others_are_served(
    cli_server: StartServer,
) -> None:
    """500 connections each trickling a byte a second, no newline (line framing,
    --message-timeout 2): each gets `Error: message timed out` then is closed about 2 s after
    its first byte (silence before it does not count, later bytes do not extend it); a
    normal client is served promptly meanwhile; `message_timeout` warnings and
    `connection_closed` reason `message_timeout`."""
    crowd_size = 500
    timeout_s = 2.0
    server = cli_server("--tcp", ANY_PORT, "--framing", "line", "--message-timeout", "2")
    addr = server.address("tcp")
    expected = b"Welcome!\n" + b"Error: message timed out\n"
    with contextlib.ExitStack() as stack, selectors.DefaultSelector() as selector:
        crowd = [stack.enter_context(connect(addr)) for _ in range(crowd_size)]
        received = {sock: bytearray() for sock in crowd}
        closed_at: dict[socket.socket, float] = {}
        for sock in crowd:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        time.sleep(0.8)  # silence before the message: the timer must not run yet
        first_byte_at = time.monotonic()
        next_byte_at = first_byte_at
        probe_times: list[float] = []
        deadline = first_byte_at + timeout_s + 8
        while len(closed_at) < crowd_size and time.monotonic() < deadline:
            now = time.monotonic()
            if now >= next_byte_at:
                next_byte_at += 1.0
                for sock in crowd:
                    if sock not in closed_at:
                        with contextlib.suppress(OSError):
                            sock.send(b"s")
                started = time.monotonic()
                assert_served(addr, name=b"Normal")
                probe_times.append(time.monotonic() - started)
            for key, _ in selector.select(timeout=0.05):
                sock = key.fileobj  # type: ignore[assignment]
                try:
                    chunk = sock.recv(1 << 16)
                except BlockingIOError:
                    continue
                except ConnectionError:
                    chunk = b""
                if chunk:
                    received[sock] += chunk
                else:
                    closed_at[sock] = time.monotonic()
                    selector.unregister(sock)
        assert len(closed_at) == crowd_size, (
            f"{crowd_size - len(closed_at)} slow connections still open "
            f"{time.monotonic() - first_byte_at:.1f} s after their first byte"
        )
        wrong = [bytes(data) for data in received.values() if data != expected]
        assert wrong == [], f"{len(wrong)} got other bytes, e.g. {wrong[:3]}"
        earliest = min(closed_at.values()) - first_byte_at
        assert earliest >= timeout_s - 0.5, f"closed {earliest:.2f} s after the first byte"
        assert max(probe_times) < 2.0, f"normal client round trips took {probe_times}"

    warnings = wait_logged(server, "message_timeout", count=crowd_size)
    assert all(e["level"] == "warning" for e in warnings)
    wait_logged(server, "connection_closed", count=crowd_size, reason="message_timeout")
    assert_served(addr)
    assert_clean_log(server)


# == 5. clients that pipeline ======================================================================


def assert_memory_bound(pid: int, baseline: int, peak: int) -> None:
    """RSS grew less than 10 MB at peak and comes back within 2 MB of the start."""
    growth = peak - baseline
    assert growth < 10 * MiB, f"RSS grew {growth / MiB:.1f} MiB at peak"
    try:
        wait_until(lambda: rss(pid) - baseline < 2 * MiB, 10, "RSS back within 2 MiB")
    except AssertionError:
        raise AssertionError(
            f"RSS still {(rss(pid) - baseline) / MiB:.1f} MiB above the start"
        ) from None


@pytest.mark.timeout(90)
def test_05_client_that_pipelines_and_never_reads_is_throttled_then_aborted(
    cli_server: StartServer,
) -> None:
    """20 MB of short lines, never reading: the server stops reading, its RSS grows less than
    10 MB at peak and comes back within 2 MB after the client is gone; the client is aborted
    after --send-timeout (`connection_closed` reason `send_timeout`); others served
    meanwhile."""
    cap = 20 * MiB
    server = cli_server("--tcp", ANY_PORT, "--framing", "line", "--send-timeout", "2")
    addr = server.address("tcp")
    pid = server.proc.pid
    assert_served(addr)  # warm up the code paths before the baseline
    time.sleep(0.3)
    baseline = rss(pid)
    with RssSampler(pid) as sampler, Bystanders(addr) as bystanders:
        # Small client buffers, so the kernel does not hide a server that keeps reading.
        with connect(addr, rcvbuf=64 * 1024, sndbuf=64 * 1024) as hog:
            hog.setblocking(False)
            sent = push_until_stalled(hog, b"m" * 99 + b"\n", cap=cap, idle_s=0.5)
            assert sent < cap, "the server read all 20 MB from a client that never reads"
            wait_logged(server, "connection_closed", reason="send_timeout", timeout=15)
        time.sleep(0.3)
    assert bystanders.failures == [], bystanders.failures
    assert bystanders.served >= 3
    assert_memory_bound(pid, baseline, sampler.peak)
    assert_served(addr)
    assert_clean_log(server)


@pytest.mark.timeout(120)
def test_05_client_that_pipelines_and_reads_stays_within_the_memory_bound(
    cli_server: StartServer,
) -> None:
    """20 MB of lines pipelined by a client that reads its replies: every reply, in order;
    server RSS grows less than 10 MB at peak and returns within 2 MB of the start."""
    line = b"r" * 199 + b"\n"
    count = (20 * MiB) // len(line)
    reply = hello(line[:-1])
    server = cli_server("--tcp", ANY_PORT, "--framing", "line")
    addr = server.address("tcp")
    pid = server.proc.pid
    assert_served(addr)
    time.sleep(0.3)
    baseline = rss(pid)
    errors: list[BaseException] = []

    def send_all(sock: socket.socket) -> None:
        block = line * 5000
        try:
            for _ in range(count // 5000):
                sock.sendall(block)
            sock.sendall(line * (count % 5000))
        except OSError as exc:
            errors.append(exc)

    with RssSampler(pid) as sampler, connect(addr) as client:
        expect(client, b"Welcome!\n")
        sender = threading.Thread(target=send_all, args=(client,), daemon=True)
        sender.start()
        received = receive(client, count * len(reply), timeout=90)
        sender.join(30)
        assert errors == []
        assert len(received) == count * len(reply)
        assert received == reply * count
    assert_memory_bound(pid, baseline, sampler.peak)
    assert_clean_log(server)


# == 6. half-close =================================================================================


@pytest.mark.timeout(60)
def test_06_half_closed_client_gets_its_reply_then_the_server_closes(
    cli_server: StartServer,
) -> None:
    """`Bob` or `Bob\\n` then shutdown(SHUT_WR): the reply, then the server closes; no socket
    of the server is left in CLOSE_WAIT."""
    auto = cli_server("--tcp", ANY_PORT)
    line = cli_server("--tcp", ANY_PORT, "--framing", "line")
    # (server, its greeting, what is sent before the half-close, the replies expected)
    cases: list[tuple[CliServer, bytes, bytes, bytes | None]] = [
        (auto, WELCOME["auto"], b"Bob", hello(b"Bob", b"")),
        (auto, WELCOME["auto"], b"Bob\n", hello(b"Bob")),
        (auto, WELCOME["auto"], b"Bob\r\n", hello(b"Bob", b"\r\n")),
        (line, WELCOME["line"], b"Bob\n", hello(b"Bob")),
        (line, WELCOME["line"], b"Bob\nAnn\r\n", hello(b"Bob") + hello(b"Ann", b"\r\n")),
        (auto, WELCOME["auto"], b"", None),  # nothing at all, then the half-close
        (line, WELCOME["line"], b"", None),
    ]
    with contextlib.ExitStack() as stack:
        pending = []
        for server, welcome, sent, expected in cases * 5:
            sock = stack.enter_context(connect(server.address("tcp")))
            expect(sock, welcome)
            if sent:
                sock.sendall(sent)
            sock.shutdown(socket.SHUT_WR)
            pending.append((sent, expected, sock))
        outcomes = [
            (sent, expected, *receive_until_closed(sock)) for sent, expected, sock in pending
        ]
        # The client sockets are still open here: a server socket that got the FIN and did
        # not close would be in CLOSE_WAIT.
        for server in (auto, line):
            wait_until(
                lambda server=server: close_wait_sockets(server.proc.pid) == [],
                STEP,
                "no server socket in CLOSE_WAIT",
            )
        for sent, expected, data, closed in outcomes:
            assert closed, f"{sent!r}: the server did not close after the half-close"
            if expected is not None:
                assert data == expected, sent
    for server in (auto, line):
        assert_clean_log(server)


# == 7. connection churn ===========================================================================


@pytest.mark.timeout(120)
def test_07_ten_thousand_connections_that_reset_leave_nothing_behind(
    cli_server: StartServer,
) -> None:
    """10,000 connections that connect and reset (SO_LINGER 0), some before `Welcome!`:
    the server's descriptors are back to the baseline within seconds, nothing on stderr
    about ResourceWarning, destroyed tasks or tracebacks, and it still serves."""
    total = 10_000
    server = cli_server("--tcp", ANY_PORT, "--framing", "line")
    addr = server.address("tcp")
    process = psutil.Process(server.proc.pid)
    assert_served(addr)
    wait_logged(server, "connection_closed")
    time.sleep(0.2)
    baseline = process.num_fds()

    def closed_count() -> int:
        return sum(1 for e in list(server.events) if e.get("event") == "connection_closed")

    for i in range(total):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(STEP)
            sock.connect(addr)
            kind = i % 4
            if kind == 1:  # after the greeting
                receive(sock, len(b"Welcome!\n"))
            elif kind == 2:  # in the middle of a line
                sock.sendall(b"Bo")
            elif kind == 3:  # right after a request
                sock.sendall(b"Bob\n")
            # kind 0: at once, most likely before the greeting was sent
        finally:
            reset(sock)
        if i % 1000 == 999:
            # Pacing only (keeps the listen backlog from overflowing); not an assertion.
            with contextlib.suppress(AssertionError):
                wait_until(lambda i=i: closed_count() >= i - 1500, 5, "the server to catch up")

    try:
        wait_until(lambda: process.num_fds() <= baseline, 15, "descriptors back to baseline")
    except AssertionError:
        raise AssertionError(
            f"server has {process.num_fds()} descriptors, {baseline} before the churn"
        ) from None
    assert_served(addr)
    assert_clean_log(server)


# == 8. connection caps ============================================================================


@pytest.mark.timeout(60)
def test_08_connection_caps_refuse_with_an_error_and_capacity_returns(
    cli_server: StartServer,
) -> None:
    """--max-connections 4 --max-per-ip 2: over the per-IP cap `Error: too many connections
    from your address`, over the total cap `Error: too many connections`, each then closed;
    capacity returns when others leave; `connections_refused` warnings with `reason` and
    `refused` (counts since the previous line), at most one line a second per reason."""
    per_ip_error = b"Error: too many connections from your address\n"
    total_error = b"Error: too many connections\n"
    reasons = {per_ip_error: "max_per_ip", total_error: "max_connections"}
    refusals = {"max_per_ip": 0, "max_connections": 0}
    server = cli_server(
        "--tcp", ANY_PORT, "--framing", "line", "--max-connections", "4", "--max-per-ip", "2"
    )
    addr = server.address("tcp")

    def attempt(source: str) -> socket.socket | None:
        """A new connection: the accepted socket, or None after counting its refusal."""
        sock = connect(addr, source=source)
        first = receive(sock, len(b"Welcome!\n"), timeout=STEP)
        if first == b"Welcome!\n":
            return sock
        data, closed = receive_until_closed(sock)
        sock.close()
        message = first + data
        assert message in reasons, f"from {source}: {message!r}"
        assert closed, f"from {source}: refused but left open"
        refusals[reasons[message]] += 1
        return None

    def refused(source: str, reason: str) -> None:
        sock = attempt(source)
        if sock is not None:
            sock.close()
            raise AssertionError(f"a connection from {source} was accepted, not {reason}")
        assert refusals[reason], reason

    def accepted_eventually(source: str) -> socket.socket:
        deadline = time.monotonic() + STEP
        while time.monotonic() < deadline:
            sock = attempt(source)
            if sock is not None:
                return sock
            time.sleep(0.1)
        raise AssertionError(f"capacity did not return for {source}")

    def served(sock: socket.socket, name: bytes) -> None:
        sock.sendall(name + b"\n")
        expect(sock, hello(name))

    with contextlib.ExitStack() as stack:
        a1 = stack.enter_context(connect(addr, source="127.0.0.1"))
        a2 = stack.enter_context(connect(addr, source="127.0.0.1"))
        for sock in (a1, a2):
            expect(sock, b"Welcome!\n")
        before = dict(refusals)
        for _ in range(10):
            refused("127.0.0.1", "max_per_ip")
        assert refusals["max_per_ip"] == before["max_per_ip"] + 10

        b1 = stack.enter_context(connect(addr, source="127.0.0.2"))
        b2 = stack.enter_context(connect(addr, source="127.0.0.2"))
        for sock in (b1, b2):
            expect(sock, b"Welcome!\n")
        for _ in range(10):
            refused("127.0.0.3", "max_connections")
        assert refusals["max_connections"] == 10
        for sock, name in ((a1, b"A1"), (a2, b"A2"), (b1, b"B1"), (b2, b"B2")):
            served(sock, name)

        # Capacity returns when others leave: the total, then the per-IP cap.
        b2.close()
        c1 = stack.enter_context(accepted_eventually("127.0.0.3"))
        a1.close()
        a3 = stack.enter_context(accepted_eventually("127.0.0.1"))
        served(c1, b"C1")
        served(a3, b"A3")

        # Now 4 open (a2, b1, c1, a3), two of them from 127.0.0.1. After a quiet second,
        # one more refusal of each kind: its line must carry the count since the last one.
        time.sleep(1.2)
        refused("127.0.0.4", "max_connections")
        c1.close()
        time.sleep(0.5)  # the server sees c1 leave: 3 open, two of them from 127.0.0.1
        refused("127.0.0.1", "max_per_ip")
        served(a2, b"A2")

    def totals() -> dict[str, int]:
        sums = {"max_per_ip": 0, "max_connections": 0}
        for event in logged(server, "connections_refused"):
            sums[event["reason"]] += int(event["refused"])
        return sums

    with contextlib.suppress(AssertionError):
        wait_until(lambda: totals() == refusals, 3, "refusal counts")
    assert totals() == refusals, logged(server, "connections_refused")
    lines = logged(server, "connections_refused")
    assert all(e["level"] == "warning" for e in lines), lines
    assert_at_most_one_line_a_second(lines, "reason")
    assert_clean_log(server)


# == 9. out of file descriptors ====================================================================


def _limit_descriptors_to_64() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


@pytest.mark.timeout(90)
def test_09_out_of_descriptors_keeps_serving_and_accepts_again(
    raw_server: Callable[..., RawServer],
) -> None:
    """A server limited to 64 open files and offered far more connections: it keeps serving
    its connections, stays well under 25% of a core, logs only JSON lines and at most one a
    second per kind (with `connections_refused` counting the refusals), and accepts again
    once descriptors are free."""
    server = raw_server("--tcp", ANY_PORT, "--framing", "line", preexec_fn=_limit_descriptors_to_64)
    server.start_reader()
    addr = server.address("tcp")
    pid = server.proc.pid
    assert psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE) == (64, 64)
    with contextlib.ExitStack() as stack:
        kept = [stack.enter_context(connect(addr)) for _ in range(5)]
        for sock in kept:
            expect(sock, b"Welcome!\n")
        flood: list[socket.socket] = []

        def more(count: int) -> None:
            for _ in range(count):
                with contextlib.suppress(OSError):
                    flood.append(stack.enter_context(connect(addr, timeout=2)))

        more(150)
        time.sleep(0.2)
        cpu_before, started = cpu_seconds(pid), time.monotonic()
        for round_ in range(5):  # 1.25 s under pressure
            for i, sock in enumerate(kept):
                sock.sendall(b"k%d-%d\n" % (round_, i))
                expect(sock, hello(b"k%d-%d" % (round_, i)))
            more(10)
            time.sleep(0.25)
        cpu_share = (cpu_seconds(pid) - cpu_before) / (time.monotonic() - started)
        assert cpu_share < 0.25, f"the server used {cpu_share:.0%} of a core"

        for sock in flood:
            sock.close()
        with connect(addr) as newcomer:
            expect(newcomer, b"Welcome!\n", timeout=15)
            newcomer.sendall(b"New\n")
            expect(newcomer, hello(b"New"))
        for i, sock in enumerate(kept):
            sock.sendall(b"again%d\n" % i)
            expect(sock, hello(b"again%d" % i))

    assert server.bad_lines() == [], server.bad_lines()[:5]
    refused = server.wait_event("connections_refused", timeout=5)
    assert all("refused" in e for e in refused), refused
    assert sum(int(e["refused"]) for e in refused) >= 1, refused
    loud = [e for e in server.events() if e.get("level") in ("warning", "error", "critical")]
    assert_at_most_one_line_a_second(loud, "event", "reason")
    assert "Traceback" not in server.text()


# == 10. graceful shutdown =========================================================================


@pytest.mark.timeout(60)
def test_10_sigterm_drains_partial_lines_and_handler_calls_then_exits_0(
    cli_server: StartServer, handlers: str
) -> None:
    """SIGTERM: the listener closes at once, an idle connection is closed, a partial line may
    be finished and is answered, an async handler call in flight finishes and its reply is
    sent, the rest is aborted at --shutdown-timeout, exit status 0; `shutdown_started`
    (connections, idle_closed, draining) and `shutdown_finished` (closed, aborted,
    duration_s)."""
    shutdown_s = 2.0
    server = cli_server(
        "--tcp", ANY_PORT, "--framing", "line", "--handler", f"{handlers}:SlowGreeter",
        "--shutdown-timeout", "2",
    )  # fmt: skip
    addr = server.address("tcp")
    with (
        connect(addr) as idle,
        connect(addr) as partial,
        connect(addr) as inflight,
        connect(addr) as stuck,
    ):
        for sock in (idle, partial, inflight, stuck):
            expect(sock, b"Welcome!\n")
        partial.sendall(b"Bo")
        inflight.sendall(b"slow\n")  # the handler awaits for a second
        stuck.sendall(b"never finished")
        time.sleep(0.3)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        [started] = wait_logged(server, "shutdown_started")

        def refused() -> bool:
            try:
                connect(addr, timeout=1).close()
            except ConnectionRefusedError:
                return True
            return False

        wait_until(refused, 1.0, "the listener to close at once")
        partial.sendall(b"b\n")
        _, closed = receive_until_closed(idle, timeout=shutdown_s - 0.6)
        assert closed, "the idle connection was not closed at once"
        assert time.monotonic() - signalled < shutdown_s - 0.5
        assert receive_until_closed(partial) == (hello(b"Bob"), True)
        assert receive_until_closed(inflight) == (hello(b"slow"), True)
        data, closed = receive_until_closed(stuck, timeout=shutdown_s + 5)
        assert closed, "the connection that never finished its line was not aborted"
        assert data == b""
        assert time.monotonic() - signalled > shutdown_s - 0.3, "aborted before the deadline"
        assert server.proc.wait(10) == 0
    assert started["connections"] == 4, started
    assert started["idle_closed"] == 1, started
    assert started["draining"] == 3, started
    [finished] = wait_logged(server, "shutdown_finished")
    # Only the connection still holding its partial line at the deadline was aborted.
    closes = [e.get("reason") for e in logged(server, "connection_closed")]
    assert finished["aborted"] == 1, (finished, closes)
    assert finished["closed"] + finished["aborted"] == 4, (finished, closes)
    assert shutdown_s - 0.5 <= float(finished["duration_s"]) < shutdown_s + 3, finished
    assert_clean_log(server)


@pytest.mark.timeout(60)
def test_10_second_signal_exits_at_once_with_status_1(cli_server: StartServer) -> None:
    """SIGINT starts a graceful stop (a connection holds a partial line, the grace period
    is 10 s); a second signal exits at once with status 1."""
    server = cli_server("--tcp", ANY_PORT, "--framing", "line", "--shutdown-timeout", "10")
    addr = server.address("tcp")
    with connect(addr) as holder:
        expect(holder, b"Welcome!\n")
        holder.sendall(b"half a li")
        time.sleep(0.2)
        server.proc.send_signal(signal.SIGINT)
        wait_logged(server, "shutdown_started")
        time.sleep(0.2)
        assert server.proc.poll() is None, "did not wait for the partial line"
        server.proc.send_signal(signal.SIGTERM)
        # Within STEP (5 s), half the 10 s grace: it did not wait for the partial line.
        assert server.proc.wait(STEP) == 1
    assert_clean_log(server)


# == 11. handler exceptions ========================================================================


@pytest.mark.timeout(60)
def test_11_handler_exception_closes_only_that_connection_logged_without_locals(
    cli_server: StartServer, raw_server: Callable[..., RawServer], handlers: str
) -> None:
    """A handler that raises: only that connection closes; one `handler_error` (level error)
    with the traceback in `exception`; no local variable values in the JSON or the console
    format."""
    secret = b"boom-xyzzy-plugh"  # the message, and reversed in a local variable
    markers = ("xyzzy", "yzzyx", "plugh", "hgulp")

    def scenario(addr: tuple[str, int]) -> None:
        with connect(addr) as victim, connect(addr) as other:
            expect(victim, b"Welcome!\n")
            expect(other, b"Welcome!\n")
            victim.sendall(b"a\n")
            expect(victim, hello(b"a"))
            victim.sendall(secret + b"\nb\n")
            data, closed = receive_until_closed(victim)
            assert closed, "the connection whose handler raised was not closed"
            assert data == b""
            other.sendall(b"c\n")
            expect(other, hello(b"c"))
        assert_served(addr)

    # JSON.
    server = cli_server("--tcp", ANY_PORT, "--framing", "line", "--handler", f"{handlers}:Fragile")
    scenario(server.address("tcp"))
    wait_logged(server, "handler_error")
    time.sleep(0.3)
    errors = logged(server, "handler_error")
    assert len(errors) == 1, errors
    error = errors[0]
    assert error["level"] == "error"
    traceback_text = json.dumps(error.get("exception"))
    assert "ValueError" in traceback_text, error
    assert "explode" in traceback_text, error
    log_text = json.dumps(list(server.events))
    for marker in markers:
        assert marker not in log_text, f"a local variable value ({marker}) was logged"

    # Console.
    port = free_tcp_port()
    console = raw_server(
        "--tcp", f"{LOCAL}:{port}", "--framing", "line", "--handler", f"{handlers}:Fragile",
        log_format="console",
    )  # fmt: skip
    console.start_reader()
    wait_until(lambda: "serving" in console.text(), 15, "the console server to serve")
    scenario((LOCAL, port))
    wait_until(lambda: "explode" in console.text(), STEP, "the console traceback")
    time.sleep(0.3)
    text = console.text()
    assert "handler_error" in text, text
    assert "ValueError" in text, text
    for marker in markers:
        assert marker not in text, f"a local variable value ({marker}) was logged:\n{text}"


# == 12. async handlers that are cancelled or fail =================================================


@pytest.mark.timeout(60)
def test_12_cancelled_or_failing_await_closes_after_replies_so_far_in_order(
    cli_server: StartServer, handlers: str
) -> None:
    """An async on_message whose await is cancelled, or fails: that connection is closed
    after the replies made so far (in the order of the messages, whatever each one
    awaited), later messages are not answered, each logged as `handler_error`."""
    server = cli_server("--tcp", ANY_PORT, "--framing", "line", "--handler", f"{handlers}:Awaiting")
    addr = server.address("tcp")
    pipelined = [b"a:0.2", b"b:0", b"c:0.1", b"d:0.05"]
    kinds = (b"cancel", b"fail")
    with contextlib.ExitStack() as stack:
        bystander = stack.enter_context(connect(addr))
        clients = [stack.enter_context(connect(addr)) for _ in kinds]
        for sock in (bystander, *clients):
            expect(sock, b"Welcome!\n")
        for kind, client in zip(kinds, clients, strict=True):
            client.sendall(b"".join(m + b"\n" for m in [*pipelined, kind + b":0.05", b"e:0"]))
        for kind, client in zip(kinds, clients, strict=True):
            data, closed = receive_until_closed(client)
            assert data == b"".join(hello(m) for m in pipelined) + b"partial\n", kind
            assert closed, kind
        bystander.sendall(b"x:0.05\n")
        expect(bystander, hello(b"x:0.05"))
    errors = wait_logged(server, "handler_error", count=2)
    time.sleep(0.3)
    assert len(logged(server, "handler_error")) == 2
    assert all(e["level"] == "error" for e in errors), errors
    assert_served(addr)


# == 13. Server.stop() from a signal handler and from another thread ===============================

STOP_SCRIPT = """
import asyncio, signal, sys, threading

import uvloop

import netframe

loop_name, mode = sys.argv[1], sys.argv[2]
factory = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}[loop_name]


def say(*words):
    print("@@", *words, flush=True)


async def main():
    netframe.configure_logging(level="warning")
    server = netframe.Server(tcp=["127.0.0.1:0"], udp=[])
    await server.start()
    if mode == "signal":
        signal.signal(signal.SIGUSR1, lambda signum, frame: server.stop())
    else:
        def stop_when_asked():
            sys.stdin.readline()
            server.stop()

        threading.Thread(target=stop_when_asked, daemon=True).start()
    say("ready", server.address("tcp")[1])
    await server.serve_forever()
    say("returned")


with asyncio.Runner(loop_factory=factory) as runner:
    runner.run(main())
say("exited")
"""


@pytest.mark.timeout(60)
def test_13_server_stop_from_a_signal_handler_and_from_a_thread_is_prompt(
    loop_name: str,
) -> None:
    """``netframe.Server.stop()`` called from a ``signal.signal`` handler (SIGUSR1) and from
    another thread: ``serve_forever()`` returns within 2 s (an idle client connected), on
    an ``asyncio.Runner`` with the parametrized loop."""
    procs = {
        mode: subprocess.Popen(
            [sys.executable, "-c", STOP_SCRIPT, loop_name, mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mode in ("signal", "thread")
    }
    lines: dict[str, queue.Queue[str]] = {mode: queue.Queue() for mode in procs}

    def read(mode: str) -> None:
        stdout = procs[mode].stdout
        assert stdout is not None
        for line in stdout:
            if line.startswith("@@ "):
                lines[mode].put(line[3:].strip())

    readers = [threading.Thread(target=read, args=(m,), daemon=True) for m in procs]
    for reader in readers:
        reader.start()
    problems: dict[str, str] = {}
    try:
        for mode, proc in procs.items():
            try:
                ready = lines[mode].get(timeout=20)
            except queue.Empty:
                problems[mode] = "never ready"
                continue
            assert ready.startswith("ready "), ready
            port = int(ready.split()[1])
            with connect((LOCAL, port)) as idle:
                expect(idle, b"Welcome!")
                stopped = time.monotonic()
                if mode == "signal":
                    proc.send_signal(signal.SIGUSR1)
                else:
                    assert proc.stdin is not None
                    proc.stdin.write("stop\n")
                    proc.stdin.flush()
                try:
                    returned = lines[mode].get(timeout=10)
                except queue.Empty:
                    problems[mode] = "serve_forever() did not return within 10 s"
                    continue
                elapsed = time.monotonic() - stopped
                if returned != "returned" or elapsed >= 2.0:
                    problems[mode] = f"{returned!r} after {elapsed:.2f} s"
                _, closed = receive_until_closed(idle)
                if not closed:
                    problems.setdefault(mode, "the idle client was not closed")
        for mode, proc in procs.items():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                problems.setdefault(mode, "the process did not exit")
            if proc.returncode != 0:
                assert proc.stderr is not None
                stderr = proc.stderr.read() if proc.poll() is not None else ""
                problems.setdefault(mode, f"exit status {proc.returncode}: {stderr[-2000:]}")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        for reader in readers:
            reader.join(5)
    assert problems == {}


# == 14. stderr closed or stalled ==================================================================


@pytest.mark.timeout(60)
def test_14_stderr_closed_every_client_is_still_served(
    raw_server: Callable[..., RawServer],
) -> None:
    """The server's stderr pipe is closed by its reader: every client is still served."""
    server = raw_server("--tcp", ANY_PORT, "--framing", "line", "--log-level", "debug")
    server.read_until("serving")
    addr = server.address("tcp")
    server.close_stderr()
    for i in range(20):
        assert_served(addr, name=b"After%d" % i)
    with connect(addr) as busy:  # many debug lines, all of them going nowhere
        expect(busy, b"Welcome!\n")
        count = 5000
        busy.sendall(b"m\n" * count)
        expect(busy, hello(b"m") * count, timeout=30)
    assert_served(addr)
    assert server.proc.poll() is None, "the server died"


@pytest.mark.timeout(90)
def test_14_stderr_reader_stalled_for_10s_clients_served_and_drops_reported(
    raw_server: Callable[..., RawServer],
) -> None:
    """The stderr reader stops reading for 10 s while clients keep coming (debug level, so
    that far more than a pipe's worth is logged): every client is served promptly, no
    broken line reaches stderr, and once writing works again a `log_lines_dropped` event
    reports the lines dropped (`dropped`)."""
    server = raw_server("--tcp", ANY_PORT, "--framing", "line", "--log-level", "debug")
    server.start_reader()
    addr = server.address("tcp")
    time.sleep(0.2)
    server.reading.clear()
    stalled = time.monotonic()
    # About 50,000 debug lines (megabytes of log), far more than any pipe holds.
    with connect(addr) as busy:
        expect(busy, b"Welcome!\n")
        count = 50_000
        sender = threading.Thread(target=busy.sendall, args=(b"m\n" * count,), daemon=True)
        sender.start()
        expect(busy, hello(b"m") * count, timeout=30)
        sender.join(10)
    served = 0
    slowest = 0.0
    while time.monotonic() - stalled < 10.0:
        started = time.monotonic()
        assert_served(addr, name=b"During%d" % served)
        slowest = max(slowest, time.monotonic() - started)
        served += 1
        time.sleep(0.3)
    assert slowest < 3.0, f"a client waited {slowest:.1f} s while stderr was stalled"
    server.reading.set()
    assert_served(addr, name=b"After")
    assert_served(addr, name=b"AfterAgain")
    dropped = server.wait_event("log_lines_dropped", timeout=10)
    assert all(int(e["dropped"]) > 0 for e in dropped), dropped
    assert server.bad_lines() == [], server.bad_lines()[:5]


# == 15. UDP =======================================================================================


def udp_socket(source: str = LOCAL, port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((source, port))
        sock.settimeout(STEP)
    except BaseException:
        sock.close()
        raise
    return sock


def udp_collect(socks: list[socket.socket], quiet_s: float) -> list[tuple[socket.socket, bytes]]:
    """Every datagram that arrives on ``socks`` until none has come for ``quiet_s``."""
    got = []
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = selector.select(timeout=quiet_s)
            if not ready:
                break
            for key, _ in ready:
                sock = key.fileobj  # type: ignore[assignment]
                with contextlib.suppress(OSError):
                    got.append((sock, sock.recv(65536)))
    return got


@pytest.mark.timeout(60)
def test_15_udp_no_reply_to_empty_blank_or_greeting_reply_datagrams(
    cli_server: StartServer,
) -> None:
    """No reply to an empty or blank datagram, nor (greeting handler) to a datagram that is
    itself a greeting reply `Hello, ...!`; the next datagram is answered normally."""
    server = cli_server("--udp", ANY_PORT)
    addr = server.address("udp")
    with udp_socket() as client:
        for datagram in [b"", b"\n", b"\r\n", b" ", b"   \n", b"\t \r\n", b"Hello, Bob!",
                         b"Hello, Bob!\n"]:  # fmt: skip
            client.sendto(datagram, addr)
        client.sendto(b"probe", addr)
        # A reply to any earlier datagram would come first.
        assert client.recv(65536) == b"Hello, probe!"
        assert udp_collect([client], 0.3) == []
    assert_clean_log(server)


@pytest.mark.timeout(60)
def test_15_udp_datagrams_and_replies_over_the_size_limit_are_dropped(
    cli_server: StartServer,
) -> None:
    """--udp-max-datagram 100: a larger datagram gets no reply, a reply larger than 100 bytes
    is not sent, a reply of exactly 100 bytes is."""
    greeting = cli_server("--udp", ANY_PORT, "--udp-max-datagram", "100")
    echo = cli_server("--udp", ANY_PORT, "--udp-max-datagram", "100", "--handler", "echo")
    with udp_socket() as client:
        to_greeting = greeting.address("udp")
        client.sendto(b"x" * 101, to_greeting)  # too large to take
        client.sendto(b"y" * 93, to_greeting)  # its reply would be 101 bytes
        client.sendto(b"z" * 1400, to_greeting)
        client.sendto(b"w" * 92, to_greeting)  # its reply is exactly 100 bytes
        assert client.recv(65536) == hello(b"w" * 92, b"")
        assert udp_collect([client], 0.3) == []

        to_echo = echo.address("udp")
        client.sendto(b"a" * 101, to_echo)
        client.sendto(bytes(range(100)), to_echo)
        assert client.recv(65536) == bytes(range(100))
        assert udp_collect([client], 0.3) == []
    for server in (greeting, echo):
        assert_clean_log(server)


def _privileged_udp_ports(count: int) -> list[socket.socket]:
    """``count`` UDP sockets bound to free ports below 1024 (needs root), or skip."""
    socks: list[socket.socket] = []
    for port in range(1023, 900, -1):
        try:
            socks.append(udp_socket(LOCAL, port))
        except PermissionError:
            break
        except OSError:
            continue
        if len(socks) == count:
            return socks
    for sock in socks:
        sock.close()
    pytest.skip("cannot bind source ports below 1024 here")


@pytest.mark.timeout(60)
def test_15_udp_no_reply_to_source_ports_below_1024_unless_allowed(
    cli_server: StartServer,
) -> None:
    """Datagrams from source ports below 1024 are not answered, except from a port given
    with --udp-allow-port; ordinary ports are answered."""
    denied, allowed = _privileged_udp_ports(2)
    with denied, allowed, udp_socket() as ordinary:
        allowed_port = allowed.getsockname()[1]
        server = cli_server("--udp", ANY_PORT, "--udp-allow-port", str(allowed_port))
        addr = server.address("udp")
        denied.sendto(b"Mallory", addr)
        allowed.sendto(b"Ann", addr)
        ordinary.sendto(b"Bob", addr)
        assert allowed.recv(65536) == b"Hello, Ann!"
        assert ordinary.recv(65536) == b"Hello, Bob!"
        assert udp_collect([denied], 0.3) == []
    assert_clean_log(server)


@pytest.mark.timeout(90)
def test_15_udp_flood_from_one_address_does_not_starve_another(
    cli_server: StartServer,
) -> None:
    """200,000 datagrams from 127.0.0.1 (from four source ports: the port does not count)
    over about 3 s: 127.0.0.2, sending 50 a second, gets at least 90% answered; the flood
    gets no more than the rate limit's worth (100/s, burst 100); the drops are summarised
    by `datagrams_dropped` warnings (`reason`, `dropped`), at most one a second."""
    # The full 200,000 datagrams, paced over about 3 s (a Python sender on a busy machine
    # cannot do much better anyway); the >= 90% criterion for 127.0.0.2 is kept.
    flood_count = 200_000
    flood_s = 3.0
    server = cli_server("--udp", ANY_PORT)
    addr = server.address("udp")
    with contextlib.ExitStack() as stack:
        flooders = [stack.enter_context(udp_socket("127.0.0.1")) for _ in range(4)]
        victim = stack.enter_context(udp_socket("127.0.0.2"))
        stop = threading.Event()
        flood_replies = [0]
        victim_replies: set[bytes] = set()

        def count_flood_replies() -> None:
            with selectors.DefaultSelector() as selector:
                for sock in flooders:
                    sock.setblocking(False)
                    selector.register(sock, selectors.EVENT_READ)
                while not stop.is_set():
                    for key, _ in selector.select(timeout=0.05):
                        with contextlib.suppress(OSError):
                            while key.fileobj.recv(65536):  # type: ignore[union-attr]
                                flood_replies[0] += 1

        def collect_victim_replies() -> None:
            victim.settimeout(0.05)
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    victim_replies.add(victim.recv(65536))

        def flood() -> None:
            payload = b"flood"
            started = time.monotonic()
            for batch in range(flood_count // 1000):
                sock = flooders[batch % len(flooders)]
                for _ in range(1000):
                    with contextlib.suppress(OSError):
                        sock.sendto(payload, addr)
                # Paced to spread the flood over about flood_s seconds.
                ahead = started + flood_s * (batch + 1) * 1000 / flood_count - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)

        helpers = [
            threading.Thread(target=count_flood_replies, daemon=True),
            threading.Thread(target=collect_victim_replies, daemon=True),
        ]
        for helper in helpers:
            helper.start()
        flooder = threading.Thread(target=flood, daemon=True)
        flood_started = time.monotonic()
        flooder.start()
        sent: list[bytes] = []
        while flooder.is_alive() and time.monotonic() - flood_started < 30:
            name = b"v%d" % len(sent)
            victim.sendto(name, addr)
            sent.append(name)
            time.sleep(0.02)
        flooder.join(30)
        flood_elapsed = time.monotonic() - flood_started
        time.sleep(0.5)
        stop.set()
        for helper in helpers:
            helper.join(5)

    answered = sum(1 for name in sent if hello(name, b"") in victim_replies)
    assert len(sent) >= 20
    assert answered >= 0.9 * len(sent), f"127.0.0.2: {answered} of {len(sent)} answered"
    budget = 100 + 100 * (flood_elapsed + 1.0) + 50
    assert flood_replies[0] <= budget, f"the flood got {flood_replies[0]} replies"
    drops = wait_logged(server, "datagrams_dropped", timeout=5)
    assert all(e["level"] == "warning" and "reason" in e for e in drops), drops
    assert sum(int(e["dropped"]) for e in drops) > 0, drops
    assert_at_most_one_line_a_second(drops, "reason")
    assert_clean_log(server)


@pytest.mark.timeout(60)
def test_15_udp_rate_limit_is_a_burst_of_n_then_n_per_second_per_address(
    cli_server: StartServer,
) -> None:
    """--udp-rate 20: 100 datagrams at once from one address (two ports) get 20 answers
    (give or take the refill), another address is answered meanwhile, the first is answered
    again after a pause; --udp-rate 0 answers everything."""
    limited = cli_server("--udp", ANY_PORT, "--udp-rate", "20")
    unlimited = cli_server("--udp", ANY_PORT, "--udp-rate", "0")
    addr = limited.address("udp")
    with (
        udp_socket("127.0.0.3") as one,
        udp_socket("127.0.0.3") as two,
        udp_socket("127.0.0.4") as other,
    ):
        started = time.monotonic()
        for i in range(100):
            (one if i % 2 else two).sendto(b"r%d" % i, addr)
        other.sendto(b"other", addr)
        assert other.recv(65536) == b"Hello, other!"
        elapsed = time.monotonic() - started  # the 100 were handled before `other`
        replies = udp_collect([one, two], 0.3)
        assert 20 <= len(replies) <= 20 + 20 * elapsed + 2, (len(replies), elapsed)
        time.sleep(0.6)  # 12 datagrams' worth refilled
        one.sendto(b"later", addr)
        assert one.recv(65536) == b"Hello, later!"

        to_unlimited = unlimited.address("udp")
        for i in range(150):
            one.sendto(b"u%d" % i, to_unlimited)
        replies = udp_collect([one], 0.3)
        assert len(replies) == 150
    for server in (limited, unlimited):
        assert_clean_log(server)


class LoopbackSniffer:
    """Records UDP datagrams seen arriving on ``lo`` (AF_PACKET: root only)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.05)
        self.packets: list[tuple[float, int, int, bytes]] = []  # (time, sport, dport, payload)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, where = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            if where[2] == socket.PACKET_OUTGOING:  # each loopback packet is seen twice
                continue
            ip = frame[14:]
            if len(ip) < 28 or ip[9] != socket.IPPROTO_UDP:
                continue
            ihl = (ip[0] & 0x0F) * 4
            sport, dport = struct.unpack("!HH", ip[ihl : ihl + 4])
            self.packets.append((time.monotonic(), sport, dport, ip[ihl + 8 :]))

    def between(self, a: int, b: int) -> list[tuple[float, int, int, bytes]]:
        return [p for p in list(self.packets) if {p[1], p[2]} == {a, b}]

    def __enter__(self) -> LoopbackSniffer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def send_spoofed_udp(source_port: int, dest_port: int, payload: bytes) -> None:
    """A datagram 127.0.0.1:source_port -> 127.0.0.1:dest_port (raw socket: root only)."""
    udp = struct.pack("!HHHH", source_port, dest_port, 8 + len(payload), 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0,
        socket.inet_aton(LOCAL), socket.inet_aton(LOCAL),
    )  # fmt: skip
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(header + udp, (LOCAL, 0))


@pytest.mark.timeout(60)
def test_15_udp_servers_aimed_at_each_other_stop_quickly(cli_server: StartServer) -> None:
    """Two servers aimed at each other by one spoofed datagram: greeting servers exchange
    fewer than 3 datagrams; echo servers' ping-pong is cut off by the rate limit within a
    second (and the drops are logged as `datagrams_dropped`)."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).close()
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800)).close()
    except PermissionError:
        pytest.skip("spoofing and sniffing loopback datagrams need raw sockets (root)")
    greet_a, greet_b = cli_server("--udp", ANY_PORT), cli_server("--udp", ANY_PORT)
    echo_a = cli_server("--udp", ANY_PORT, "--handler", "echo")
    echo_b = cli_server("--udp", ANY_PORT, "--handler", "echo")
    ga, gb = greet_a.address("udp")[1], greet_b.address("udp")[1]
    ea, eb = echo_a.address("udp")[1], echo_b.address("udp")[1]
    with LoopbackSniffer() as sniffer:
        time.sleep(0.1)
        injected = time.monotonic()
        send_spoofed_udp(gb, ga, b"Bob")
        send_spoofed_udp(eb, ea, b"ping")
        time.sleep(1.4)
    greeting = [p for p in sniffer.between(ga, gb) if (p[1], p[2], p[3]) != (gb, ga, b"Bob")]
    assert 1 <= len(greeting) < 3, [(p[1], p[2], p[3]) for p in greeting]
    echoes = sniffer.between(ea, eb)
    assert len(echoes) >= 2, "the spoofed datagram did not start the echo servers"
    late = [p for p in echoes if p[0] > injected + 1.0]
    assert late == [], f"{len(echoes)} datagrams, {len(late)} of them after a second"
    drops = wait_until(
        lambda: logged(echo_a, "datagrams_dropped") + logged(echo_b, "datagrams_dropped"),
        5,
        "a datagrams_dropped warning from an echo server",
    )
    assert all(e["level"] == "warning" and "reason" in e and "dropped" in e for e in drops)
    for server in (greet_a, greet_b, echo_a, echo_b):
        assert_clean_log(server)
