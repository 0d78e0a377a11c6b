"""Binding listeners, the server's lifecycle, and the blocking :func:`run`.

Binding and serving are separate steps: :meth:`Server.start` binds every listener (or
none: if one fails, those already bound are closed and :class:`ListenError` names the
address), and :meth:`Server.serve_forever` waits until :meth:`Server.stop` is called.
``async with Server(...)`` does both halves of the lifecycle for you.

Stopping has a sequence and a deadline: stop listening at once, close the connections
that are between messages, let those in the middle of one (a partial line, an async
handler call) finish it and get their replies, wait up to ``shutdown_timeout_s``, then
abort what is left.

TCP listening sockets are made here rather than by ``loop.create_server``: on the
standard loop they are :class:`_GuardedListener` objects, whose ``accept`` turns the
"out of descriptors" errors into a refused connection instead of asyncio's retry loop
(which, up to at least Python 3.13, keeps calling ``accept`` after the first failure and
logs each one: a busy spin that writes a traceback per attempt). uvloop's accept has
libuv's own answer to it; on both loops the connection cap, derived from the open-file
limit, keeps connections from running the process out of descriptors in the first place.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Final, Literal

from netframe._build import BUILD
from netframe._datagram import open_datagram_endpoint, serve_datagram_socket
from netframe._endpoint import TICK_S, EndpointContext
from netframe._errors import Error, name_not_found
from netframe._metrics_http import bind_metrics, serve_metrics
from netframe._proxy_gate import ProxyGates
from netframe._resolve import getaddrinfo
from netframe._ticker import Ticker, start_ticker
from netframe._tls import TlsGates, server_context
from netframe._unix import FileIdentity, bind_unix_listener, remove_socket_file, unix_address
from netframe.config import Address, Config, ConfigError
from netframe.framing import make_framer
from netframe.handlers import HandlerError, resolve_handler
from netframe.limits import connection_budget
from netframe.logs import configure_logging, flush_logs, get_logger, lifecycle_logger
from netframe.loops import EOF_BEFORE_CLOSE, loop_factory, loop_lacks, resolve_loop_name
from netframe.metrics import Snapshot, require, snapshot
from netframe.systemd import Handover, take
from netframe.tcp import EndpointFactory, TcpEndpoint
from netframe.udp import UdpEndpoint

__all__ = ["BoundAddress", "ListenError", "RunInLoopError", "Server", "StartError"]


class RunInLoopError(Error, RuntimeError):
    """:func:`run` was called where an event loop is already running."""


class StartError(Error, RuntimeError):
    """The handler's ``on_start`` hook raised; the original exception is the cause."""


class ListenError(Error, OSError):
    """A listener could not be bound; the message names the transport and address.

    ``wrong_address`` is True when the address itself is the mistake (a host name that
    does not resolve, an IP address this machine does not have, a Unix socket path in a
    directory that does not exist), False when the machine's state is (the address is in
    use, the port needs privileges, the path is a live socket): the command line exits
    with status 2 for the first, 1 for the second.
    """

    wrong_address: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class BoundAddress:
    """An address a server is actually listening on (port 0 resolved to the real port).

    ``transport`` is ``tcp``, ``udp`` or ``unix``; for ``unix``, ``host`` is the socket's
    path and ``port`` is 0.
    """

    transport: str
    host: str
    port: int

    def __str__(self) -> str:
        if self.transport == "unix":
            return f"unix {self.host}"
        return f"{self.transport} {Address(self.host, self.port)}"


#: Server.addresses lists TCP, then UDP, then Unix listeners, whatever order they bound in.
_LISTED_ORDER: Final = {"tcp": 0, "udp": 1, "unix": 2}
#: Bytes the standard loop's transports read per recv() (see Server._serve_stream).
STANDARD_READ_BYTES: Final = 64 * 1024


class Server:
    """A netframe server: TCP and UDP listeners serving one handler.

    Args:
        config: the settings; ``None`` means :class:`Config` defaults.
        sockets: listening sockets made elsewhere (handed over by systemd, see
            :mod:`netframe.systemd`, or by a supervisor process), served instead of
            binding ``config``'s ``tcp``, ``udp`` and ``unix`` listeners: TCP and Unix
            stream sockets that listen, and bound UDP sockets, told apart by their
            family and type. The server owns them from then on and closes them when it
            stops (or fails to start); it never removes the file of a Unix socket it did
            not bind. ``None`` (the default): bind what ``config`` says.
        **settings: any :class:`Config` field, applied on top of ``config``
            (``Server(handler=MyHandler, tcp=["127.0.0.1:0"])``).

    Raises:
        ConfigError: a setting is invalid, or one of ``sockets`` cannot be served (a
            stream socket that does not listen, a Unix datagram socket, ...).
        HandlerError: the handler cannot be found.

    The handler is resolved when the server is built, so a wrong name fails here, not
    on the first connection. Logging follows the application's structlog configuration;
    :func:`run` and the command line configure it from ``config``.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        sockets: Sequence[socket.socket] | None = None,
        **settings: Any,
    ) -> None:
        if config is None:
            config = Config(**settings)
        elif settings:
            config = config.replace(**settings)
        self.config = config
        self._given = None if sockets is None else [(listener_kind(s), s) for s in sockets]
        self._handler_factory = resolve_handler(config.handler)
        self._hooks_started = False
        try:
            self._framer_factory = make_framer(
                config.framing,
                config.max_line_bytes,
                config.bare_message_delay_s,
                config.length_prefix_bytes,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        # Loaded now, so that a missing or wrong file is a usage error before anything
        # is bound (and, with workers, before any worker starts).
        self._tls_context = server_context(config) if config.tls_cert is not None else None
        if config.metrics_address is not None:
            require()  # prometheus-client, before anything is bound
        self._log = get_logger()
        self._ctx: EndpointContext | None = None
        # The metrics page (--metrics), served on the server's own loop.
        self._metrics_server: asyncio.Server | None = None
        self._metrics_bound: tuple[str, int] | None = None
        # Connections waiting for their PROXY header, when the protocol is on.
        self._proxy_gates: ProxyGates | None = None
        # Connections in their TLS handshake, and the context in force, with TLS on.
        self._tls_gates: TlsGates | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tcp_servers: list[asyncio.Server] = []
        self._uv_listeners: list[_UvListener] = []
        self._exhausted_logged = -math.inf
        self._udp_transports: list[asyncio.DatagramTransport] = []
        self._udp_endpoints: list[UdpEndpoint] = []
        self._addresses: list[BoundAddress] = []
        # The socket files this server bound, removed when it stops (if still its own).
        self._unix_files: list[tuple[str, FileIdentity]] = []
        self._ticker: Ticker | None = None
        self._ticks = 0
        # Events bind to a loop on first wait (3.10+), so this may be made before one runs.
        self._stop_requested = asyncio.Event()
        self._stopped = False  # close() has begun
        self._closed = False  # close() has finished

    @property
    def addresses(self) -> list[BoundAddress]:
        """Every address bound (after start): the TCP listeners, then UDP, then Unix, each
        kind in the order given."""
        return list(self._addresses)

    def address(self, transport: str = "tcp") -> tuple[str, int]:
        """The ``(host, port)`` of the first listener of ``transport`` (for ``unix``, the
        socket's path and 0).

        Raises:
            LookupError: the server is not started or has no such listener.
        """
        for bound in self._addresses:
            if bound.transport == transport:
                return bound.host, bound.port
        raise LookupError(f"no {transport} listener is bound")

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """The ``(host, port)`` the metrics page is served on (port 0 resolved), or
        ``None`` when ``metrics`` is off or the server is not started."""
        return self._metrics_bound

    def metrics(self) -> Snapshot:
        """What the server has counted since it started, one value per series, as the
        metrics page shows it (see :mod:`netframe.metrics`): for instance
        ``metrics()["netframe_connections_total", ("tcp",)]``. Read it on the server's
        loop. Works whether or not ``metrics`` serves a page.

        Raises:
            LookupError: the server is not started.
        """
        if self._ctx is None:
            raise LookupError("the server is not started")
        return snapshot(self._ctx, {bound.transport for bound in self._addresses})

    @property
    def connection_count(self) -> int:
        """How many stream connections (TCP and Unix) are open now."""
        return len(self._ctx.connections) if self._ctx else 0

    @property
    def max_connections(self) -> int:
        """The connection cap in force (``auto`` resolved when the server started)."""
        if self._ctx is None:
            raise LookupError("the server is not started")
        return self._ctx.max_connections

    async def start(self) -> None:
        """Bind every listener and start accepting.

        Raises:
            ListenError: an address could not be bound (in use, not local, ...). Nothing
                stays bound when this is raised.
        """
        if self._ctx is not None:
            raise RuntimeError("server already started")
        loop = self._loop = asyncio.get_running_loop()
        ctx = self._ctx = EndpointContext(
            self.config, self._handler_factory, self._log, framers=self._framer_factory
        )
        ctx.now = loop.time()
        # A loop whose close() does not end the stream by itself (rloop 0.5).
        ctx.eof_before_close = type(loop).__module__.partition(".")[0] in EOF_BEFORE_CLOSE
        if self._tls_context is not None:
            self._tls_gates = TlsGates(ctx, self._tls_context)
        if self.config.proxy_protocol != "off":
            self._proxy_gates = ProxyGates(ctx, self._tls_gates)
        try:
            await self._start_hook()
            if self._stopped:  # close() came while on_start ran: bind nothing, undo it
                await self._stop_hook()
                return
            if self.config.metrics_address is not None:  # first: it logs nothing on failure
                await self._serve_metrics(self.config.metrics_address)
            if self._given is not None:
                for kind, sock in self._given:
                    await self._adopt(ctx, kind, sock)
            else:
                # UDP first: a client that waits until the TCP port takes connections
                # (as health checks and load generators do) must find UDP bound too, not
                # lose its first datagram while UDP's address is still being resolved.
                for address in self.config.udp_addresses:
                    await self._listen_udp(ctx, address)
                for address in self.config.tcp_addresses:
                    await self._listen_tcp(ctx, address)
                for path in self.config.unix:
                    await self._listen_unix(ctx, path)
            self._addresses.sort(key=lambda bound: _LISTED_ORDER[bound.transport])
        except BaseException:
            self._close_listeners()
            self._close_metrics()
            for _, sock in self._given or ():  # those not served yet (closing twice is fine)
                sock.close()
            self._addresses.clear()
            self._ctx = None
            # uvloop closes a datagram transport's socket on the loop's next turn: without
            # it, the UDP port bound before a TCP bind failed would outlive the failure.
            await asyncio.sleep(0)
            await self._stop_hook()
            raise
        ctx.max_connections = self._connection_cap()
        self._ticker = start_ticker(loop, TICK_S, self._tick)

    async def serve_forever(self) -> None:
        """Serve until :meth:`stop` is called, then shut down gracefully. Starts if needed."""
        if self._ctx is None:
            await self.start()
        try:
            await self._stop_requested.wait()
        finally:
            await self.close()

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return and the server to shut down gracefully.

        Safe to call from any thread and from a signal handler (``signal.signal`` or
        ``loop.add_signal_handler``): it wakes the server's loop, which acts at once.
        """
        loop = self._loop
        if loop is None:
            self._stop_requested.set()
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to stop
            loop.call_soon_threadsafe(self._stop_requested.set)

    async def close(self) -> None:
        """Shut down gracefully: stop listening, let connections finish, then close them.

        Listeners close at once. Connections between messages are closed (after their
        queued replies are written); a connection in the middle of a message (a partial
        line, an async handler call, queued messages) finishes it, gets its replies and
        is closed then. Whatever is still open after ``shutdown_timeout_s`` is aborted.
        Logs ``shutdown_started`` and ``shutdown_finished`` with counts. Calling it again
        does nothing.
        """
        if self._stopped or self._ctx is None:
            return
        self._stopped = True
        self._stop_requested.set()
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + self.config.shutdown_timeout_s
        ctx = self._ctx
        ctx.stopping = True
        servers = list(self._tcp_servers)
        self._close_listeners()
        if self._proxy_gates is not None:  # no handler yet, nothing to finish
            self._proxy_gates.close_all()
        if self._tls_gates is not None:  # the same for handshakes in progress
            self._tls_gates.close_all()
        # A connection accepted in the last instant reaches connection_made within an
        # iteration or two, and closes there because the server is stopping.
        for _ in range(3):
            await asyncio.sleep(0)
        at_stop = list(ctx.connections)
        idle = sum(conn.shut_down() for conn in at_stop)
        self._log.info(
            "shutdown_started",
            connections=len(at_stop),
            idle_closed=idle,
            draining=len(at_stop) - idle,
        )
        aborted = 0
        try:
            if ctx.connections:
                ctx.all_closed = asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ctx.all_closed.wait(), deadline - loop.time())
        finally:  # also when the stop itself is cancelled: nothing is left behind
            aborted = len(ctx.connections)
            for conn in list(ctx.connections):
                conn.terminate()
        await asyncio.sleep(0)  # let the aborted connections' connection_lost run
        if ctx.background:  # async on_disconnect hooks, within what is left of the grace
            _, late = await asyncio.wait(ctx.background, timeout=max(0, deadline - loop.time()))
            for task in late:
                task.cancel()
        for server in servers:
            # On 3.12+ this also waits for connections; ours are all closed by now.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), max(0.1, deadline - loop.time()))
        self._closed = True
        if self._ticker is not None:
            self._ticker.cancel()
        self._tick()
        ctx.flush_summaries(final=True)  # the refusal and drop counts still waiting
        for endpoint in self._udp_endpoints:
            endpoint.flush_summaries(final=True)
        await self._stop_hook()
        self._close_metrics()  # last: the page is served while connections drain
        self._log.info(
            "shutdown_finished",
            closed=len(at_stop) - aborted,
            aborted=aborted,
            duration_s=round(loop.time() - began, 3),
        )

    def abort(self) -> None:
        """Close every listener and abort every connection now, dropping unsent data."""
        self._close_listeners()
        if self._proxy_gates is not None:
            self._proxy_gates.close_all()
        if self._tls_gates is not None:
            self._tls_gates.close_all()
        if self._ctx is not None:
            for conn in list(self._ctx.connections):
                conn.terminate()

    def reload_tls(self) -> bool:
        """Load the TLS certificate, key and client CA files again (SIGHUP does this).

        New handshakes use the new files at once; connections already open keep the
        certificate they were made with and are not disturbed. Logs ``tls_reloaded``,
        or ``tls_reload_failed`` with the reason (a file missing, unreadable, or a key
        that does not match), in which case the server keeps serving with what it had.

        Returns:
            ``True`` if the files were loaded, ``False`` if not, or if the server does not
            serve TLS (then nothing is logged).
        """
        if self._tls_context is None:
            return False
        try:
            context = server_context(self.config)
        except ConfigError as exc:
            self._log.warning("tls_reload_failed", error=str(exc))
            return False
        self._tls_context = context
        if self._tls_gates is not None:
            self._tls_gates.use(context)
        self._log.info("tls_reloaded", cert=self.config.tls_cert)
        return True

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

    async def _start_hook(self) -> None:
        """The handler's ``on_start``, before anything is bound."""
        hook = _hook(self._handler_factory, "on_start")
        if hook is None:
            self._hooks_started = True
            return
        try:
            result = hook(self)
            if result is not None:
                await result
        except Exception as exc:
            self._log.exception("handler_error", hook="on_start")
            raise StartError(f"the handler's on_start failed: {exc!r}") from exc
        self._hooks_started = True

    async def _stop_hook(self) -> None:
        """The handler's ``on_stop``, once, if ``on_start`` succeeded; errors are logged."""
        if not self._hooks_started:
            return
        self._hooks_started = False
        hook = _hook(self._handler_factory, "on_stop")
        if hook is None:
            return
        try:
            result = hook(self)
            if result is not None:
                await result
        except Exception:
            self._log.exception("handler_error", hook="on_stop")

    def _tick(self) -> None:
        """Advance the coarse clock, act on due deadlines, log summaries (every TICK_S)."""
        ctx, loop = self._ctx, self._loop
        if ctx is None or loop is None:
            return
        ctx.now = now = loop.time()
        if arrivals := ctx.arrivals:
            ctx.arrivals = {}
            for arrival in arrivals:
                arrival.enter_wheel()
        for conn in ctx.wheel.due(now):
            try:
                conn.check_deadlines(now)
            except Exception:  # a bug here must not stop every other deadline
                self._log.exception("deadline_check_failed")
        ctx.flush_summaries()
        self._ticks += 1
        for endpoint in self._udp_endpoints:
            endpoint.flush_summaries()
        if self._ticks % 10 == 0:  # once a second
            for endpoint in self._udp_endpoints:
                endpoint.prune()
        self._probe_descriptors(now)

    def _probe_descriptors(self, now: float) -> None:
        """Notice (each tick) that the process is out of descriptors, and when it is not.

        While it is, the condition is logged once a second, and uvloop's listeners are
        switched to the guarded accept: libuv's own answer to it closes connections
        without telling anyone, where the guarded accept answers and counts them.
        """
        spare = _open_spare()
        if spare is not None:
            os.close(spare)
            for listener in self._uv_listeners:
                if listener.shedding:
                    listener.recover()
            return
        for listener in self._uv_listeners:
            listener.shed()
        if now - self._exhausted_logged >= 1.0:
            self._exhausted_logged = now
            connections = len(self._ctx.connections) if self._ctx else 0
            self._log.warning("file_descriptors_exhausted", connections=connections)

    def _connection_cap(self) -> int:
        """``max_connections`` as it can be honoured under the open-file limit."""
        wanted = self.config.max_connections
        limits = _open_file_limits()
        if limits is None:
            return wanted or 2**31
        soft, hard = limits
        budget = connection_budget(soft, _descriptors_in_use())
        if wanted is None or wanted <= budget:
            return wanted or budget
        # Asked for more than the soft limit allows: raise it, as far as the hard limit
        # lets us (nginx's worker_rlimit_nofile does the same by hand).
        in_use = _descriptors_in_use()
        needed = soft
        while connection_budget(needed, in_use) < wanted:
            needed += wanted - connection_budget(needed, in_use)
        raised = _raise_open_file_limit(needed, hard)
        budget = connection_budget(raised, in_use)
        if wanted <= budget:
            return wanted
        self._log.warning(
            "max_connections_capped", requested=wanted, max_connections=budget,
            open_file_limit=raised,
        )  # fmt: skip
        return budget

    async def _listen_tcp(self, ctx: EndpointContext, address: Address) -> None:
        try:
            for sock in await _bind_tcp(address, self.config.backlog):
                await self._serve_stream(ctx, sock, "tcp")
                self._bound("tcp", sock, **self._tls_field())
        except OSError as exc:
            raise listen_error("tcp", address, exc) from None

    async def _listen_unix(self, ctx: EndpointContext, path: str) -> None:
        mode = self.config.unix_mode
        try:
            bound = bind_unix_listener(
                path, mode, self.config.backlog,
                lambda: _GuardedListener(socket.AF_UNIX, socket.SOCK_STREAM, 0),
            )  # fmt: skip
            self._unix_files.append((bound.path, bound.identity))
            if bound.replaced_stale:
                self._log.warning("stale_socket_replaced", path=bound.path)
            await self._serve_stream(ctx, bound.sock, "unix")
        except OSError as exc:
            raise listen_error("unix", path, exc) from None
        self._bound("unix", bound.sock, path=bound.path, mode=f"{mode:04o}", **self._tls_field())

    async def _serve_stream(
        self, ctx: EndpointContext, sock: _GuardedListener, network: Literal["tcp", "unix"]
    ) -> None:
        """Accept connections on a listening stream socket (closed if that fails).

        With the PROXY protocol on, a TCP listener's connections pass a gate that reads
        the header first; a Unix listener's never do: its clients are local processes,
        identified by their credentials, and ``proxy_allow`` names IP networks only.
        """
        loop = asyncio.get_running_loop()
        backlog = self.config.backlog
        standard = isinstance(loop, asyncio.BaseEventLoop)  # its accept calls sock.accept
        if standard:
            # The standard loop reads each chunk for a Protocol into a new bytes of
            # transport.max_size, 256 KiB, which glibc can serve by mapping and unmapping
            # pages on every read (cpython#85451); 64 KiB stays below its mapping
            # threshold. Measured against a BufferedProtocol reading into one shared
            # buffer, this is cheaper (docs/design.md, "The walk a byte takes"). uvloop
            # reads into a buffer of its own.
            ctx.read_size = STANDARD_READ_BYTES
        # Compiled, the loop calls it per connection with no Python frame.
        make_endpoint: Callable[[], TcpEndpoint] = EndpointFactory(ctx, network)
        factory: Callable[[], Any] = make_endpoint
        if self._tls_gates is not None:  # the handshake, then the endpoint (_tls)
            factory = self._tls_gates.factory(network)
        if self._proxy_gates is not None and network == "tcp":  # the header, then the endpoint
            factory = self._proxy_gates.factory(make_endpoint)
        sock.on_shed = lambda: ctx.refused("no_file_descriptors", 1, network)
        try:
            if standard:
                server = await loop.create_server(factory, sock=sock, backlog=backlog)
                self._tcp_servers.append(server)
            else:
                listener = _UvListener(sock, factory, backlog)
                await listener.serve()
                self._uv_listeners.append(listener)
        except BaseException:
            sock.close()
            raise

    async def _listen_udp(
        self, ctx: EndpointContext, address: Address | None, sock: socket.socket | None = None
    ) -> None:
        """Listen on UDP at ``address``, or serve ``sock``, a bound socket handed over."""
        try:
            handler = ctx.handler_factory()  # one per listener, made where errors are clear
        except Exception as exc:
            raise HandlerError(f"the handler factory failed: {exc!r}") from exc
        endpoint = UdpEndpoint(ctx, handler)
        config = self.config
        where = address if sock is None else _handed_over_name(sock)
        try:
            if sock is not None:
                transport = await serve_datagram_socket(
                    endpoint, sock, max_datagram_bytes=config.udp_max_datagram_bytes
                )
            else:
                assert address is not None
                transport = await open_datagram_endpoint(
                    endpoint,
                    address.host,
                    address.port,
                    max_datagram_bytes=config.udp_max_datagram_bytes,
                    receive_buffer_bytes=config.udp_receive_buffer_bytes,
                )
        except OSError as exc:
            raise listen_error("udp", where, exc) from None
        self._udp_transports.append(transport)
        self._udp_endpoints.append(endpoint)
        if sock is None:
            self._bound("udp", transport.get_extra_info("socket"))

    async def _adopt(self, ctx: EndpointContext, kind: str, sock: socket.socket) -> None:
        """Serve a listening socket handed over (by systemd, or a supervisor)."""
        fd = sock.fileno()
        sock.setblocking(False)
        if kind == "udp":
            await self._listen_udp(ctx, None, sock)
            self._bound("udp", sock, fd=fd)
            return
        where = _handed_over_name(sock)
        try:
            # The same guarded accept as the sockets the server binds itself.
            listener = _GuardedListener(sock.family, sock.type, sock.proto, sock.detach())
            listener.setblocking(False)
            await self._serve_stream(ctx, listener, "unix" if kind == "unix" else "tcp")
        except OSError as exc:
            raise listen_error(kind, where, exc) from None
        self._bound(kind, listener, fd=fd, **self._tls_field())

    def _tls_field(self) -> dict[str, bool]:
        """``tls=True`` in a stream listener's ``listening`` line when it serves TLS."""
        return {"tls": True} if self._tls_context is not None else {}

    async def _serve_metrics(self, address: Address) -> None:
        """Serve the metrics page on this loop (``--metrics``)."""
        try:
            sock = bind_metrics(address)
        except OSError as exc:
            raise listen_error("metrics", address, exc) from None
        host, port = sock.getsockname()[:2]
        try:
            self._metrics_server = await serve_metrics(sock, self.metrics)
        except BaseException:
            sock.close()
            raise
        self._metrics_bound = (host, port)
        lifecycle_logger().info("metrics_listening", host=host, port=port, path="/metrics")

    def _close_metrics(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None

    def _bound(self, transport: str, sock: Any, **fields: Any) -> None:
        name = sock.getsockname()
        if isinstance(name, str | bytes):  # a Unix socket: its path
            path = fields.pop("path", None) or unix_address(name).path
            self._addresses.append(BoundAddress(transport, path, 0))
            lifecycle_logger().info("listening", transport=transport, path=path, **fields)
            return
        host, port = name[:2]
        self._addresses.append(BoundAddress(transport, host, port))
        lifecycle_logger().info("listening", transport=transport, host=host, port=port, **fields)

    def _close_listeners(self) -> None:
        # The socket files first: a server started meanwhile binds the path without
        # having to find it stale, and new clients are told it is gone.
        for path, identity in self._unix_files:
            try:
                remove_socket_file(path, identity)
            except OSError as exc:
                self._log.warning("unix_socket_not_removed", path=path, error=_reason(exc))
        self._unix_files.clear()
        for server in self._tcp_servers:
            server.close()
        for transport in self._udp_transports:
            transport.close()
        self._tcp_servers.clear()
        self._udp_transports.clear()
        for listener in self._uv_listeners:
            listener.close()
        self._uv_listeners.clear()


#: accept() errors that mean "the process or system is out of descriptors or memory":
#: wait or shed, never crash (trio keeps the same list).
_OUT_OF_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: How long the guarded accept stays off when it cannot even shed a connection.
_ACCEPT_BACKOFF_S: Final = 1.0
_NO_DESCRIPTORS_REPLY: Final = b"Error: too many connections\n"


class _GuardedListener(socket.socket):
    """A listening socket whose ``accept`` sheds connections when descriptors run out.

    It keeps one spare descriptor. When ``accept`` fails for want of descriptors, the
    spare is closed, one waiting connection is accepted into its place, told it is
    refused and closed, and the spare is taken again; asyncio sees "nothing to accept"
    (``BlockingIOError``) and carries on. So each waiting connection gets an answer and
    costs one accept, and the loop never spins. If even that fails, ``accept`` raises the
    error once (asyncio logs it and retries in a second) and reports nothing to accept
    until then.
    """

    __slots__ = ("_backoff_until", "_spare", "on_shed")

    def __init__(self, family: int, type: int, proto: int, fileno: int | None = None) -> None:
        super().__init__(family, type, proto, fileno)
        self._spare: int | None = _open_spare()
        self._backoff_until = 0.0
        self.on_shed: Any = None

    def accept(self) -> tuple[socket.socket, Any]:
        if self._backoff_until:
            if time.monotonic() < self._backoff_until:
                raise BlockingIOError(errno.EAGAIN, "accept is backing off")
            self._backoff_until = 0.0
        try:
            return super().accept()
        except OSError as exc:
            if exc.errno not in _OUT_OF_RESOURCES:
                raise
            if self._shed():
                raise BlockingIOError(errno.EAGAIN, "shed one connection") from None
            self._backoff_until = time.monotonic() + _ACCEPT_BACKOFF_S
            raise

    def _shed(self) -> bool:
        if self._spare is None:
            self._spare = _open_spare()  # a descriptor may have come free since
            if self._spare is None:
                return False
        os.close(self._spare)
        self._spare = None
        try:
            fd, _ = self._accept()  # type: ignore[attr-defined]
        except BlockingIOError:  # nobody was waiting after all: nothing to accept
            self._spare = _open_spare()
            raise
        except OSError:
            self._spare = _open_spare()
            return False
        with contextlib.suppress(OSError):
            os.write(fd, _NO_DESCRIPTORS_REPLY)
        os.close(fd)
        self._spare = _open_spare()
        if self.on_shed is not None:
            self.on_shed()
        return True

    def close(self) -> None:
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        super().close()


class _UvListener:
    """A listening socket served by uvloop's own accept, or by the guarded one.

    uvloop takes the socket it is given and closes it with its server, so it is given a
    duplicate and ``sock`` stays ours. While the process is out of descriptors the
    server is closed and ``sock`` is served by a reader that calls the guarded
    ``accept`` (each refused connection answered and counted, see
    :class:`_GuardedListener`); the rare connection it does accept then is handed to
    the loop with ``connect_accepted_socket``. When descriptors are free again uvloop
    takes over once more.
    """

    def __init__(self, sock: _GuardedListener, factory: Callable[[], Any], backlog: int) -> None:
        self.sock = sock
        self._factory = factory
        self._backlog = backlog
        self._loop = asyncio.get_running_loop()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.shedding = False
        self._closed = False

    async def serve(self) -> None:
        duplicate = socket.socket(
            self.sock.family, self.sock.type, self.sock.proto, os.dup(self.sock.fileno())
        )
        self._server = await self._loop.create_server(
            self._factory, sock=duplicate, backlog=self._backlog
        )

    def shed(self) -> None:
        if self.shedding or self._closed or self._server is None:
            return
        self.shedding = True
        self._server.close()
        self._server = None
        self._loop.add_reader(self.sock.fileno(), self._acceptable)

    def recover(self) -> None:
        if not self.shedding or self._closed:
            return
        try:
            duplicate = os.dup(self.sock.fileno())
        except OSError:  # not yet: stay on the guarded accept
            return
        os.close(duplicate)
        self.shedding = False
        self._loop.remove_reader(self.sock.fileno())
        self._spawn(self._serve_again())

    async def _serve_again(self) -> None:
        try:
            await self.serve()
        except OSError:  # descriptors ran out again in between
            self.shedding = True
            self._loop.add_reader(self.sock.fileno(), self._acceptable)

    def _acceptable(self) -> None:
        for _ in range(64):
            try:
                conn, _ = self.sock.accept()
            except OSError:  # nothing waiting (or shed: the guard counted it)
                return
            conn.setblocking(False)
            self._spawn(self._loop.connect_accepted_socket(self._factory, conn))

    def _spawn(self, coroutine: Any) -> None:
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            get_logger().warning("accept_failed", error=str(task.exception()))

    def close(self) -> None:
        self._closed = True
        if self.shedding:
            self._loop.remove_reader(self.sock.fileno())
        if self._server is not None:
            self._server.close()
        self.sock.close()


def listener_kind(sock: socket.socket) -> Literal["tcp", "udp", "unix"]:
    """What a socket made elsewhere serves, told by its family and type.

    Raises:
        ConfigError: a socket netframe cannot serve, with the reason in one line.
    """
    family, kind = sock.family, sock.type
    what = f"descriptor {sock.fileno()}"
    if kind == socket.SOCK_STREAM and family in _STREAM_FAMILIES:
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ConfigError(
                f"{what} is a stream socket that does not listen (a socket unit with "
                "Accept=yes hands over connections; netframe needs Accept=no)"
            )
        return "unix" if family == socket.AF_UNIX else "tcp"
    if kind == socket.SOCK_DGRAM and family in (socket.AF_INET, socket.AF_INET6):
        return "udp"
    family_name = getattr(family, "name", str(family))
    kind_name = getattr(kind, "name", str(kind))
    raise ConfigError(
        f"{what} is a socket of family {family_name} and type {kind_name}: netframe "
        "serves TCP and UDP sockets and Unix stream sockets"
    )


_STREAM_FAMILIES: Final = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)


def _handed_over_name(sock: socket.socket) -> str:
    return f"descriptor {sock.fileno()} (handed over)"


def _open_spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


async def _bind_tcp(address: Address, backlog: int) -> list[_GuardedListener]:
    """Listening sockets for every address ``address.host`` resolves to (all or none)."""
    infos = await getaddrinfo(
        address.host, address.port, kind=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[_GuardedListener] = []
    try:
        for family, type_, proto, _, sockaddr in dict.fromkeys(infos):
            sock = _GuardedListener(family, type_, proto)
            sockets.append(sock)
            prepare_tcp_listener(sock)
            sock.bind(sockaddr)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def prepare_tcp_listener(sock: socket.socket) -> None:
    """The options every TCP listening socket gets before it is bound."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sock.family == socket.AF_INET6:
        # One socket per family, as asyncio does: [::] must not also take IPv4.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)


def listen_error(transport: str, address: object, exc: OSError) -> ListenError:
    """The error for a listener that cannot be bound, naming the transport and address."""
    error = ListenError(exc.errno, f"cannot listen on {transport} {address}: {_reason(exc)}")
    if isinstance(exc, socket.gaierror):  # its numbers are not errno's (EAI_AGAIN is 2 on BSD)
        error.wrong_address = name_not_found(exc)
    elif exc.errno == errno.EADDRNOTAVAIL:  # an IP address of no interface of this machine
        error.wrong_address = True
    elif exc.errno == errno.ENOENT and transport == "unix":
        # A Unix socket path whose directory does not exist (and not a file removed
        # between bind and chmod by another server starting on the same path).
        error.wrong_address = not os.path.isdir(os.path.dirname(str(address)) or ".")
    return error


def _open_file_limits() -> tuple[int, int] | None:
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = 2**20
    return (
        unlimited if soft == resource.RLIM_INFINITY else soft,
        unlimited if hard == resource.RLIM_INFINITY else hard,
    )


def _raise_open_file_limit(wanted: int, hard: int) -> int:
    import resource

    new = min(wanted, hard)
    # The hard limit is passed on as it is (RLIM_INFINITY included), never lowered.
    _, hard_as_is = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard_as_is))
    except (ValueError, OSError):
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return new


def _descriptors_in_use() -> int:
    for folder in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return len(os.listdir(folder)) - 1  # less the one listdir itself opened
    return 32


def _hook(factory: Any, name: str) -> Any:
    """The factory's ``on_start``/``on_stop``, or its class's when the factory is a
    ``functools.partial`` of a handler class."""
    hook = getattr(factory, name, None)
    if hook is None and isinstance(factory, functools.partial):
        hook = getattr(factory.func, name, None)
    return hook


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _name(handler: object) -> str:
    if isinstance(handler, str):
        return handler
    return f"{getattr(handler, '__module__', '?')}:{getattr(handler, '__qualname__', handler)}"


#: Exit status of a stop forced by a second signal (the drain did not finish).
EXIT_FORCED: Final = 1


def ensure_no_running_loop() -> None:
    """Raise :class:`RunInLoopError` where an event loop is already running."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # none running: the normal case
        return
    raise RunInLoopError(
        "netframe.run() blocks until a signal, so it cannot run inside a running "
        "event loop: use `async with netframe.Server(...)` there instead"
    )


def run_in_process(config: Config | None = None, **settings: Any) -> int:
    """:func:`netframe.run` for one worker: the server runs in this process.

    Configures structlog from ``config`` (``log_format``, ``log_level``), runs on the
    event loop ``config.loop`` names until SIGINT or SIGTERM and returns 0; a second
    signal aborts every connection and exits at once with status 1.

    Under systemd (see :mod:`netframe.systemd`) it serves the sockets a socket unit hands
    over (in place of the listeners ``config`` names), reports ``READY=1`` once every
    listener is bound and ``on_start`` has run, ``STOPPING=1`` when the stop begins, and
    feeds the watchdog when the unit has one.

    Raises:
        ConfigError, HandlerError, LoopUnavailable, ListenError, StartError: before
            serving starts.
        RunInLoopError: called inside a running event loop (use :class:`Server`).
    """
    ensure_no_running_loop()
    handover = take()  # systemd's variables, read once and removed for child processes
    handed = [each.sock for each in handover.sockets] or None
    server = Server(config, sockets=handed, **settings)
    config = server.config
    factory = loop_factory(config.loop)
    loop_lacks(config.loop, {"unix": bool(config.unix), "tls": config.tls_cert is not None})
    configure_logging(config.log_format, config.log_level)
    log_handover(handover, config)
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(
                serve_until_signal(server, resolve_loop_name(config.loop), handover=handover)
            )
    finally:
        flush_logs()
    return 0


def log_handover(handover: Handover, config: Config) -> None:
    """Log the sockets systemd handed over, and the listeners they replace."""
    if not handover.sockets:
        return
    get_logger().info(
        "sockets_handed_over",
        fds=[each.fd for each in handover.sockets],
        names=[each.name for each in handover.sockets],
    )
    if config.listeners_given:  # the socket unit decides where to listen
        get_logger().warning(
            "listeners_ignored",
            tcp=[str(a) for a in config.tcp_addresses],
            udp=[str(a) for a in config.udp_addresses],
            unix=list(config.unix),
        )


class StopRequests:
    """How a server run in the foreground answers requests to stop.

    The first request (a signal, or a worker's supervisor) starts the graceful stop; a
    second signal aborts every connection, flushes the log and exits the process at
    once with :data:`EXIT_FORCED`.
    """

    def __init__(self, server: Server) -> None:
        self._server = server
        self._requested = False

    def signal(self, signum: int) -> None:
        """A stop signal: the first drains, the next forces."""
        name = signal.Signals(signum).name
        if self._requested:
            self.force(signal=name)
        else:
            self.stop(signal=name)

    def stop(self, **why: Any) -> None:
        """Start the graceful stop, unless it has started already (then nothing)."""
        if self._requested:
            return
        self._requested = True
        get_logger().info("stop_requested", **why)
        self._server.stop()

    def reload(self, **why: Any) -> None:
        """SIGHUP (or the supervisor's word): load the TLS files again; a server without
        TLS has nothing to reload and logs only the request."""
        get_logger().info("reload_requested", **why)
        self._server.reload_tls()

    def force(self, **why: Any) -> None:
        """Abort every connection and exit the process now with status 1."""
        get_logger().warning("shutdown_forced", **why)
        self._server.abort()
        flush_logs(1.0)
        sys.stderr.flush()
        os._exit(EXIT_FORCED)


async def serve_until_signal(
    server: Server,
    loop_name: str,
    *,
    handover: Handover | None = None,
    signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM),
    reload_signals: Sequence[int] = (signal.SIGHUP,),
    attach: Callable[[StopRequests], None] | None = None,
    on_serving: Callable[[], None] | None = None,
) -> None:
    """Start ``server``, log ``serving``, serve until a stop request, then stop.

    ``handover`` is what systemd passed (its notify socket gets ``READY=1``,
    ``STOPPING=1`` and the watchdog's keep-alives); ``signals`` are the ones that
    request the stop, ``reload_signals`` those that reload the TLS files; ``attach`` is
    handed the :class:`StopRequests` before anything is bound (a worker connects its
    supervisor's commands to it), and ``on_serving`` is called once the server serves.
    """
    loop = asyncio.get_running_loop()
    requests = StopRequests(server)
    notify = handover.notify if handover is not None else None
    watchdog = handover.watchdog() if handover is not None else None

    async def announce_stop() -> None:
        await server._stop_requested.wait()  # set as any stop begins
        if notify is not None:
            notify.stopping("Stopping: finishing open connections")

    # Before binding: a signal that arrives while we start still means a clean stop.
    for signum in signals:
        loop.add_signal_handler(signum, requests.signal, signum)
    for signum in reload_signals:
        name = signal.Signals(signum).name
        loop.add_signal_handler(signum, functools.partial(requests.reload, signal=name))
    if watchdog is not None:  # from the start: a start that hangs is a hung service too
        watchdog.start()
    stopping = loop.create_task(announce_stop())
    try:
        if attach is not None:
            attach(requests)
        try:
            await server.start()
        except Exception as exc:
            if notify is not None:
                notify.status(f"Failed to start: {failure_reason(exc)}")
            raise
        lifecycle_logger().info(
            "serving",
            loop=loop_name,
            handler=_name(server.config.handler),
            framing=server.config.framing,
            max_connections=server.max_connections,
            build="compiled" if BUILD.compiled else "pure",
        )
        if notify is not None:
            notify.ready(f"Serving on {', '.join(map(str, server.addresses))}")
        if on_serving is not None:
            on_serving()
        await server.serve_forever()
    finally:
        if watchdog is not None:
            watchdog.stop()
        if server._stop_requested.is_set():
            await stopping  # STOPPING=1 is out before the process ends
        else:
            stopping.cancel()
        for signum in (*signals, *reload_signals):
            # Best effort: rloop 0.5's remove_signal_handler raises AttributeError, and
            # the process ends next anyway.
            with contextlib.suppress(AttributeError, RuntimeError, NotImplementedError):
                loop.remove_signal_handler(signum)


def failure_reason(exc: BaseException) -> object:
    """What a failed start reports to systemd: an OSError's own words, else the error."""
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
