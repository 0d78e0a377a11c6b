"""The small interface between netframe and a handler: what a handler sees, what it implements.

A handler is a plain class. It imports nothing from asyncio, opens no socket and
reads no clock: it is told that a peer arrived, handed each message, and told when the
peer left, and it answers through the :class:`Connection` it is given. That is what
lets one handler class serve TCP and UDP, and be unit-tested with
:class:`netframe.testing.MemoryConnection` in microseconds.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Literal, Protocol

__all__ = ["Connection", "Handler", "Message", "Transport"]

Transport = Literal["tcp", "udp"]
#: A message as a handler receives it: ``str`` for text handlers, ``bytes`` otherwise.
Message = str | bytes


class Connection(Protocol):
    """A peer, as a handler sees it. Provided by netframe; handlers never build one.

    Over TCP it is one connection. Over UDP it is the sender of the datagram being
    handled: replies go back to that address, and ``close()`` only means "no more
    replies to this datagram".
    """

    @property
    def transport(self) -> Transport:
        """``"tcp"`` or ``"udp"``."""
        ...

    @property
    def peer(self) -> tuple[Any, ...]:
        """The peer's address as the socket reports it, e.g. ``("127.0.0.1", 50312)``."""
        ...

    @property
    def id(self) -> int:
        """A number unique to this connection within the process (0 for UDP)."""
        ...

    @property
    def log(self) -> Any:
        """A structlog logger bound to this peer (``peer=``, ``conn=``)."""
        ...

    def send(self, message: Message) -> None:
        """Queue ``message`` for the peer.

        ``str`` is encoded with the server's encoding. The reply ends with the line
        terminator of the message being answered (nothing for bare or raw messages),
        so a handler never writes line endings itself. Replies made while one batch of
        input is handled leave in one write. After :meth:`close`, sends are ignored.
        """
        ...

    def close(self) -> None:
        """Close after the queued replies are sent. Messages after this are not handled."""
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

    Exceptions a hook raises are logged with the peer's context and close that
    connection (over UDP, the datagram is dropped); other peers are unaffected.
    """

    __slots__ = ()

    #: ``True``: messages arrive as ``str``, decoded with the server's encoding, and
    #: bytes that do not decode never reach the handler (netframe answers them with an
    #: error line). ``False``: messages arrive as the raw ``bytes``.
    text: bool = True

    def on_connect(self, conn: Connection) -> Awaitable[None] | None:
        """A TCP peer connected. It may send (a greeting) or close.

        May be ``async def``: the peer's messages then wait until it has finished.
        """

    def on_message(self, conn: Connection, message: Any) -> Awaitable[None] | None:
        """One framed message arrived. Reply any number of times with ``conn.send``."""

    def on_disconnect(self, conn: Connection) -> Awaitable[None] | None:
        """The TCP peer left, or the connection was closed. Sending now does nothing.

        May be ``async def``: it runs to the end, and a stopping server waits for it
        (within its grace period).
        """
