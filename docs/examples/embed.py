"""Run a server inside your own asyncio program, talk to it, and stop it."""

import asyncio

from wordcount import WordCount

import netframe


async def main() -> None:
    netframe.configure_logging(level="warning")  # or keep your own structlog set-up
    config = netframe.Config(handler=WordCount, framing="line", tcp=["127.0.0.1:0"])
    async with netframe.Server(config) as server:
        host, port = server.address("tcp")  # port 0 asked for a free port: here it is
        print(f"listening on {host}:{port}")
        client = await netframe.TcpClient.connect(host, port, framing="line")
        print((await client.receive()).decode())
        for text in ["hello there", "one two three", "bye"]:
            client.send(text)
            print((await client.receive()).decode())
        await client.wait_closed()
    # Leaving the block stopped the server: its listeners and connections are closed.


if __name__ == "__main__":
    asyncio.run(main())
