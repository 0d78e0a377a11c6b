"""A UDP transport for the standard event loop that reads datagrams in batches.

asyncio's own datagram transport reads one datagram per wake-up of the loop: under a
flood the loop spends most of its time in ``select`` and a busy listener falls behind
the kernel's receive buffer, which then drops legitimate datagrams along with the flood.
This transport reads up to ``_BATCH`` datagrams per wake-up, reads each into a buffer one
byte larger than the largest datagram answered (a longer one is cut short by the kernel
and recognised as too large), and never queues a reply: when the socket's send buffer is
full, ``sendto`` raises ``BlockingIOError`` and the reply is dropped, as the network would
drop it. uvloop reads in batches already and keeps its own transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any, Final

from netframe._resolve import getaddrinfo

__all__ = [
    "ask_receive_buffer",
    "open_datagram_endpoint",
    "prepare_udp_listener",
    "serve_datagram_socket",
]

#: Datagrams read per wake-up of the loop: enough to keep up with a flood, few enough
#: that one busy listener cannot starve the rest of the loop.
_BATCH: Final = 256


class BatchedDatagramTransport(asyncio.DatagramTransport):
    """A datagram transport over a bound, non-blocking socket (standard loop only)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: Any,  # an asyncio datagram protocol by its methods (UdpEndpoint)
        read_size: int,
    ) -> None:
        super().__init__({"socket": sock, "sockname": sock.getsockname()})
        self._loop = loop
        self._sock = sock
        self._protocol = protocol
        self._read_size = read_size
        self._closing = False
        loop.add_reader(sock.fileno(), self._read_ready)
        loop.call_soon(protocol.connection_made, self)

    def _read_ready(self) -> None:
        receive = self._sock.recvfrom
        size = self._read_size
        received = self._protocol.datagram_received
        for _ in range(_BATCH):
            try:
                data, addr = receive(size)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error for an earlier reply
                self._protocol.error_received(exc)
                return
            received(data, addr)
            if self._closing:
                return

    def sendto(self, data: Any, addr: Any = None) -> None:
        """Send one datagram now; ``BlockingIOError`` when the send buffer is full."""
        if self._closing:
            return
        try:
            self._sock.sendto(data, addr)
        except BlockingIOError:
            raise
        except OSError as exc:
            self._protocol.error_received(exc)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_write_buffer_size(self) -> int:
        return 0


async def open_datagram_endpoint(
    protocol: Any,  # an asyncio datagram protocol by its methods (UdpEndpoint)
    host: str,
    port: int,
    *,
    max_datagram_bytes: int,
    receive_buffer_bytes: int,
) -> asyncio.DatagramTransport:
    """Bind a UDP listener at ``host:port`` served by ``protocol``.

    The socket's receive buffer is asked to be ``receive_buffer_bytes`` (past the
    kernel's ``net.core.rmem_max`` only with privilege, as Unbound's ``so-rcvbuf`` does).
    On the standard loop the transport is a :class:`BatchedDatagramTransport`; on any
    other loop (uvloop) it is the loop's own, over the same socket.

    Raises:
        OSError: the address cannot be resolved or bound (the reason is the system's).
    """
    infos = await getaddrinfo(host, port, kind=socket.SOCK_DGRAM)
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setblocking(False)
        prepare_udp_listener(sock, receive_buffer_bytes)
        sock.bind(sockaddr)
    except BaseException:
        sock.close()
        raise
    return await serve_datagram_socket(protocol, sock, max_datagram_bytes=max_datagram_bytes)


async def serve_datagram_socket(
    protocol: Any,  # an asyncio datagram protocol by its methods (UdpEndpoint)
    sock: socket.socket,
    *,
    max_datagram_bytes: int,
) -> asyncio.DatagramTransport:
    """Serve a bound UDP socket (one of ours, one handed over by systemd, or one a
    worker process was handed by the ``--workers`` supervisor) with ``protocol``, on
    the transport that suits the running loop. The socket is made non-blocking."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    if isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
        return BatchedDatagramTransport(loop, sock, protocol, max_datagram_bytes + 1)
    transport, _ = await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
    return transport


def prepare_udp_listener(sock: socket.socket, receive_buffer_bytes: int) -> None:
    """The options every UDP listening socket gets before it is bound."""
    ask_receive_buffer(sock, receive_buffer_bytes)
    if sock.family == socket.AF_INET6:
        # [::] is IPv6 only, as for TCP: IPv4 is its own listener (0.0.0.0), so the two
        # can share a port, and what a listener serves never hangs on a sysctl.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)


def ask_receive_buffer(sock: socket.socket, size: int) -> None:
    """Ask for a ``size``-byte receive buffer: past ``net.core.rmem_max`` with privilege."""
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    if force is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
            return
        except OSError:  # not privileged: the kernel's cap applies
            pass
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
