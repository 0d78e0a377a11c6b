"""Baseline: the same protocol written with asyncio streams, the idiomatic hand-written way.

Why it is a fair baseline: this is what most people write first with asyncio. One task
per connection runs ``asyncio.start_server``'s callback, reading with ``readline`` (greeting)
or ``read`` (echo) and writing each reply followed by ``await drain()``. It measures what
the stream layer and a task per connection cost next to plain Protocol callbacks.
``readline`` keeps the streams' default 64 KiB line limit; a longer line closes the
connection. UDP, when asked for, is a plain ``DatagramProtocol`` (streams have no UDP).

    python benchmarks/servers/streams.py --host 127.0.0.1 --port 0 \\
        --handler greeting|echo [--loop asyncio|uvloop] [--udp-port PORT]
"""

from __future__ import annotations

import asyncio

from _common import BACKLOG, CONNECTIONS, READ_SIZE, WELCOME, greet_lines, parse_args, run_asyncio


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    CONNECTIONS.add(writer.transport)
    try:
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        CONNECTIONS.discard(writer.transport)
        writer.close()


async def greeting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    CONNECTIONS.add(writer.transport)
    try:
        writer.write(WELCOME)
        await writer.drain()
        while (line := await reader.readline()).endswith(b"\n"):
            reply, _, done = greet_lines(line)
            if done:
                break
            writer.write(reply)
            await writer.drain()
    except (ConnectionError, ValueError):  # ValueError: line over the limit
        pass
    finally:
        CONNECTIONS.discard(writer.transport)
        writer.close()


def main() -> None:
    options = parse_args(__doc__)
    client = greeting if options.handler == "greeting" else echo

    async def start_tcp() -> asyncio.Server:
        return await asyncio.start_server(client, options.host, options.port, backlog=BACKLOG)

    run_asyncio(options, start_tcp)


if __name__ == "__main__":
    main()
