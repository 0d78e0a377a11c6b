"""One load process: opens its share of the connections, runs the scenario, reports back.

The parent talks to each worker over a pipe: the worker says ``ready`` once its
connections are up (greetings read), the parent answers with the absolute start of the
measured window (``time.monotonic_ns`` is one clock for every process on the machine),
and the worker sends its tally when the window has closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import resource
import signal
import ssl
import time
from collections.abc import Callable
from multiprocessing.connection import Connection as Pipe
from typing import Any, Final, TypeVar

from netframe.bench._load import DatagramLoad, SessionLoad, StreamLoad, Tally
from netframe.client import tls_context
from netframe.config import Framing
from netframe.loops import loop_factory

__all__ = ["STOP_SIGNAL", "Job", "raise_open_file_limit", "worker_main"]

#: What the parent sends a load process to end the measured window now (on Ctrl+C).
STOP_SIGNAL: Final = signal.SIGUSR1

# Connections opened at once while setting up: a SYN burst larger than the server's
# accept backlog would be dropped and retried a second later by the kernel.
_CONNECT_BATCH = 256
_SESSION_TIMEOUT_S = 10.0
_UDP_SWEEP_S = 0.02
_OPEN_LOOP_TICK_S = 0.001


@dataclasses.dataclass(frozen=True)
class Job:
    """What one worker is asked to do (sent to the worker process, so plain data)."""

    index: int
    scenario: str
    host: str
    port: int
    conns: int
    first_conn_id: int
    pipeline: int
    size: int
    framing: Framing
    rate: float | None  # this worker's share of --rate, requests per second
    warmup_s: float
    duration_s: float
    udp_timeout_s: float
    cpus: tuple[int, ...] | None
    #: The server's Unix socket, when it is one (``host`` and ``port`` are then unused).
    path: str | None = None
    #: Speak TLS, trusting the CAs of ``tls_ca`` (the system's when ``None``).
    tls: bool = False
    tls_ca: str | None = None

    @property
    def target(self) -> str:
        return self.path or f"{self.host}:{self.port}"


_Protocol = TypeVar("_Protocol", bound=asyncio.BaseProtocol)


@functools.cache
def _tls_context(ca: str | None) -> ssl.SSLContext:
    """One client context per load process (made once: loading CAs is not free)."""
    return tls_context(ca)


async def _connect(job: Job, factory: Callable[[], _Protocol]) -> tuple[Any, _Protocol]:
    """One stream connection to the job's server, TCP or Unix, over TLS with ``job.tls``
    (the loop's own TLS transport: the load pays for TLS as the server does)."""
    loop = asyncio.get_running_loop()
    options: dict[str, Any] = {}
    if job.tls:
        options = {"ssl": _tls_context(job.tls_ca), "server_hostname": job.host or "localhost"}
    if job.path is not None:
        return await loop.create_unix_connection(factory, job.path, **options)
    return await loop.create_connection(factory, job.host, job.port, **options)


def raise_open_file_limit(wanted: int) -> int:
    """Raise the soft open-file limit toward ``wanted`` (never past the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def messages(job: Job, conn_id: int) -> tuple[bytes, bytes, bytes]:
    """(greeting, request, reply) for one connection of ``job``'s scenario."""
    term = b"" if job.framing == "raw" else b"\n"
    if job.scenario == "echo":
        body = b"x" * max(0, job.size - len(term))
        return b"", body + term, body + term
    greeting = b"Welcome!\n" if job.framing == "line" else b"Welcome!"
    name = b"c%d" % conn_id
    return greeting, name + term, b"Hello, " + name + b"!" + term


def worker_main(job: Job, pipe: Pipe, progress: Any) -> None:
    """Process entry point."""
    # Ctrl+C reaches every process of the terminal's group: the parent alone decides,
    # and asks a load process to end its window early with SIGUSR1 (STOP_SIGNAL).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if job.cpus:
            os.sched_setaffinity(0, job.cpus)
        raise_open_file_limit(job.conns * 2 + 64)
        with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
            result = runner.run(_run(job, pipe, progress))
    except Exception as exc:  # reported to the parent, which prints one line
        pipe.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    pipe.send(("result", result))


async def _run(job: Job, pipe: Pipe, progress: Any) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    tally = Tally(0, 0)  # the real window is known once every worker is ready
    protocols: list[Any] = []
    if job.scenario in ("greeting", "echo", "hold"):
        protocols = await _connect_streams(job, tally)
    elif job.scenario == "udp":
        protocols = [
            await _open_datagram(job, tally, job.first_conn_id + i) for i in range(job.conns)
        ]
    pipe.send(("ready", len(protocols)))
    start_ns = await loop.run_in_executor(None, pipe.recv)
    window_start_ns = start_ns + int(job.warmup_s * 1e9)
    tally.set_window(window_start_ns, window_start_ns + int(job.duration_s * 1e9))
    stop = asyncio.Event()

    def stop_early() -> None:  # the parent was interrupted: end the window now
        tally.end_ns = max(tally.start_ns, min(tally.end_ns, time.monotonic_ns()))
        stop.set()

    loop.add_signal_handler(STOP_SIGNAL, stop_early)
    _stopping.append(stop)
    await _sleep_until(start_ns)
    reporter = loop.create_task(_report_progress(tally, progress, job.index))
    cpu_task = loop.create_task(_cpu_in_window(tally))
    if job.scenario == "sessions":
        await asyncio.gather(
            *(_session_loop(job, tally, job.first_conn_id + i) for i in range(job.conns))
        )
    elif job.scenario == "hold":
        await _sleep_until(tally.end_ns)
    elif job.scenario == "udp":
        await _drive_datagrams(protocols, tally)
    elif job.rate:
        await _drive_open_loop(job, protocols, tally)
    else:
        for protocol in protocols:
            protocol.start()
        await _sleep_until(tally.end_ns)
    cpu_s = await cpu_task
    reporter.cancel()
    held = sum(1 for p in protocols if not getattr(p, "closed", False))
    for protocol in protocols:
        protocol.stop()
    await asyncio.sleep(0.05)  # let the closes go out before the loop stops
    return {
        "ops": tally.ops,
        "errors": tally.errors,
        "first_error": tally.first_error,
        "connect_errors": tally.connect_errors,
        "lost": tally.lost,
        "bytes_in": tally.bytes_in,
        "bytes_out": tally.bytes_out,
        "histogram": tally.record_pending(),
        "timeline": tally.timeline,
        "error_timeline": tally.error_timeline,
        "lost_timeline": tally.lost_timeline,
        "cpu_s": cpu_s,
        "held": held,
        "window_ns": tally.end_ns - tally.start_ns,
    }


# The event set when the parent asks this process to stop early (one per run).
_stopping: list[asyncio.Event] = []


async def _sleep_until(deadline_ns: int) -> None:
    """Sleep until ``deadline_ns``, or until the parent asks to stop early."""
    stop = _stopping[-1] if _stopping else None
    # Loop timers may fire a little early (uvloop rounds to milliseconds): sleep again.
    while (delay := (deadline_ns - time.monotonic_ns()) / 1e9) > 0:
        if stop is None:
            await asyncio.sleep(delay)
            continue
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)


async def _report_progress(tally: Tally, progress: Any, index: int) -> None:
    while True:
        progress[index] = tally.ops
        await asyncio.sleep(0.1)


async def _cpu_in_window(tally: Tally) -> float:
    """This process's CPU seconds (user + system) spent inside the measured window."""
    await _sleep_until(tally.start_ns)
    before = time.process_time()
    await _sleep_until(tally.end_ns)
    return time.process_time() - before


async def _connect_streams(job: Job, tally: Tally) -> list[StreamLoad]:
    protocols: list[StreamLoad] = []

    async def connect(conn_id: int) -> None:
        greeting, request, reply = messages(job, conn_id)
        _, protocol = await _connect(
            job, lambda: StreamLoad(tally, request, reply, greeting, job.pipeline, bool(job.rate))
        )
        try:
            await asyncio.wait_for(protocol.ready, _SESSION_TIMEOUT_S)
        except TimeoutError:
            raise ConnectionError(
                f"no greeting {greeting!r} within {_SESSION_TIMEOUT_S:g} s"
            ) from None
        protocols.append(protocol)

    ids = range(job.first_conn_id, job.first_conn_id + job.conns)
    for batch_start in range(0, job.conns, _CONNECT_BATCH):
        batch = ids[batch_start : batch_start + _CONNECT_BATCH]
        results = await asyncio.gather(*(connect(i) for i in batch), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        tally.connect_errors += len(failures)
        if failures and not protocols:
            reason = str(failures[0]) or type(failures[0]).__name__
            raise ConnectionError(f"cannot connect to {job.target}: {reason}")
    return protocols


async def _open_datagram(job: Job, tally: Tally, conn_id: int) -> DatagramLoad:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_datagram_endpoint(
        lambda: DatagramLoad(tally, conn_id, job.pipeline, int(job.udp_timeout_s * 1e9), job.size),
        remote_addr=(job.host, job.port),
    )
    return protocol


async def _session_loop(job: Job, tally: Tally, conn_id: int) -> None:
    greeting, request, reply = messages(job, conn_id)
    exit_request = b"exit" if job.framing == "raw" else b"exit\n"
    while tally.in_window():
        began = time.monotonic_ns()
        try:
            transport, protocol = await _connect(
                job, lambda: SessionLoad(greeting, request, reply, exit_request)
            )
        except OSError as exc:
            if began >= tally.start_ns:
                tally.connect_errors += 1
                tally.error(f"connect failed: {exc}")
            await asyncio.sleep(0.01)
            continue
        try:
            error = await asyncio.wait_for(protocol.done, _SESSION_TIMEOUT_S)
        except TimeoutError:
            error = f"session timed out after {_SESSION_TIMEOUT_S} s"
            transport.abort()
        now = time.monotonic_ns()
        if error is None:
            tally.done(now, now - began, protocol.bytes_in, len(request) + len(exit_request))
        else:
            tally.error(error)


async def _drive_datagrams(protocols: list[DatagramLoad], tally: Tally) -> None:
    for protocol in protocols:
        protocol.start()
    while tally.in_window():
        await asyncio.sleep(_UDP_SWEEP_S)
        now = time.monotonic_ns()
        for protocol in protocols:
            protocol.sweep(now)


async def _drive_open_loop(job: Job, protocols: list[StreamLoad], tally: Tally) -> None:
    """Send on a fixed schedule, whatever the replies do: ``rate`` spread over connections."""
    assert job.rate
    interval_ns = len(protocols) * 1e9 / job.rate
    start = time.monotonic_ns()
    # Stagger connections across one interval so requests do not leave in bursts.
    next_due = [start + interval_ns * i / len(protocols) for i in range(len(protocols))]
    while tally.in_window():
        now = time.monotonic_ns()
        for i, protocol in enumerate(protocols):
            due: list[int] = []
            t = next_due[i]
            while t <= now:
                due.append(int(t))
                t += interval_ns
            next_due[i] = t
            if due and not protocol.closed:
                protocol.schedule(due)
        await asyncio.sleep(_OPEN_LOOP_TICK_S)
