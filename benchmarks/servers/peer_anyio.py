"""Peer: the same exchange on AnyIO, the way AnyIO's networking guide writes servers.

What an AnyIO user would pick instead of netframe: ``anyio.create_tcp_listener`` and
``listener.serve(handler)``, which runs the handler in a task of its own per connection,
on AnyIO's socket streams. Lines are framed by ``anyio.streams.buffered.BufferedByteStream``:
``receive_until(b"\\n", 65536)`` (a longer line closes the connection, like the asyncio
streams' default limit), each reply sent with ``await stream.send(...)``. Echo and the
bare words use the socket stream itself, a ``receive()`` (up to 64 KiB) at a time; the
bare words follow ``raw_protocol.py --handler bare-greeting`` (every read is one name).
UDP is ``anyio.create_udp_socket``: ``async for data, addr in udp`` and ``await
udp.sendto(...)``, one datagram after another.

A connection that the client breaks ends only its own handler (AnyIO's errors for it
are caught), since an exception escaping a handler would cancel ``serve``'s whole task
group. SIGINT and SIGTERM, read through ``anyio.open_signal_receiver``, cancel the
server. ``--loop asyncio`` is AnyIO's default backend; ``--loop uvloop`` is the same
backend with ``backend_options={"use_uvloop": True}``. No thread is started: the process
is one thread.

    python benchmarks/servers/peer_anyio.py --host 127.0.0.1 --port 0 \\
        --handler greeting|bare-greeting|echo [--loop asyncio|uvloop] [--udp-port PORT]
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable

import anyio
from _common import (
    BACKLOG,
    READ_SIZE,
    WELCOME,
    WELCOME_BARE,
    Options,
    announce,
    greet_datagram,
    greet_line,
    parse_args,
)
from anyio.abc import SocketAttribute, SocketStream, UDPSocket
from anyio.streams.buffered import BufferedByteStream

#: What ends one connection and nothing else: the peer closed or broke it, or sent a
#: line over the limit.
CONNECTION_ENDED = (
    anyio.EndOfStream,
    anyio.IncompleteRead,
    anyio.DelimiterNotFound,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
)
MAX_LINE = 65536


async def echo(client: SocketStream) -> None:
    async with client:
        try:
            while True:
                await client.send(await client.receive(READ_SIZE))
        except CONNECTION_ENDED:
            pass


async def greeting(client: SocketStream) -> None:
    async with client:
        stream = BufferedByteStream(client)
        try:
            await stream.send(WELCOME)
            while (reply := greet_line(await stream.receive_until(b"\n", MAX_LINE))) is not None:
                await stream.send(reply)
        except CONNECTION_ENDED:
            pass


async def bare_greeting(client: SocketStream) -> None:
    """The tutorial's server: every read is one name."""
    async with client:
        try:
            await client.send(WELCOME_BARE)
            while (data := await client.receive(READ_SIZE)) != b"exit":
                await client.send(b"Hello, " + data + b"!")
        except CONNECTION_ENDED:
            pass


async def datagrams(udp: UDPSocket, greet: bool) -> None:
    async with udp:
        async for data, addr in udp:
            reply = greet_datagram(data) if greet else data
            if reply is not None:
                await udp.sendto(reply, *addr[:2])


HANDLERS: dict[str, Callable[[SocketStream], Awaitable[None]]] = {
    "greeting": greeting,
    "bare-greeting": bare_greeting,
    "echo": echo,
}


async def serve(options: Options) -> None:
    listener = await anyio.create_tcp_listener(
        local_host=options.host, local_port=options.port, backlog=BACKLOG
    )
    tcp_port = listener.extra(SocketAttribute.local_port)
    udp_port = -1
    async with listener, anyio.create_task_group() as group:
        if options.udp_port is not None:
            udp = await anyio.create_udp_socket(
                local_host=options.host, local_port=options.udp_port
            )
            udp_port = udp.extra(SocketAttribute.local_port)
            group.start_soon(datagrams, udp, options.handler == "greeting")
        group.start_soon(listener.serve, HANDLERS[options.handler])
        announce(tcp_port, udp_port)
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                group.cancel_scope.cancel()
                break


def main() -> None:
    options = parse_args(__doc__, tuple(HANDLERS), ("asyncio", "uvloop"))  # type: ignore[arg-type]
    anyio.run(
        serve, options, backend="asyncio", backend_options={"use_uvloop": options.loop == "uvloop"}
    )


if __name__ == "__main__":
    main()
