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
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

from netframe._errors import Error

if TYPE_CHECKING:
    from netframe.handlers import Handler

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "SERVER_FRAMINGS",
    "Address",
    "Config",
    "ConfigError",
    "Framing",
    "HandlerSpec",
    "LogFormat",
    "LoopName",
    "ProxyProtocol",
    "Setting",
    "parse_address",
    "parse_network",
    "parse_unix_path",
    "settings",
    "settings_markdown",
]

Framing: TypeAlias = Literal["auto", "line", "raw"]
#: A built-in loop's name, or ``module:attribute`` naming a callable that makes a loop.
LoopName: TypeAlias = str
LogFormat: TypeAlias = Literal["console", "json"]
ProxyProtocol: TypeAlias = Literal["off", "v1", "v2", "any"]
# A built-in handler's name, "module:attribute", or a callable that makes one handler.
HandlerSpec: TypeAlias = "str | Callable[[], Handler]"

#: What the client and the load generator speak.
FRAMINGS: tuple[Framing, ...] = ("auto", "line", "raw")
#: What the server frames by name; it also takes ``module:attribute`` for a user framer.
SERVER_FRAMINGS: tuple[str, ...] = (*FRAMINGS, "length")
LOOPS: tuple[LoopName, ...] = ("auto", "asyncio", "uvloop", "rloop")
LOG_FORMATS: tuple[LogFormat, ...] = ("console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
PROXY_PROTOCOLS: tuple[ProxyProtocol, ...] = ("off", "v1", "v2", "any")

# The seeds' server listens on 127.0.0.1:9999, TCP and UDP side by side.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9999

# A DNS-style host name: labels of letters, digits and hyphens.
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


class ConfigError(Error, ValueError):
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


#: The longest path a Unix socket can be bound to: ``sun_path`` holds 108 bytes on Linux,
#: the last of which ends the string (104 on the BSDs and macOS).
MAX_UNIX_PATH_BYTES: Final = 107


def parse_unix_path(text: str) -> str:
    """Check the path of a Unix-domain socket to listen on or connect to; return it.

    Raises:
        ConfigError: with a one-line reason: empty, not text, a NUL byte, a name in
            Linux's abstract namespace (``@name``, not served), or longer than a socket
            address holds.
    """
    if not isinstance(text, str) or not text:
        raise ConfigError(f"a Unix socket path must be a non-empty string, not {text!r}")
    if "\0" in text:
        raise ConfigError(f"Unix socket path {text!r} holds a NUL byte")
    if text.startswith("@"):
        raise ConfigError(
            f"Unix socket path {text!r}: abstract-namespace sockets (@name) are not served; "
            "give a file path (./@name for a file of that name)"
        )
    size = len(os.fsencode(text))
    if size > MAX_UNIX_PATH_BYTES:
        raise ConfigError(
            f"Unix socket path {text!r} is {size} bytes; a socket address holds at most "
            f"{MAX_UNIX_PATH_BYTES} (use a shorter path, or a relative one)"
        )
    return text


def _file_path(where: str, value: object) -> str:
    """A file's path as given (not opened here: the server reads it, and says why it
    cannot), checked to be non-empty text without a NUL byte."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}a file path must be a non-empty string, not {value!r}")
    if "\0" in value:
        raise ConfigError(f"{where}file path {value!r} holds a NUL byte")
    return value


def _file_mode(text: str) -> int:
    """``660``, ``0660`` or ``0o660`` -> 0o660."""
    digits = text.strip().lower().removeprefix("0o")
    if not digits or any(c not in "01234567" for c in digits):
        raise ConfigError(f"{text!r} is not an octal file mode like 660")
    mode = int(digits, 8)
    if mode > 0o777:
        raise ConfigError(f"{text!r} is not a file mode: at most 777 (rwx for all)")
    return mode


def _addresses(value: Sequence[str | Address] | None) -> tuple[Address, ...]:
    if value is None:
        return ()
    if isinstance(value, str | Address):
        value = [value]
    return tuple(a if isinstance(a, Address) else parse_address(a) for a in value)


Kind: TypeAlias = Literal[
    "address",
    "addresses",
    "ports",
    "paths",
    "mode",
    "networks",
    "text",
    "choice",
    "pluggable",
    "file",
    "count",
    "count0",
    "auto_count",
    "seconds",
    "seconds0",
]
#: Kinds whose setting holds a list: the flag is repeatable, the environment variable
#: comma-separated, the TOML value a list.
REPEATABLE_KINDS: Final[tuple[Kind, ...]] = ("addresses", "ports", "paths", "networks")
IPNetwork: TypeAlias = "ipaddress.IPv4Network | ipaddress.IPv6Network"


@dataclasses.dataclass(frozen=True, slots=True)
class Setting:
    """How one :class:`Config` field is set from text, checked and documented.

    Every setting is defined once, as a field of :class:`Config` carrying one of these:
    the command line's flags, the validation and the documentation table are all made
    from it, so adding a setting means adding one field.
    """

    #: The command-line flag, e.g. ``--idle-timeout``.
    flag: str
    #: One line for ``--help`` and the documentation.
    help: str
    #: Why the default is what it is (shown in the documentation, beside the default).
    why: str
    #: What values are allowed: ``count`` (whole number >= 1), ``count0`` (>= 0, 0 = off),
    #: ``seconds`` (> 0), ``seconds0`` (>= 0, 0 = off), ``auto_count`` (``auto`` or a
    #: count), ``choice``, ``text``, ``file`` (a path, or none), ``mode`` (an octal file
    #: mode), ``address`` (one ``HOST:PORT``, or none: off), and ``addresses``,
    #: ``ports``, ``paths`` and ``networks`` (IP addresses or networks) (repeatable).
    kind: Kind
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    #: Largest value allowed, for counts.
    upper: float = math.inf

    def parse(self, text: str) -> Any:
        """Turn one textual value (a flag's argument) into the field's value.

        Raises:
            ConfigError: a one-line reason naming the value and what was expected.
        """
        kind = self.kind
        if kind in ("address", "addresses"):
            return parse_address(text)
        if kind == "ports":
            return _whole(text, 1, 65535)
        if kind == "paths":
            return parse_unix_path(text)
        if kind == "mode":
            return _file_mode(text)
        if kind == "networks":
            return parse_network(text)
        if kind in ("count", "count0"):
            return _whole(text, 1 if kind == "count" else 0, self.upper)
        if kind == "auto_count":
            return None if text.strip().lower() == "auto" else _whole(text, 1, self.upper)
        if kind in ("seconds", "seconds0"):
            return _seconds(text, allow_zero=kind == "seconds0")
        if kind == "file":
            return _file_path("", text)
        if kind == "pluggable" and ":" in text:
            return text
        if kind in ("choice", "pluggable") and text.lower() in self.choices:
            return text.lower()
        if kind in ("choice", "pluggable"):
            more = " or module:attribute" if kind == "pluggable" else ""
            raise ConfigError(f"{text!r} is not one of {', '.join(self.choices)}{more}")
        return text

    def check(self, name: str, value: Any) -> None:
        """Check a value given in code (not text) against the same rules.

        Raises:
            ConfigError: naming the field and the rule.
        """
        kind = self.kind
        if kind == "choice" or (kind == "pluggable" and ":" not in str(value)):
            _choice(name, value, self.choices)
        elif kind in ("count", "count0") or (kind == "auto_count" and value is not None):
            lowest = 0 if kind == "count0" else 1
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be a whole number, not {value!r}")
            if not lowest <= value <= self.upper:
                top = "" if self.upper == math.inf else f" and at most {self.upper:g}"
                raise ConfigError(f"{name} must be at least {lowest}{top}, not {value!r}")
        elif kind in ("seconds", "seconds0"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{name} must be a number of seconds, not {value!r}")
            if not math.isfinite(value) or value < 0 or (value == 0 and kind == "seconds"):
                least = "0 (off) or more" if kind == "seconds0" else "more than 0"
                raise ConfigError(f"{name} must be {least} seconds, not {value!r}")
            if value > MAX_SECONDS:
                raise ConfigError(f"{name} must be at most a year, not {value!r}")
        elif kind == "paths":
            for path in value:
                try:
                    parse_unix_path(path)
                except ConfigError as exc:
                    raise ConfigError(f"{name}: {exc}") from None
        elif kind == "file":
            if value is not None:
                _file_path(f"{name}: ", value)
        elif kind == "mode":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
                shown = oct(value) if isinstance(value, int) else repr(value)
                raise ConfigError(f"{name} must be a file mode from 0o000 to 0o777, not {shown}")
        elif kind == "networks":
            for network in value:
                if not isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network):
                    raise ConfigError(f"{name} must hold IP addresses or networks, not {network!r}")
        elif kind == "address":
            if value is not None and not isinstance(value, Address):
                raise ConfigError(f"{name} must be an address like 127.0.0.1:9100, not {value!r}")
        elif kind == "ports":
            for port in value:
                if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                    raise ConfigError(f"{name} must hold ports from 1 to 65535, not {port!r}")


def parse_network(text: str) -> IPNetwork:
    """``10.0.0.0/8``, ``192.0.2.7`` (a network of one) or ``2001:db8::/32`` as an
    :mod:`ipaddress` network.

    Raises:
        ConfigError: not an address or network, or a network with host bits set.
    """
    if not isinstance(text, str):
        raise ConfigError(f"{text!r} is not an IP address or network")
    try:
        return ipaddress.ip_network(text.strip())
    except ValueError as exc:
        if "host bits set" in str(exc):
            network = ipaddress.ip_network(text.strip(), strict=False)
            raise ConfigError(
                f"{text!r} has host bits set: write {network} for the network, or the address alone"
            ) from None
        raise ConfigError(
            f"{text!r} is not an IP address or network (like 10.0.0.0/8 or 192.0.2.7)"
        ) from None


def _networks(value: object) -> tuple[IPNetwork, ...]:
    """Networks given in code: text is parsed, addresses become networks of one."""
    if isinstance(value, str | ipaddress.IPv4Network | ipaddress.IPv6Network):
        value = [value]
    if not isinstance(value, Sequence):
        raise ConfigError(f"proxy_allow must be a list of addresses or networks, not {value!r}")
    networks = []
    for item in value:
        if isinstance(item, str):
            networks.append(parse_network(item))
        elif isinstance(item, ipaddress.IPv4Address | ipaddress.IPv6Address):
            networks.append(ipaddress.ip_network(item))
        else:
            networks.append(item)
    return tuple(networks)


def _whole(text: str, lowest: int, upper: float) -> int:
    try:
        value = int(text.strip().replace("_", ""))
    except ValueError:
        raise ConfigError(f"{text!r} is not a whole number") from None
    if value < lowest:
        raise ConfigError(f"{text!r} must be at least {lowest}")
    if value > upper:
        raise ConfigError(f"{text!r} must be at most {upper:g}")
    return value


#: The longest time any setting may be (a year): longer is a typo, and clocks overflow.
MAX_SECONDS: Final = 365 * 24 * 3600.0


def _seconds(text: str, *, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        least = "0 (off) or more" if allow_zero else "more than 0"
        raise ConfigError(f"{text!r} must be {least} seconds")
    if value > MAX_SECONDS:
        raise ConfigError(f"{text!r} must be at most {MAX_SECONDS:g} seconds (a year)")
    return value


def _setting(default: Any, flag: str, help: str, why: str, kind: Kind, **more: Any) -> Any:
    """A dataclass field carrying its :class:`Setting` (the one definition of a setting)."""
    meta = {"setting": Setting(flag, help, why, kind, **more)}
    if isinstance(default, list | tuple):
        return dataclasses.field(default=tuple(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Everything a server needs to know, validated once when it is built.

    Listeners: when none of ``tcp``, ``udp`` and ``unix`` is given, the server listens on
    TCP and UDP at 127.0.0.1:9999 as the tutorial's server does; giving any of them
    replaces that default set, so ``Config(tcp=["[::1]:0"])`` listens on TCP only and
    ``Config(unix=["/run/app.sock"])`` on that socket only. Addresses may be strings
    (``"127.0.0.1:9999"``, ``"[::1]:0"``) or :class:`Address` objects.

    Each field is one setting; :func:`settings` lists them with their flags and the
    reasons for their defaults (``docs/operations.md`` shows the same table).

    Raises:
        ConfigError: on any malformed or out-of-range value, naming the setting.
    """

    tcp: Sequence[str | Address] | None = _setting(
        None, "--tcp",
        "listen on TCP here (repeatable; [::1]:9999 for IPv6; port 0 picks a free port)",
        "the tutorial's server listens on 127.0.0.1:9999; loopback until you choose otherwise",
        "addresses", metavar="HOST:PORT",
    )  # fmt: skip
    udp: Sequence[str | Address] | None = _setting(
        None, "--udp", "listen on UDP here (repeatable)",
        "the same address as TCP, as in the tutorial", "addresses", metavar="HOST:PORT",
    )  # fmt: skip
    unix: Sequence[str] = _setting(
        (), "--unix",
        "listen on a Unix-domain stream socket at this path (repeatable); served like TCP",
        "for clients on the same machine (a local proxy, a sidecar): no port to allocate, "
        "and file permissions decide who may connect", "paths", metavar="PATH",
    )  # fmt: skip
    unix_mode: int = _setting(
        0o660, "--unix-mode",
        "permissions of the Unix socket files the server creates, in octal",
        "owner and group may connect, others may not, as Docker's socket is set; add the "
        "clients' user to the service's group, or use 666 for every local user", "mode",
        metavar="OCTAL",
    )  # fmt: skip
    handler: HandlerSpec = _setting(
        "greeting", "--handler", "greeting, echo, or module:attribute",
        "the tutorial's exchange", "text",
    )  # fmt: skip
    framing: str = _setting(
        "auto", "--framing",
        "how the TCP stream is cut into messages: auto, line, raw, length, or "
        "module:attribute (your own Framer)",
        "serves both the tutorial's bare-word clients and line clients", "pluggable",
        choices=SERVER_FRAMINGS, metavar="FRAMING",
    )  # fmt: skip
    length_prefix_bytes: int = _setting(
        4, "--length-prefix", "bytes of the big-endian length prefix in length framing (2 or 4)",
        "4, as Erlang's {packet, 4} and most length-prefixed protocols; 2 for small messages",
        "count", metavar="2|4", upper=4,
    )  # fmt: skip
    loop: LoopName = _setting(
        "auto", "--loop",
        "event loop: auto (uvloop when installed), asyncio, uvloop, rloop, or "
        "module:attribute (a callable that makes a new loop)",
        "uvloop is the faster loop; asyncio is always there", "pluggable", choices=LOOPS,
        metavar="LOOP",
    )  # fmt: skip
    encoding: str = _setting(
        "utf-8", "--encoding", "text encoding of messages", "what the tutorial uses", "text",
    )  # fmt: skip
    log_format: LogFormat = _setting(
        "console", "--log-format", "log lines on stderr as console text or one JSON object each",
        "readable in a terminal; choose json for a log collector", "choice",
        choices=LOG_FORMATS,
    )  # fmt: skip
    log_level: str = _setting(
        "info", "--log-level", "lowest level logged",
        "one line when a connection opens and one when it closes", "choice",
        choices=LOG_LEVELS,
    )  # fmt: skip

    workers: int | None = _setting(
        1, "--workers",
        "server processes sharing the listeners through SO_REUSEPORT (Linux), under a "
        "supervisor that restarts them; auto: one per usable core. Caps and rate limits "
        "apply per worker",
        "one process is the simplest to run and debug, and one event loop already serves "
        "thousands of connections; more workers use more cores",
        "auto_count", metavar="N|auto", upper=1024,
    )  # fmt: skip

    max_line_bytes: int = _setting(
        65536, "--max-line-bytes",
        "longest message in line and auto framing, and largest raw chunk, in bytes",
        "without a cap one client that never sends a newline grows the server without bound. "
        "nginx reads request lines into 8 KiB buffers and HAProxy into 16 KiB; 64 KiB is far "
        "above any typed line and 10,000 full buffers still fit in under 1 GiB",
        "count", metavar="BYTES",
    )  # fmt: skip
    bare_message_delay_s: float = _setting(
        0.25, "--bare-message-delay",
        "seconds auto framing waits before a first word of 536 bytes or more, with no "
        "newline, counts as a bare message",
        "only such long first words wait: shorter ones are answered at once (TCP never "
        "cuts a write shorter than 536 bytes). Long enough for the rest of a long first "
        "line to arrive over a slow path with delayed acknowledgements (up to 200 ms)",
        "seconds", metavar="SECONDS",
    )  # fmt: skip
    idle_timeout_s: float = _setting(
        300.0, "--idle-timeout",
        "close a connection with no traffic either way for this many seconds (0: never)",
        "a silent client holds a descriptor and memory forever otherwise. nginx keeps idle "
        "keep-alive connections 75 s and its stream proxy 10 min, uvicorn 5 s, Envoy's TCP "
        "proxy 1 h; connections here are long-lived sessions, so 5 min",
        "seconds0", metavar="SECONDS",
    )  # fmt: skip
    message_timeout_s: float = _setting(
        30.0, "--message-timeout",
        "a message whose first byte has arrived must be complete within this many seconds "
        "(0: no limit)",
        "stops slowloris clients that trickle a byte at a time to stay under the idle "
        "timeout. nginx allows 60 s for a request's header, HAProxy's documentation "
        "suggests 10 s for a whole request; a typed line needs no more than 30 s",
        "seconds0", metavar="SECONDS",
    )  # fmt: skip
    max_connections: int | None = _setting(
        None, "--max-connections",
        "most TCP connections open at once, per worker process; auto: what the open-file "
        "limit allows",
        "past the open-file limit accept() fails and the server can no longer even say "
        "no. HAProxy also derives its maxconn from the limit; auto is the soft limit "
        "less the descriptors open at start and a reserve",
        "auto_count", metavar="N|auto",
    )  # fmt: skip
    max_per_ip: int = _setting(
        0, "--max-per-ip",
        "most TCP connections open at once from one client address, per worker process "
        "(0: no limit)",
        "off, as nginx's limit_conn is: many users can share one address behind NAT",
        "count0", metavar="N",
    )  # fmt: skip
    write_buffer_high_bytes: int = _setting(
        256 * 1024, "--write-buffer",
        "bytes of unsent replies at which the server stops reading from that client",
        "bounds what a client that sends but never reads can make the server hold; 256 KiB "
        "is what a fast reader never reaches (asyncio's own default is 64 KiB)",
        "count", metavar="BYTES",
    )  # fmt: skip
    write_buffer_low_bytes: int = _setting(
        64 * 1024, "--write-buffer-low",
        "bytes of unsent replies below which reading resumes",
        "a quarter of the high mark, so reading does not flap on and off", "count0",
        metavar="BYTES",
    )  # fmt: skip
    send_timeout_s: float = _setting(
        30.0, "--send-timeout",
        "abort a connection whose client has not read for this many seconds while replies "
        "wait (0: never)",
        "a client that never reads would otherwise hold its buffers until the idle "
        "timeout; nginx's send_timeout is 60 s, HAProxy closes at its client timeout",
        "seconds0", metavar="SECONDS",
    )  # fmt: skip
    backlog: int = _setting(
        1024, "--backlog", "connections the kernel queues per TCP listener before accept",
        "the tutorial's 5 drops connections under any burst; the kernel caps it at "
        "net.core.somaxconn anyway", "count", metavar="N", upper=65535,
    )  # fmt: skip
    max_pending_messages: int = _setting(
        64, "--max-pending-messages",
        "messages queued behind an async handler before reading from that client pauses",
        "keeps a pipelining client from queueing without bound behind a slow lookup",
        "count", metavar="N",
    )  # fmt: skip
    shutdown_timeout_s: float = _setting(
        10.0, "--shutdown-timeout",
        "seconds a graceful stop lets connections finish their message before aborting them",
        "long enough to finish a message and flush replies, well inside the 30 s Kubernetes "
        "and 90 s systemd wait before SIGKILL; gunicorn's default is 30 s",
        "seconds", metavar="SECONDS",
    )  # fmt: skip
    udp_max_datagram_bytes: int = _setting(
        1472, "--udp-max-datagram",
        "largest UDP datagram answered, and largest reply sent, in bytes",
        "1500-byte Ethernet less the IPv4 and UDP headers: nothing larger travels "
        "unfragmented, and fragments are a classic attack tool. DNS chose 1,232 for the "
        "same reason", "count", metavar="BYTES", upper=65507,
    )  # fmt: skip
    udp_rate: int = _setting(
        100, "--udp-rate",
        "datagrams answered per second per source address, with a burst of as many, per "
        "worker process (0: no limit)",
        "a UDP source address can be forged: the limit keeps the server from being aimed "
        "at a victim or at another server, as DNS response-rate limiting does; a person "
        "or a well-behaved client stays far below 100 a second",
        "count0", metavar="N",
    )  # fmt: skip
    udp_rate_sources: int = _setting(
        16384, "--udp-rate-sources",
        "source addresses the UDP rate limit remembers at once, per worker process",
        "bounds the limiter's memory (about 200 bytes a source, 3 MiB in all) however many "
        "addresses a flood forges", "count", metavar="N",
    )  # fmt: skip
    udp_receive_buffer_bytes: int = _setting(
        4 * 1024 * 1024, "--udp-receive-buffer",
        "kernel receive buffer asked for each UDP listener, in bytes",
        "absorbs bursts so a flood from one source does not crowd out others' datagrams "
        "before the rate limit sees them; Unbound recommends 4 MiB (so-rcvbuf). Above "
        "net.core.rmem_max only when run with privilege", "count", metavar="BYTES",
    )  # fmt: skip
    udp_allow_ports: tuple[int, ...] = _setting(
        (), "--udp-allow-port",
        "answer UDP datagrams from this source port below 1024 too (repeatable)",
        "ports below 1024 are services (DNS 53, NTP 123): a datagram from one is forged to "
        "aim our reply at that service, so none is answered unless allowed", "ports",
        metavar="PORT",
    )  # fmt: skip
    proxy_protocol: ProxyProtocol = _setting(
        "off", "--proxy-protocol",
        "expect a PROXY protocol header from the load balancer on every TCP connection: "
        "v1 (text), v2 (binary) or any (either); needs --proxy-allow",
        "a header is a claim about who the client is, believable only on a port that only "
        "the load balancer reaches: the server must be told, never guess (HAProxy's "
        "specification)", "choice", choices=PROXY_PROTOCOLS,
    )  # fmt: skip
    proxy_allow: Sequence[str | IPNetwork] = _setting(
        (), "--proxy-allow",
        "a load balancer's address or network (10.0.0.0/8) allowed to send PROXY headers "
        "(repeatable); connections from anywhere else are closed",
        "none: whoever may send a header may claim any client address, so the trusted "
        "balancers must be named", "networks", metavar="ADDRESS|NETWORK",
    )  # fmt: skip
    proxy_timeout_s: float = _setting(
        5.0, "--proxy-timeout",
        "seconds a connection has to deliver its PROXY header before it is closed",
        "a balancer sends the header at once; the specification asks for at least 3 s so "
        "a lost first segment can be retransmitted", "seconds", metavar="SECONDS",
    )  # fmt: skip
    tls_cert: str | None = _setting(
        None, "--tls-cert",
        "serve TLS on every TCP and Unix listener with this certificate (PEM, the "
        "intermediate certificates after it); reloaded on SIGHUP",
        "none: a certificate is yours to give; without one the server speaks plain TCP, "
        "as the tutorial's does", "file", metavar="FILE",
    )  # fmt: skip
    tls_key: str | None = _setting(
        None, "--tls-key",
        "the certificate's private key (PEM, not encrypted); none: it is in the "
        "--tls-cert file",
        "none: one file holding both is common (HAProxy's crt takes one)", "file",
        metavar="FILE",
    )  # fmt: skip
    tls_client_ca: str | None = _setting(
        None, "--tls-client-ca",
        "require every TLS client to present a certificate signed by a CA in this PEM "
        "file; handlers see it as conn.tls.peer_certificate",
        "none: clients are not asked for certificates, as on most servers; only the "
        "CAs named here are trusted, never the system's", "file", metavar="FILE",
    )  # fmt: skip
    tls_handshake_timeout_s: float = _setting(
        10.0, "--tls-handshake-timeout",
        "seconds a TLS client has to complete its handshake before it is closed",
        "a handshake is two round trips: 10 s is ample over a slow mobile path, and "
        "connections that never finish cannot pile up (asyncio's own default is 60 s; "
        "Go's HTTP client allows 10 s)", "seconds", metavar="SECONDS",
    )  # fmt: skip
    metrics: str | Address | None = _setting(
        None, "--metrics",
        "serve Prometheus metrics over HTTP at this address, path /metrics (needs the "
        "metrics extra: pip install 'netframe[metrics]'); with workers the supervisor "
        "serves the sum of all of them",
        "off: the figures are for the operators only, so where they are served must be "
        "chosen (a private interface or loopback; 9100 is node_exporter's port, so "
        "another, such as 9109)", "address", metavar="HOST:PORT",
    )  # fmt: skip

    # The listen addresses, parsed from `tcp` and `udp` with the default set applied.
    tcp_addresses: tuple[Address, ...] = dataclasses.field(init=False)
    udp_addresses: tuple[Address, ...] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        tcp: tuple[Address, ...]
        udp: tuple[Address, ...]
        unix = (self.unix,) if isinstance(self.unix, str) else tuple(self.unix or ())
        object.__setattr__(self, "unix", unix)
        if not self.listeners_given:
            tcp = udp = (Address(DEFAULT_HOST, DEFAULT_PORT),)
        else:
            tcp, udp = _addresses(self.tcp), _addresses(self.udp)
        object.__setattr__(self, "tcp_addresses", tcp)
        object.__setattr__(self, "udp_addresses", udp)
        if not self.tcp_addresses and not self.udp_addresses and not unix:
            raise ConfigError("no listeners: give at least one tcp, udp or unix address")
        object.__setattr__(self, "log_level", str(self.log_level).lower())
        object.__setattr__(self, "udp_allow_ports", tuple(self.udp_allow_ports))
        object.__setattr__(self, "proxy_allow", _networks(self.proxy_allow))
        for name in ("tls_cert", "tls_key", "tls_client_ca"):  # a pathlib.Path as its text
            if isinstance(getattr(self, name), os.PathLike):
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        if isinstance(self.metrics, str):
            object.__setattr__(self, "metrics", parse_address(self.metrics))
        for name, setting in _SETTINGS.items():
            setting.check(name, getattr(self, name))
        try:
            codecs.lookup(self.encoding)
        except (LookupError, TypeError):
            raise ConfigError(f"unknown encoding {self.encoding!r}") from None
        if not (isinstance(self.handler, str) or callable(self.handler)):
            raise ConfigError(f"handler must be a name or a callable, not {self.handler!r}")
        if self.length_prefix_bytes not in (2, 4):
            prefix = self.length_prefix_bytes
            raise ConfigError(f"length_prefix_bytes must be 2 or 4, not {prefix!r}")
        if self.proxy_protocol != "off" and not self.proxy_allow:
            raise ConfigError(
                "proxy_protocol (--proxy-protocol) needs proxy_allow (--proxy-allow): the "
                "addresses or networks of the load balancers that may send the header"
            )
        for name, flag in (("tls_key", "--tls-key"), ("tls_client_ca", "--tls-client-ca")):
            if getattr(self, name) is not None and self.tls_cert is None:
                raise ConfigError(f"{name} ({flag}) needs tls_cert (--tls-cert)")
        if self.write_buffer_low_bytes > self.write_buffer_high_bytes:
            raise ConfigError(
                "write_buffer_low_bytes (--write-buffer-low) must not be above "
                "write_buffer_high_bytes (--write-buffer)"
            )

    @property
    def metrics_address(self) -> Address | None:
        """Where ``metrics`` are served (``None``: off), as an :class:`Address`."""
        return self.metrics if isinstance(self.metrics, Address) else None

    @property
    def listeners_given(self) -> bool:
        """Whether any of ``tcp``, ``udp`` and ``unix`` was given; if none was, the
        default set (TCP and UDP at 127.0.0.1:9999) applies."""
        return self.tcp is not None or self.udp is not None or bool(self.unix)

    def replace(self, **changes: Any) -> Config:
        """Return a copy with ``changes`` applied and validated again."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        **settings: Any,
    ) -> Config:
        """Settings from a TOML file, then ``NETFRAME_*`` environment variables, then
        ``settings``, each over the one before and all over the defaults.

        ``path`` is the file (``None``: the one ``$NETFRAME_CONFIG`` names, if any), with
        field names as keys (``idle_timeout_s = 60``). ``environ`` defaults to
        ``os.environ``; a variable is ``NETFRAME_`` and the field name in capitals
        (``NETFRAME_IDLE_TIMEOUT_S=60``), with repeatable settings comma-separated.
        Pass ``environ={}`` to ignore the environment.

        Raises:
            ConfigError: naming the file or variable, the key and the reason.
        """
        from netframe._sources import load_config  # it builds on this module

        return load_config(path, environ, settings)


#: Every setting, by field name, in the order :class:`Config` defines them.
_SETTINGS: dict[str, Setting] = {
    field.name: field.metadata["setting"]
    for field in dataclasses.fields(Config)
    if "setting" in field.metadata
}


def settings() -> dict[str, Setting]:
    """Every :class:`Config` setting by field name, in definition order."""
    return dict(_SETTINGS)


def default_text(name: str) -> str:
    """A setting's default as the command line would write it (``auto``, ``off``, ...)."""
    setting = _SETTINGS[name]
    value = _DEFAULTS[name]
    if value is None:
        if setting.kind == "file":
            return "none"
        if setting.kind == "address":
            return "off"
        return "auto" if setting.kind == "auto_count" else "127.0.0.1:9999 (TCP and UDP)"
    if setting.kind == "mode":
        return f"{value:04o}"
    if value == () or (value == 0 and setting.kind in ("count0", "seconds0")):
        return "off" if value == 0 else "none"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


_DEFAULTS: dict[str, Any] = {
    field.name: field.default for field in dataclasses.fields(Config) if field.name in _SETTINGS
}


def settings_markdown() -> str:
    """The table of settings that ``docs/operations.md`` shows (kept equal by a test)."""
    rows = [
        "| setting | flag | default | what it does | why this default |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, setting in _SETTINGS.items():
        flag = setting.flag + (f" {setting.metavar}" if setting.metavar else "")
        flag = flag.replace("|", "\\|")  # a pipe would end the table cell
        rows.append(
            f"| `{name}` | `{flag}` | {default_text(name)} | {setting.help} | {setting.why} |"
        )
    return "\n".join(rows) + "\n"


def _choice(name: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        choices = ", ".join(map(str, allowed))
        raise ConfigError(f"{name} must be one of {choices}, not {value!r}")
