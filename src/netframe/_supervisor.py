"""The supervisor of ``--workers N``: starts the workers, replaces those that die, and
passes stop requests on.

Its loop is a plain ``select`` over the signal wake-up descriptor, each worker's
process sentinel and each worker's pipe, with no event loop: nothing in it runs user
code, and nothing of it is inherited by a worker (they are spawned, not forked).
"""

from __future__ import annotations

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
from collections.abc import Iterator
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Final

from netframe._errors import Error
from netframe._metrics_http import MetricsThread, bind_metrics
from netframe._reuseport import Listeners, bind_groups, share
from netframe._worker import FORCE, METRICS, RELOAD, STOP, WorkerSpec, worker_main
from netframe.config import Config, ConfigError
from netframe.logs import configure_logging, flush_logs, get_logger, lifecycle_logger
from netframe.loops import loop_factory, loop_lacks
from netframe.metrics import WorkerTotals
from netframe.server import (
    EXIT_FORCED,
    Server,
    StartError,
    failure_reason,
    listen_error,
    listener_kind,
    log_handover,
)
from netframe.systemd import Handover, Notifier, take

__all__ = ["Supervisor"]

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
#: How often the supervisor asks each worker for its counters when --metrics is on: the
#: page is at most this old, and a worker killed outright takes at most this much of
#: its counting with it.
METRICS_POLL_S: Final = 1.0

_STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)
#: Passed on to every worker, which reloads its TLS files.
_RELOAD_SIGNAL: Final = signal.SIGHUP


def _check(config: Config, handover: Handover) -> None:
    """Refuse what would only fail in every worker, before anything is bound."""
    if not sys.platform.startswith("linux"):
        raise ConfigError("workers need Linux: elsewhere SO_REUSEPORT does not spread connections")
    if multiprocessing.parent_process() is not None:
        raise ConfigError(
            "netframe.run() with workers ran again inside a worker process: call it "
            'under `if __name__ == "__main__":`'
        )
    Server(config)  # the handler and the framer resolve here, as in each worker
    for each in handover.sockets:  # one that cannot be served: one line, as without workers
        listener_kind(each.sock)
    loop_factory(config.loop)
    loop_lacks(config.loop, {"unix": bool(config.unix), "tls": config.tls_cert is not None})
    try:
        pickle.dumps(config)
    except Exception as exc:
        raise ConfigError(
            f"with workers the settings go to each worker process, and these cannot "
            f"({exc}): give the handler as a name or module:attribute, or as a class or "
            f"function defined at module level"
        ) from None


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
    asked: bool = False  # asked for its counters, not answered yet (one at a time)


class Supervisor:
    """Starts the workers, replaces those that die, passes stop requests on."""

    def __init__(self, config: Config, count: int) -> None:
        self._config = config
        self._slots = [_Slot(index) for index in range(1, count + 1)]
        self._listeners = Listeners()
        self._handover = Handover([], None, None)
        # systemd's watchdog, fed from this loop: (the notify socket, the interval).
        self._watchdog: tuple[Notifier, float] | None = None
        self._watchdog_at = 0.0
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
        # --metrics: the workers' counters, added up and served by a thread of its own.
        self._totals = WorkerTotals()
        self._metrics: MetricsThread | None = None
        self._metrics_at = 0.0
        # Workers never serve the page themselves: the supervisor asks them instead.
        self._worker_config = config.replace(metrics=None) if config.metrics else config

    def run(self) -> int:
        config = self._config
        # systemd's variables, read once here and removed, so that no worker takes them:
        # the supervisor is the service's main process, the one that notifies.
        handover = self._handover = take()
        _check(config, handover)
        configure_logging(config.log_format, config.log_level, worker="supervisor")
        log_handover(handover, config)
        count = len(self._slots)
        try:
            self._serve_metrics()
            if handover.sockets:  # the socket unit's sockets, each shared by every worker
                self._listeners = share([each.sock for each in handover.sockets], count)
            else:
                self._listeners = bind_groups(config, count)
            with self._signal_handling():
                self._log.info("workers_starting", workers=count, pid=os.getpid())
                if handover.notify is not None and handover.watchdog_s is not None:
                    # Fed from the start, as by one server: a start that hangs is a hang.
                    self._watchdog = (handover.notify, handover.watchdog_s)
                for slot in self._slots:
                    if not self._stopping:
                        self._spawn(slot)
                self._loop()
        except Exception as exc:
            if handover.notify is not None:
                handover.notify.status(f"Failed to start: {failure_reason(exc)}")
            raise
        finally:
            self._close_sockets()
            self._kill_all()  # only after a bug here: every path above reaps its workers
            if self._metrics is not None:
                self._metrics.stop()
            self._selector.close()
            flush_logs()
        if self._error is not None:
            if handover.notify is not None:
                handover.notify.status(f"Failed to start: {failure_reason(self._error)}")
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
        if self._watchdog is not None:
            due.append(self._watchdog_at)
        if self._metrics is not None and not self._stopping:
            due.append(self._metrics_at)
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
        if self._watchdog is not None and now >= self._watchdog_at:
            notify, interval_s = self._watchdog
            notify.watchdog()
            self._watchdog_at = now + interval_s
        if self._metrics is not None and not self._stopping and now >= self._metrics_at:
            self._metrics_at = now + METRICS_POLL_S
            for slot in self._slots:
                # Only one question in flight per worker: a few bytes in its pipe at most,
                # so neither side can ever block on the other's full pipe.
                if slot.ready_at is not None and slot.link is not None and not slot.asked:
                    slot.asked = True
                    self._send(slot, METRICS)

    # -- metrics -------------------------------------------------------------------------

    def _serve_metrics(self) -> None:
        """Serve the workers' summed counters at ``--metrics`` from a thread."""
        address = self._config.metrics_address
        if address is None:
            return
        try:
            sock = bind_metrics(address)
        except OSError as exc:
            raise listen_error("metrics", address, exc) from None
        host, port = sock.getsockname()[:2]
        self._metrics = MetricsThread(sock, self._totals.total)
        self._metrics.start()
        lifecycle_logger().info("metrics_listening", host=host, port=port, path="/metrics")

    # -- workers -------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        ours, theirs = self._context.Pipe()
        sockets = self._listeners.for_worker(slot.index)
        spec = WorkerSpec(slot.index, self._worker_config, sockets, theirs)
        process = self._context.Process(
            target=worker_main, args=(spec,), name=f"netframe-worker-{slot.index}", daemon=True
        )
        try:
            # Blocked signals stay blocked in the child: a Ctrl+C or SIGTERM that comes
            # while it starts waits until it can handle them. (The first start of a spawn
            # process also starts multiprocessing's resource tracker, which unblocks both
            # signals when it is done: start the tracker first. It ignores those two, and
            # is started with SIGHUP blocked, which it never unblocks: a SIGHUP to the
            # whole group, a reload, must not end it.)
            with _signals_blocked((_RELOAD_SIGNAL,)):
                resource_tracker.ensure_running()
            with _signals_blocked((*_STOP_SIGNALS, _RELOAD_SIGNAL)):
                process.start()
        except Exception as exc:  # out of processes or memory: as if it had died at once
            ours.close()
            self._log.error("worker_start_failed", index=slot.index, error=str(exc))
            slot.failure = StartError(f"cannot start worker {slot.index}: {exc}")
            slot.spawned_at, slot.ready_at = time.monotonic(), None  # a death at start
            self._died(slot, None)
            return
        finally:
            theirs.close()
        now = time.monotonic()
        slot.process, slot.link, slot.pid = process, ours, process.pid
        slot.spawned_at, slot.ready_at, slot.failure = now, None, None
        slot.asked = False
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
        elif kind == "metrics":
            slot.asked = False
            self._totals.update(slot.index, slot.pid or 0, rest[0])
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
            if self._handover.notify is not None:
                self._handover.notify.ready(f"Serving with {len(self._slots)} workers")

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
        # Its counters stay in the sum: a counter never goes down (netframe.metrics).
        self._totals.retire(slot.index)
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
        self._totals.restarts += 1
        slot.died_at = now
        self._log.warning("worker_exited", **fields, restart_in_s=delay)

    def _send(self, slot: _Slot, command: bytes) -> None:
        if slot.link is not None:
            with contextlib.suppress(OSError):  # it has just died: its sentinel will say so
                slot.link.send_bytes(command)

    # -- stopping ------------------------------------------------------------------------

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            name = signal.Signals(signum).name
            if signum == _RELOAD_SIGNAL:
                if not self._stopping:
                    self._log.info("reload_requested", signal=name)
                    for slot in self._slots:
                        self._send(slot, RELOAD)
                continue
            if not self._stopping:
                self._log.info("stop_requested", signal=name)
                self._begin_stop()
            elif not self._forced:
                self._forced = True
                self._status = EXIT_FORCED
                self._log.warning("shutdown_forced", signal=name)
                for slot in self._slots:
                    self._send(slot, FORCE)
                # Each aborts and exits at once; give them a moment, not the full grace.
                soon = time.monotonic() + KILL_GRACE_S
                self._kill_at = soon if self._kill_at is None else min(self._kill_at, soon)

    def _begin_stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._handover.notify is not None:
            self._handover.notify.stopping("Stopping: finishing open connections")
        # New connections are refused from now on, as they are by one process stopping:
        # each listening socket closes with its worker's copy (a shared one, Unix or
        # systemd's, with the last worker's; the Unix socket's file goes at once).
        self._close_sockets()
        for slot in self._slots:
            slot.restart_at = None
            self._send(slot, STOP)
        self._kill_at = time.monotonic() + self._config.shutdown_timeout_s + KILL_GRACE_S

    def _close_sockets(self) -> None:
        self._listeners.close()

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
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (*_STOP_SIGNALS, _RELOAD_SIGNAL)
        }
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
def _signals_blocked(signals: tuple[int, ...]) -> Iterator[None]:
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
