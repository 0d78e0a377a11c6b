"""The HTTP side of ``--metrics``: ``GET /metrics``, one request per connection.

The exchange itself is pure (:func:`respond`: the bytes of a request in, the whole
response out, or "need more"); :class:`_MetricsProtocol` moves bytes between it and a
socket. A single server serves the page on its own event loop, between the callbacks of
its connections: rendering reads a few counters and takes about a millisecond, so a
scrape never holds the loop up for long. The supervisor of ``--workers`` has no event
loop, so it runs the same server in a thread of its own (:class:`MetricsThread`).

Whoever can reach the port can read the figures and open connections to it, so it
should listen on loopback or a private interface; within that, a client gets
:data:`REQUEST_TIMEOUT_S` to send its request and read the answer, a request head
longer than :data:`MAX_REQUEST_BYTES` is refused, and at most :data:`MAX_CLIENTS`
connections are served at once (the rest are closed at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Any, Final

from netframe.config import Address
from netframe.logs import get_logger
from netframe.metrics import Snapshot, collector_registry, render

__all__ = ["MetricsThread", "bind_metrics", "respond", "serve_metrics"]

#: The longest request head read (Prometheus sends a few hundred bytes).
MAX_REQUEST_BYTES: Final = 8192
#: How long one connection may take to send its request and read the page.
REQUEST_TIMEOUT_S: Final = 5.0
#: Connections served at once; Prometheus makes one per scrape.
MAX_CLIENTS: Final = 32

Render = Callable[[], tuple[bytes, str]]


def respond(request: bytes, render_page: Render) -> bytes | None:
    """The whole response to an HTTP request whose bytes so far are ``request``, or
    ``None`` while its head is incomplete.

    ``GET`` or ``HEAD /metrics`` (a query string is ignored) gets the page; any other
    path is 404, another method 405, a malformed request line 400, a head over
    :data:`MAX_REQUEST_BYTES` 431. Every response closes the connection.
    """
    end = request.find(b"\r\n\r\n")
    if end < 0:
        end = request.find(b"\n\n")
    if end < 0:
        if len(request) > MAX_REQUEST_BYTES:
            return _status(431, "Request Header Fields Too Large")
        return None
    parts = request.split(b"\n", 1)[0].rstrip(b"\r").split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return _status(400, "Bad Request")
    method, target = parts[0], parts[1]
    if target.partition(b"?")[0] != b"/metrics":
        return _status(404, "Not Found")
    if method not in (b"GET", b"HEAD"):
        return _status(405, "Method Not Allowed", b"Allow: GET, HEAD\r\n")
    try:
        body, content_type = render_page()
    except Exception:  # a bug, not the client's doing: say so once, and answer 500
        get_logger().exception("metrics_failed")
        return _status(500, "Internal Server Error")
    head = (
        f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    return head if method == b"HEAD" else head + body


def _status(code: int, reason: str, extra: bytes = b"") -> bytes:
    body = f"{code} {reason}\n".encode("ascii")
    head = (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n"
    ).encode("ascii")
    return head + extra + b"\r\n" + body


class _Page:
    """What the connections of one metrics server share: the registry, the count."""

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self._registry = collector_registry(source)
        self.clients = 0

    def render(self) -> tuple[bytes, str]:
        return render(self._registry)


class _MetricsProtocol(asyncio.Protocol):
    """One connection to the metrics port: read a request, write the answer, close."""

    def __init__(self, page: _Page) -> None:
        self._page = page
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._counted = False
        self._answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        if self._page.clients >= MAX_CLIENTS:
            transport.close()
            return
        self._page.clients += 1
        self._counted = True
        # The whole exchange, reading the answer included: a client that never reads
        # cannot hold the connection (and its buffer) open.
        self._timer = asyncio.get_running_loop().call_later(REQUEST_TIMEOUT_S, self._abort)

    def data_received(self, data: bytes) -> None:
        if self._answered or self._transport is None:
            return
        self._buffer += data
        response = respond(bytes(self._buffer), self._page.render)
        if response is not None:
            self._answered = True
            self._buffer.clear()
            self._transport.write(response)
            self._transport.close()

    def eof_received(self) -> bool:
        return False  # a request cut short gets nothing; the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self._page.clients -= 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _abort(self) -> None:
        self._timer = None
        if self._transport is not None:
            self._transport.abort()


def bind_metrics(address: Address) -> socket.socket:
    """A listening socket for the metrics page at ``address`` (port 0: a free port).

    Raises:
        OSError: the address cannot be resolved or bound.
    """
    infos = socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    if not infos:
        raise OSError(f"{address.host} resolves to no address")
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_metrics(sock: socket.socket, source: Callable[[], Snapshot]) -> asyncio.Server:
    """Serve ``/metrics`` on ``sock`` from the running loop; ``source`` is read at each
    scrape."""
    page = _Page(source)
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _MetricsProtocol(page), sock=sock)


class MetricsThread:
    """The metrics page served from a thread with an asyncio loop of its own (the
    supervisor of ``--workers``, which has none). ``source`` must be safe to call from
    that thread."""

    def __init__(self, sock: socket.socket, source: Callable[[], Snapshot]) -> None:
        self._sock = sock
        self._source = source
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="netframe-metrics", daemon=True)

    def start(self) -> None:
        """Start serving; returns once the page is served.

        Raises:
            OSError, ImportError: what serving failed with.
        """
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Stop serving and close the socket (waits a moment for the thread)."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                loop.call_soon_threadsafe(loop.stop)
        if self._thread.is_alive():
            self._thread.join(2.0)
        self._sock.close()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        server: Any = None
        try:
            try:
                server = loop.run_until_complete(serve_metrics(self._sock, self._source))
            except BaseException as exc:
                self._error = exc
                return
            finally:
                self._loop = loop
                self._ready.set()
            loop.run_forever()
        finally:
            if server is not None:
                server.close()
            loop.close()
