"""A worker process of ``--workers N``: the ordinary server on the sockets it is handed.

It is started by the supervisor (``netframe._supervisor``) with multiprocessing's
``spawn`` method, so it is a fresh interpreter: its event loop, structlog set-up and
log-writer thread are its own. It logs with a ``worker`` field, reports to the
supervisor when it serves (or the error that kept it from serving), and stops
gracefully when told to, on SIGTERM, or when the supervisor's end of the pipe closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import socket
import sys
from multiprocessing.connection import Connection
from typing import Any, Final

from netframe._errors import Error
from netframe.config import Config
from netframe.logs import configure_logging, flush_logs, get_logger
from netframe.loops import loop_factory, resolve_loop_name
from netframe.server import Server, StartError, StopRequests, serve_until_signal

__all__ = ["FORCE", "METRICS", "RELOAD", "STOP", "WorkerSpec", "worker_main"]

# The supervisor's commands to a worker, over the worker's pipe.
STOP: Final = b"stop"
FORCE: Final = b"force"
RELOAD: Final = b"reload"
#: "Send me your counters": answered with ("metrics", Server.metrics()) (--metrics).
METRICS: Final = b"metrics"


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a worker process is handed (pickled by multiprocessing, descriptors passed)."""

    index: int
    config: Config
    sockets: list[socket.socket]
    link: Connection


def worker_main(spec: WorkerSpec) -> None:
    """A worker process: serve ``spec.sockets`` until the supervisor or SIGTERM stops it."""
    # Ctrl+C reaches every process of the terminal's group: the supervisor acts on it.
    # (Both signals arrive blocked, see Supervisor._spawn; SIGTERM is unblocked once handled.)
    # SIGHUP likewise: the supervisor passes its own on to every worker as "reload", so
    # a reload of the whole group (kill -HUP -PGID) happens once per worker, not twice.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGHUP})
    config = spec.config
    configure_logging(config.log_format, config.log_level, worker=str(spec.index))
    link = _SupervisorLink(spec.link)
    status = 0
    try:
        server = link.server = Server(config, sockets=spec.sockets)
        with asyncio.Runner(loop_factory=loop_factory(config.loop)) as runner:
            runner.run(
                serve_until_signal(
                    server,
                    resolve_loop_name(config.loop),
                    signals=(),  # SIGTERM is the link's: see _SupervisorLink.attach
                    reload_signals=(),  # SIGHUP comes as the supervisor's "reload"
                    attach=link.attach,
                    on_serving=link.ready,
                )
            )
    except Error as exc:  # failed to start; on_start's traceback is in the log already
        link.failed(exc)
        status = 1
    except Exception as exc:
        get_logger().exception("worker_failed")
        link.failed(StartError(f"worker {spec.index} failed: {exc!r}"))
        status = 1
    finally:
        flush_logs()
    sys.exit(status)


class _SupervisorLink:
    """A worker's end of its pipe: reports going up, stop commands coming down."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.server: Server | None = None

    def attach(self, requests: StopRequests) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self._conn.fileno(), self._command, loop, requests)
        # SIGTERM only ever starts the graceful stop here, however often it comes: the
        # whole group gets one from systemd or `kill -TERM -PGID`, and the supervisor's
        # own "stop" may come before or after it. Forcing is the supervisor's to say.
        loop.add_signal_handler(signal.SIGTERM, lambda: requests.stop(signal="SIGTERM"))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # handled from here on

    def _command(self, loop: asyncio.AbstractEventLoop, requests: StopRequests) -> None:
        try:
            command = self._conn.recv_bytes()
        except (EOFError, OSError):
            # The supervisor is gone (killed outright): stop rather than serve unwatched.
            loop.remove_reader(self._conn.fileno())
            requests.stop(by="supervisor_gone")
            return
        if command == RELOAD:
            requests.reload(by="supervisor")
        elif command == METRICS:
            try:
                values = self.server.metrics() if self.server is not None else {}
            except LookupError:  # not started yet: nothing counted
                values = {}
            self._send(("metrics", values))  # always answered: the supervisor waits for it
        elif command == FORCE:
            requests.force(by="supervisor")
        else:
            requests.stop(by="supervisor")

    def ready(self) -> None:
        flush_logs()  # its `listening` and `serving` lines come before the supervisor's
        self._send(("ready",))

    def failed(self, exc: BaseException) -> None:
        try:
            self._send(("failed", exc))
        except Exception:  # an exception that does not pickle: its text does
            self._send(("failed", StartError(str(exc))))

    def _send(self, message: tuple[Any, ...]) -> None:
        with contextlib.suppress(OSError):  # the supervisor is gone: nobody to tell
            self._conn.send(message)
