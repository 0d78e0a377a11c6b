"""Peer: the same exchange as aiomisc services, the way aiomisc's documentation shows them.

What an aiomisc user would pick instead of netframe: a ``TCPServer`` service whose
``handle_client(reader, writer)`` speaks the exchange on asyncio streams, a ``UDPServer``
service whose ``handle_datagram`` answers through ``self.sendto``, both run by
``aiomisc.entrypoint(...)`` and ``loop.run_forever()``. Lines are read with
``readline`` (the streams' default 64 KiB limit; a longer line closes the connection),
each reply written and then ``await writer.drain()``, as in ``streams.py``; the bare
words follow ``raw_protocol.py --handler bare-greeting`` (every read is one name). So
the difference from ``streams.py`` is what aiomisc adds: a task of its own per
connection (and per datagram: ``UDPServer`` runs each ``handle_datagram`` as a task),
tracked by the service, and its entrypoint.

The entrypoint keeps its defaults: logging configured (nothing is logged per connection
or datagram), its thread pool as the loop's default executor, which starts two idle
threads at once (the process has three threads; the exchange never uses them, and
their CPU, if any, is counted with the server's), SIGINT and SIGTERM stop it.
``--loop uvloop`` is aiomisc's own default (it runs on uvloop whenever uvloop is
installed; the script passes the loop's factory either way, so a missing uvloop is an
error, not a silent asyncio). The
listening socket gets aiomisc's options (``SO_REUSEADDR``, ``SO_REUSEPORT``) and
``asyncio.start_server``'s default backlog of 100, which ``TCPServer`` does not let a user
change.

    python benchmarks/servers/peer_aiomisc.py --host 127.0.0.1 --port 0 \\
        --handler greeting|bare-greeting|echo [--loop uvloop|asyncio] [--udp-port PORT]
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiomisc
from _common import (
    READ_SIZE,
    WELCOME,
    WELCOME_BARE,
    announce,
    greet_datagram,
    greet_line,
    loop_factory,
    parse_args,
)
from aiomisc.service import TCPServer, UDPServer


class Echo(TCPServer):
    async def handle_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await reader.read(READ_SIZE):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


class Greeting(TCPServer):
    async def handle_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            writer.write(WELCOME)
            await writer.drain()
            while (line := await reader.readline()).endswith(b"\n"):
                reply = greet_line(line[:-1])
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
        except (ConnectionError, ValueError):  # ValueError: line over the limit
            pass
        finally:
            writer.close()


class BareGreeting(TCPServer):
    """The tutorial's server: every read is one name."""

    async def handle_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            writer.write(WELCOME_BARE)
            await writer.drain()
            while (data := await reader.read(READ_SIZE)) and data != b"exit":
                writer.write(b"Hello, " + data + b"!")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


class Datagrams(UDPServer):
    greeting: bool

    async def handle_datagram(self, data: bytes, addr: tuple[Any, ...]) -> None:
        reply = greet_datagram(data) if self.greeting else data
        if reply is not None:
            self.sendto(reply, addr)


SERVICES: dict[str, type[TCPServer]] = {
    "greeting": Greeting,
    "bare-greeting": BareGreeting,
    "echo": Echo,
}


def main() -> None:
    options = parse_args(__doc__, tuple(SERVICES), ("uvloop", "asyncio"))  # type: ignore[arg-type]
    tcp = SERVICES[options.handler](address=options.host, port=options.port)
    services: list[aiomisc.Service] = [tcp]
    udp = None
    if options.udp_port is not None:
        # Service keyword arguments become attributes of the service.
        udp = Datagrams(
            address=options.host, port=options.udp_port, greeting=options.handler == "greeting"
        )
        services.append(udp)
    # uvloop is aiomisc's default, but where uvloop is missing aiomisc falls back on
    # asyncio without a word: the loop is named here, so the server is what it says.
    with aiomisc.entrypoint(*services, loop_factory=loop_factory(options.loop)) as loop:
        announce(tcp.port or -1, -1 if udp is None else udp.port or -1)
        loop.run_forever()


if __name__ == "__main__":
    main()
