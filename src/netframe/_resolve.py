"""Resolving a listener's host without leaving a thread behind.

``loop.getaddrinfo`` runs ``socket.getaddrinfo`` in the loop's default executor, whose
thread then stays for the life of the process (uvloop's resolver keeps libuv's thread
pool the same way). A server is better off with one thread: on Linux every socket call
of a process whose descriptor table another thread shares takes and drops a reference
on the file, which a process of one thread skips (about 2% of the raw server's CPU on a
1 KiB echo). So an address that is already numeric, the usual case for a server, is
turned into a socket address here at once (``AI_NUMERICHOST``: no lookup, nothing that
can block), and only a name is looked up, in a thread of its own that ends with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from typing import Any

__all__ = ["getaddrinfo"]

#: ``socket.getaddrinfo``'s answers: (family, type, proto, canonname, sockaddr).
AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]


async def getaddrinfo(host: str | None, port: int, *, kind: int, flags: int = 0) -> list[AddrInfo]:
    """``socket.getaddrinfo(host, port, type=kind, flags=flags)``, without blocking the
    loop and without a thread that outlives the lookup.

    Raises:
        OSError: ``socket.gaierror`` from the lookup, as ``loop.getaddrinfo`` raises it.
    """
    try:
        return list(socket.getaddrinfo(host, port, type=kind, flags=flags | socket.AI_NUMERICHOST))
    except socket.gaierror:
        pass  # a name (or no valid address at all): the lookup below says which
    loop = asyncio.get_running_loop()
    future: asyncio.Future[list[AddrInfo]] = loop.create_future()

    def settle(result: list[AddrInfo] | None, error: BaseException | None) -> None:
        if future.done():  # the caller was cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            assert result is not None
            future.set_result(result)

    def look_up() -> None:
        result: list[AddrInfo] | None = None
        error: BaseException | None = None
        try:
            result = list(socket.getaddrinfo(host, port, type=kind, flags=flags))
        except BaseException as exc:  # handed to the awaiting task, not lost in the thread
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=look_up, name="netframe-resolve", daemon=True).start()
    return await future
