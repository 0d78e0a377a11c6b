"""Peer: the same exchange on Twisted, written the way Twisted's own how-tos write servers.

What a Twisted user would pick instead of netframe: one ``Protocol`` subclass per
exchange, a ``Factory`` making one per connection, ``reactor.listenTCP``/``listenUDP``
and ``reactor.run()``. Lines are framed by ``twisted.protocols.basic.LineReceiver``, the
class the how-tos teach for line protocols, with ``delimiter = b"\\n"`` so that ``\\n`` and
``\\r\\n`` clients are both served (each reply ends as its line did) and its default
``MAX_LENGTH`` (16,384 bytes; a longer line closes the connection). Echo and the bare
words are plain ``Protocol.dataReceived``, the bare words by the same rule as
``raw_protocol.py --handler bare-greeting``: every read is one name. UDP is a
``DatagramProtocol``. Writes go through Twisted's transport buffer, which sends on the
reactor's next turn; no producer/consumer flow control, as in the how-tos' echo server.

``--loop epoll`` installs ``twisted.internet.epollreactor``, Twisted's default reactor on
Linux; ``--loop asyncio`` and ``--loop uvloop`` install ``asyncioreactor`` on a new loop of
that kind (Twisted's sockets and buffers, the loop's polling and timers). The reactor
starts no thread for this exchange: the process is one thread.

    python benchmarks/servers/peer_twisted.py --host 127.0.0.1 --port 0 \\
        --handler greeting|bare-greeting|echo [--loop epoll|asyncio|uvloop] [--udp-port PORT]
"""

from __future__ import annotations

from typing import Any

from _common import (
    BACKLOG,
    WELCOME,
    WELCOME_BARE,
    LoopName,
    announce,
    greet_datagram,
    greet_line,
    loop_factory,
    parse_args,
)
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.protocols.basic import LineReceiver

# Twisted types its transports and reactor as zope interfaces, which mypy cannot read
# without the mypy-zope plugin: they are ``Any`` here.


class Echo(Protocol):
    transport: Any

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class Greeting(LineReceiver):
    delimiter = b"\n"
    transport: Any

    def connectionMade(self) -> None:
        self.transport.write(WELCOME)

    def lineReceived(self, line: bytes) -> None:
        reply = greet_line(line)
        if reply is None:
            self.transport.loseConnection()
        else:
            self.transport.write(reply)


class BareGreeting(Protocol):
    """The tutorial's server: every read is one name."""

    transport: Any

    def connectionMade(self) -> None:
        self.transport.write(WELCOME_BARE)

    def dataReceived(self, data: bytes) -> None:
        if data == b"exit":
            self.transport.loseConnection()
        else:
            self.transport.write(b"Hello, " + data + b"!")


class Datagrams(DatagramProtocol):
    transport: Any

    def __init__(self, greeting: bool) -> None:
        self.greeting = greeting

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        reply = greet_datagram(datagram) if self.greeting else datagram
        if reply is not None:
            self.transport.write(reply, addr)


PROTOCOLS: dict[str, type[Protocol]] = {
    "greeting": Greeting,
    "bare-greeting": BareGreeting,
    "echo": Echo,
}


def install_reactor(loop: LoopName) -> None:
    """Install the reactor ``loop`` names, before anything imports ``twisted.internet.reactor``."""
    if loop == "epoll":
        from twisted.internet import epollreactor

        epollreactor.install()  # type: ignore[no-untyped-call]
    else:
        from twisted.internet import asyncioreactor

        asyncioreactor.install(loop_factory(loop)())  # type: ignore[no-untyped-call]


def main() -> None:
    options = parse_args(__doc__, tuple(PROTOCOLS), ("epoll", "asyncio", "uvloop"))  # type: ignore[arg-type]
    install_reactor(options.loop)
    from twisted.internet import reactor as installed

    reactor: Any = installed
    factory = Factory.forProtocol(PROTOCOLS[options.handler])
    tcp = reactor.listenTCP(options.port, factory, backlog=BACKLOG, interface=options.host)
    udp_port = -1
    if options.udp_port is not None:
        udp = reactor.listenUDP(
            options.udp_port, Datagrams(options.handler == "greeting"), interface=options.host
        )
        udp_port = udp.getHost().port
    announce(tcp.getHost().port, udp_port)
    reactor.run()  # SIGINT and SIGTERM stop it


if __name__ == "__main__":
    main()
