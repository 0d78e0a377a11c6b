"""Reference baseline: a hand-written ``asyncio.Protocol`` server, the fastest reasonable one.

Why it is the fair reference for netframe: it uses the same transport/protocol machinery
netframe is built on, with nothing on top. Callbacks run straight from the loop with no
task per connection, all replies to one read leave in one ``transport.write``, and flow
control is the minimal pause/resume of reading. It does not decode text, log, limit line
lengths or isolate handler errors; what netframe costs beyond this is what those buy.

    python benchmarks/servers/raw_protocol.py --host 127.0.0.1 --port 0 \\
        --handler greeting|bare-greeting|echo [--loop asyncio|uvloop] [--udp-port PORT]

``bare-greeting`` serves the tutorial's exchange as its own clients speak it, the way a
hand-written Protocol server for them would: ``Welcome!`` with no newline, each read
answered as one name, and ``exit`` closes.
"""

from __future__ import annotations

import asyncio

from _common import (
    BACKLOG,
    CONNECTIONS,
    WELCOME,
    WELCOME_BARE,
    greet_lines,
    parse_args,
    run_asyncio,
)


class _Base(asyncio.Protocol):
    __slots__ = ("transport",)

    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop: not a subclass
        CONNECTIONS.add(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        CONNECTIONS.discard(self.transport)

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()


class EchoProtocol(_Base):
    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class GreetingProtocol(_Base):
    __slots__ = ("buffer",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.buffer = b""
        self.transport.write(WELCOME)

    def data_received(self, data: bytes) -> None:
        if self.buffer:
            data = self.buffer + data
        replies, self.buffer, done = greet_lines(data)
        if replies:
            self.transport.write(replies)
        if done:
            self.transport.close()


class BareGreetingProtocol(_Base):
    """The tutorial's server on a Protocol: every read is one name."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport.write(WELCOME_BARE)

    def data_received(self, data: bytes) -> None:
        if data == b"exit":
            self.transport.close()
        else:
            self.transport.write(b"Hello, " + data + b"!")


PROTOCOLS: dict[str, type[_Base]] = {
    "greeting": GreetingProtocol,
    "bare-greeting": BareGreetingProtocol,
    "echo": EchoProtocol,
}


def main() -> None:
    options = parse_args(__doc__, tuple(PROTOCOLS))  # type: ignore[arg-type]
    protocol = PROTOCOLS[options.handler]

    async def start_tcp() -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(protocol, options.host, options.port, backlog=BACKLOG)

    run_asyncio(options, start_tcp)


if __name__ == "__main__":
    main()
