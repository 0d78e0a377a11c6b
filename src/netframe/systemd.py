"""systemd integration: listening sockets it hands over, and its notify socket.

Pure standard library; the protocols are systemd's own, documented in sd_listen_fds(3)
and sd_notify(3).

Socket activation. systemd (or ``systemd-socket-activate``) binds the sockets a socket
unit names and starts the service with them open from descriptor 3 on, and with
``LISTEN_PID`` (the process meant), ``LISTEN_FDS`` (how many) and ``LISTEN_FDNAMES``
(their ``FileDescriptorName=``, colon-separated). :func:`listen_sockets` takes them only
when ``LISTEN_PID`` is this process, marks them close-on-exec, and removes the three
variables whatever they said, so that no child process takes them for its own. Each
socket is then served by what it is (TCP, UDP or Unix stream), told by its family and
type, never by its name.

Notification. ``NOTIFY_SOCKET`` names a datagram socket (a path, or ``@name`` in Linux's
abstract namespace) to which the service reports ``READY=1`` once it serves,
``STOPPING=1`` when its stop begins, ``STATUS=...`` lines for ``systemctl status``, and
``WATCHDOG=1`` keep-alives at half of ``WATCHDOG_USEC`` when the unit has
``WatchdogSec=`` (and ``WATCHDOG_PID``, if set, is this process). Those variables are
removed too. A message that cannot be sent is dropped (systemd may be gone, or busy),
and the first such failure is logged once.

:func:`take` reads all of it at once; :func:`netframe.run` (and so ``netframe serve``)
calls it before it builds its server. A process that starts workers of its own would
call it once, in the parent, and hand each worker duplicates of the sockets
(``Server(sockets=...)``): the sockets are then shared, one accept queue for all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from collections.abc import MutableMapping
from typing import Final

from netframe.config import ConfigError
from netframe.logs import get_logger

__all__ = [
    "HandedOverSocket",
    "Handover",
    "Notifier",
    "Watchdog",
    "listen_sockets",
    "notifier",
    "take",
    "watchdog_interval",
]

#: The first descriptor systemd hands over (0, 1 and 2 are stdin, stdout and stderr).
LISTEN_FDS_START: Final = 3
#: The most descriptors believed from ``LISTEN_FDS``: a corrupt value must not make the
#: server wrap every descriptor up to the open-file limit.
MAX_LISTEN_FDS: Final = 1024
LISTEN_VARIABLES: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
NOTIFY_VARIABLES: Final = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


@dataclasses.dataclass(frozen=True, slots=True)
class HandedOverSocket:
    """One socket systemd handed over: the socket, its descriptor, and its name
    (``FileDescriptorName=``, ``"unknown"`` when the unit gave none)."""

    sock: socket.socket
    fd: int
    name: str


def listen_sockets(
    environ: MutableMapping[str, str] | None = None, pid: int | None = None
) -> list[HandedOverSocket]:
    """The listening sockets handed to this process (``sd_listen_fds``), or none.

    ``environ`` defaults to ``os.environ`` and ``pid`` to this process's id. The
    ``LISTEN_*`` variables are removed from ``environ`` in every case.

    Raises:
        ConfigError: ``LISTEN_FDS`` is not a count, or a descriptor it names is not open
            or not a socket (one line, naming the descriptor and its name).
    """
    environ = os.environ if environ is None else environ
    values = {name: environ.pop(name, None) for name in LISTEN_VARIABLES}
    if values["LISTEN_PID"] != str(os.getpid() if pid is None else pid):
        return []  # meant for another process (a parent that did not clean up), or none
    text = values["LISTEN_FDS"] or "0"
    if not text.isdigit() or int(text) > MAX_LISTEN_FDS:
        raise ConfigError(f"LISTEN_FDS={text!r} is not a count of descriptors")
    count = int(text)
    given = values["LISTEN_FDNAMES"]
    names = given.split(":") if given is not None else []
    if len(names) != count:  # none, or not one per descriptor: as sd_listen_fds_with_names
        names = ["unknown"] * count
    handed = []
    for index, name in enumerate(names):
        fd = LISTEN_FDS_START + index
        try:
            os.set_inheritable(fd, False)  # not for the processes a handler may start
            sock = socket.socket(fileno=fd)  # family, type and protocol asked of the kernel
        except OSError as exc:
            raise ConfigError(
                f"cannot use descriptor {fd} ({name}) handed over by systemd: {exc.strerror or exc}"
            ) from None
        handed.append(HandedOverSocket(sock, fd, name))
    return handed


def _address(text: str) -> str | None:
    """``NOTIFY_SOCKET`` as an ``AF_UNIX`` address: a path, or an abstract name."""
    if text.startswith("@"):
        return "\0" + text[1:]
    if text.startswith("/"):
        return text
    return None  # vsock:... and other forms systemd may grow: not spoken here


class Notifier:
    """Sends ``sd_notify`` messages to systemd's notify socket.

    Each message is one datagram from a fresh non-blocking socket, as ``sd_notify``
    sends it; sending never blocks the event loop. A message that cannot be sent is
    dropped, and only the first failure is logged (``systemd_notify_failed``).
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self._failed = False

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields as one message; True if it was sent."""
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(message, self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                get_logger().warning(
                    "systemd_notify_failed",
                    socket=self.address.replace("\0", "@", 1),
                    error=exc.strerror or str(exc),
                )
            return False
        return True

    def ready(self, status: str) -> bool:
        """The service is up: its listeners are bound and it serves."""
        return self.send("READY=1", f"STATUS={status}")

    def stopping(self, status: str = "Stopping") -> bool:
        """The service has begun to stop."""
        return self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        """A one-line status for ``systemctl status``."""
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        """Keep the watchdog from firing for another ``WatchdogSec=``."""
        return self.send("WATCHDOG=1")


def notifier(environ: MutableMapping[str, str] | None = None) -> Notifier | None:
    """A :class:`Notifier` for ``NOTIFY_SOCKET``, or ``None`` when it is not set (or is a
    form not spoken here). Removes the variable from ``environ`` (``os.environ``)."""
    environ = os.environ if environ is None else environ
    text = environ.pop("NOTIFY_SOCKET", "")
    address = _address(text) if text else None
    if text and address is None:
        get_logger().warning("systemd_notify_unsupported", socket=text)
    return None if address is None else Notifier(address)


def watchdog_interval(
    environ: MutableMapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """Seconds between ``WATCHDOG=1`` messages: half of ``WATCHDOG_USEC``, as systemd
    asks; ``None`` when there is no watchdog, or it watches another process
    (``WATCHDOG_PID``). Removes both variables from ``environ`` (``os.environ``)."""
    environ = os.environ if environ is None else environ
    usec = environ.pop("WATCHDOG_USEC", "")
    watched = environ.pop("WATCHDOG_PID", "")
    if watched and watched != str(os.getpid() if pid is None else pid):
        return None
    if not usec.isdigit() or int(usec) == 0:
        return None
    return int(usec) / 2 / 1_000_000


class Watchdog:
    """Feeds systemd's watchdog from the event loop, so a loop that stops turning (a
    handler stuck in a blocking call) stops feeding it, and systemd restarts the
    service."""

    def __init__(self, notify: Notifier, interval_s: float) -> None:
        self._notify = notify
        self.interval_s = interval_s
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Send ``WATCHDOG=1`` now and every ``interval_s`` on the running loop."""
        self._feed()

    def _feed(self) -> None:
        self._notify.watchdog()
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(self.interval_s, self._feed)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


@dataclasses.dataclass(frozen=True, slots=True)
class Handover:
    """Everything systemd passed this process: sockets, the notify socket, the watchdog."""

    sockets: list[HandedOverSocket]
    notify: Notifier | None
    watchdog_s: float | None

    def watchdog(self) -> Watchdog | None:
        """A :class:`Watchdog` to start, when systemd asked for one."""
        if self.notify is None or self.watchdog_s is None:
            return None
        return Watchdog(self.notify, self.watchdog_s)


def take(environ: MutableMapping[str, str] | None = None) -> Handover:
    """Read what systemd passed this process, and remove its variables from ``environ``
    (``os.environ``) so that child processes do not take it for theirs.

    Outside systemd this is an empty :class:`Handover`.

    Raises:
        ConfigError: as :func:`listen_sockets`.
    """
    environ = os.environ if environ is None else environ
    return Handover(listen_sockets(environ), notifier(environ), watchdog_interval(environ))
