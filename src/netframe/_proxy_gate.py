"""The PROXY protocol in front of the TCP endpoint: read the header, then hand over.

With ``proxy_protocol`` on, the listener's protocol factory makes a :class:`ProxyGate`
instead of the endpoint. The gate owns the connection only until the header is in:

- at ``connection_made`` it refuses a peer outside ``proxy_allow`` at once, without
  reading a byte, and starts the header's deadline (``proxy_timeout_s``);
- each read goes to :func:`netframe.proxy.parse` with the bytes so far (never more than
  one header's worth is held: the parser decides at the latest when that much arrived);
- with a whole header it makes the real endpoint, tells it the client and the address
  the header names (:meth:`TcpEndpoint.set_proxied`), moves the transport to it
  (``transport.set_protocol``), calls its ``connection_made`` (caps, greeting, handler)
  and hands it the bytes that came after the header.

With TLS on too, the gate hands the plain transport, the header's addresses and the
bytes after the header to a :class:`~netframe._tls.TlsGate` instead, which runs the
handshake (those bytes are its start) and then hands over to the endpoint.

So the endpoint's hot path is untouched: it never learns a gate was there, except that
its peer is the client and ``via`` names the balancer. Every refusal (untrusted peer, a
malformed, truncated, missing or late header) is one ``proxy_header_rejected`` warning
and a close; no handler is made, no greeting sent, and no ``connection_opened`` or
``connection_closed`` line is logged for it.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from typing import Final

from netframe._endpoint import EndpointContext, format_peer
from netframe._tls import TlsGate, TlsGates
from netframe.handlers import InetAddress, PeerAddress, UnixAddress
from netframe.proxy import (
    HeaderReader,
    ProxyHeader,
    ProxyProtocolError,
    SocketAddress,
    TrustedProxies,
    Versions,
)
from netframe.tcp import TcpEndpoint

__all__ = ["REJECTED_EVENT", "ProxyGate", "ProxyGates"]

REJECTED_EVENT: Final = "proxy_header_rejected"


class ProxyGates:
    """What the gates of one server share, and the gates still waiting for a header."""

    def __init__(self, ctx: EndpointContext, tls: TlsGates | None = None) -> None:
        config = ctx.config
        self.ctx = ctx
        #: The TLS handshakes the gates hand over to, when TLS is on.
        self.tls = tls
        self.versions: Versions = "any" if config.proxy_protocol == "off" else config.proxy_protocol
        self.trusted = TrustedProxies(config.proxy_allow)
        self.timeout_s = config.proxy_timeout_s
        #: Connections whose header has not arrived yet.
        self.waiting: set[ProxyGate] = set()

    def factory(self, make_endpoint: Callable[[], TcpEndpoint]) -> Callable[[], ProxyGate]:
        """The listener's protocol factory: a gate in front of each endpoint."""
        return lambda: ProxyGate(self, make_endpoint)

    def close_all(self) -> None:
        """The server is stopping: connections still waiting for a header have no
        handler and nothing to finish, so they close now."""
        for gate in list(self.waiting):
            gate.close()


class ProxyGate(asyncio.Protocol):
    """One connection until its PROXY header is read; see the module's docstring."""

    __slots__ = ("_done", "_gates", "_make_endpoint", "_peer", "_reader", "_timer", "_transport")

    def __init__(self, gates: ProxyGates, make_endpoint: Callable[[], TcpEndpoint]) -> None:
        self._gates = gates
        self._make_endpoint = make_endpoint
        self._reader = HeaderReader(gates.versions)
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._peer: InetAddress | None = None
        self._done = False

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport: asyncio.Transport = base  # type: ignore[assignment]
        self._transport = transport
        gates = self._gates
        if gates.ctx.read_size:  # the standard loop's read size, as the endpoint's
            transport.max_size = gates.ctx.read_size  # type: ignore[attr-defined]
        if gates.ctx.stopping:
            self._done = True
            transport.close()
            return
        try:
            raw = transport.get_extra_info("peername")
        except OSError:  # uvloop asks the socket, which may be closed already
            raw = None
        if not raw:
            # Reset before it could be asked (a balancer's health check that connects
            # and aborts at once, on uvloop): there is nothing to serve or to refuse.
            self._done = True
            transport.close()
            return
        # Only an IP peer can be a trusted balancer (a Unix socket's is a path).
        self._peer = peer = InetAddress.from_sockaddr(raw)
        if peer is None or not gates.trusted.allows(peer.host):
            self._reject(
                "untrusted_source",
                "the peer is not in proxy_allow (--proxy-allow)",
                str(peer or raw),
            )
            return
        gates.waiting.add(self)
        self._timer = asyncio.get_running_loop().call_later(gates.timeout_s, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        try:
            header = self._reader.feed(data)
        except ProxyProtocolError as exc:
            self._reject(exc.reason, str(exc))
            return
        if header is not None:
            self._hand_over(header)

    def eof_received(self) -> bool:
        if not self._done:
            try:
                self._reader.eof()
            except ProxyProtocolError as exc:
                self._reject(exc.reason, str(exc))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()

    def close(self) -> None:
        """Close without a word (the server is stopping)."""
        self._finish()
        if self._transport is not None:
            self._transport.close()

    def _timed_out(self) -> None:
        self._timer = None
        if not self._done:
            self._reject(
                "timeout",
                f"no complete PROXY header within {self._gates.timeout_s:g} s "
                f"({self._reader.buffered} bytes received)",
            )

    def _finish(self) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._gates.waiting.discard(self)

    def _reject(self, reason: str, error: str, peer: str | None = None) -> None:
        self._finish()
        rejected = self._gates.ctx.counters.proxy_rejected  # metrics
        rejected[reason] = rejected.get(reason, 0) + 1
        self._gates.ctx.log.warning(
            REJECTED_EVENT, transport="tcp", peer=peer or format_peer(self._peer),
            reason=reason, error=error,
        )  # fmt: skip
        if self._transport is not None:
            self._transport.close()

    def _hand_over(self, header: ProxyHeader) -> None:
        self._finish()
        transport = self._transport
        assert transport is not None
        if (tls := self._gates.tls) is not None:  # the handshake follows the header
            client = _proxied(header.source)
            proxied = None if client is None else (client, _proxied(header.destination), self._peer)
            TlsGate(tls, "tcp", proxied).begin(transport, self._reader.rest)
            return
        endpoint = protocol = self._make_endpoint()
        client = _proxied(header.source)
        if client is not None:  # else (LOCAL, UNKNOWN) the socket's own addresses hold
            endpoint.set_proxied(client, _proxied(header.destination), self._peer)
        ctx = self._gates.ctx
        if ctx.debug:
            ctx.log.debug(
                "proxy_header", transport="tcp", peer=format_peer(self._peer), conn=endpoint.id,
                client=None if client is None else str(client), version=header.version,
                command=header.command,
            )  # fmt: skip
        transport.set_protocol(protocol)  # type: ignore[arg-type]  # a protocol by its methods
        protocol.connection_made(transport)
        rest = self._reader.rest
        if rest and not transport.is_closing():
            endpoint.data_received(rest)


def _proxied(address: SocketAddress | None) -> PeerAddress | None:
    """A header's address as the handler sees addresses: an IPv4-mapped IPv6 client is
    the IPv4 client it is (as for direct connections), whatever text form it came in."""
    if address is None:
        return None
    if isinstance(address, str):
        return UnixAddress(address)
    host, port = address
    if ":" in host:
        mapped = ipaddress.IPv6Address(host).ipv4_mapped
        if mapped is not None:
            host = str(mapped)
    return InetAddress(host, port)
