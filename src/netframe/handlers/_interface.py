"""The small interface between netframe and a handler: what a handler sees, what it implements.

A handler is a plain class. It imports nothing from asyncio, opens no socket and
reads no clock: it is told that a peer arrived, handed each message, and told when the
peer left, and it answers through the :class:`Connection` it is given. That is what
lets one handler class serve TCP and UDP, and be unit-tested with
:class:`netframe.testing.MemoryConnection` in microseconds.

The addresses, the TLS details and the close reasons a connection reports are small
typed values defined here, so that handlers depend on nothing else of the framework.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from netframe.server import Server

__all__ = [
    "CloseReason",
    "Connection",
    "Handler",
    "InetAddress",
    "Message",
    "Network",
    "PeerAddress",
    "TlsInfo",
    "UnixAddress",
]

#: How a connection reaches the server: ``"tcp"``, ``"udp"``, or ``"unix"`` (a stream
#: socket on a path), as Go's ``net.Dial`` names them.
Network = Literal["tcp", "udp", "unix"]
#: A message as a handler receives it: ``str`` for text handlers, ``bytes`` otherwise.
Message = str | bytes


def unmapped_host(host: str) -> str:
    """``"::ffff:10.0.0.1"`` -> ``"10.0.0.1"``: one client, one key, whichever socket family."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


@dataclasses.dataclass(frozen=True, slots=True)
class InetAddress:
    """An IPv4 or IPv6 address and port, as a peer or a local end of a connection.

    ``host`` is the address in its usual text form. An IPv4 client reaching an IPv6
    socket (``::ffff:10.0.0.1``) is reported as the IPv4 address it is, so limits and
    logs see one client whatever socket it came through. An IPv6 scope
    (``fe80::1%eth0``) stays in ``host``.
    """

    host: str
    port: int

    @classmethod
    def from_sockaddr(cls, sockaddr: Any) -> InetAddress | None:
        """The address of a socket tuple (``("::1", 5000, 0, 0)``); ``None`` if it is not one."""
        if not isinstance(sockaddr, tuple) or len(sockaddr) < 2:
            return None
        return cls(unmapped_host(str(sockaddr[0])), int(sockaddr[1]))

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """``host`` as an :mod:`ipaddress` object, to test against networks."""
        return ipaddress.ip_address(self.host.partition("%")[0])

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True, slots=True)
class UnixAddress:
    """A Unix-domain socket end: its path, and for a peer, the process behind it.

    ``path`` is ``""`` for an unnamed end, which is what most clients are, and
    ``@name`` for a name in Linux's abstract namespace. ``pid``, ``uid`` and ``gid`` are
    the peer process's credentials as they were when it connected (``SO_PEERCRED``);
    ``None`` for the server's own end and where the system does not tell.

    ``str()`` is the path (``unix:unnamed`` for an unnamed end) followed by the
    credentials when known: ``unix:pid=4242,uid=1000,gid=1000``.
    """

    path: str
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None

    def __str__(self) -> str:
        if self.uid is None:
            return self.path or "unix:unnamed"
        return f"{self.path or 'unix'}:pid={self.pid},uid={self.uid},gid={self.gid}"


#: What ``conn.peer`` and ``conn.local`` hold.
PeerAddress = InetAddress | UnixAddress


@dataclasses.dataclass(frozen=True, slots=True)
class TlsInfo:
    """What a TLS connection negotiated: ``conn.tls``, ``None`` on a plain connection."""

    #: The protocol version, as :meth:`ssl.SSLSocket.version` names it: ``"TLSv1.3"``.
    version: str
    #: The cipher suite's OpenSSL name: ``"TLS_AES_256_GCM_SHA384"``.
    cipher: str
    #: The client's certificate as :meth:`ssl.SSLSocket.getpeercert` gives it, when the
    #: server asked for one (``--tls-client-ca``) and the client sent it.
    peer_certificate: dict[str, Any] | None = None
    #: The server name the client asked for (SNI), if it named one.
    server_name: str | None = None


class CloseReason(enum.StrEnum):
    """Why a connection ended: ``conn.close_reason`` in ``on_disconnect``, and the
    ``reason`` of the ``connection_closed`` log event."""

    #: The peer closed its side (end of input) and everything it sent was answered.
    PEER_CLOSED = "peer_closed"
    #: The peer reset the connection, or the network failed.
    RESET = "reset"
    #: The handler called ``conn.close()``.
    HANDLER_CLOSED = "handler_closed"
    #: The handler called ``conn.abort()``.
    HANDLER_ABORTED = "handler_aborted"
    #: A hook raised, or an await in it failed; logged as ``handler_error``.
    HANDLER_ERROR = "handler_error"
    #: Nothing arrived or left for ``idle_timeout_s``.
    IDLE_TIMEOUT = "idle_timeout"
    #: A message was begun and not finished within ``message_timeout_s``.
    MESSAGE_TIMEOUT = "message_timeout"
    #: The peer did not read its replies within ``send_timeout_s``.
    SEND_TIMEOUT = "send_timeout"
    #: A message exceeded ``max_line_bytes``, or the stream could not be framed.
    LINE_TOO_LONG = "line_too_long"
    #: The server stopped.
    SERVER_SHUTDOWN = "server_shutdown"
    #: Refused before any handler was made: over ``max_connections``.
    MAX_CONNECTIONS = "max_connections"
    #: Refused before any handler was made: over ``max_per_ip`` from this address.
    MAX_PER_IP = "max_per_ip"


class Connection(Protocol):
    """A peer, as a handler sees it. Provided by netframe; handlers never build one.

    Over TCP it is one connection. Over UDP it is the sender of the datagram being
    handled: replies go back to that address, and ``close()`` only means "no more
    replies to this datagram".
    """

    @property
    def network(self) -> Network:
        """``"tcp"``, ``"udp"``, or ``"unix"`` for a Unix-domain stream socket."""
        ...

    @property
    def peer(self) -> PeerAddress | None:
        """The client: an :class:`InetAddress`, or on a Unix socket a
        :class:`UnixAddress` with the client process's pid, uid and gid; ``None`` when
        the socket could not tell (it was already reset). Behind a load balancer with
        the PROXY protocol, the client the balancer's header names."""
        ...

    @property
    def local(self) -> PeerAddress | None:
        """The server's end the client reached (the listener's address and port, or
        its path; behind a load balancer with the PROXY protocol, the balancer's
        address the client reached, from the header)."""
        ...

    @property
    def tls(self) -> TlsInfo | None:
        """What TLS negotiated, or ``None`` for a plain connection (and always over
        UDP)."""
        ...

    @property
    def via(self) -> PeerAddress | None:
        """The load balancer the connection came through when a PROXY protocol header
        named the real client in :attr:`peer`; ``None`` for a direct connection (and a
        balancer's own health check)."""
        ...

    @property
    def id(self) -> int:
        """A number unique to this connection within the process (0 for UDP)."""
        ...

    @property
    def close_reason(self) -> CloseReason | None:
        """Why the connection ended, once it has (in ``on_disconnect``); else ``None``."""
        ...

    @property
    def log(self) -> FilteringBoundLogger:
        """A structlog logger bound to this peer (``peer=``, ``conn=``)."""
        ...

    def send(self, message: Message) -> None:
        """Queue ``message`` for the peer. A handler never writes line endings.

        ``str`` is encoded with the server's encoding; a ``bytearray`` or ``memoryview``
        is copied when sent (changing it later changes nothing). How the reply ends:

        - a reply to a message ends as that message did (``\\n``, ``\\r\\n``, or nothing
          for a bare or raw message), also after an ``await`` in an async ``on_message``;
        - a send in ``on_connect`` (the greeting) ends with the framer's greeting
          ending: ``\\n`` in ``line`` framing, nothing in ``auto`` and ``raw``;
        - any other send, a push (to another connection, from a task, a broadcast),
          ends with the framer's push ending: ``\\n`` in ``line`` and ``auto``, nothing in
          ``raw``.

        ``length`` framing prefixes every send with its length instead. Replies made
        while one batch of input is handled leave in one write. After :meth:`close` or
        :meth:`abort`, sends are ignored.
        """
        ...

    def close(self) -> None:
        """Close after the queued replies are sent. Messages after this are not handled."""
        ...

    def abort(self) -> None:
        """Close at once, discarding replies not yet sent (TCP sends a reset)."""
        ...


class Handler:
    """Base class for handlers. Override the hooks you need; each default does nothing.

    netframe makes one handler instance per TCP connection, so instance attributes are
    per-connection state. Over UDP one instance serves every datagram of a listener,
    and :meth:`on_connect` / :meth:`on_disconnect` are not called (UDP has no
    connection).

    ``on_message`` may be ``async def`` when it must wait on something (a lookup): the
    loop keeps serving everyone else, this peer's later messages wait their turn so
    replies stay in order, and plain handlers pay nothing for the possibility.

    State shared by every connection (a database pool, a chat room) belongs to the
    class, opened in :meth:`on_start` and closed in :meth:`on_stop`.

    Exceptions a hook raises are logged with the peer's context and close that
    connection (over UDP, the datagram is dropped); other peers are unaffected.
    """

    __slots__ = ()

    #: ``True``: messages arrive as ``str``, decoded with the server's encoding, and
    #: bytes that do not decode never reach the handler (netframe answers them with an
    #: error line). ``False``: messages arrive as the raw ``bytes``.
    text: bool = True

    @classmethod
    def on_start(cls, server: Server) -> Awaitable[None] | None:
        """The server is starting, before it binds a listener: open shared resources.

        Called once per server, on the class (or on the factory's ``on_start``, when the
        handler is named by a factory that has one). May be ``async def``. If it raises,
        the server does not start and the error reaches :meth:`Server.start`.
        """

    @classmethod
    def on_stop(cls, server: Server) -> Awaitable[None] | None:
        """The server has stopped: every connection and ``on_disconnect`` has finished.

        Called once, also when the start failed after :meth:`on_start` succeeded. May be
        ``async def``. An exception is logged and does not stop the shutdown.
        """

    def on_connect(self, conn: Connection) -> Awaitable[None] | None:
        """A TCP peer connected. It may send (a greeting) or close.

        May be ``async def``: the peer's messages then wait until it has finished.
        """

    def on_message(self, conn: Connection, message: Any) -> Awaitable[None] | None:
        """One framed message arrived. Reply any number of times with ``conn.send``."""

    def on_disconnect(self, conn: Connection) -> Awaitable[None] | None:
        """The TCP peer left, or the connection was closed; ``conn.close_reason`` says
        why. Sending now does nothing.

        May be ``async def``: it runs to the end, and a stopping server waits for it
        (within its grace period).
        """
