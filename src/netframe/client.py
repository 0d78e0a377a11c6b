"""An async client for both transports, on asyncio Protocols.

The command line's ``client`` and the load generator use it. Framing matches the
server's: with ``line`` each message is sent with ``\\n`` and replies are read line by
line; with ``auto`` or ``raw`` messages go out bare, as the seeds' clients send them,
and each received chunk is one reply (a bare reply has no other boundary).

Every wait has a timeout, except in :meth:`TcpClient.next_reply` and
:meth:`UdpClient.next_datagram`, whose callers bound their waits; failures are
:class:`ClientError` with a one-line reason.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Awaitable
from typing import Any, cast

from netframe._errors import Error, name_not_found
from netframe.config import ConfigError, Framing
from netframe.framing import LineFramer, RawFramer

__all__ = ["ClientError", "TcpClient", "UdpClient", "tls_context"]

# Replies longer than this are refused by the client, as the server refuses lines.
_MAX_REPLY_BYTES = 16 * 1024 * 1024


class ClientError(Error, ConnectionError):
    """The server could not be reached, timed out, or closed early; the text says which.

    ``wrong_address`` is True when the host name does not resolve: a mistake in the
    address, which the command line reports with exit status 2 rather than 1.
    """

    wrong_address: bool = False


def _unreachable(message: str, exc: OSError) -> ClientError:
    error = ClientError(f"{message}: {exc.strerror or exc}")
    error.wrong_address = name_not_found(exc)
    return error


def tls_context(
    ca: str | None = None, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext:
    """A client's SSL context: TLS 1.2 at least, the server's certificate checked against
    the CAs in ``ca`` (the system's when ``None``) and against the name connected to;
    ``cert`` (and ``key``, when not in the same file) is the client's own certificate,
    for servers that ask for one.

    Raises:
        ConfigError: a file cannot be read or holds no certificate or key (one line).
    """
    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the CA file {ca}: {_reason(exc)}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the certificate {cert}: {_reason(exc)}") from None
    elif key is not None:
        raise ConfigError("a client key needs its certificate (--tls-cert)")
    return context


def _reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError) and isinstance(exc.reason, str):
        return exc.reason.lower().replace("_", " ")
    return exc.strerror or str(exc)


class _Receiver(asyncio.Protocol):
    """Collects framed replies and wakes whoever waits for the next one."""

    def __init__(self, framing: Framing) -> None:
        self.framer = (
            LineFramer(_MAX_REPLY_BYTES) if framing == "line" else RawFramer(_MAX_REPLY_BYTES)
        )
        self.transport: asyncio.Transport | None = None
        self.replies: collections.deque[bytes] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.closed = asyncio.get_running_loop().create_future()
        # Set while the transport's write buffer is above its high-water mark.
        self.writable: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        for payload, _terminator in self.framer.feed(data):
            self.replies.append(payload)
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake()
        self.resume_writing()  # nothing will be written now: release whoever waits

    def pause_writing(self) -> None:
        if self.writable is None:
            self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.writable is not None:
            if not self.writable.done():
                self.writable.set_result(None)
            self.writable = None

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class TcpClient:
    """One TCP (or Unix-domain stream) connection to a line or bare-message server.

    Use :meth:`connect` (or :meth:`connect_unix`); then :meth:`send`, :meth:`receive`,
    and :meth:`close` (or ``async with``).
    """

    def __init__(self, protocol: _Receiver, framing: Framing, timeout_s: float) -> None:
        self._protocol = protocol
        self._line = framing == "line"
        self.timeout_s = timeout_s

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        framing: Framing = "auto",
        timeout_s: float = 5.0,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> TcpClient:
        """Connect to ``host:port``; with ``tls`` (see :func:`tls_context`), speak TLS,
        checking the server's certificate against ``server_name`` (default ``host``).

        Raises:
            ClientError: refused, unreachable, the TLS handshake failed, or no answer
                within ``timeout_s``.
        """
        loop = asyncio.get_running_loop()
        options: dict[str, Any] = {}
        if tls is not None:
            options = {"ssl": tls, "server_hostname": server_name or host}
            options["ssl_handshake_timeout"] = timeout_s
        connecting = loop.create_connection(lambda: _Receiver(framing), host, port, **options)
        return await cls._open(connecting, f"{host}:{port}", framing, timeout_s)

    @classmethod
    async def connect_unix(
        cls,
        path: str,
        *,
        framing: Framing = "auto",
        timeout_s: float = 5.0,
        tls: ssl.SSLContext | None = None,
        server_name: str = "localhost",
    ) -> TcpClient:
        """Connect to the Unix-domain stream socket at ``path``; with ``tls``, speak TLS,
        checking the server's certificate against ``server_name``.

        Raises:
            ClientError: no such socket, refused, not allowed, the TLS handshake failed,
                or no answer within ``timeout_s``.
        """
        loop = asyncio.get_running_loop()
        options: dict[str, Any] = {}
        if tls is not None:
            options = {"ssl": tls, "server_hostname": server_name}
            options["ssl_handshake_timeout"] = timeout_s
        connecting = loop.create_unix_connection(lambda: _Receiver(framing), path, **options)
        return await cls._open(connecting, path, framing, timeout_s)

    @classmethod
    async def _open(
        cls,
        connecting: Awaitable[tuple[asyncio.BaseTransport, _Receiver]],
        where: str,
        framing: Framing,
        timeout_s: float,
    ) -> TcpClient:
        try:
            _, protocol = await asyncio.wait_for(connecting, timeout_s)
        except TimeoutError:
            raise ClientError(f"connecting to {where} timed out") from None
        except ssl.SSLCertVerificationError as exc:
            raise ClientError(
                f"TLS with {where} failed: the server's certificate is not trusted "
                f"({exc.verify_message})"
            ) from None
        except ssl.SSLError as exc:
            raise ClientError(f"TLS with {where} failed: {_reason(exc)}") from None
        except OSError as exc:
            raise _unreachable(f"cannot connect to {where}", exc) from None
        return cls(protocol, framing, timeout_s)

    @property
    def peer(self) -> tuple[Any, ...] | str:
        """The server's address: a socket address tuple, or a Unix socket's path."""
        assert self._protocol.transport is not None
        peer = self._protocol.transport.get_extra_info("peername")
        return peer if isinstance(peer, str) else tuple(peer)

    def send(self, message: str | bytes, encoding: str = "utf-8") -> None:
        """Send one message (with ``\\n`` added in line framing)."""
        data = message.encode(encoding) if isinstance(message, str) else message
        assert self._protocol.transport is not None
        self._protocol.transport.write(data + b"\n" if self._line else data)

    async def receive(self) -> bytes:
        """Return the next reply, without its line ending.

        Raises:
            ClientError: the server closed the connection first, or timed out.
        """
        protocol = self._protocol
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while not protocol.replies:
            if protocol.closed.done():
                raise ClientError("the server closed the connection")
            protocol.waiter = loop.create_future()
            try:
                await asyncio.wait_for(protocol.waiter, deadline - loop.time())
            except TimeoutError:
                raise ClientError(f"no reply within {self.timeout_s:g} s") from None
        return protocol.replies.popleft()

    async def wait_closed(self) -> None:
        """Wait for the server to close the connection.

        Raises:
            ClientError: it stayed open for ``timeout_s``.
        """
        try:
            await asyncio.wait_for(asyncio.shield(self._protocol.closed), self.timeout_s)
        except TimeoutError:
            raise ClientError(f"the server did not close within {self.timeout_s:g} s") from None

    def close(self) -> None:
        """Close the connection (pending writes are flushed first)."""
        if self._protocol.transport is not None:
            self._protocol.transport.close()

    # For sessions that print replies as they come rather than one per message sent,
    # such as the command line's interactive mode (-i).

    @property
    def closed(self) -> bool:
        """The connection is closed: by the server, or by :meth:`close`."""
        return self._protocol.closed.done()

    async def next_reply(self) -> bytes | None:
        """The next reply, or ``None`` once the connection closed and every reply was taken.

        It waits as long as it takes; the caller bounds the wait (cancelling loses no
        reply).
        """
        protocol = self._protocol
        while not protocol.replies:
            if protocol.closed.done():
                return None
            protocol.waiter = asyncio.get_running_loop().create_future()
            await protocol.waiter
        return protocol.replies.popleft()

    async def drain(self) -> None:
        """Wait until the unsent data is below the transport's high-water mark."""
        if (writable := self._protocol.writable) is not None:
            await asyncio.shield(writable)

    def write_eof(self) -> None:
        """Half-close: tell the server nothing more is coming, and keep reading."""
        transport = self._protocol.transport
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    async def __aenter__(self) -> TcpClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class _DatagramReceiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        # Replies, and errors the system reports (an ICMP "port unreachable" comes back
        # as ConnectionRefusedError): a waiting receive() learns of either at once.
        self.replies: asyncio.Queue[bytes | Exception] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.replies.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        self.replies.put_nowait(exc)


class UdpClient:
    """A connected UDP socket: :meth:`request` sends a datagram and waits for the answer."""

    def __init__(
        self, transport: asyncio.DatagramTransport, protocol: _DatagramReceiver, timeout_s: float
    ) -> None:
        self._transport = transport
        self._protocol = protocol
        self.timeout_s = timeout_s

    @classmethod
    async def connect(cls, host: str, port: int, *, timeout_s: float = 5.0) -> UdpClient:
        """Open a UDP socket aimed at ``host:port`` (no packet is sent yet).

        Raises:
            ClientError: the address cannot be resolved or used.
        """
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.create_datagram_endpoint(
                _DatagramReceiver, remote_addr=(host, port)
            )
        except OSError as exc:
            raise _unreachable(f"cannot reach {host}:{port}", exc) from None
        return cls(transport, protocol, timeout_s)

    def send(self, message: str | bytes, encoding: str = "utf-8") -> None:
        """Send one datagram."""
        self._transport.sendto(message.encode(encoding) if isinstance(message, str) else message)

    async def receive(self) -> bytes:
        """Return the next datagram received.

        Raises:
            ClientError: nothing arrived within ``timeout_s``, or, as soon as the system
                says so, nothing listens on the port ("Connection refused").
        """
        try:
            reply = await asyncio.wait_for(self._protocol.replies.get(), self.timeout_s)
        except TimeoutError:
            raise ClientError(f"no reply within {self.timeout_s:g} s") from None
        return _datagram_or_raise(reply)

    async def request(self, message: str | bytes, encoding: str = "utf-8") -> bytes:
        """Send one datagram and return the first datagram that comes back."""
        self.send(message, encoding)
        return await self.receive()

    def close(self) -> None:
        """Close the socket."""
        self._transport.close()

    async def next_datagram(self) -> bytes:
        """The next datagram received, however long it takes; the caller bounds the wait
        (as :meth:`TcpClient.next_reply`, for sessions that print replies as they come).

        Raises:
            ClientError: the system reported an error, such as "Connection refused".
        """
        return _datagram_or_raise(await self._protocol.replies.get())

    async def __aenter__(self) -> UdpClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


def _datagram_or_raise(reply: bytes | Exception) -> bytes:
    if isinstance(reply, Exception):
        reason = reply.strerror if isinstance(reply, OSError) else None
        raise ClientError(f"no reply: {reason or reply}")
    return reply
