"""TLS: servers on loopback with short-lived certificates, clients of the standard
library's ``ssl``, every library test on asyncio and on uvloop, the command line as real
subprocesses.

What is checked is what a client, a handler and an operator can see: bytes and alerts
on the wire, ``conn.tls``, the certificate a new client is shown after a reload, and the
log lines. Blocking clients run in a thread (``asyncio.to_thread``) so that the server's
loop keeps turning.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import ssl
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import trustme
from conftest import (
    REPLY_TIMEOUT_S,
    CliServer,
    assert_one_line_error,
    recv_exactly,
    recv_until_closed,
    run_netframe,
)
from cryptography.hazmat.primitives import serialization
from structlog.testing import capture_logs

from netframe import Connection, Handler, Server, TlsInfo
from netframe.proxy import encode_v2
from netframe.testing import MemoryConnection

pytestmark = pytest.mark.timeout(60)
on_both_loops = pytest.mark.usefixtures("loop_checked")

WELCOME = b"Welcome!"


@dataclasses.dataclass
class Pki:
    """Files of a throwaway public-key infrastructure: one CA for servers, one for
    clients, and a certificate of each."""

    folder: Path
    ca: trustme.CA
    ca_file: str
    server: trustme.LeafCert
    server_pem: str  # key and certificate chain in one file
    cert_file: str
    key_file: str
    client_ca_file: str
    client_pem: str

    def issue(self, name: str) -> trustme.LeafCert:
        """A new server certificate for loopback (another serial, another key)."""
        return self.ca.issue_cert("127.0.0.1", "::1", "localhost", common_name=name)

    def client_context(self, *, certificate: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        if certificate:
            context.load_cert_chain(self.client_pem)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "::1", "localhost", common_name="first")
    client_ca = trustme.CA()
    client = client_ca.issue_cert("client.example.org", common_name="alice")
    files = {
        "ca_file": ca.cert_pem,
        "server_pem": server.private_key_and_cert_chain_pem,
        "cert_file": server.cert_chain_pems[0],
        "key_file": server.private_key_pem,
        "client_ca_file": client_ca.cert_pem,
        "client_pem": client.private_key_and_cert_chain_pem,
    }
    paths = {}
    for name, blob in files.items():
        path = folder / f"{name}.pem"
        blob.write_to_path(str(path))
        paths[name] = str(path)
    return Pki(folder, ca, server=server, **paths)


def der(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def install(cert: trustme.LeafCert, pem: str) -> None:
    """Replace the server's key-and-certificate file, as an operator's renewal does."""
    cert.private_key_and_cert_chain_pem.write_to_path(pem)


def refused(logs: list[dict[str, Any]], reason: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "connections_refused" and e["reason"] == reason]


@contextlib.contextmanager
def tls_client(
    address: tuple[str, int] | str,
    context: ssl.SSLContext,
    server_hostname: str = "localhost",
) -> Iterator[ssl.SSLSocket]:
    """A blocking TLS connection (TCP, or a Unix socket's path), handshake done."""
    if isinstance(address, str):
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.settimeout(REPLY_TIMEOUT_S)
        raw.connect(address)
    else:
        raw = socket.create_connection(address, timeout=REPLY_TIMEOUT_S)
    with raw, context.wrap_socket(raw, server_hostname=server_hostname) as sock:
        yield sock


@contextlib.asynccontextmanager
async def connected(
    address: tuple[str, int] | str, context: ssl.SSLContext
) -> AsyncIterator[ssl.SSLSocket]:
    """:func:`tls_client` from a test on the server's loop: the blocking handshake runs in
    a thread, so the server can answer it."""
    with contextlib.ExitStack() as stack:
        yield await asyncio.to_thread(stack.enter_context, tls_client(address, context))


def greeting_session(address: tuple[str, int] | str, context: ssl.SSLContext) -> bytes:
    """The seeds' exchange in bare words: greeting, one name, exit, the close."""
    with tls_client(address, context) as sock:
        got = recv_exactly(sock, len(WELCOME))
        sock.sendall(b"Bob")
        got += recv_exactly(sock, len(b"Hello, Bob!"))
        sock.sendall(b"exit")
        got += recv_until_closed(sock)
    return got


class MemoryTls:
    """A TLS client on memory BIOs over a blocking socket: it decides what goes out in
    which write (a PROXY header and the ClientHello together; messages and then
    ``close_notify``), and can read after sending ``close_notify``."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    def handshake(self, before: bytes = b"") -> None:
        """Handshake; ``before`` goes out in the same write as the ClientHello."""
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self.sock.sendall(before + self.outgoing.read())
                before = b""
                self._fill()
            else:
                self._flush()
                return

    def send_then_close_notify(self, data: bytes) -> None:
        """``data`` and ``close_notify`` in one write."""
        self.tls.write(data)
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.unwrap()
        self._flush()

    def read_to_end(self) -> tuple[bytes, str]:
        """Everything until the server's ``close_notify`` (or the TCP end), and which."""
        received = b""
        for _ in range(1000):
            try:
                chunk = self.tls.read(1 << 16)
            except ssl.SSLWantReadError:
                if not self._fill():
                    return received, "eof"
                continue
            except ssl.SSLZeroReturnError:
                return received, "close_notify"
            if not chunk:
                return received, "close_notify"
            received += chunk
        raise AssertionError("no end within 1000 reads")

    def _flush(self) -> None:
        if data := self.outgoing.read():
            self.sock.sendall(data)

    def _fill(self) -> bytes:
        data = self.sock.recv(1 << 16)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()
        return data


class Reporter(Handler):
    """Sends what TLS negotiated as one JSON line, then answers like the greeting."""

    def on_connect(self, conn: Connection) -> None:
        tls = conn.tls
        assert tls is not None
        report = dataclasses.asdict(tls)
        report["peer"] = str(conn.peer)
        conn.send(json.dumps(report))

    def on_message(self, conn: Connection, message: str) -> None:
        conn.send(f"Hello, {message}!")


class SlowSometimes(Handler):
    """Answers ``slow`` after an await, anything else at once."""

    def on_message(self, conn: Connection, message: str) -> Any:
        if message != "slow":
            conn.send(f"Hello, {message}!")
            return None

        async def later() -> None:
            await asyncio.sleep(0.2)
            conn.send("late")

        return later()


def tls_server(pki: Pki, **settings: Any) -> Server:
    options: dict[str, Any] = {"tcp": ["127.0.0.1:0"], "udp": [], "tls_cert": pki.server_pem}
    return Server(**{**options, **settings})


# == the library, on both loops ==============================================================


@pytest.mark.asyncio
@on_both_loops
async def test_the_greeting_exchange_over_tls(pki: Pki) -> None:
    async with tls_server(pki) as server:
        got = await asyncio.to_thread(greeting_session, server.address(), pki.client_context())
    assert got == b"Welcome!Hello, Bob!"


@pytest.mark.asyncio
@on_both_loops
async def test_tls_over_ipv6(pki: Pki) -> None:
    async with tls_server(pki, tcp=["[::1]:0"]) as server:
        got = await asyncio.to_thread(greeting_session, server.address(), pki.client_context())
    assert got == b"Welcome!Hello, Bob!"


@pytest.mark.asyncio
@on_both_loops
async def test_handshakes_in_progress_count_towards_max_connections(pki: Pki) -> None:
    """One client holds the only place with a handshake it never finishes; the next is
    closed at once and counted, and the place is free again after the timeout."""
    server = tls_server(pki, max_connections=1, tls_handshake_timeout_s=0.5)
    with capture_logs() as logs:
        async with server:
            with socket.create_connection(server.address(), timeout=REPLY_TIMEOUT_S) as silent:
                await asyncio.sleep(0.2)  # accepted, its handshake under way
                with socket.create_connection(server.address(), timeout=REPLY_TIMEOUT_S) as late:
                    assert await asyncio.to_thread(recv_until_closed, late) == b""
                assert await asyncio.to_thread(recv_until_closed, silent) == b""
            got = await asyncio.to_thread(greeting_session, server.address(), pki.client_context())
    assert got == b"Welcome!Hello, Bob!"
    assert [e["refused"] for e in refused(logs, "max_connections")] == [1]
    assert len(refused(logs, "tls_handshake_timeout")) == 1


def test_a_memory_connection_can_play_a_tls_connection() -> None:
    tls = TlsInfo(version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256", server_name="app.example")
    conn = MemoryConnection(Reporter, tls=tls, framing="line")
    conn.connect()
    report = json.loads(conn.sent[0])
    assert report["version"] == "TLSv1.3"
    assert report["server_name"] == "app.example"
    assert report["peer_certificate"] is None


@pytest.mark.asyncio
@on_both_loops
async def test_a_unix_socket_serves_tls_too(pki: Pki, tmp_path: Path) -> None:
    path = str(tmp_path / "tls.sock")
    async with tls_server(pki, tcp=None, unix=[path]) as server:
        got = await asyncio.to_thread(greeting_session, path, pki.client_context())
        assert server.address("unix")[0] == path
    assert got == b"Welcome!Hello, Bob!"


@pytest.mark.asyncio
@on_both_loops
async def test_the_handler_sees_what_tls_negotiated(pki: Pki) -> None:
    server = tls_server(pki, handler=Reporter, framing="line", tls_client_ca=pki.client_ca_file)

    def session() -> tuple[dict[str, Any], bytes, str]:
        with tls_client(server.address(), pki.client_context(certificate=True)) as sock:
            report = json.loads(sock.recv(1 << 16))
            sock.sendall(b"Bob\n")
            return report, recv_exactly(sock, len(b"Hello, Bob!\n")), sock.version() or ""

    async with server:
        report, reply, version = await asyncio.to_thread(session)
    assert reply == b"Hello, Bob!\n"
    assert report["version"] == version
    assert version in ("TLSv1.2", "TLSv1.3")
    assert report["cipher"]
    assert report["server_name"] == "localhost"
    assert report["peer"].startswith("127.0.0.1:")
    subject = dict(pair[0] for pair in report["peer_certificate"]["subject"])
    assert subject["commonName"] == "alice"


@pytest.mark.asyncio
@on_both_loops
async def test_a_client_without_the_required_certificate_is_refused(pki: Pki) -> None:
    server = tls_server(pki, tls_client_ca=pki.client_ca_file)

    def without_certificate() -> bytes | str:
        try:
            with tls_client(server.address(), pki.client_context()) as sock:
                # TLS 1.3: the client's handshake ends before the server has checked it;
                # the refusal comes as an alert on the first read.
                return sock.recv(100)
        except (ssl.SSLError, ConnectionError) as exc:
            return type(exc).__name__

    with_certificate = pki.client_context(certificate=True)
    with capture_logs() as logs:
        async with server, connected(server.address(), with_certificate) as good:
            assert await asyncio.to_thread(recv_exactly, good, len(WELCOME)) == WELCOME
            outcome = await asyncio.to_thread(without_certificate)
            good.sendall(b"Ann")  # the other client is still served
            reply = await asyncio.to_thread(recv_exactly, good, len(b"Hello, Ann!"))
    assert outcome != WELCOME
    assert reply == b"Hello, Ann!"
    [line] = refused(logs, "tls_handshake_failed")
    assert "certificate" in line["error"], line
    assert line["peer"].startswith("127.0.0.1:")


@pytest.mark.asyncio
@on_both_loops
async def test_a_silent_client_is_closed_at_the_handshake_timeout(pki: Pki) -> None:
    def silent() -> bytes:
        with socket.create_connection(server.address(), timeout=REPLY_TIMEOUT_S) as sock:
            return recv_until_closed(sock)

    server = tls_server(pki, tls_handshake_timeout_s=0.5)
    with capture_logs() as logs:
        async with server:
            got = await asyncio.to_thread(silent)
            # A proper client right after is served as usual.
            session = await asyncio.to_thread(
                greeting_session, server.address(), pki.client_context()
            )
    assert got == b""
    assert session == b"Welcome!Hello, Bob!"
    [line] = refused(logs, "tls_handshake_timeout")
    assert line["refused"] == 1
    assert line["error"] == "no TLS handshake within 0.5 s"
    # No handler was made for the silent client: only the proper one was opened.
    assert [e["event"] for e in logs].count("connection_opened") == 1


@pytest.mark.asyncio
@on_both_loops
@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.0\r\n\r\n", b"\x16\x03\x01\x00\x05hello", b"Bob, Ann\n", b"\x00" * 600],
)
async def test_garbage_instead_of_a_client_hello_disturbs_nobody(pki: Pki, garbage: bytes) -> None:
    def send_garbage() -> bytes:
        with socket.create_connection(server.address(), timeout=REPLY_TIMEOUT_S) as sock:
            sock.sendall(garbage)
            with contextlib.suppress(ConnectionResetError):
                return recv_until_closed(sock)
        return b"reset"

    server = tls_server(pki)
    with capture_logs() as logs:
        async with server, connected(server.address(), pki.client_context()) as good:
            assert await asyncio.to_thread(recv_exactly, good, len(WELCOME)) == WELCOME
            got = await asyncio.to_thread(send_garbage)
            good.sendall(b"Ann")
            reply = await asyncio.to_thread(recv_exactly, good, len(b"Hello, Ann!"))
    assert reply == b"Hello, Ann!"
    assert WELCOME not in got
    [line] = refused(logs, "tls_handshake_failed")
    assert line["error"]
    assert [e["event"] for e in logs].count("connection_opened") == 1  # the good client only


@pytest.mark.asyncio
@on_both_loops
async def test_a_tls_1_1_client_is_refused(pki: Pki) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.ca_file)
    try:
        with warnings.catch_warnings():  # deprecated, which is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError) as exc:
        pytest.skip(f"this OpenSSL cannot make a TLS 1.1 client: {exc}")

    def old_client() -> str:
        try:
            with tls_client(server.address(), context):
                return "handshake done"
        except ssl.SSLError as exc:
            return str(exc.reason)

    server = tls_server(pki)
    with capture_logs() as logs:
        async with server:
            outcome = await asyncio.to_thread(old_client)
    if outcome == "NO_PROTOCOLS_AVAILABLE":
        pytest.skip("the local OpenSSL refuses TLS 1.1 before a ClientHello leaves")
    assert outcome != "handshake done"
    [line] = refused(logs, "tls_handshake_failed")
    assert "protocol" in line["error"], line


@pytest.mark.asyncio
@on_both_loops
async def test_a_reload_serves_the_new_certificate_without_dropping_anyone(
    pki: Pki, tmp_path: Path
) -> None:
    pem = str(tmp_path / "server.pem")
    install(pki.server, pem)
    renewed = pki.issue("renewed")
    server = tls_server(pki, tls_cert=pem)
    with capture_logs() as logs:
        async with server, connected(server.address(), pki.client_context()) as first:
            assert first.getpeercert(binary_form=True) == der(pki.server)
            assert await asyncio.to_thread(recv_exactly, first, len(WELCOME)) == WELCOME
            install(renewed, pem)
            assert server.reload_tls()
            async with connected(server.address(), pki.client_context()) as second:
                assert second.getpeercert(binary_form=True) == der(renewed)
            # A failed reload keeps what was loaded and serves on.
            await asyncio.to_thread(Path(pem).write_text, "not a certificate\n")
            assert not server.reload_tls()
            async with connected(server.address(), pki.client_context()) as third:
                assert third.getpeercert(binary_form=True) == der(renewed)
            first.sendall(b"Ann")  # the first connection never noticed
            reply = await asyncio.to_thread(recv_exactly, first, len(b"Hello, Ann!"))
    assert reply == b"Hello, Ann!"
    assert [e["event"] for e in logs if e["event"].startswith("tls_reload")] == [
        "tls_reloaded",
        "tls_reload_failed",
    ]
    [failed] = [e for e in logs if e["event"] == "tls_reload_failed"]
    assert "not a PEM certificate" in failed["error"]


@pytest.mark.asyncio
@on_both_loops
@pytest.mark.parametrize("together", [True, False], ids=["one-write", "two-writes"])
async def test_a_proxy_header_comes_first_then_tls(pki: Pki, together: bool) -> None:
    server = tls_server(
        pki, handler=Reporter, framing="line", proxy_protocol="v2", proxy_allow=["127.0.0.1"]
    )
    header = encode_v2(("203.0.113.7", 4242), ("198.51.100.1", 443))

    def balancer() -> tuple[dict[str, Any], bytes]:
        with socket.create_connection(server.address(), timeout=REPLY_TIMEOUT_S) as sock:
            client = MemoryTls(sock, pki.client_context())
            if together:  # the header and the ClientHello in one segment
                client.handshake(before=header)
            else:
                sock.sendall(header)
                client.handshake()
            client.send_then_close_notify(b"Bob\n")
            received, _ = client.read_to_end()
        first, rest = received.split(b"\n", 1)
        return json.loads(first), rest

    async with server:
        report, rest = await asyncio.to_thread(balancer)
    assert report["peer"] == "203.0.113.7:4242"
    assert report["version"] in ("TLSv1.2", "TLSv1.3")
    assert rest == b"Hello, Bob!\n"


@pytest.mark.asyncio
@on_both_loops
async def test_close_notify_after_the_last_messages(pki: Pki) -> None:
    """A client sends its last messages and close_notify in one write. The replies a
    plain handler makes at once are all delivered, then the server's close_notify. A
    reply made after an await is not: the TLS transport drops writes once it has seen
    close_notify (the documented difference from plain TCP's half-close)."""
    server = tls_server(pki, handler=SlowSometimes, framing="line")

    def last_words(data: bytes) -> tuple[bytes, str]:
        with socket.create_connection(server.address(), timeout=REPLY_TIMEOUT_S) as sock:
            client = MemoryTls(sock, pki.client_context())
            client.handshake()
            client.send_then_close_notify(data)
            return client.read_to_end()

    with capture_logs() as logs:
        async with server:
            plain = await asyncio.to_thread(last_words, b"Ann\nBob\n")
            late = await asyncio.to_thread(last_words, b"slow\nBob\n")
            await asyncio.sleep(0.3)  # the slow reply's await has ended by now
    assert plain == (b"Hello, Ann!\nHello, Bob!\n", "close_notify")
    assert late == (b"", "close_notify")
    closed = [e for e in logs if e["event"] == "connection_closed"]
    assert [e["reason"] for e in closed] == ["peer_closed", "peer_closed"]


@pytest.mark.asyncio
@on_both_loops
async def test_a_stopping_server_closes_handshakes_in_progress(pki: Pki) -> None:
    server = tls_server(pki)
    async with server:
        silent = socket.create_connection(server.address(), timeout=REPLY_TIMEOUT_S)
        with silent:
            await asyncio.sleep(0.1)  # accepted, waiting for a ClientHello
            await asyncio.wait_for(server.close(), REPLY_TIMEOUT_S)
            assert await asyncio.to_thread(recv_until_closed, silent) == b""


# == the command line ==========================================================================


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "/nonexistent/cert.pem"], "cannot read /nonexistent/cert.pem (--tls-cert)"),
        (["--tls-cert", "{cert_file}"], "not a PEM certificate and key"),
        (["--tls-cert", "{cert_file}", "--tls-key", "{other_key}"], "does not belong"),
        (["--tls-cert", "{cert_file}", "--tls-key", "{encrypted_key}"], "the key is encrypted"),
        (["--tls-cert", "{garbage}"], "not a PEM certificate and key"),
        (["--tls-key", "{key_file}"], "tls_key (--tls-key) needs tls_cert (--tls-cert)"),
        (["--tls-cert", "{server_pem}", "--tls-client-ca", "{garbage}"], "--tls-client-ca"),
        (["--tls-cert", "{server_pem}", "--tls-handshake-timeout", "0"], "more than 0"),
        (["--tls-cert", "{server_pem}", "--loop", "rloop"], "rloop"),
    ],
    ids=[
        "missing",
        "no-key",
        "wrong-key",
        "encrypted-key",
        "garbage",
        "key-alone",
        "bad-client-ca",
        "zero-timeout",
        "rloop",
    ],
)
def test_tls_settings_that_cannot_work_are_one_line_and_status_2(
    pki: Pki, flags: list[str], message: str
) -> None:
    other = pki.issue("other")
    files = {
        "cert_file": pki.cert_file,
        "key_file": pki.key_file,
        "server_pem": pki.server_pem,
        "other_key": str(pki.folder / "other-key.pem"),
        "encrypted_key": str(pki.folder / "encrypted-key.pem"),
        "garbage": str(pki.folder / "garbage.pem"),
    }
    other.private_key_pem.write_to_path(files["other_key"])
    key = serialization.load_pem_private_key(pki.server.private_key_pem.bytes(), None)
    Path(files["encrypted_key"]).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    Path(files["garbage"]).write_text("-----BEGIN NONSENSE-----\n")
    args = [flag.format(**files) for flag in flags]
    done = run_netframe("serve", "--tcp", "127.0.0.1:0", *args)
    assert_one_line_error(done, 2, message)


@pytest.fixture
def tls_cli(pki: Pki, loop_name: str) -> Iterator[Callable[..., CliServer]]:
    servers: list[CliServer] = []

    def start(*args: str, cert: str | None = None) -> CliServer:
        server = CliServer(
            ["--loop", loop_name, "--tcp", "127.0.0.1:0", "--tls-cert", cert or pki.server_pem,
             *args],
            new_session=True,  # a process group of its own, to signal whole
        )  # fmt: skip
        servers.append(server)
        server.wait_for("serving" if "--workers" not in args else "workers_ready")
        return server

    yield start
    for server in servers:
        server.kill()


def tcp_port(server: CliServer) -> int:
    return next(
        e["port"] for e in server.events if e["event"] == "listening" and e["transport"] == "tcp"
    )


def test_sighup_reloads_the_certificate_without_dropping_a_connection(
    pki: Pki, tls_cli: Callable[..., CliServer], tmp_path: Path
) -> None:
    pem = str(tmp_path / "server.pem")
    install(pki.server, pem)
    server = tls_cli(cert=pem)
    address = ("127.0.0.1", tcp_port(server))
    listening = [e for e in server.events if e["event"] == "listening"]
    assert listening[0]["tls"] is True
    renewed = pki.issue("renewed")
    with tls_client(address, pki.client_context()) as first:
        assert recv_exactly(first, len(WELCOME)) == WELCOME
        install(renewed, pem)
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for("tls_reloaded")
        with tls_client(address, pki.client_context()) as second:
            assert second.getpeercert(binary_form=True) == der(renewed)
        first.sendall(b"Ann")
        assert recv_exactly(first, len(b"Hello, Ann!")) == b"Hello, Ann!"
        assert first.getpeercert(binary_form=True) == der(pki.server)
    # A reload that fails keeps the server serving the certificate it has.
    Path(pem).write_text("")
    server.proc.send_signal(signal.SIGHUP)
    [failed] = server.wait_for("tls_reload_failed")
    assert "--tls-cert" in failed["error"]
    assert greeting_session(address, pki.client_context()) == b"Welcome!Hello, Bob!"
    assert [e["signal"] for e in server.events if e["event"] == "reload_requested"] == [
        "SIGHUP",
        "SIGHUP",
    ]
    assert server.stop() == 0


@pytest.mark.slow
def test_sighup_reaches_every_worker_once(
    pki: Pki, tls_cli: Callable[..., CliServer], tmp_path: Path
) -> None:
    pem = str(tmp_path / "server.pem")
    install(pki.server, pem)
    server = tls_cli("--workers", "2", cert=pem)
    address = ("127.0.0.1", tcp_port(server))
    supervisor = psutil.Process(server.proc.pid)
    helpers = supervisor.children()  # two workers and multiprocessing's resource tracker
    renewed = pki.issue("renewed")
    install(renewed, pem)
    server.proc.send_signal(signal.SIGHUP)  # to the supervisor, as systemctl reload does
    reloaded = server.wait_for("tls_reloaded", 2)
    assert sorted(e["worker"] for e in reloaded) == ["1", "2"]
    for _ in range(8):  # whichever worker the kernel picks
        with tls_client(address, pki.client_context()) as client:
            assert client.getpeercert(binary_form=True) == der(renewed)
    # To the whole group (a terminal's hangup, kill -HUP -PGID): each worker reloads once,
    # through the supervisor, and no process of the group ends.
    os.killpg(server.proc.pid, signal.SIGHUP)
    server.wait_for("tls_reloaded", 4)
    time.sleep(0.5)  # a second reload per worker would come within this
    assert len([e for e in server.events if e["event"] == "tls_reloaded"]) == 4
    assert all(helper.status() != psutil.STATUS_ZOMBIE for helper in helpers), helpers
    assert greeting_session(address, pki.client_context()) == b"Welcome!Hello, Bob!"
    assert server.stop() == 0


def test_handshake_failures_are_counted_in_the_json_log(
    pki: Pki, tls_cli: Callable[..., CliServer]
) -> None:
    server = tls_cli("--tls-handshake-timeout", "0.3")
    address = ("127.0.0.1", tcp_port(server))
    with socket.create_connection(address, timeout=REPLY_TIMEOUT_S) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        recv_until_closed(sock)
    [line] = server.wait_for("connections_refused")
    assert (line["reason"], line["refused"], line["transport"]) == (
        "tls_handshake_failed",
        1,
        "tcp",
    )
    assert line["error"] == "http request"
    assert server.stop() == 0
    assert not [e for e in server.events if e["event"] == "connection_opened"]


def test_the_client_and_the_load_generator_speak_tls(
    pki: Pki, tls_cli: Callable[..., CliServer], tmp_path: Path
) -> None:
    server = tls_cli()
    target = f"127.0.0.1:{tcp_port(server)}"
    done = run_netframe("client", target, "Ann", "--tls", "--tls-ca", pki.ca_file)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Welcome!\nHello, Ann!\n"
    untrusted = run_netframe("client", target, "--tls", "--timeout", "5")
    assert_one_line_error(untrusted, 1, "not trusted")
    for scenario in ("greeting", "sessions"):  # open connections; a handshake per session
        report = tmp_path / f"{scenario}.json"
        bench = run_netframe(
            "bench", "--target", target, "--tls", "--tls-ca", pki.ca_file, "--scenario",
            scenario, "--conns", "2", "--workers", "1", "--duration", "0.5", "--warmup", "0",
            "--no-progress", "--json", str(report), timeout_s=120,
        )  # fmt: skip
        assert bench.returncode == 0, bench.stdout + bench.stderr
        figures = json.loads(report.read_text())
        assert figures["ops"] > 0, scenario
        assert figures["errors"] == 0, figures["first_error"]


def test_client_tls_flags_need_tls() -> None:
    done = run_netframe("client", "127.0.0.1:9", "--tls-ca", "/x.pem")
    assert_one_line_error(done, 2, "argument --tls-ca: needs --tls")
    done = run_netframe("client", "127.0.0.1:9", "--tls", "--tls-ca", "/nonexistent.pem")
    assert_one_line_error(done, 2, "cannot load the CA file /nonexistent.pem")
    bench = run_netframe("bench", "--target", "127.0.0.1:9", "--tls", "--scenario", "udp")
    assert_one_line_error(bench, 2, "--tls applies to TCP and Unix scenarios")
