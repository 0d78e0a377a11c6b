"""Binding a listener once per worker: one group of ``SO_REUSEPORT`` sockets per address.

The kernel spreads connections (and UDP flows) over the sockets of a group by a hash of
the addresses, each socket with an accept queue of its own. The first socket of each
group is bound *without* the option and only given it afterwards: that bind fails, as a
single server's does, if anything at all holds the port, a group of another program's
``SO_REUSEPORT`` sockets included. So a second netframe never joins a running one; only
a process of the same user that sets the option itself can still join ours (the kernel
lets nobody else).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from netframe._datagram import ask_receive_buffer
from netframe.config import Config
from netframe.server import listen_error, prepare_tcp_listener

__all__ = ["bind_groups"]


def bind_groups(config: Config, count: int) -> list[list[socket.socket]]:
    """For every listener, ``count`` sockets bound to one address (all or none)."""
    groups: list[list[socket.socket]] = []
    try:
        for address in config.tcp_addresses:
            try:
                infos = socket.getaddrinfo(
                    address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )
                for family, type_, proto, _, sockaddr in dict.fromkeys(infos):
                    groups.append(
                        _bind_group(
                            family, type_, proto, sockaddr, count,
                            prepare=prepare_tcp_listener, backlog=config.backlog,
                        )
                    )  # fmt: skip
            except OSError as exc:
                raise listen_error("tcp", address, exc) from None
        for address in config.udp_addresses:
            size = config.udp_receive_buffer_bytes
            try:
                # The first address only, as a single server binds.
                family, type_, proto, _, sockaddr = socket.getaddrinfo(
                    address.host, address.port, type=socket.SOCK_DGRAM
                )[0]
                groups.append(
                    _bind_group(
                        family, type_, proto, sockaddr, count,
                        prepare=lambda sock: ask_receive_buffer(sock, size),  # noqa: B023
                    )
                )  # fmt: skip
            except OSError as exc:
                raise listen_error("udp", address, exc) from None
    except BaseException:
        for group in groups:
            for sock in group:
                sock.close()
        raise
    return groups


def _bind_group(
    family: int,
    type_: int,
    proto: int,
    sockaddr: Any,
    count: int,
    *,
    prepare: Callable[[socket.socket], None],
    backlog: int | None = None,
) -> list[socket.socket]:
    """``count`` sockets bound to ``sockaddr`` in one ``SO_REUSEPORT`` group.

    The first is bound without the option, so the bind fails if anything holds the
    port (a group of sockets with the option included), and only then given it: the
    others, bound with it, join that socket and nothing else. Port 0 is resolved by
    the first bind. Stream sockets listen with ``backlog``.
    """
    group: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, type_, proto)
            group.append(sock)
            prepare(sock)
            if len(group) > 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(sockaddr)
            if len(group) == 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sockaddr = (sockaddr[0], sock.getsockname()[1], *sockaddr[2:])
            if backlog is not None:
                sock.listen(backlog)
    except BaseException:
        for sock in group:
            sock.close()
        raise
    return group
