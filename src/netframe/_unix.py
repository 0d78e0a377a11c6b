"""Unix-domain stream listeners: binding a path safely, and telling who is on the other end.

Binding (:func:`bind_unix_listener`) never takes a path that is not ours to take:

- ``bind()`` itself never replaces a file: when the path exists it fails with
  ``EADDRINUSE``, and the file is looked at. A file that is not a socket is refused and
  left alone. A socket that something accepts connections on (a ``connect`` succeeds, or
  would wait for a full backlog) is in use and is never stolen. A socket that refuses
  connections (``ECONNREFUSED``: nobody listens) is a stale file from a run that did not
  remove it: it is removed, if the path still names the file that was probed, and the
  bind is tried again. Anything else (no permission to connect, a socket of another
  type) is refused with the system's reason.
- The file's mode is set between ``bind()`` and ``listen()``: a Unix stream socket
  refuses every ``connect`` until it listens, so no client can connect while the socket
  is more open than asked, and no process-wide ``umask`` has to be changed.
- On close the file is removed only if the path still names the file this server
  created (same device and inode): a newer server that has taken the path since keeps
  its socket.

The checks and the removal are separate system calls, so a process that replaces the
path between them could still be raced. That needs write access to the socket's
directory; give the server a directory of its own (``/run/NAME/``, ``RuntimeDirectory=``
under systemd).

Peers: the address of a Unix client is usually unnamed, so what identifies it is the
process behind it. On Linux ``SO_PEERCRED`` gives its pid, uid and gid as they were when
it connected; they are read once per connection, only when its peer is asked for (every
connection, while ``connection_opened`` is logged).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import socket
import stat
import struct
from collections.abc import Callable
from typing import Any, Final, Generic, TypeAlias, TypeVar

from netframe.handlers import PeerAddress, UnixAddress

__all__ = [
    "BoundUnixSocket",
    "FileIdentity",
    "bind_unix_listener",
    "limit_key",
    "peer_credentials",
    "remove_socket_file",
    "unix_address",
]

#: A file's device and inode: what "the same file" means when it is removed.
FileIdentity: TypeAlias = tuple[int, int]
_Socket = TypeVar("_Socket", bound=socket.socket)


@dataclasses.dataclass(frozen=True, slots=True)
class BoundUnixSocket(Generic[_Socket]):
    """What :func:`bind_unix_listener` made."""

    #: Listening and non-blocking.
    sock: _Socket
    #: The absolute path, so that the file is found again whatever the working directory.
    path: str
    #: The file's identity, for :func:`remove_socket_file`.
    identity: FileIdentity
    #: Whether a stale socket file was removed to make room.
    replaced_stale: bool


#: Attempts at binding a path whose stale socket file keeps coming back (another server
#: starting at the same moment). Each attempt is a few system calls.
_BIND_ATTEMPTS: Final = 3
#: ``struct ucred``: pid, uid, gid.
_UCRED: Final = struct.Struct("3i")
_SO_PEERCRED: Final[int | None] = getattr(socket, "SO_PEERCRED", None)


def bind_unix_listener(
    path: str, mode: int, backlog: int, make_socket: Callable[[], _Socket]
) -> BoundUnixSocket[_Socket]:
    """Bind and listen on ``path`` with a socket from ``make_socket`` (``AF_UNIX``,
    ``SOCK_STREAM``), the file's permissions set to ``mode`` before any client can
    connect.

    Raises:
        OSError: the path is in use (``EADDRINUSE``), exists and is not a socket
            (``EEXIST``), cannot be probed or bound (the system's reason). Nothing is
            left bound, and no file but a stale socket is ever removed.
    """
    replaced = False
    for _ in range(_BIND_ATTEMPTS):
        sock = make_socket()
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            replaced = _remove_stale(path) or replaced
            continue
        identity: FileIdentity | None = None
        try:
            identity = _identity(os.lstat(path))
            os.chmod(path, mode)
            if _identity(os.lstat(path)) != identity:  # replaced under us: not ours now
                raise OSError(errno.EBUSY, "the path was replaced while it was being bound")
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            if identity is not None:
                with contextlib.suppress(OSError):
                    remove_socket_file(path, identity)
            raise
        return BoundUnixSocket(sock, os.path.abspath(path), identity, replaced)
    raise OSError(errno.EADDRINUSE, "Address already in use (bound again as it was replaced)")


def _remove_stale(path: str) -> bool:
    """The path exists: remove it if it is a socket nobody accepts on (True).

    Raises:
        OSError: it is not a socket, something accepts on it, or that cannot be told.
    """
    try:
        before = os.lstat(path)
    except FileNotFoundError:  # gone in between: bind again
        return False
    if not stat.S_ISSOCK(before.st_mode):
        raise OSError(errno.EEXIST, "the path exists and is not a socket (it is left as it is)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)  # a full backlog answers EAGAIN instead of waiting
        result = probe.connect_ex(path)
    if result in (0, errno.EAGAIN, errno.EINPROGRESS):
        raise OSError(
            errno.EADDRINUSE, "Address already in use (a process is accepting connections on it)"
        )
    if result == errno.ENOENT:
        return False
    if result != errno.ECONNREFUSED:
        raise OSError(result, f"cannot tell whether it is in use: {os.strerror(result)}")
    return remove_socket_file(path, _identity(before))


def remove_socket_file(path: str, identity: FileIdentity) -> bool:
    """Remove ``path`` if it still names the file ``identity`` describes; True if it did."""
    try:
        if _identity(os.lstat(path)) != identity:
            return False
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _identity(status: os.stat_result) -> FileIdentity:
    return status.st_dev, status.st_ino


def peer_credentials(sock: Any) -> tuple[int, int, int] | None:
    """The ``(pid, uid, gid)`` of the process at the other end of a connected Unix
    socket, as it was when it connected; ``None`` where the system does not say
    (no ``SO_PEERCRED``) or the socket is gone."""
    if _SO_PEERCRED is None or sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def unix_address(raw: str | bytes, sock: Any = None) -> UnixAddress:
    """A Unix socket address as the transport gives it (a path, ``""`` for an unnamed
    end, bytes for an abstract name), with the credentials of the process behind ``sock``
    when it is given (for the peer end)."""
    path = raw if isinstance(raw, str) else raw.decode(errors="replace")
    if path.startswith("\0"):  # Linux's abstract namespace, shown as ss and systemd do
        path = "@" + path[1:]
    credentials = peer_credentials(sock) if sock is not None else None
    if credentials is None:
        return UnixAddress(path)
    return UnixAddress(path, *credentials)


def limit_key(peer: PeerAddress | None) -> str:
    """What per-address limits count a non-IP peer under.

    A Unix peer has no address of its own, so it is counted per user: ``uid:1000``. One
    local user is then one "address", as one host behind NAT is; where the system does
    not tell the user, every Unix peer shares the key ``unix``. A peer that could not be
    read at all (reset at once) is ``""``, as before.
    """
    if isinstance(peer, UnixAddress):
        return "unix" if peer.uid is None else f"uid:{peer.uid}"
    return ""
