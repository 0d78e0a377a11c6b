"""netframe: fast, well-behaved TCP and UDP servers on asyncio, with sans-IO handlers.

Serve a handler from code::

    import netframe

    class Shout(netframe.Handler):
        def on_message(self, conn, message):
            conn.send(message.upper())

    netframe.run(handler=Shout, tcp=["127.0.0.1:7000"])   # blocks until Ctrl+C

or, inside an application's event loop::

    async with netframe.Server(handler=Shout, tcp=["127.0.0.1:0"]) as server:
        host, port = server.address("tcp")
        await server.serve_forever()
"""

# First: it decides between the compiled and the pure build before a hot-path module loads.
from netframe._build import BUILD as BUILD  # isort: skip
from netframe._errors import Error
from netframe._version import __version__
from netframe.client import ClientError, TcpClient, UdpClient
from netframe.config import Address, Config, ConfigError, parse_address
from netframe.framing import Framer
from netframe.handlers import (
    CloseReason,
    Connection,
    Handler,
    HandlerError,
    InetAddress,
    PeerAddress,
    TlsInfo,
    UnixAddress,
    resolve_handler,
)
from netframe.handlers.echo import EchoHandler
from netframe.handlers.greeting import GreetingHandler
from netframe.logs import configure_logging
from netframe.loops import LoopUnavailable
from netframe.server import BoundAddress, ListenError, RunInLoopError, Server, StartError
from netframe.workers import run

__all__ = [
    "Address",
    "BoundAddress",
    "ClientError",
    "CloseReason",
    "Config",
    "ConfigError",
    "Connection",
    "EchoHandler",
    "Error",
    "Framer",
    "GreetingHandler",
    "Handler",
    "HandlerError",
    "InetAddress",
    "ListenError",
    "LoopUnavailable",
    "PeerAddress",
    "RunInLoopError",
    "Server",
    "StartError",
    "TcpClient",
    "TlsInfo",
    "UdpClient",
    "UnixAddress",
    "__version__",
    "configure_logging",
    "parse_address",
    "resolve_handler",
    "run",
]
