"""TLS in front of the stream endpoints: the server's context, its reload, and the gate
that runs each connection's handshake before the endpoint exists.

With ``tls_cert`` set, every TCP and Unix listener's protocol factory makes a
:class:`TlsGate` instead of the endpoint (behind a :class:`~netframe._proxy_gate.ProxyGate`
when the PROXY protocol is on too: the header comes first, in clear). The gate owns the
connection only for the handshake:

- at ``connection_made`` it applies the connection cap (handshakes in progress count),
  stops reading and hands the plain transport to ``loop.start_tls`` with the context in
  force (a reload swaps it for the next handshake, never for a connection's own), and
  starts the handshake's deadline (``tls_handshake_timeout_s``); bytes the PROXY gate read
  past its header are handed to the TLS protocol before it reads anything else;
- when the handshake is done it makes the endpoint (:class:`TlsEndpoint`), gives it what
  TLS negotiated (``conn.tls``) and the PROXY header's addresses, moves the encrypted
  transport to it and calls its ``connection_made``: from there the walk is a plain
  connection's, on decrypted bytes;
- a handshake that fails or times out is counted like the other refused connections
  (``connections_refused`` with reason ``tls_handshake_failed`` or
  ``tls_handshake_timeout``, logged at once with the peer and the error, then at most once
  a second per reason with the count), and the connection is closed before any handler
  exists.

Nothing of this touches a plain connection: without ``tls_cert`` no gate is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import weakref
from collections.abc import Callable
from typing import Any, Final

from netframe._endpoint import REFUSED_EVENT, EndpointContext, format_peer
from netframe.config import Config, ConfigError
from netframe.handlers import CloseReason, PeerAddress, TlsInfo
from netframe.handlers._interface import Network
from netframe.tcp import TcpEndpoint

__all__ = [
    "HANDSHAKE_FAILED",
    "HANDSHAKE_TIMEOUT",
    "TlsEndpoint",
    "TlsGate",
    "TlsGates",
    "server_context",
]

#: The ``reason`` of ``connections_refused`` for a handshake that failed, or was not done
#: in time.
HANDSHAKE_FAILED: Final = "tls_handshake_failed"
HANDSHAKE_TIMEOUT: Final = "tls_handshake_timeout"
#: asyncio's own handshake deadline is set this much past ours, so ours always fires
#: first and the refusal is logged the same way on every loop.
_LOOP_DEADLINE_MARGIN_S: Final = 5.0
#: Proxied addresses a PROXY header named: (client, destination, balancer).
Proxied = tuple[PeerAddress | None, PeerAddress | None, PeerAddress | None]


class _EncryptedKey(Exception):
    """OpenSSL asked for a password: the key file is encrypted."""


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal and wait for an answer.
    raise _EncryptedKey


def server_context(config: Config) -> ssl.SSLContext:
    """The server's SSL context, from ``tls_cert``, ``tls_key`` and ``tls_client_ca``.

    TLS 1.2 at least, the standard library's server defaults (its cipher list, no
    compression, no client-initiated renegotiation); with ``tls_client_ca``, a client
    certificate is required and only the CAs of that file are trusted for it.

    Raises:
        ConfigError: a file cannot be read, holds no certificate or key, the key is
            encrypted, or the certificate and the key do not belong together; in one
            line naming the file and the flag.
    """
    cert, key, client_ca = config.tls_cert, config.tls_key, config.tls_client_ca
    if cert is None:
        raise ConfigError("tls_cert (--tls-cert) is not set")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    what = f"the TLS certificate {cert} (--tls-cert)" + (
        f" and key {key} (--tls-key)" if key else ""
    )
    for path, flag in ((cert, "--tls-cert"), (key, "--tls-key"), (client_ca, "--tls-client-ca")):
        if path is not None:
            _readable(path, flag)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except _EncryptedKey:
        raise ConfigError(
            f"cannot load {what}: the key is encrypted; give an unencrypted key "
            "(openssl pkey -in KEY -out PLAIN)"
        ) from None
    except ssl.SSLError as exc:
        raise ConfigError(f"cannot load {what}: {_ssl_reason(exc)}") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"cannot load the client CA file {client_ca} (--tls-client-ca): {_ssl_reason(exc)}"
            ) from None
        if not context.get_ca_certs():
            raise ConfigError(
                f"the client CA file {client_ca} (--tls-client-ca) holds no CA certificate"
            )
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _readable(path: str, flag: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({flag}): {exc.strerror or exc}") from None


def _ssl_reason(exc: ssl.SSLError) -> str:
    """``[X509: KEY_VALUES_MISMATCH] key values mismatch (_ssl.c:3921)`` -> ``key values
    mismatch``; OpenSSL's reason code in words when that is all there is."""
    reason = getattr(exc, "reason", None)
    if reason == "KEY_VALUES_MISMATCH":
        return "the key does not belong to the certificate"
    if reason in ("PEM_LIB", "NO_START_LINE", None) or not isinstance(reason, str):
        return "not a PEM certificate and key (or a part of them is missing)"
    return reason.lower().replace("_", " ")


def describe_failure(exc: BaseException | None) -> str:
    """A failed handshake's error in words, for the log line."""
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None)
        if isinstance(reason, str):
            return reason.lower().replace("_", " ")
        return str(exc)
    if exc is None or isinstance(exc, ConnectionError | EOFError):
        return "the connection closed during the handshake"
    return str(exc) or type(exc).__name__


class TlsEndpoint(asyncio.BufferedProtocol):
    """The protocol of a TLS connection once its handshake is done: a
    :class:`~netframe.tcp.TcpEndpoint` behind it, read through
    ``get_buffer``/``buffer_updated`` on both loops (their TLS transports then decrypt
    straight into the server's shared read buffer, where a plain ``Protocol`` gets a new
    256 KiB ``bytes`` per read), with an ``eof_received`` that never asks to stay open:
    asyncio's and uvloop's TLS transports close after the client's ``close_notify``
    whatever it answers (and warn when asked otherwise).

    A Python class in front of the compiled endpoint, which cannot subclass
    ``asyncio.BufferedProtocol``.
    """

    __slots__ = ("_buffer", "endpoint")

    def __init__(self, ctx: EndpointContext, network: Network) -> None:
        self.endpoint = TcpEndpoint(ctx, network)
        self._buffer = ctx.read_buffer

    def connection_made(self, transport: Any) -> None:
        self.endpoint.connection_made(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.endpoint.data_received(self._buffer[:nbytes].tobytes())

    def eof_received(self) -> bool:
        self.endpoint.eof_received()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.endpoint.connection_lost(exc)

    def pause_writing(self) -> None:
        self.endpoint.pause_writing()

    def resume_writing(self) -> None:
        self.endpoint.resume_writing()


class TlsGates:
    """What the handshakes of one server share: the context in force, its deadline, the
    handshakes in progress, and the server names clients asked for (SNI)."""

    def __init__(self, ctx: EndpointContext, context: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.timeout_s = ctx.config.tls_handshake_timeout_s
        #: Connections whose handshake has not finished.
        self.waiting: set[TlsGate] = set()
        # The name each handshake's ClientHello asked for, read back at the hand-over.
        self.server_names: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self.context = context
        self.use(context)

    def use(self, context: ssl.SSLContext) -> None:
        """Serve new handshakes with ``context`` (a reload); those under way keep theirs."""
        context.sni_callback = self._server_name
        self.context = context

    def _server_name(self, ssl_object: Any, name: str | None, context: ssl.SSLContext) -> None:
        if name:
            self.server_names[ssl_object] = name

    def factory(self, network: Network) -> Callable[[], TlsGate]:
        """The listener's protocol factory: a gate in front of each endpoint."""
        return lambda: TlsGate(self, network)

    def close_all(self) -> None:
        """The server is stopping: handshakes in progress have no handler and nothing to
        finish, so they close now."""
        for gate in list(self.waiting):
            gate.close()


class TlsGate(asyncio.Protocol):
    """One connection until its TLS handshake is done; see the module's docstring.

    It is the transport's protocol until ``start_tls`` takes the transport (bytes read
    meanwhile are the handshake's, handed to the TLS protocol), and then the TLS
    protocol's application protocol until the hand-over, which happens at the first
    decrypted bytes or when ``start_tls`` returns, whichever comes first.
    """

    __slots__ = (
        "_done",
        "_eof",
        "_gates",
        "_held",
        "_lost",
        "_network",
        "_plain",
        "_proxied",
        "_read",
        "_task",
        "_timer",
        "_wrapped",
    )

    def __init__(
        self, gates: TlsGates, network: Network = "tcp", proxied: Proxied | None = None
    ) -> None:
        self._gates = gates
        self._network = network
        self._proxied = proxied
        self._plain: Any = None
        self._task: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        # Bytes read from the plain transport before start_tls took it (the start of
        # the handshake), and decrypted bytes that came before the hand-over.
        self._read: list[bytes] = []
        self._held: list[bytes] = []
        self._wrapped = False  # start_tls has the transport: what comes is decrypted
        self._eof = False
        self._lost = False
        self._done = False

    # -- the plain transport's protocol, until start_tls takes it -----------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.begin(transport)

    def begin(self, transport: Any, rest: bytes = b"") -> None:
        """Start the handshake on ``transport`` (plain); ``rest`` is what was read from
        it already (by the PROXY gate, after the header): the start of the handshake."""
        self._plain = transport
        gates = self._gates
        ctx = gates.ctx
        if ctx.stopping:
            self._done = True
            transport.close()
            return
        if len(ctx.connections) + len(gates.waiting) >= ctx.max_connections:
            # Nothing can be said before the handshake: the client sees the close.
            self._done = True
            transport.abort()
            ctx.refused(CloseReason.MAX_CONNECTIONS.value)
            return
        if rest:
            self._read.append(rest)
        if transport.get_protocol() is not self:  # handed over by the PROXY gate
            transport.set_protocol(self)
        gates.waiting.add(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(gates.timeout_s, self._timed_out)
        starting = loop.start_tls(
            transport, self, gates.context, server_side=True,
            ssl_handshake_timeout=gates.timeout_s + _LOOP_DEADLINE_MARGIN_S,
        )  # fmt: skip
        self._task = loop.create_task(starting)
        self._task.add_done_callback(self._handshake_done)
        # Runs after the task's first step, in which start_tls pauses reading and makes
        # its TLS protocol the transport's, and before that protocol's connection_made.
        loop.call_soon(self._taken)

    def _taken(self) -> None:
        """start_tls has the transport: hand its TLS protocol the bytes read so far
        (both loops' TLS protocols keep bytes given before their connection_made)."""
        self._wrapped = True
        protocol = self._plain.get_protocol()
        if protocol is self or self._done or not self._read:
            return
        view = memoryview(b"".join(self._read))
        self._read.clear()
        while view:
            buffer = protocol.get_buffer(len(view))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            protocol.buffer_updated(size)
            view = view[size:]

    # -- then the TLS transport's application protocol, until the hand-over -------------

    def data_received(self, data: bytes) -> None:
        if not self._wrapped:
            # uvloop starts reading after connection_made whatever it did, so the first
            # bytes of the handshake may come here before start_tls takes the transport.
            self._read.append(data)
            return
        # Decrypted: the handshake is done and start_tls has not returned yet.
        protocol = self._early_hand_over()
        if protocol is None:
            self._held.append(data)
        else:
            protocol.endpoint.data_received(data)

    def eof_received(self) -> bool:
        protocol = self._early_hand_over() if self._wrapped else None
        if protocol is None:
            self._eof = True
        else:
            protocol.eof_received()
        return False

    def _early_hand_over(self) -> TlsEndpoint | None:
        """Hand over now, from inside the TLS protocol's read: the loops pass decrypted
        bytes on before ``start_tls`` returns (asyncio in the very call that ends the
        handshake). A client whose Finished, first messages and ``close_notify`` arrive
        in one read would otherwise get no reply at all, since the TLS transport drops
        every write once it has seen ``close_notify``. The transport is taken from the
        TLS protocol (``_get_app_transport``, which asyncio's and uvloop's both have, and
        which ``start_tls`` returns later too); a loop without it gets the bytes held
        until ``start_tls`` returns."""
        if self._done:
            return None
        getter = getattr(self._plain.get_protocol(), "_get_app_transport", None)
        return None if getter is None else self._hand_over(getter())

    def connection_lost(self, exc: Exception | None) -> None:
        if self._done:
            return
        if self._wrapped:  # the handshake's own end says what happened
            self._lost = True
        else:
            self._refuse(HANDSHAKE_FAILED, describe_failure(exc))

    # -- the handshake's end ------------------------------------------------------------

    def _handshake_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if self._done:  # timed out or closed meanwhile: already said
            return
        if exc is not None:
            self._refuse(HANDSHAKE_FAILED, describe_failure(exc))
            return
        transport = task.result()
        if transport is None or self._lost or transport.is_closing():
            # Reset or closed the instant the handshake ended: nothing to serve.
            self._finish()
            return
        self._hand_over(transport)

    def _timed_out(self) -> None:
        self._timer = None
        if not self._done:
            self._refuse(
                HANDSHAKE_TIMEOUT,
                f"no TLS handshake within {self._gates.timeout_s:g} s",
            )

    def close(self) -> None:
        """Close without a word (the server is stopping)."""
        self._finish()
        self._stop()

    def _stop(self) -> None:
        if self._plain is not None:
            self._plain.abort()
        if self._task is not None:
            self._task.cancel()

    def _finish(self) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._gates.waiting.discard(self)

    def _refuse(self, reason: str, error: str) -> None:
        self._finish()
        self._stop()
        ctx = self._gates.ctx
        total = ctx.summary.add(reason, ctx.now)
        if total is not None:
            ctx.log.warning(
                REFUSED_EVENT, reason=reason, refused=total, transport=self._network,
                peer=self._peer(), error=error,
            )  # fmt: skip

    def _peer(self) -> str:
        if self._proxied is not None and self._proxied[0] is not None:
            return format_peer(self._proxied[0])
        try:
            raw = self._plain.get_extra_info("peername") if self._plain else None
        except OSError:  # uvloop asks the socket, which may be closed already
            raw = None
        if isinstance(raw, str | bytes):
            return "unix"
        return format_peer(raw)

    def _hand_over(self, transport: Any) -> TlsEndpoint:
        self._finish()
        protocol = TlsEndpoint(self._gates.ctx, self._network)
        endpoint = protocol.endpoint
        if self._proxied is not None:
            endpoint.set_proxied(*self._proxied)
        ssl_object = transport.get_extra_info("ssl_object")
        endpoint.tls = tls_info(ssl_object, self._gates.server_names.pop(ssl_object, None))
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._held and not transport.is_closing():
            endpoint.data_received(b"".join(self._held))
        self._held.clear()
        if self._eof:
            protocol.eof_received()
        return protocol


def tls_info(ssl_object: Any, server_name: str | None) -> TlsInfo:
    """What a finished handshake negotiated, as the handler sees it."""
    if ssl_object is None:
        return TlsInfo(version="", cipher="")
    cipher = ssl_object.cipher()
    certificate = None
    with contextlib.suppress(ValueError):  # no certificate was asked for
        certificate = ssl_object.getpeercert() or None
    return TlsInfo(
        version=ssl_object.version() or "",
        cipher=cipher[0] if cipher else "",
        peer_certificate=certificate,
        server_name=server_name,
    )
