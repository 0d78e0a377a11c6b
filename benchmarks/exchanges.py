"""Checking a server's bytes before it is measured: one short exchange per protocol.

compare.py runs :func:`check` against every server it starts, before loading it, and
tests/test_peers.py against every server of the suite: a server whose bytes differ from
the exchange's, byte for byte, is not measured. Each exchange is what the load generator
speaks in the scenarios that use it, plus what TCP may do to it (two lines in one
segment, one line in two); the load generator itself checks every reply again.

    greeting       Welcome!\\n; c0\\n -> Hello, c0!\\n; c1\\nc2\\n in one write -> both
                   replies; Mich + ael\\n in two writes -> Hello, Michael!\\n; exit\\n closes
    bare-greeting  Welcome! (no newline); c0 -> Hello, c0!; Michael -> Hello, Michael!;
                   exit closes
    echo           1 KiB and 64 KiB of varied bytes come back unchanged
    udp            u0-1 -> Hello, u0-1!; a 1,024-byte name -> its greeting
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

__all__ = ["EXCHANGES", "Mismatch", "check"]

#: How long one reply may take: generous, for a busy 2-core machine; a right server
#: answers in well under a millisecond.
REPLY_TIMEOUT_S = 3.0
#: The pause between the two halves of a split line, so they leave as two segments.
SPLIT_PAUSE_S = 0.05


class Mismatch(Exception):
    """The server's bytes differ from the exchange's; the message says where."""


def _shown(data: bytes) -> str:
    return repr(data) if len(data) <= 80 else f"{data[:60]!r}... ({len(data):,} bytes)"


class _Stream:
    """A client connection that compares what it reads with what it expects."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pending = b""  # read but not yet expected
        self.after = "on connecting"  # where in the exchange, for the messages

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.after = f"after {_shown(data)}"

    def expect(self, wanted: bytes) -> None:
        """Read until ``len(wanted)`` bytes are in, or they already differ; they must be
        ``wanted``."""
        received = self.pending
        then = ""
        try:
            while len(received) < len(wanted) and wanted.startswith(received):
                chunk = self.sock.recv(max(65536, len(wanted)))
                if not chunk:
                    then = ", then closed the connection"
                    break
                received += chunk
        except TimeoutError:
            then = f", then nothing for {self.timeout_s:g} s"
        if received[: len(wanted)] != wanted:
            raise Mismatch(
                f"{self.after}: expected {_shown(wanted)}, "
                f"got {_shown(received[: len(wanted) + 40])}{then}"
            )
        self.pending = received[len(wanted) :]

    def expect_close(self) -> None:
        """The server must close the connection, sending nothing more first."""
        received = self.pending
        if not received:
            try:
                received = self.sock.recv(65536)
            except TimeoutError:
                raise Mismatch(
                    f"{self.after}: expected the connection closed, "
                    f"still open after {self.timeout_s:g} s"
                ) from None
            except ConnectionResetError:
                return  # closed with a reset: closed all the same
        if received:
            raise Mismatch(f"{self.after}: expected the connection closed, got {_shown(received)}")

    def close(self) -> None:
        self.sock.close()


def _greeting(host: str, port: int, timeout_s: float) -> None:
    conn = _Stream(host, port, timeout_s)
    try:
        conn.expect(b"Welcome!\n")
        conn.send(b"c0\n")
        conn.expect(b"Hello, c0!\n")
        conn.send(b"c1\nc2\n")
        conn.expect(b"Hello, c1!\nHello, c2!\n")
        conn.send(b"Mich")
        time.sleep(SPLIT_PAUSE_S)
        conn.send(b"ael\n")
        conn.expect(b"Hello, Michael!\n")
        conn.send(b"exit\n")
        conn.expect_close()
    finally:
        conn.close()


def _bare_greeting(host: str, port: int, timeout_s: float) -> None:
    conn = _Stream(host, port, timeout_s)
    try:
        conn.expect(b"Welcome!")
        for name in (b"c0", b"Michael"):
            conn.send(name)
            conn.expect(b"Hello, " + name + b"!")
        conn.send(b"exit")
        conn.expect_close()
    finally:
        conn.close()


def _echo(host: str, port: int, timeout_s: float) -> None:
    conn = _Stream(host, port, timeout_s)
    try:
        for size in (1024, 65536):
            data = bytes(i % 251 for i in range(size))
            conn.send(data)
            conn.expect(data)
    finally:
        conn.close()


def _udp(host: str, port: int, timeout_s: float) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout_s)
        for name in (b"u0-1", b"u0-2".ljust(1024, b"-")):
            sock.sendto(name, (host, port))
            wanted = b"Hello, " + name + b"!"
            try:
                reply, source = sock.recvfrom(65536)
            except TimeoutError:
                raise Mismatch(f"UDP {name[:20]!r}: no reply within {timeout_s:g} s") from None
            if reply != wanted:
                raise Mismatch(f"UDP {name[:20]!r}: expected {wanted[:40]!r}, got {reply[:40]!r}")
            if source[1] != port:
                raise Mismatch(f"UDP {name[:20]!r}: the reply came from port {source[1]}")


#: The exchanges by protocol: the handler the server runs, or ``udp``.
EXCHANGES: dict[str, Callable[[str, int, float], None]] = {
    "greeting": _greeting,
    "bare-greeting": _bare_greeting,
    "echo": _echo,
    "udp": _udp,
}


def check(exchange: str, host: str, port: int, timeout_s: float = REPLY_TIMEOUT_S) -> str | None:
    """Run ``exchange`` (a key of :data:`EXCHANGES`) against ``host:port``, waiting up to
    ``timeout_s`` for each reply.

    Returns None when every byte was as expected, else one line saying what differed
    (or that the connection failed).
    """
    try:
        EXCHANGES[exchange](host, port, timeout_s)
    except Mismatch as exc:
        return f"{exchange}: {exc}"
    except OSError as exc:
        return f"{exchange}: {type(exc).__name__}: {exc}"
    return None
