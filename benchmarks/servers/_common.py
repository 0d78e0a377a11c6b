"""Shared pieces of the baseline servers: command line, READY line, protocol and asyncio runner.

The baselines import this module as ``_common``; running a script as
``python benchmarks/servers/NAME.py`` puts this folder on ``sys.path``. Everything here
is deliberately plain so each baseline costs what its I/O model costs and nothing more.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "BACKLOG",
    "CONNECTIONS",
    "READ_SIZE",
    "WELCOME",
    "WELCOME_BARE",
    "Options",
    "UdpServer",
    "announce",
    "greet_datagram",
    "greet_line",
    "greet_lines",
    "loop_factory",
    "parse_args",
    "run_asyncio",
]

#: Listen backlog, the same as netframe's default, so accept queues compare fairly.
BACKLOG = 1024
#: Bytes per read for the servers that choose it themselves.
READ_SIZE = 65536
WELCOME = b"Welcome!\n"
WELCOME_BARE = b"Welcome!"
LF = b"\n"
CRLF = b"\r\n"

#: ``bare-greeting`` is the tutorial's exchange as its own clients speak it: ``Welcome!``
#: with no newline, and each read one bare name (``raw_protocol.py`` and the peers serve it).
Handler = Literal["greeting", "bare-greeting", "echo"]
#: ``epoll`` is Twisted's own reactor (its default on Linux); the rest are asyncio loops.
LoopName = Literal["asyncio", "uvloop", "epoll"]


@dataclass(frozen=True, slots=True)
class Options:
    host: str
    port: int
    handler: Handler
    loop: LoopName
    udp_port: int | None


def parse_args(
    doc: str | None,
    handlers: tuple[Handler, ...] = ("greeting", "echo"),
    loops: tuple[LoopName, ...] = ("asyncio", "uvloop"),
) -> Options:
    """Parse the shared command line; ``doc`` is the script's docstring (first line shown),
    ``handlers`` the protocols the script serves and ``loops`` the loops it runs on (the
    first is the default)."""
    parser = argparse.ArgumentParser(description=(doc or "").partition("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="TCP port, 0 picks a free one")
    parser.add_argument("--handler", choices=handlers, default="greeting")
    parser.add_argument("--loop", choices=loops, default=loops[0])
    parser.add_argument("--udp-port", type=int, default=None, help="also serve UDP here")
    args = parser.parse_args()
    return Options(args.host, args.port, args.handler, args.loop, args.udp_port)


def announce(tcp_port: int, udp_port: int) -> None:
    """Tell the benchmark driver the real ports: ``READY <tcp> <udp or -1>``."""
    print(f"READY {tcp_port} {udp_port}", flush=True)


def _hello(body: bytes, end: bytes) -> bytes | None:
    return None if body == b"exit" else b"Hello, " + body + b"!" + end


def greet_lines(data: bytes) -> tuple[bytes, bytes, bool]:
    """Answer every complete line of ``data``: ``(replies joined, partial rest, exit seen)``.

    Lines end with ``\\n`` or ``\\r\\n`` and each reply ends the same way. At ``exit``
    the replies so far are returned and the rest of ``data`` is dropped.
    """
    *lines, rest = data.split(LF)
    replies: list[bytes] = []
    for line in lines:
        reply = _hello(line[:-1], CRLF) if line.endswith(b"\r") else _hello(line, LF)
        if reply is None:
            return b"".join(replies), b"", True
        replies.append(reply)
    return b"".join(replies), rest, False


def greet_line(line: bytes) -> bytes | None:
    """One line without its ``\\n`` -> its reply, ending as the line did (``\\r\\n`` or
    ``\\n``); ``exit`` -> None. For servers whose library splits the lines."""
    return _hello(line[:-1], CRLF) if line.endswith(b"\r") else _hello(line, LF)


def greet_datagram(data: bytes) -> bytes | None:
    """``X``, ``X\\n`` or ``X\\r\\n`` -> ``Hello, X!`` with the same ending; ``exit`` -> None."""
    if data.endswith(CRLF):
        return _hello(data[:-2], CRLF)
    if data.endswith(LF):
        return _hello(data[:-1], LF)
    return _hello(data, b"")


class UdpServer(asyncio.DatagramProtocol):
    """The UDP side of the asyncio baselines: one reply datagram per request datagram."""

    def __init__(self, handler: Handler) -> None:
        self.greeting = handler == "greeting"
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop: not a subclass

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        reply = greet_datagram(data) if self.greeting else data
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


def loop_factory(name: LoopName) -> Callable[[], asyncio.AbstractEventLoop]:
    """A new loop of the kind named: uvloop's, or the standard asyncio one."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


#: Open TCP connections of the asyncio baselines, closed by :func:`run_asyncio` on a signal.
CONNECTIONS: set[asyncio.BaseTransport] = set()


def run_asyncio(options: Options, start_tcp: Callable[[], Awaitable[asyncio.Server]]) -> None:
    """Serve TCP (and UDP if asked) on the chosen loop until SIGTERM or SIGINT.

    On a signal the listeners close, then every connection in :data:`CONNECTIONS`, and
    connection tasks get up to a second to finish before ``asyncio.Runner`` cancels them.
    """

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        server = await start_tcp()
        udp: asyncio.BaseTransport | None = None
        udp_port = -1
        if options.udp_port is not None:
            udp, _ = await loop.create_datagram_endpoint(
                lambda: UdpServer(options.handler), local_addr=(options.host, options.udp_port)
            )
            udp_port = udp.get_extra_info("sockname")[1]
        announce(server.sockets[0].getsockname()[1], udp_port)
        await stop.wait()
        server.close()
        if udp is not None:
            udp.close()
        for transport in list(CONNECTIONS):
            transport.close()
        await server.wait_closed()
        if tasks := asyncio.all_tasks() - {asyncio.current_task()}:
            await asyncio.wait(tasks, timeout=1)
        await asyncio.sleep(0)  # let the closed transports call connection_lost

    with asyncio.Runner(loop_factory=loop_factory(options.loop)) as runner:
        runner.run(main())
