"""The one validated, immutable settings object, and the single source of every default.

Every limit the server enforces is a named field here, with the reason for its default
beside it. The command line maps one flag to one field; library users build a
:class:`Config` directly. Later features (timeouts, caps, TLS) add fields here, so
nothing else has to learn a new place to look.
"""

from __future__ import annotations

import codecs
import dataclasses
import ipaddress
import math
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

if TYPE_CHECKING:
    from netframe.handlers import Handler

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "Address",
    "Config",
    "ConfigError",
    "Framing",
    "HandlerSpec",
    "LogFormat",
    "LoopName",
    "parse_address",
]

Framing: TypeAlias = Literal["auto", "line", "raw"]
LoopName: TypeAlias = Literal["auto", "asyncio", "uvloop"]
LogFormat: TypeAlias = Literal["console", "json"]
# A built-in handler's name, "module:attribute", or a callable that makes one handler.
HandlerSpec: TypeAlias = "str | Callable[[], Handler]"

FRAMINGS: tuple[Framing, ...] = ("auto", "line", "raw")
LOOPS: tuple[LoopName, ...] = ("auto", "asyncio", "uvloop")
LOG_FORMATS: tuple[LogFormat, ...] = ("console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

# The seeds' server listens on 127.0.0.1:9999, TCP and UDP side by side.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9999

# A DNS-style host name: labels of letters, digits and hyphens.
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


class ConfigError(ValueError):
    """A setting is malformed or out of range; the message says which and why."""


@dataclasses.dataclass(frozen=True, slots=True)
class Address:
    """A host and port to listen on or connect to.

    ``host`` is an IPv4 or IPv6 literal (without brackets) or a host name; port 0 asks
    the system for a free port.
    """

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """Parse ``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (the default host) into an Address.

    Raises:
        ConfigError: with a one-line reason when the text is not a valid address.
    """
    if not isinstance(text, str):
        raise ConfigError(f"address must be a string like 127.0.0.1:9999, not {text!r}")
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ConfigError(f"malformed address {text!r}: expected [IPV6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(
                f"malformed address {text!r}: {host!r} is not an IPv6 address"
            ) from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(f"malformed address {text!r}: expected HOST:PORT")
        host = host or DEFAULT_HOST
        if ":" in host:
            raise ConfigError(f"malformed address {text!r}: write IPv6 hosts as [HOST]:PORT")
        if not _is_host(host):
            raise ConfigError(f"malformed address {text!r}: {host!r} is not a valid host")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"malformed address {text!r}: port must be a number from 0 to 65535")
    return Address(host, int(port_text))


def _is_host(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        # Looks like a dotted quad but is not one (999.1.1.1): reject rather than resolve.
        return not re.fullmatch(r"[\d.]+", host) and bool(_HOSTNAME.match(host))
    return True


def _addresses(value: Sequence[str | Address] | None) -> tuple[Address, ...]:
    if value is None:
        return ()
    if isinstance(value, str | Address):
        value = [value]
    return tuple(a if isinstance(a, Address) else parse_address(a) for a in value)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Everything a server needs to know, validated once when it is built.

    Listeners: when neither ``tcp`` nor ``udp`` is given, the server listens on both at
    127.0.0.1:9999 as the seeds do; giving either replaces that default set, so
    ``Config(tcp=["[::1]:0"])`` listens on TCP only. Addresses may be strings
    (``"127.0.0.1:9999"``, ``"[::1]:0"``) or :class:`Address` objects.

    Raises:
        ConfigError: on any malformed or out-of-range value, naming the setting.
    """

    tcp: Sequence[str | Address] | None = None
    udp: Sequence[str | Address] | None = None
    handler: HandlerSpec = "greeting"
    framing: Framing = "auto"
    loop: LoopName = "auto"
    encoding: str = "utf-8"
    log_format: LogFormat = "console"
    log_level: str = "info"

    # A line longer than this is refused: without a cap, one client that never sends a
    # newline could make the server buffer without bound. 64 KiB is far above any
    # human-typed line and small enough that 10,000 such buffers fit in under 1 GiB.
    max_line_bytes: int = 65536

    # How long `auto` framing waits for a newline before it treats unterminated bytes as
    # one bare message (the seeds' clients send bare words). A line split across two
    # reads arrives well within this on any real network; a bare-word client pays it
    # once, on its first message, after which the connection is known to be bare.
    bare_message_delay_s: float = 0.05

    # Write-buffer marks: above `high`, the server stops reading from that client until
    # its pending replies drain below `low`. This is what keeps a client that sends but
    # never reads from growing the server's memory without bound.
    write_buffer_high_bytes: int = 256 * 1024
    write_buffer_low_bytes: int = 64 * 1024

    # Connections the kernel may hold for us before accept(). The seeds' 5 drops
    # connections under any burst; the kernel caps this at net.core.somaxconn anyway.
    backlog: int = 1024

    # Messages queued for an async handler before reading from that client pauses.
    max_pending_messages: int = 64

    # How long a graceful stop waits for replies to drain before closing connections hard.
    shutdown_timeout_s: float = 5.0

    # The listen addresses, parsed from `tcp` and `udp` with the default set applied.
    tcp_addresses: tuple[Address, ...] = dataclasses.field(init=False)
    udp_addresses: tuple[Address, ...] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        tcp: tuple[Address, ...]
        udp: tuple[Address, ...]
        if self.tcp is None and self.udp is None:
            tcp = udp = (Address(DEFAULT_HOST, DEFAULT_PORT),)
        else:
            tcp, udp = _addresses(self.tcp), _addresses(self.udp)
        object.__setattr__(self, "tcp_addresses", tcp)
        object.__setattr__(self, "udp_addresses", udp)
        if not self.tcp_addresses and not self.udp_addresses:
            raise ConfigError("no listeners: give at least one tcp or udp address")
        _choice("framing", self.framing, FRAMINGS)
        _choice("loop", self.loop, LOOPS)
        _choice("log_format", self.log_format, LOG_FORMATS)
        object.__setattr__(self, "log_level", str(self.log_level).lower())
        _choice("log_level", self.log_level, LOG_LEVELS)
        try:
            codecs.lookup(self.encoding)
        except (LookupError, TypeError):
            raise ConfigError(f"unknown encoding {self.encoding!r}") from None
        if not (isinstance(self.handler, str) or callable(self.handler)):
            raise ConfigError(f"handler must be a name or a callable, not {self.handler!r}")
        _positive("max_line_bytes", self.max_line_bytes)
        _positive("bare_message_delay_s", self.bare_message_delay_s)
        _positive("write_buffer_high_bytes", self.write_buffer_high_bytes)
        _positive("max_pending_messages", self.max_pending_messages)
        _positive("backlog", self.backlog, upper=65535)
        _positive("shutdown_timeout_s", self.shutdown_timeout_s)
        if not 0 <= self.write_buffer_low_bytes <= self.write_buffer_high_bytes:
            raise ConfigError("write_buffer_low_bytes must be between 0 and the high mark")

    def replace(self, **changes: Any) -> Config:
        """Return a copy with ``changes`` applied and validated again."""
        return dataclasses.replace(self, **changes)


def _choice(name: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        choices = ", ".join(map(str, allowed))
        raise ConfigError(f"{name} must be one of {choices}, not {value!r}")


def _positive(name: str, value: float, upper: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a positive number, not {value!r}")
    if not (0 < value <= upper and math.isfinite(value)):
        limit = "" if upper == math.inf else f" up to {upper:g}"
        raise ConfigError(f"{name} must be a positive finite number{limit}, not {value!r}")
