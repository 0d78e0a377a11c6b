"""Binding listeners, the server's lifecycle, and the blocking :func:`run`.

Binding and serving are separate steps: :meth:`Server.start` binds every listener (or
none: if one fails, those already bound are closed and :class:`ListenError` names the
address), and :meth:`Server.serve_forever` waits until :meth:`Server.stop` is called.
``async with Server(...)`` does both halves of the lifecycle for you.

Stopping has a sequence and a deadline: stop listening, close every connection once its
queued replies are written, wait up to ``shutdown_timeout_s``, then abort what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
from types import TracebackType
from typing import Any

from netframe._endpoint import EndpointContext
from netframe.config import Address, Config
from netframe.handlers import HandlerError, resolve_handler
from netframe.logs import configure_logging, get_logger
from netframe.loops import loop_factory, resolve_loop_name
from netframe.tcp import TcpEndpoint
from netframe.udp import UdpEndpoint

__all__ = ["BoundAddress", "ListenError", "Server", "run"]


class ListenError(OSError):
    """A listener could not be bound; the message names the transport and address."""


@dataclasses.dataclass(frozen=True, slots=True)
class BoundAddress:
    """An address a server is actually listening on (port 0 resolved to the real port)."""

    transport: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.transport} {Address(self.host, self.port)}"


class Server:
    """A netframe server: TCP and UDP listeners serving one handler.

    Args:
        config: the settings; ``None`` means :class:`Config` defaults.
        **settings: any :class:`Config` field, applied on top of ``config``
            (``Server(handler=MyHandler, tcp=["127.0.0.1:0"])``).

    Raises:
        ConfigError: a setting is invalid.
        HandlerError: the handler cannot be found.

    The handler is resolved when the server is built, so a wrong name fails here, not
    on the first connection. Logging follows the application's structlog configuration;
    :func:`run` and the command line configure it from ``config``.
    """

    def __init__(self, config: Config | None = None, **settings: Any) -> None:
        if config is None:
            config = Config(**settings)
        elif settings:
            config = config.replace(**settings)
        self.config = config
        self._handler_factory = resolve_handler(config.handler)
        self._log = get_logger()
        self._ctx: EndpointContext | None = None
        self._tcp_servers: list[asyncio.Server] = []
        self._udp_transports: list[asyncio.DatagramTransport] = []
        self._addresses: list[BoundAddress] = []
        # Events bind to a loop on first wait (3.10+), so this may be made before one runs.
        self._stop_requested = asyncio.Event()
        self._stopped = False

    @property
    def addresses(self) -> list[BoundAddress]:
        """Every address bound, in the order the listeners were given (after start)."""
        return list(self._addresses)

    def address(self, transport: str = "tcp") -> tuple[str, int]:
        """The ``(host, port)`` of the first listener of ``transport``.

        Raises:
            LookupError: the server is not started or has no such listener.
        """
        for bound in self._addresses:
            if bound.transport == transport:
                return bound.host, bound.port
        raise LookupError(f"no {transport} listener is bound")

    @property
    def connections(self) -> int:
        """How many TCP connections are open now."""
        return len(self._ctx.connections) if self._ctx else 0

    async def start(self) -> None:
        """Bind every listener and start accepting.

        Raises:
            ListenError: an address could not be bound (in use, not local, ...). Nothing
                stays bound when this is raised.
        """
        if self._ctx is not None:
            raise RuntimeError("server already started")
        ctx = self._ctx = EndpointContext(self.config, self._handler_factory, self._log)
        try:
            for address in self.config.tcp_addresses:
                await self._listen_tcp(ctx, address)
            for address in self.config.udp_addresses:
                await self._listen_udp(ctx, address)
        except BaseException:
            self._close_listeners()
            self._addresses.clear()
            self._ctx = None
            raise

    async def serve_forever(self) -> None:
        """Serve until :meth:`stop` is called, then shut down gracefully. Starts if needed."""
        if self._ctx is None:
            await self.start()
        try:
            await self._stop_requested.wait()
        finally:
            await self.close()

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return. Safe to call from a signal handler."""
        self._stop_requested.set()

    async def close(self) -> None:
        """Stop listening, let connections finish their writes, then close them.

        Connections still open after ``shutdown_timeout_s`` are aborted. Calling it
        again does nothing.
        """
        if self._stopped or self._ctx is None:
            return
        self._stopped = True
        self.stop()
        servers = list(self._tcp_servers)
        self._close_listeners()
        ctx = self._ctx
        ctx.stopping = True
        open_at_stop = len(ctx.connections)
        if ctx.connections:
            ctx.all_closed = asyncio.Event()
            for conn in list(ctx.connections):
                conn.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.all_closed.wait(), self.config.shutdown_timeout_s)
        aborted = len(ctx.connections)
        for conn in list(ctx.connections):
            conn.abort()
        for server in servers:
            # On 3.12+ this also waits for connections; ours are all closed by now.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), self.config.shutdown_timeout_s)
        self._log.info("stopped", connections_closed=open_at_stop, connections_aborted=aborted)

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _listen_tcp(self, ctx: EndpointContext, address: Address) -> None:
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(
                lambda: TcpEndpoint(ctx),
                address.host,
                address.port,
                backlog=self.config.backlog,
                reuse_address=True,
            )
        except OSError as exc:
            raise ListenError(
                exc.errno, f"cannot listen on tcp {address}: {_reason(exc)}"
            ) from None
        self._tcp_servers.append(server)
        for sock in server.sockets:
            self._bound("tcp", sock)

    async def _listen_udp(self, ctx: EndpointContext, address: Address) -> None:
        loop = asyncio.get_running_loop()
        try:
            handler = ctx.handler_factory()  # one per listener, made where errors are clear
        except Exception as exc:
            raise HandlerError(f"the handler factory failed: {exc!r}") from exc
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: UdpEndpoint(ctx, handler), local_addr=(address.host, address.port)
            )
        except OSError as exc:
            raise ListenError(
                exc.errno, f"cannot listen on udp {address}: {_reason(exc)}"
            ) from None
        self._udp_transports.append(transport)
        self._bound("udp", transport.get_extra_info("socket"))

    def _bound(self, transport: str, sock: Any) -> None:
        host, port = sock.getsockname()[:2]
        self._addresses.append(BoundAddress(transport, host, port))
        self._log.info("listening", transport=transport, host=host, port=port)

    def _close_listeners(self) -> None:
        for server in self._tcp_servers:
            server.close()
        for transport in self._udp_transports:
            transport.close()
        self._tcp_servers.clear()
        self._udp_transports.clear()


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _name(handler: object) -> str:
    if isinstance(handler, str):
        return handler
    return f"{getattr(handler, '__module__', '?')}:{getattr(handler, '__qualname__', handler)}"


def run(config: Config | None = None, **settings: Any) -> int:
    """Run a server in the foreground until SIGINT or SIGTERM; return the exit status 0.

    The blocking form of :class:`Server`, with the same arguments. It configures
    structlog from ``config`` (``log_format``, ``log_level``) and runs on the event loop
    ``config.loop`` names.

    Raises:
        ConfigError, HandlerError, LoopUnavailable, ListenError: before serving starts.
    """
    server = Server(config, **settings)
    config = server.config
    factory = loop_factory(config.loop)
    configure_logging(config.log_format, config.log_level)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve_until_signal(server, resolve_loop_name(config.loop)))
    return 0


async def _serve_until_signal(server: Server, loop_name: str) -> None:
    loop = asyncio.get_running_loop()
    # Before binding: a signal that arrives while we start still means a clean stop.
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, server.stop)
    try:
        await server.start()
        get_logger().info(
            "serving",
            loop=loop_name,
            handler=_name(server.config.handler),
            framing=server.config.framing,
        )
        await server.serve_forever()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
