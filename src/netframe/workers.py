"""``--workers N``: a supervisor and N server processes that share the listeners.

The blocking :func:`run` (``netframe.run``, and so ``netframe serve``) serves in its own
process when ``workers`` is 1, the default. With more, the process becomes a supervisor:

- It binds every listener once per worker, all to one address with ``SO_REUSEPORT``, so
  that the kernel spreads connections (and UDP flows) over the workers' sockets, each
  with an accept queue of its own. The first socket of each address is bound *without*
  the option, and only then given it: that bind fails, as a single server's does, if
  anything at all holds the port, a group of ``SO_REUSEPORT`` sockets included, so a
  second netframe never joins a running one. Port 0 is resolved by that first bind, and
  the rest of the group binds the real port.
- It starts the workers with :mod:`multiprocessing`'s ``spawn`` method: fresh
  interpreters, each handed its sockets, the settings and one end of a pipe. A worker
  runs the ordinary :class:`~netframe.Server` on its sockets, logs with a ``worker``
  field, tells the supervisor when it serves, and stops when told to (or when the pipe
  breaks: a supervisor killed outright does not leave its workers serving on their own).
- It keeps its own copy of every socket, so a worker that dies loses only the
  connections it had accepted: those queued on its socket wait for the replacement. A
  worker that dies is replaced at once; one that dies before it serves, or soon after,
  is replaced after a delay that doubles each time, and after
  :data:`MAX_QUICK_DEATHS` such deaths in a row the supervisor gives up.
- A first SIGINT or SIGTERM closes the supervisor's sockets and tells every worker to
  stop gracefully; a second tells them to abort. Workers ignore SIGINT, which a
  terminal sends to every process of the group: the supervisor acts on it for them.

The supervisor's loop is a plain ``select`` over the signal wake-up descriptor, each
worker's process sentinel and each worker's pipe, with no event loop: nothing in it
runs user code, and nothing in it is inherited by a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import pickle
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Final

from netframe._datagram import ask_receive_buffer
from netframe._errors import Error
from netframe.config import Config, ConfigError
from netframe.logs import configure_logging, flush_logs, get_logger, lifecycle_logger
from netframe.loops import loop_factory, resolve_loop_name
from netframe.server import (
    EXIT_FORCED,
    Server,
    StartError,
    StopRequests,
    ensure_no_running_loop,
    listen_error,
    prepare_tcp_listener,
    run_in_process,
    serve_until_signal,
)

__all__ = ["run", "worker_count"]

#: A worker that dies before it serves, or within this long after, died "at start".
START_GRACE_S: Final = 5.0
#: The delay before replacing a worker that died at start, doubled for each such death
#: in a row, up to :data:`BACKOFF_MAX_S`; a worker that served longer is replaced at once.
BACKOFF_FIRST_S: Final = 0.25
BACKOFF_MAX_S: Final = 8.0
#: Deaths at start in a row, in one worker's place, after which the supervisor stops
#: everything and exits with status 1: a crash loop must not spin forever.
MAX_QUICK_DEATHS: Final = 5
#: How long past the shutdown timeout the supervisor waits for a stopping worker before
#: it kills it (a worker stuck in a handler that never yields).
KILL_GRACE_S: Final = 5.0

# The supervisor's commands to a worker, over the worker's pipe.
_STOP: Final = b"stop"
_FORCE: Final = b"force"
_STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)


def run(config: Config | None = None, **settings: Any) -> int:
    """Run a server in the foreground until SIGINT or SIGTERM; return the exit status.

    The blocking form of :class:`~netframe.Server`, with the same arguments. It
    configures structlog from ``config`` (``log_format``, ``log_level``) and runs on the
    event loop ``config.loop`` names. The first signal starts a graceful shutdown; a
    second one aborts every connection and exits at once with status 1.

    With ``workers`` above 1 (``None``: one per usable core), this process supervises
    that many worker processes, each serving the listeners through a socket of its own
    (see ``docs/operations.md``, "Workers"). Each worker imports the main module again,
    as :mod:`multiprocessing` does, so a script must call this under
    ``if __name__ == "__main__":``, and the handler must be importable there (a name,
    ``module:attribute``, or a class or function defined at module level).

    Returns:
        0 after a graceful stop; 1 when a second signal forced the stop, a worker did
        not stop cleanly, or a worker kept dying as it started.

    Raises:
        ConfigError, HandlerError, LoopUnavailable, ListenError, StartError: before
            serving starts (with workers: :class:`StartError` also when a worker dies
            before it serves, and the error a worker met when it raised one).
        RunInLoopError: called inside a running event loop (use :class:`Server`).
    """
    if config is None:
        config = Config(**settings)
    elif settings:
        config = config.replace(**settings)
    count = worker_count(config.workers)
    if count == 1:
        return run_in_process(config)
    ensure_no_running_loop()
    return _Supervisor(config, count).run()


def worker_count(workers: int | None) -> int:
    """The number of processes the ``workers`` setting stands for: itself, or for
    ``None`` (``auto``) the cores this process may run on."""
    if workers is not None:
        return workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _check(config: Config) -> None:
    """Refuse what would only fail in every worker, before anything is bound."""
    if not sys.platform.startswith("linux"):
        raise ConfigError("workers need Linux: elsewhere SO_REUSEPORT does not spread connections")
    if multiprocessing.parent_process() is not None:
        raise ConfigError(
            "netframe.run() with workers ran again inside a worker process: call it "
            'under `if __name__ == "__main__":`'
        )
    Server(config)  # the handler and the framer resolve here, as in each worker
    loop_factory(config.loop)
    try:
        pickle.dumps(config)
    except Exception as exc:
        raise ConfigError(
            f"with workers the settings go to each worker process, and these cannot "
            f"({exc}): give the handler as a name or module:attribute, or as a class or "
            f"function defined at module level"
        ) from None


# == binding: one group of SO_REUSEPORT sockets per address ====================================


def _bind_groups(config: Config, count: int) -> list[list[socket.socket]]:
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


# == the supervisor ===========================================================================


@dataclasses.dataclass(frozen=True, slots=True)
class _WorkerSpec:
    """What a worker process is handed (pickled by multiprocessing, descriptors passed)."""

    index: int
    config: Config
    sockets: list[socket.socket]
    link: Connection


@dataclasses.dataclass(slots=True)
class _Slot:
    """One worker's place: the process in it now, and its history of deaths."""

    index: int
    process: BaseProcess | None = None
    link: Connection | None = None
    pid: int | None = None
    spawned_at: float = 0.0
    ready_at: float | None = None
    failure: BaseException | None = None  # what the worker reported before it exited
    quick_deaths: int = 0
    restart_at: float | None = None
    died_at: float | None = None  # when the previous process's exit was seen


class _Supervisor:
    """Starts the workers, replaces those that die, passes stop requests on."""

    def __init__(self, config: Config, count: int) -> None:
        self._config = config
        self._slots = [_Slot(index) for index in range(1, count + 1)]
        self._groups: list[list[socket.socket]] = []
        self._context = multiprocessing.get_context("spawn")
        self._selector = selectors.DefaultSelector()
        self._signals: list[int] = []
        self._log = get_logger()
        self._began = time.monotonic()
        self._all_ready = False  # every first worker has served: start-up is over
        self._stopping = False
        self._forced = False
        self._kill_at: float | None = None
        self._status = 0
        self._error: Error | None = None

    def run(self) -> int:
        config = self._config
        _check(config)
        configure_logging(config.log_format, config.log_level, worker="supervisor")
        try:
            self._groups = _bind_groups(config, len(self._slots))
            with self._signal_handling():
                self._log.info("workers_starting", workers=len(self._slots), pid=os.getpid())
                for slot in self._slots:
                    if not self._stopping:
                        self._spawn(slot)
                self._loop()
        finally:
            self._close_sockets()
            self._kill_all()  # only after a bug here: every path above reaps its workers
            self._selector.close()
            flush_logs()
        if self._error is not None:
            raise self._error
        lifecycle_logger().info(
            "workers_stopped",
            status=self._status,
            duration_s=round(time.monotonic() - self._began, 3),
        )
        flush_logs()
        return self._status

    # -- the loop ------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping or any(slot.process for slot in self._slots):
            events = self._selector.select(self._timeout())
            # Signals first: a worker that ended because the whole group got SIGTERM
            # (systemd, a terminal) must count as stopped, not be replaced.
            self._handle_signals()
            for key, _ in events:
                key.data()
            self._run_timers()

    def _timeout(self) -> float | None:
        due = [slot.restart_at for slot in self._slots if slot.restart_at is not None]
        if self._kill_at is not None:
            due.append(self._kill_at)
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _run_timers(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            if slot.restart_at is not None and slot.restart_at <= now and not self._stopping:
                slot.restart_at = None
                self._spawn(slot)
        if self._kill_at is not None and now >= self._kill_at:
            self._kill_at = None
            for slot in self._slots:
                if slot.process is not None:
                    self._log.error("worker_killed", index=slot.index, pid=slot.pid)
                    slot.process.kill()
            self._status = 1

    # -- workers -------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        ours, theirs = self._context.Pipe()
        spec = _WorkerSpec(
            slot.index, self._config, [group[slot.index - 1] for group in self._groups], theirs
        )
        process = self._context.Process(
            target=_worker_main, args=(spec,), name=f"netframe-worker-{slot.index}", daemon=True
        )
        try:
            # Blocked signals stay blocked in the child: a Ctrl+C or SIGTERM that comes
            # while it starts waits until it can handle them.
            with _signals_blocked():
                process.start()
        except Exception as exc:  # out of processes or memory: as if it had died at once
            ours.close()
            self._log.error("worker_start_failed", index=slot.index, error=str(exc))
            slot.failure = StartError(f"cannot start worker {slot.index}: {exc}")
            slot.spawned_at = time.monotonic()
            self._died(slot, None)
            return
        finally:
            theirs.close()
        now = time.monotonic()
        slot.process, slot.link, slot.pid = process, ours, process.pid
        slot.spawned_at, slot.ready_at, slot.failure = now, None, None
        self._selector.register(process.sentinel, selectors.EVENT_READ, lambda: self._exited(slot))
        self._selector.register(ours, selectors.EVENT_READ, lambda: self._message(slot))
        self._log.info("worker_started", index=slot.index, pid=process.pid)

    def _message(self, slot: _Slot) -> bool:
        """Read one report from the worker; False once its end is closed."""
        if slot.link is None:  # its exit, seen in the same round, came first
            return False
        try:
            kind, *rest = slot.link.recv()
        except (EOFError, OSError):  # it is going: its sentinel will tell
            with contextlib.suppress(KeyError):
                self._selector.unregister(slot.link)
            return False
        except Exception as exc:  # a report that cannot be read back (an odd exception)
            kind, rest = "failed", [StartError(f"worker {slot.index} failed: {exc!r}")]
        if kind == "failed":
            slot.failure = rest[0]
        elif kind == "ready":
            self._ready(slot)
        return True

    def _ready(self, slot: _Slot) -> None:
        now = time.monotonic()
        slot.ready_at = now
        fields: dict[str, Any] = {"startup_s": round(now - slot.spawned_at, 3)}
        if slot.died_at is not None:  # a replacement: how long its place was empty
            fields["replaced_after_s"] = round(now - slot.died_at, 3)
            slot.died_at = None
        self._log.info("worker_ready", index=slot.index, pid=slot.pid, **fields)
        if not self._all_ready and all(s.ready_at is not None for s in self._slots):
            self._all_ready = True
            lifecycle_logger().info(
                "workers_ready",
                workers=len(self._slots),
                pid=os.getpid(),
                duration_s=round(now - self._began, 3),
            )

    def _exited(self, slot: _Slot) -> None:
        process, link = slot.process, slot.link
        assert process is not None
        assert link is not None
        # The sentinel closes as the process ends, a moment before it can be reaped: a
        # positive timeout makes join wait (blocking) for that moment, not return early.
        process.join(KILL_GRACE_S)
        while _poll(link) and self._message(slot):  # reports sent just before it ended
            pass
        self._selector.unregister(process.sentinel)
        with contextlib.suppress(KeyError):
            self._selector.unregister(link)
        link.close()
        code = process.exitcode
        process.close()
        slot.process = slot.link = None
        self._died(slot, code)

    def _died(self, slot: _Slot, code: int | None) -> None:
        """Log a worker's end and decide what follows: nothing, a replacement, or the end."""
        now = time.monotonic()
        fields: dict[str, Any] = {"index": slot.index, "pid": slot.pid}
        if code is not None and code < 0:
            fields["signal"] = signal.Signals(-code).name
        else:
            fields["status"] = code
        fields["uptime_s"] = round(now - slot.spawned_at, 3)
        if slot.failure is not None:
            fields["error"] = str(slot.failure)
        if self._stopping:
            self._log.info("worker_stopped", **fields)
            if code != 0:
                self._status = 1
            return
        if not self._all_ready:  # the group never served: the start has failed
            self._log.error("worker_exited", **fields)
            self._error = _start_error(slot, code)
            self._begin_stop()
            return
        quick = slot.ready_at is None or now - slot.ready_at < START_GRACE_S
        slot.quick_deaths = slot.quick_deaths + 1 if quick else 0
        if slot.quick_deaths >= MAX_QUICK_DEATHS:
            self._log.warning("worker_exited", **fields)
            self._log.error(
                "workers_failing",
                index=slot.index,
                deaths=slot.quick_deaths,
                message=f"worker {slot.index} died {slot.quick_deaths} times in a row "
                f"within {START_GRACE_S:g} s of starting: giving up",
            )
            self._status = 1
            self._begin_stop()
            return
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (slot.quick_deaths - 1)) if quick else 0
        slot.restart_at = now + delay
        slot.died_at = now
        self._log.warning("worker_exited", **fields, restart_in_s=delay)

    def _send(self, slot: _Slot, command: bytes) -> None:
        if slot.link is not None:
            with contextlib.suppress(OSError):  # it has just died: its sentinel will say so
                slot.link.send_bytes(command)

    # -- stopping ------------------------------------------------------------------------

    def _handle_signals(self) -> None:
        while self._signals:
            name = signal.Signals(self._signals.pop(0)).name
            if not self._stopping:
                self._log.info("stop_requested", signal=name)
                self._begin_stop()
            elif not self._forced:
                self._forced = True
                self._status = EXIT_FORCED
                self._log.warning("shutdown_forced", signal=name)
                for slot in self._slots:
                    self._send(slot, _FORCE)
                # Each aborts and exits at once; give them a moment, not the full grace.
                soon = time.monotonic() + KILL_GRACE_S
                self._kill_at = soon if self._kill_at is None else min(self._kill_at, soon)

    def _begin_stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        # New connections are refused from now on, as they are by one process stopping:
        # each listening socket closes with its worker's copy.
        self._close_sockets()
        for slot in self._slots:
            slot.restart_at = None
            self._send(slot, _STOP)
        self._kill_at = time.monotonic() + self._config.shutdown_timeout_s + KILL_GRACE_S

    def _close_sockets(self) -> None:
        for group in self._groups:
            for sock in group:
                sock.close()

    def _kill_all(self) -> None:
        for slot in self._slots:
            if slot.process is not None:
                slot.process.kill()
                slot.process.join(KILL_GRACE_S)

    @contextlib.contextmanager
    def _signal_handling(self) -> Iterator[None]:
        """SIGINT and SIGTERM queued for the loop, which a wake-up descriptor wakes."""
        wake_read, wake_write = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)

        def drain() -> None:
            with contextlib.suppress(OSError):
                while wake_read.recv(4096):
                    pass

        previous_fd = signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
        previous = {signum: signal.signal(signum, self._on_signal) for signum in _STOP_SIGNALS}
        self._selector.register(wake_read, selectors.EVENT_READ, drain)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            signal.set_wakeup_fd(previous_fd)
            self._selector.unregister(wake_read)
            wake_read.close()
            wake_write.close()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)


def _poll(link: Connection) -> bool:
    try:
        return link.poll(0)
    except (EOFError, OSError):
        return False


def _start_error(slot: _Slot, code: int | None) -> Error:
    """The error a failed start raises: the worker's own, when it reported one."""
    if isinstance(slot.failure, Error):
        return slot.failure
    if code is not None and code < 0:
        how = f"was killed by {signal.Signals(-code).name}"
    else:
        how = f"exited with status {code}"
    return StartError(f"worker {slot.index} {how} before it served")


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# == the worker process =======================================================================


def _worker_main(spec: _WorkerSpec) -> None:
    """A worker process: serve ``spec.sockets`` until the supervisor or SIGTERM stops it."""
    # Ctrl+C reaches every process of the terminal's group: the supervisor acts on it.
    # (Both signals arrive blocked, see _spawn; SIGTERM is unblocked once handled.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    config = spec.config
    configure_logging(config.log_format, config.log_level, worker=str(spec.index))
    link = _SupervisorLink(spec.link)
    status = 0
    try:
        server = Server(config, sockets=spec.sockets)
        with asyncio.Runner(loop_factory=loop_factory(config.loop)) as runner:
            runner.run(
                serve_until_signal(
                    server,
                    resolve_loop_name(config.loop),
                    signals=(signal.SIGTERM,),
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

    def attach(self, requests: StopRequests) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self._conn.fileno(), self._command, loop, requests)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # handled from here on

    def _command(self, loop: asyncio.AbstractEventLoop, requests: StopRequests) -> None:
        try:
            command = self._conn.recv_bytes()
        except (EOFError, OSError):
            # The supervisor is gone (killed outright): stop rather than serve unwatched.
            loop.remove_reader(self._conn.fileno())
            requests.stop(by="supervisor_gone")
            return
        if command == _FORCE:
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
