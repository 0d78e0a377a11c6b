"""The PROXY protocol, versions 1 and 2: a pure parser, encoders, and the trusted-source check.

A load balancer that relays TCP (HAProxy, nginx's stream module, cloud load balancers)
can prepend one header to each connection naming the client it relays for, so that the
server sees the real client instead of the balancer. HAProxy's specification
(``doc/proxy-protocol.txt``) defines two forms: a line of text (v1, at most 107 bytes)
and a binary block (v2, a 16-byte fixed part, the addresses and optional
type-length-value fields, "TLVs").

Nothing here does I/O. :class:`HeaderReader` is fed a connection's first bytes as they
arrive and answers "need more", the header and the bytes after it, or an error;
:func:`parse`, which it uses, takes the bytes received so far and answers with
``None`` (a valid header may still follow: read more), a :class:`ProxyHeader` (whose
``length`` says how many bytes it took; the rest belongs to the application protocol),
or raises :class:`ProxyProtocolError` with a one-line reason. ``None`` is only ever the
answer while the bytes are a strict prefix of a header that could be valid, so a caller
that feeds bytes until it gets an answer never holds more than one header's worth.

The header is a claim made by whoever opened the connection, so it may only be believed
from the load balancers themselves: :class:`TrustedProxies` answers whether a peer is
one of them. The receiver must be told by configuration, never guess, whether a header
comes; that is the caller's part.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import struct
from collections.abc import Iterable, Mapping
from typing import Final, Literal, TypeAlias

from netframe._errors import Error

__all__ = [
    "MAX_V2_HEADER_BYTES",
    "PP2_CLIENT_CERT_CONN",
    "PP2_CLIENT_CERT_SESS",
    "PP2_CLIENT_SSL",
    "PP2_SUBTYPE_SSL_CIPHER",
    "PP2_SUBTYPE_SSL_CLIENT_CERT",
    "PP2_SUBTYPE_SSL_CN",
    "PP2_SUBTYPE_SSL_GROUP",
    "PP2_SUBTYPE_SSL_KEY_ALG",
    "PP2_SUBTYPE_SSL_SIG_ALG",
    "PP2_SUBTYPE_SSL_SIG_SCHEME",
    "PP2_SUBTYPE_SSL_VERSION",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NETNS",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_SSL",
    "PP2_TYPE_UNIQUE_ID",
    "V1_MAX_BYTES",
    "V2_SIGNATURE",
    "HeaderReader",
    "ProxyHeader",
    "ProxyProtocolError",
    "SocketAddress",
    "SslInfo",
    "TrustedProxies",
    "crc32c",
    "encode_v1",
    "encode_v2",
    "parse",
    "ssl_tlv",
]

#: Which header forms a receiver accepts: ``any`` is both, as the specification
#: recommends for a v2 receiver.
Versions: TypeAlias = Literal["v1", "v2", "any"]
#: ``proxy``: the header names the connection relayed; ``local``: the balancer opened
#: the connection itself (a health check), and its own address is the peer.
Command: TypeAlias = Literal["proxy", "local"]
#: An address a header carries: ``(host, port)`` for IPv4 and IPv6, the host in its
#: canonical text form (``ipaddress``'s), or a Unix socket's path (``"@name"`` for
#: Linux's abstract namespace).
SocketAddress: TypeAlias = "tuple[str, int] | str"

#: The 12 bytes that open every v2 header (chosen to make other protocols fail fast).
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
#: The longest v1 line, CRLF included ("PROXY UNKNOWN" with two full IPv6 addresses).
V1_MAX_BYTES: Final = 107
#: The largest v2 header accepted, fixed part included. The specification keeps headers
#: within one 536-byte segment, except a client certificate in the SSL TLV (a DER
#: certificate is typically 1 to 2 KiB); the field allows 64 KiB, which nobody needs
#: and a broken or hostile sender could otherwise make us wait for.
MAX_V2_HEADER_BYTES: Final = 4096

PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_TYPE_NETNS: Final = 0x30
PP2_SUBTYPE_SSL_VERSION: Final = 0x21
PP2_SUBTYPE_SSL_CN: Final = 0x22
PP2_SUBTYPE_SSL_CIPHER: Final = 0x23
PP2_SUBTYPE_SSL_SIG_ALG: Final = 0x24
PP2_SUBTYPE_SSL_KEY_ALG: Final = 0x25
PP2_SUBTYPE_SSL_GROUP: Final = 0x26
PP2_SUBTYPE_SSL_SIG_SCHEME: Final = 0x27
PP2_SUBTYPE_SSL_CLIENT_CERT: Final = 0x28
PP2_CLIENT_SSL: Final = 0x01
PP2_CLIENT_CERT_CONN: Final = 0x02
PP2_CLIENT_CERT_SESS: Final = 0x04

_V1_PREFIX: Final = b"PROXY "
_V2_FIXED: Final = 16
_MAX_UNIQUE_ID: Final = 128
_UNIX_PATH_BYTES: Final = 108
# The address block's size by family (low nibble 0 = unspecified: no addresses).
_ADDRESS_BYTES: Final = {0x1: 12, 0x2: 36, 0x3: 2 * _UNIX_PATH_BYTES}
_PROTOCOLS: Final[dict[int, Literal["stream", "dgram"]]] = {0x1: "stream", 0x2: "dgram"}
# A decimal port with no leading zero, as v1 requires.
_V1_PORT: Final = re.compile(r"0|[1-9][0-9]{0,4}")
_V6_TEXT: Final = re.compile(r"[0-9A-Fa-f:.]+")


class ProxyProtocolError(Error, ValueError):
    """The bytes are not an acceptable PROXY header; ``str()`` is a one-line reason.

    ``reason`` names the kind, for logs and metrics: ``missing`` (the connection does
    not start with a PROXY header at all), ``wrong_version`` (a header of a version
    the receiver was not told to accept) or ``malformed``.
    """

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True, slots=True)
class SslInfo:
    """What a v2 header's SSL TLV says about the client's TLS connection to the balancer."""

    #: ``PP2_CLIENT_*`` bits: TLS used, a certificate sent on this connection, or on
    #: this TLS session.
    client: int
    #: 0 when the client's certificate was verified, otherwise the verify result.
    verify: int
    version: str | None = None
    cipher: str | None = None
    sig_alg: str | None = None
    key_alg: str | None = None
    group: str | None = None
    sig_scheme: str | None = None
    #: The Common Name of the client certificate's subject.
    common_name: str | None = None
    #: The client certificate, DER-encoded, when the balancer passes it on.
    client_cert: bytes | None = None
    #: Every sub-TLV by subtype, the ones above included.
    fields: Mapping[int, bytes] = dataclasses.field(default_factory=dict)

    @property
    def tls(self) -> bool:
        """The client spoke TLS to the balancer."""
        return bool(self.client & PP2_CLIENT_SSL)

    @property
    def verified_certificate(self) -> bool:
        """The client presented a certificate and the balancer verified it."""
        return bool(self.client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS)) and (
            self.verify == 0
        )


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed header.

    ``source`` and ``destination`` are the relayed connection's client and the address
    it reached, or ``None`` when the header names none: a ``local`` command (a health
    check), a v1 ``UNKNOWN`` line, or an unspecified v2 family or protocol. The
    specification says to use the real connection's endpoints then.
    """

    version: Literal[1, 2]
    command: Command
    #: How many bytes of the stream the header took; what follows is the application's.
    length: int
    source: SocketAddress | None = None
    destination: SocketAddress | None = None
    #: The relayed connection's transport (v2 says; v1 is always ``stream``).
    protocol: Literal["stream", "dgram"] | None = None
    #: v2 TLVs by type, NOOP padding left out (each type appears at most once).
    tlvs: Mapping[int, bytes] = dataclasses.field(default_factory=dict)
    #: The SSL TLV, decoded, when there is one.
    ssl: SslInfo | None = None

    @property
    def authority(self) -> str | None:
        """The host name the client asked for (TLS SNI), from the AUTHORITY TLV."""
        value = self.tlvs.get(PP2_TYPE_AUTHORITY)
        return None if value is None else value.decode("utf-8")


def parse(
    data: bytes | bytearray | memoryview,
    versions: Versions = "any",
    *,
    max_v2_bytes: int = MAX_V2_HEADER_BYTES,
) -> ProxyHeader | None:
    """The header at the start of ``data`` (everything received so far), if complete.

    ``versions`` is ``"v1"``, ``"v2"`` or ``"any"`` (either): a header of another version
    is refused as ``wrong_version``. ``max_v2_bytes`` caps a v2 header's size.

    Returns:
        ``None`` while ``data`` is a strict prefix of a header that could still be
        valid (never once ``data`` is as long as the longest such header), otherwise
        the :class:`ProxyHeader`; bytes after ``header.length`` are not looked at.

    Raises:
        ProxyProtocolError: ``data`` cannot begin an acceptable header. Its ``reason``
            is ``missing``, ``wrong_version`` or ``malformed``.
    """
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    size = len(view)
    if size == 0:
        return None
    if view[0] == 0x0D:  # CR: only a v2 signature starts with it
        head = bytes(view[:12])
        if not V2_SIGNATURE.startswith(head):
            raise _missing()
        if len(head) < 12:
            return None
        if versions == "v1":
            raise ProxyProtocolError("a PROXY v2 header where only v1 is accepted", "wrong_version")
        return _parse_v2(bytes(view[:max_v2_bytes]), size, max_v2_bytes)
    head = bytes(view[: len(_V1_PREFIX)])
    if not _V1_PREFIX.startswith(head):
        raise _missing()
    if len(head) < len(_V1_PREFIX):
        return None
    if versions == "v2":
        raise ProxyProtocolError("a PROXY v1 header where only v2 is accepted", "wrong_version")
    return _parse_v1(bytes(view[:V1_MAX_BYTES]))


class HeaderReader:
    """The header of one connection, from its bytes as they arrive.

    ``feed`` returns ``None`` until the header is complete, then the header, with the
    bytes that followed it in :attr:`rest` (they belong to the application protocol).
    It holds at most one header's worth of bytes: past that, the answer is an error.
    ``versions`` and ``max_v2_bytes`` are as for :func:`parse`.

    Raises (from :meth:`feed` and :meth:`eof`):
        ProxyProtocolError: the bytes cannot begin an acceptable header (``reason`` as
            for :func:`parse`), or the input ended first (``truncated`` when part of a
            header had come, ``missing`` when nothing had).
    """

    __slots__ = ("_buffer", "_max_v2_bytes", "_versions", "header", "rest")

    def __init__(self, versions: Versions = "any", *, max_v2_bytes: int = MAX_V2_HEADER_BYTES):
        self._versions: Versions = versions
        self._max_v2_bytes = max_v2_bytes
        self._buffer = bytearray()
        #: The header, once complete.
        self.header: ProxyHeader | None = None
        #: The bytes after the header, once it is complete.
        self.rest = b""

    @property
    def buffered(self) -> int:
        """How many bytes of an incomplete header are held."""
        return len(self._buffer)

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Add ``data``; the header once it is complete (then :attr:`rest`), else ``None``."""
        if self.header is not None:
            raise RuntimeError("the header is complete: what follows is in rest")
        self._buffer += data
        header = parse(self._buffer, self._versions, max_v2_bytes=self._max_v2_bytes)
        if header is not None:
            self.header = header
            self.rest = bytes(self._buffer[header.length :])
            self._buffer.clear()
        return header

    def eof(self) -> None:
        """The input ended before a complete header: always raises."""
        if self._buffer:
            raise ProxyProtocolError(
                f"the connection ended {len(self._buffer)} bytes into a PROXY header",
                "truncated",
            )
        raise ProxyProtocolError("the connection ended before a PROXY header", "missing")


def _missing() -> ProxyProtocolError:
    return ProxyProtocolError("the connection does not start with a PROXY header", "missing")


def _malformed(message: str) -> ProxyProtocolError:
    return ProxyProtocolError(message, "malformed")


# -- version 1 ---------------------------------------------------------------------------


def _parse_v1(window: bytes) -> ProxyHeader | None:
    """``window``: at most the first 107 bytes, beginning with ``PROXY ``."""
    cr, lf = window.find(b"\r"), window.find(b"\n")
    if cr < 0 and lf < 0:
        if len(window) >= V1_MAX_BYTES:
            raise _malformed(f"no CRLF within the first {V1_MAX_BYTES} bytes of a PROXY v1 line")
        return None
    if lf >= 0 and (cr < 0 or lf < cr):
        raise _malformed("a PROXY v1 line ends with LF instead of CRLF")
    if cr + 1 == len(window):
        if len(window) >= V1_MAX_BYTES:
            raise _malformed(f"no CRLF within the first {V1_MAX_BYTES} bytes of a PROXY v1 line")
        return None
    if window[cr + 1] != 0x0A:
        raise _malformed("a PROXY v1 line holds a CR not followed by LF")
    length = cr + 2
    try:
        words = window[:cr].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise _malformed("a PROXY v1 line holds bytes that are not ASCII") from None
    family = words[1]
    if family == "UNKNOWN":  # the sender could not tell: the rest is to be ignored
        return ProxyHeader(1, "proxy", length)
    if family not in ("TCP4", "TCP6"):
        raise _malformed(f"unknown PROXY v1 protocol {family[:16]!r} (TCP4, TCP6 or UNKNOWN)")
    if len(words) != 6:
        raise _malformed(
            "a PROXY v1 line must be PROXY, the protocol, two addresses and two ports, "
            "each after exactly one space"
        )
    _, _, source, destination, source_port, destination_port = words
    return ProxyHeader(
        1,
        "proxy",
        length,
        (_v1_host(source, family), _v1_port(source_port)),
        (_v1_host(destination, family), _v1_port(destination_port)),
        "stream",
    )


def _v1_host(text: str, family: str) -> str:
    """The address as ``ipaddress`` writes it, if ``text`` is one of ``family``'s."""
    try:
        if family == "TCP4":
            address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(text)
            if str(address) != text:  # leading zeros, which could be read as octal
                raise ValueError(text)
        else:
            if not _V6_TEXT.fullmatch(text):  # no scope (%eth0), no spaces
                raise ValueError(text)
            address = ipaddress.IPv6Address(text)
    except ValueError:
        kind = "IPv4" if family == "TCP4" else "IPv6"
        raise _malformed(f"{text[:48]!r} is not an {kind} address") from None
    return str(address)


def _v1_port(text: str) -> int:
    if not _V1_PORT.fullmatch(text) or int(text) > 65535:
        raise _malformed(f"{text[:16]!r} is not a port (0 to 65535, no leading zero)")
    return int(text)


# -- version 2 ---------------------------------------------------------------------------


def _parse_v2(window: bytes, size: int, max_v2_bytes: int) -> ProxyHeader | None:
    """``window``: the first bytes (at most ``max_v2_bytes``), beginning with the
    signature; ``size``: how many bytes were received in all."""
    if size < _V2_FIXED:
        return None
    version_command, family_protocol, body_length = struct.unpack_from("!BBH", window, 12)
    if version_command >> 4 != 2:
        raise _malformed(f"PROXY v2 header with version {version_command >> 4} (must be 2)")
    command_bits = version_command & 0x0F
    if command_bits > 1:
        raise _malformed(f"PROXY v2 header with unknown command {command_bits:#x}")
    family, protocol_bits = family_protocol >> 4, family_protocol & 0x0F
    if family > 3 or protocol_bits > 2:
        raise _malformed(f"PROXY v2 header with unknown family/protocol {family_protocol:#04x}")
    length = _V2_FIXED + body_length
    if length > max_v2_bytes:
        raise _malformed(f"PROXY v2 header of {length} bytes is over the {max_v2_bytes}-byte limit")
    if size < length:
        return None
    body = window[_V2_FIXED:length]
    command: Command = "local" if command_bits == 0 else "proxy"
    if (family == 0) != (protocol_bits == 0):
        # Half unspecified: how many address bytes there are is unknown, and the
        # specification says to ignore them; so nothing in the block can be read.
        return ProxyHeader(2, command, length)
    address_bytes = _ADDRESS_BYTES.get(family, 0)
    if len(body) < address_bytes:
        if command == "local":  # its addresses are to be ignored, whatever they are
            return ProxyHeader(2, "local", length)
        raise _malformed(
            f"PROXY v2 address block of {len(body)} bytes is too short for its family "
            f"({address_bytes} needed)"
        )
    source = destination = None
    protocol = _PROTOCOLS.get(protocol_bits) if address_bytes else None
    if command == "proxy" and address_bytes:
        source, destination = _v2_addresses(family, body)
    tlvs, crc_at = _tlvs(body, address_bytes, "TLV", top_level=True)
    if crc_at is not None:
        _check_crc(window[:length], _V2_FIXED + crc_at)
    unique_id = tlvs.get(PP2_TYPE_UNIQUE_ID)
    if unique_id is not None and len(unique_id) > _MAX_UNIQUE_ID:
        raise _malformed(f"PROXY v2 unique ID of {len(unique_id)} bytes (at most 128)")
    ssl = _ssl(tlvs[PP2_TYPE_SSL]) if PP2_TYPE_SSL in tlvs else None
    if PP2_TYPE_AUTHORITY in tlvs:
        _text(tlvs[PP2_TYPE_AUTHORITY], "authority")
    return ProxyHeader(2, command, length, source, destination, protocol, tlvs, ssl)


def _v2_addresses(family: int, body: bytes) -> tuple[SocketAddress, SocketAddress]:
    if family == 0x1:
        src, dst, src_port, dst_port = struct.unpack_from("!4s4sHH", body)
        return (
            (str(ipaddress.IPv4Address(src)), src_port),
            (str(ipaddress.IPv4Address(dst)), dst_port),
        )
    if family == 0x2:
        src, dst, src_port, dst_port = struct.unpack_from("!16s16sHH", body)
        return (
            (str(ipaddress.IPv6Address(src)), src_port),
            (str(ipaddress.IPv6Address(dst)), dst_port),
        )
    return _unix_path(body[:_UNIX_PATH_BYTES]), _unix_path(body[_UNIX_PATH_BYTES:216])


def _unix_path(raw: bytes) -> str:
    if raw[:1] == b"\x00":  # Linux's abstract namespace: shown as "@name", as ss does
        return "@" + _text(raw[1:].rstrip(b"\x00"), "Unix socket name")
    return _text(raw.partition(b"\x00")[0], "Unix socket path")


def _text(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed(f"PROXY v2 {what} is not UTF-8") from None


def _tlvs(
    block: bytes, start: int, what: str, *, top_level: bool = False
) -> tuple[dict[int, bytes], int | None]:
    """The TLVs of ``block[start:]`` by type, and where a CRC32C value sits, if any
    (NOOP and CRC32C mean something only at the top level, not inside the SSL TLV)."""
    found: dict[int, bytes] = {}
    crc_at = None
    at = start
    while at < len(block):
        if len(block) - at < 3:
            raise _malformed(f"PROXY v2 {what} cut short ({len(block) - at} bytes left)")
        kind, size = struct.unpack_from("!BH", block, at)
        value = block[at + 3 : at + 3 + size]
        if len(value) < size:
            raise _malformed(f"PROXY v2 {what} {kind:#04x} of {size} bytes runs past the header")
        if kind == PP2_TYPE_CRC32C and top_level:
            crc_at = at + 3
        at += 3 + size
        if kind == PP2_TYPE_NOOP and top_level:
            continue
        if kind in found:
            raise _malformed(f"PROXY v2 {what} {kind:#04x} appears twice")
        found[kind] = value
    return found, crc_at


def _check_crc(header: bytes, at: int) -> None:
    """The CRC32C TLV holds the checksum of the header with that value zeroed."""
    if len(header) < at + 4 or header[at - 2 : at] != b"\x00\x04":
        raise _malformed("PROXY v2 CRC32C TLV is not 4 bytes")
    expected = int.from_bytes(header[at : at + 4], "big")
    if crc32c(header[:at] + b"\x00\x00\x00\x00" + header[at + 4 :]) != expected:
        raise _malformed("PROXY v2 header fails its CRC32C checksum")


_SSL_TEXT: Final = {
    PP2_SUBTYPE_SSL_VERSION: "version",
    PP2_SUBTYPE_SSL_CIPHER: "cipher",
    PP2_SUBTYPE_SSL_SIG_ALG: "sig_alg",
    PP2_SUBTYPE_SSL_KEY_ALG: "key_alg",
    PP2_SUBTYPE_SSL_GROUP: "group",
    PP2_SUBTYPE_SSL_SIG_SCHEME: "sig_scheme",
    PP2_SUBTYPE_SSL_CN: "common_name",
}


def _ssl(value: bytes) -> SslInfo:
    if len(value) < 5:
        raise _malformed(f"PROXY v2 SSL TLV of {len(value)} bytes (at least 5)")
    client, verify = struct.unpack_from("!BI", value)
    fields, _ = _tlvs(value, 5, "SSL sub-TLV")
    named = {name: _text(fields[kind], f"SSL {name}") for kind, name in _SSL_TEXT.items()
             if kind in fields}  # fmt: skip
    return SslInfo(
        client, verify, client_cert=fields.get(PP2_SUBTYPE_SSL_CLIENT_CERT), fields=fields,
        **named,
    )  # fmt: skip


# -- CRC32C (Castagnoli), for the checksum TLV ----------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC32C (RFC 4960, appendix B) of ``data``, as the v2 checksum TLV holds it."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- encoders ----------------------------------------------------------------------------


def encode_v1(
    source: tuple[str, int] | None = None, destination: tuple[str, int] | None = None
) -> bytes:
    """A v1 line relaying ``source`` to ``destination`` (both IPv4 or both IPv6), or
    ``PROXY UNKNOWN`` when neither is given.

    Raises:
        ValueError: one address without the other, mixed families, a bad port.
    """
    if source is None and destination is None:
        return b"PROXY UNKNOWN\r\n"
    if source is None or destination is None:
        raise ValueError("give both addresses or neither")
    src, dst = _ip(source[0]), _ip(destination[0])
    if src.version != dst.version:
        raise ValueError("the two addresses must be of one family")
    family = "TCP4" if src.version == 4 else "TCP6"
    ports = _port(source[1]), _port(destination[1])
    return f"PROXY {family} {src} {dst} {ports[0]} {ports[1]}\r\n".encode("ascii")


def encode_v2(
    source: SocketAddress | None = None,
    destination: SocketAddress | None = None,
    *,
    command: Command = "proxy",
    protocol: Literal["stream", "dgram"] = "stream",
    tlvs: Mapping[int, bytes] | Iterable[tuple[int, bytes]] = (),
    checksum: bool = False,
) -> bytes:
    """A v2 header: ``source`` and ``destination`` both ``(host, port)`` of one IP family
    or both Unix paths, or neither (an unspecified family, as health checks send with
    ``command="local"``). ``tlvs`` are written in order; ``checksum`` appends a CRC32C
    TLV over the whole header.

    Raises:
        ValueError: one address without the other, mixed families, a bad port, a value
            or a header too long for its length field.
    """
    if (source is None) != (destination is None):
        raise ValueError("give both addresses or neither")
    block = b""
    family = 0
    if source is not None and destination is not None:
        family, block = _v2_block(source, destination)
    family_protocol = (family << 4 | (1 if protocol == "stream" else 2)) if family else 0
    items = list(tlvs.items() if isinstance(tlvs, Mapping) else tlvs)
    if checksum:
        items.append((PP2_TYPE_CRC32C, b"\x00\x00\x00\x00"))
    body = block + b"".join(_tlv(kind, value) for kind, value in items)
    if len(body) > 0xFFFF:
        raise ValueError(f"a v2 header body of {len(body)} bytes does not fit its length field")
    version_command = 0x20 if command == "local" else 0x21
    header = V2_SIGNATURE + struct.pack("!BBH", version_command, family_protocol, len(body)) + body
    if checksum:
        value = crc32c(header).to_bytes(4, "big")
        header = header[:-4] + value
    return header


def ssl_tlv(client: int, verify: int, fields: Iterable[tuple[int, bytes]] = ()) -> bytes:
    """The value of an SSL TLV (``PP2_TYPE_SSL``): the client bits, the verify result
    and sub-TLVs such as ``(PP2_SUBTYPE_SSL_VERSION, b"TLSv1.3")``."""
    return struct.pack("!BI", client, verify) + b"".join(_tlv(k, v) for k, v in fields)


def _tlv(kind: int, value: bytes) -> bytes:
    if not 0 <= kind <= 0xFF or len(value) > 0xFFFF:
        raise ValueError(f"TLV type {kind} with {len(value)} bytes does not fit")
    return struct.pack("!BH", kind, len(value)) + value


def _v2_block(source: SocketAddress, destination: SocketAddress) -> tuple[int, bytes]:
    if isinstance(source, str) and isinstance(destination, str):
        return 0x3, _path(source) + _path(destination)
    if isinstance(source, str) or isinstance(destination, str):
        raise ValueError("the two addresses must be of one family")
    src, dst = _ip(source[0]), _ip(destination[0])
    if src.version != dst.version:
        raise ValueError("the two addresses must be of one family")
    ports = struct.pack("!HH", _port(source[1]), _port(destination[1]))
    return (0x1 if src.version == 4 else 0x2), src.packed + dst.packed + ports


def _path(path: str) -> bytes:
    raw = b"\x00" + path[1:].encode() if path.startswith("@") else path.encode()
    if len(raw) > _UNIX_PATH_BYTES or (b"\x00" in raw[1:]):
        raise ValueError(f"{path!r} does not fit a 108-byte Unix address")
    return raw.ljust(_UNIX_PATH_BYTES, b"\x00")


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(host)


def _port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be 0 to 65535, not {port!r}")
    return port


# -- who may send a header ---------------------------------------------------------------

Network: TypeAlias = "ipaddress.IPv4Network | ipaddress.IPv6Network"


class TrustedProxies:
    """The load balancers allowed to send a header, as addresses or networks.

    ``TrustedProxies(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"])``; an address is a
    network of one. An IPv4-mapped IPv6 peer (``::ffff:10.0.0.1``, what a dual-stack
    socket reports for an IPv4 client) is checked as the IPv4 address it is, and an
    IPv4-mapped network given here as its IPv4 network, so one balancer is one entry.

    Raises:
        ValueError: an entry is not an address or network, or a network has host bits
            set (``10.0.0.1/8``: a typo for ``10.0.0.0/8`` or for ``10.0.0.1``?).
    """

    __slots__ = ("_v4", "_v6")

    def __init__(
        self,
        networks: Iterable[str | Network | ipaddress.IPv4Address | ipaddress.IPv6Address],
    ) -> None:
        v4: list[ipaddress.IPv4Network] = []
        v6: list[ipaddress.IPv6Network] = []
        for entry in networks:
            network = ipaddress.ip_network(entry)
            if isinstance(network, ipaddress.IPv6Network):
                mapped = network.network_address.ipv4_mapped
                if mapped is not None and network.prefixlen >= 96:
                    v4.append(ipaddress.IPv4Network((mapped, network.prefixlen - 96)))
                else:
                    v6.append(network)
            else:
                v4.append(network)
        self._v4 = tuple(v4)
        self._v6 = tuple(v6)

    def __bool__(self) -> bool:
        return bool(self._v4 or self._v6)

    def allows(self, host: str) -> bool:
        """Whether ``host`` (an address's text; an IPv6 scope is ignored) is trusted.
        Anything that is not an IP address (a Unix socket path) is not."""
        try:
            address = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address):
            mapped = address.ipv4_mapped
            if mapped is None:
                return any(address in network for network in self._v6)
            address = mapped
        return any(address in network for network in self._v4)
