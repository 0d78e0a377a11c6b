"""The sockets of ``--workers N``: one group of ``SO_REUSEPORT`` sockets per address.

The kernel spreads connections (and UDP flows) over the sockets of a group by a hash of
the addresses, each socket with an accept queue of its own. The first socket of each
group is bound *without* the option and only given it afterwards: that bind fails, as a
single server's does, if anything at all holds the port, a group of another program's
``SO_REUSEPORT`` sockets included. So a second netframe never joins a running one; only
a process of the same user that sets the option itself can still join ours (the kernel
lets nobody else).

A Unix socket has no ``SO_REUSEPORT``: it is bound once (as a single server binds it,
stale files and all) and that one socket is shared by every worker, one accept queue for
all; the supervisor removes its file when it stops. Sockets systemd handed over are
shared the same way, each of them by every worker.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable
from typing import Any

from netframe._datagram import prepare_udp_listener
from netframe._unix import FileIdentity, bind_unix_listener, remove_socket_file
from netframe.config import Config
from netframe.logs import get_logger
from netframe.server import listen_error, prepare_tcp_listener

__all__ = ["Listeners", "bind_groups", "share"]


@dataclasses.dataclass(slots=True)
class Listeners:
    """The supervisor's sockets: for every listener, one socket per worker (the same
    socket ``count`` times where it is shared), and the Unix socket files it bound."""

    groups: list[list[socket.socket]] = dataclasses.field(default_factory=list)
    unix_files: list[tuple[str, FileIdentity]] = dataclasses.field(default_factory=list)

    def for_worker(self, index: int) -> list[socket.socket]:
        """The sockets worker ``index`` (from 1) serves."""
        return [group[index - 1] for group in self.groups]

    def close(self) -> None:
        """Close every socket, and remove the socket files (still ours) first, as a
        single server does: new clients are told at once that it is gone."""
        for path, identity in self.unix_files:
            try:
                remove_socket_file(path, identity)
            except OSError as exc:
                get_logger().warning(
                    "unix_socket_not_removed", path=path, error=exc.strerror or str(exc)
                )
        self.unix_files.clear()
        for group in self.groups:
            for sock in group:
                sock.close()


def share(sockets: list[socket.socket], count: int) -> Listeners:
    """Sockets made elsewhere (handed over by systemd), each shared by ``count`` workers."""
    return Listeners([[sock] * count for sock in sockets])


def bind_groups(config: Config, count: int) -> Listeners:
    """For every listener of ``config``, ``count`` sockets bound to one address (all or
    none), and each Unix socket bound once, shared by all."""
    listeners = Listeners()
    groups = listeners.groups
    try:
        # UDP first, as a single server binds (Server.start).
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
                        prepare=lambda sock: prepare_udp_listener(sock, size),  # noqa: B023
                    )
                )  # fmt: skip
            except OSError as exc:
                raise listen_error("udp", address, exc) from None
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
        for path in config.unix:
            try:
                bound = bind_unix_listener(
                    path, config.unix_mode, config.backlog,
                    lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
                )  # fmt: skip
            except OSError as exc:
                raise listen_error("unix", path, exc) from None
            listeners.unix_files.append((bound.path, bound.identity))
            groups.append([bound.sock] * count)
            if bound.replaced_stale:
                get_logger().warning("stale_socket_replaced", path=bound.path)
    except BaseException:
        listeners.close()
        raise
    return listeners


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
