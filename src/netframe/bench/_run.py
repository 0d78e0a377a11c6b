"""Running one benchmark: the server (spawned or given), the load processes, the figures.

:func:`run_bench` is the library entry point behind ``python -m netframe bench`` and the
comparison suite in ``benchmarks/``. It returns one plain dict (the ``--json`` document).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import multiprocessing
import os
import platform
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any, Final

import psutil

from netframe._version import __version__
from netframe.bench._figures import COUNTERS, TIMELINES, figures
from netframe.bench._histogram import Histogram
from netframe.bench._options import BenchError, BenchOptions, Progress
from netframe.bench._worker import STOP_SIGNAL, Job, raise_open_file_limit, worker_main
from netframe.client import tls_context
from netframe.config import Address, ConfigError
from netframe.loops import resolve_loop_name

__all__ = ["run_bench", "spawned_server"]

# The handler and framing a spawned server runs for each scenario.
_SCENARIO_SERVER = {
    "sessions": "greeting",
    "greeting": "greeting",
    "echo": "echo",
    "udp": "greeting",
    "hold": "greeting",
}
_READY_TIMEOUT_S = 60.0
_SETTLE_S = 1.0


def default_workers(cpus: Sequence[int] | None) -> int:
    """One load process per core the client may use."""
    return len(cpus) if cpus else len(os.sched_getaffinity(0))


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise BenchError("no free port on 127.0.0.1")


def wait_until_listening(host: str, port: int, proc: subprocess.Popen[bytes] | None) -> None:
    """Poll until ``host:port`` accepts TCP connections, or fail with the server's reason."""
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"the server exited with status {proc.returncode} while starting")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.05)
    raise BenchError(f"the server at {host}:{port} did not start listening")


@contextlib.contextmanager
def spawned_server(
    argv: Sequence[str], host: str, port: int, cpus: Sequence[int] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` as a server process for the block; SIGTERM it, then SIGKILL if stuck.

    Its stderr goes to a temporary file, whose last line is the error when it fails.
    """
    with tempfile.TemporaryFile() as log:
        # A session of its own: a terminal's Ctrl+C, sent to the whole foreground group,
        # must not stop the server mid-window; the bench stops it below.
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
        try:
            if cpus:
                try:
                    os.sched_setaffinity(proc.pid, cpus)
                except OSError as exc:
                    raise BenchError(f"cannot pin the server to CPUs {cpus}: {exc}") from None
            try:
                wait_until_listening(host, port, proc)
            except BenchError as exc:
                log.seek(0)
                lines = log.read().decode(errors="replace").strip().splitlines()
                raise BenchError(f"{exc}: {lines[-1] if lines else 'no output'}") from None
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def netframe_serve_argv(options: BenchOptions, port: int) -> list[str]:
    """The ``python -m netframe serve`` command a spawned run starts."""
    return [
        sys.executable, "-m", "netframe", "serve",
        "--tcp", f"127.0.0.1:{port}", "--udp", f"127.0.0.1:{port}",
        "--handler", _SCENARIO_SERVER[options.scenario],
        "--framing", options.effective_framing,
        # Per-connection info lines would dominate `sessions`; pass --log-level to change.
        "--log-level", "warning",
        *(options.spawn_args or ()),
    ]  # fmt: skip


def run_bench(options: BenchOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Run one benchmark and return every figure, the options and the environment.

    Raises:
        BenchError: the options are invalid, the server cannot be started or reached,
            or a load process failed.
    """
    options.check()
    if options.tls:  # a CA file that cannot be read is one line, before anything starts
        try:
            tls_context(options.tls_ca)
        except ConfigError as exc:
            raise BenchError(str(exc)) from None
    raise_open_file_limit(options.conns * 2 + 1024)
    if options.spawn_args is None:
        target = options.target
        assert target is not None
        if options.scenario in _GREETED:
            options = _framing_for(options, target)
        return _measure(options, target, options.server_pid, progress)
    port = free_port()
    argv = netframe_serve_argv(options, port)
    with spawned_server(argv, "127.0.0.1", port, options.server_cpus) as proc:
        result = _measure(options, Address("127.0.0.1", port), proc.pid, progress)
    result["server"]["command"] = argv[1:]
    return result


#: Connections ``hold`` must keep for its memory per connection to mean anything: the
#: server's resident size moves in steps of the allocator's arenas, tens to hundreds of KiB.
HOLD_MEMORY_MIN_CONNS: Final = 1000
#: The scenarios whose connections begin with the tutorial's greeting.
_GREETED: Final = ("sessions", "greeting", "hold")
#: How long the probe waits for a greeting, and for the rest of one once it has begun.
_PROBE_S: Final = 3.0
_PROBE_SETTLE_S: Final = 0.2


def _framing_for(options: BenchOptions, target: Address | str) -> BenchOptions:
    """``options`` with the framing the server's greeting shows, when none was given: a
    line (``Welcome!\\n``) means a line server, a bare ``Welcome!`` (netframe's default
    ``auto``, the tutorial's server) bare words, as the tutorial's clients send them.

    Raises:
        BenchError: nothing listens there, no greeting or another one comes, or the
            framing asked for cannot work: each naming what to do.
    """
    greeting = probe_greeting(target, tls_context(options.tls_ca) if options.tls else None)
    if not greeting:
        raise BenchError(
            f"{target} sent no greeting within {_PROBE_S:g} s: the {options.scenario} "
            "scenario speaks the tutorial's exchange (Welcome!, then Hello, NAME!); for an "
            "echo server use --scenario echo"
        )
    if greeting not in (b"Welcome!", b"Welcome!\n"):
        raise BenchError(
            f"{target} greets with {greeting[:80]!r}, not the tutorial's Welcome!: the "
            f"{options.scenario} scenario speaks only that exchange"
        )
    line = greeting.endswith(b"\n")
    framing = options.framing or ("line" if line else "raw")
    if line and framing != "line":
        raise BenchError(
            f"{target} greets with a line ({greeting!r}): it frames lines, so leave "
            "--framing out or pass --framing line"
        )
    if not line and framing == "line":
        # netframe's auto framing answers line clients with lines after a bare greeting;
        # the load generator expects the greeting its framing implies.
        raise BenchError(
            f"{target} greets with a bare {greeting!r}: leave --framing out (bare words, as "
            "the tutorial's clients send them) or pass --framing raw"
        )
    options = dataclasses.replace(options, framing=framing)
    options.check()  # bare words allow no pipelining
    return options


def _probe_connection(target: Address | str, tls: ssl.SSLContext | None) -> socket.socket:
    if isinstance(target, Address):
        sock = socket.create_connection((target.host, target.port), timeout=_PROBE_S)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if isinstance(target, str):
            sock.settimeout(_PROBE_S)
            sock.connect(target)
        if tls is not None:
            name = target.host if isinstance(target, Address) else "localhost"
            return tls.wrap_socket(sock, server_hostname=name)
    except BaseException:
        sock.close()
        raise
    return sock


def probe_greeting(target: Address | str, tls: ssl.SSLContext | None = None) -> bytes:
    """What the server at ``target`` (an address, or a Unix socket's path) sends first,
    read by one short connection (``b""``: nothing within a few seconds), over TLS with
    ``tls``.

    Raises:
        BenchError: the connection is refused or fails (the TLS handshake included).
    """
    try:
        with _probe_connection(target, tls) as sock:
            received = b""
            try:
                while len(received) < 4096 and not received.endswith(b"\n"):
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    received += chunk
                    sock.settimeout(_PROBE_SETTLE_S)  # a bare greeting has no end mark
            except TimeoutError:
                pass
            return received
    except OSError as exc:
        raise BenchError(f"cannot connect to {target}: {exc.strerror or exc}") from None


def _jobs(options: BenchOptions, target: Address | str) -> list[Job]:
    host, port, path = (
        ("", 0, target) if isinstance(target, str) else (target.host, target.port, None)
    )
    workers = min(options.conns, options.workers or default_workers(options.client_cpus))
    share, extra = divmod(options.conns, workers)
    jobs, first = [], 0
    for index in range(workers):
        conns = share + (1 if index < extra else 0)
        rate = options.rate * conns / options.conns if options.rate else None
        jobs.append(
            Job(index=index, scenario=options.scenario, host=host, port=port, path=path,
                conns=conns, first_conn_id=first, pipeline=options.pipeline, size=options.size,
                framing=options.effective_framing, rate=rate, warmup_s=options.warmup_s,
                duration_s=options.duration_s, udp_timeout_s=options.udp_timeout_s,
                cpus=options.client_cpus, tls=options.tls, tls_ca=options.tls_ca)
        )  # fmt: skip
        first += conns
    return jobs


def _measure(
    options: BenchOptions, target: Address | str, pid: int | None, progress: Progress | None
) -> dict[str, Any]:
    try:
        server = psutil.Process(pid) if pid else None
    except psutil.Error:
        raise BenchError(f"no process with id {pid} to measure") from None
    try:
        rss_idle = server.memory_info().rss if server else None
    except psutil.Error:
        raise BenchError(f"cannot read process {pid}: not running or not ours") from None
    jobs = _jobs(options, target)
    context = multiprocessing.get_context("spawn")
    counters = context.Array("q", len(jobs), lock=False)
    pipes, procs = [], []
    for job in jobs:
        parent, child = context.Pipe()
        proc = context.Process(target=worker_main, args=(job, child, counters), daemon=True)
        proc.start()
        child.close()  # so a load process that dies shows as the end of its pipe
        pipes.append(parent)
        procs.append(proc)
    finished = False
    try:
        ready = [_receive(pipe, "ready", _READY_TIMEOUT_S) for pipe in pipes]
        if options.scenario == "hold":
            time.sleep(_SETTLE_S)
        rss_loaded = server.memory_info().rss if server else None
        start_ns = time.monotonic_ns() + 50_000_000
        for pipe in pipes:
            pipe.send(start_ns)
        window_start = start_ns + int(options.warmup_s * 1e9)
        # Where the window lies on the wall clock, for merging runs of several machines.
        window_start_unix_s = (time.time_ns() - time.monotonic_ns() + window_start) / 1e9
        window_end = window_start + int(options.duration_s * 1e9)
        cpu_start = cpu_end = None
        connections: dict[int, int] = {}
        interrupted = False
        try:
            cpu_start = _wait_and_read_cpu(
                server, window_start, start_ns, counters, options, progress
            )
            # How the connections are spread is read in the middle of the window, not at
            # its start: a worker still starting (a busy machine) has not accepted its
            # share of the connections the kernel queued for it by then.
            middle = window_start + (window_end - window_start) // 2
            cpu_middle = _wait_and_read_cpu(server, middle, start_ns, counters, options, progress)
            connections = _connections_by_process(server, target, cpu_middle)
            cpu_end = _wait_and_read_cpu(server, window_end, start_ns, counters, options, progress)
        except KeyboardInterrupt:  # Ctrl+C: end the window now, and report what it holds
            interrupted = True
            for proc in procs:
                if proc.pid is not None:
                    with contextlib.suppress(OSError):
                        os.kill(proc.pid, STOP_SIGNAL)
            if cpu_start is None:
                raise
            cpu_end = _read_cpu(server)
        rss_end = server.memory_info().rss if server else None
        results = [_receive(pipe, "result", 60.0) for pipe in pipes]
        finished = True
    except psutil.Error:
        raise BenchError("the server process exited during the run") from None
    finally:
        for proc in procs:
            if not finished:  # the others wait for a start that will not come
                proc.kill()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
        for pipe in pipes:
            pipe.close()
    window_s = min(r["window_ns"] for r in results) / 1e9 if interrupted else options.duration_s
    if window_s <= 0:
        raise KeyboardInterrupt  # interrupted before the measured window began
    result = _combine(options, results, window_s)
    result["window_s"] = window_s
    result["window_start_unix_s"] = window_start_unix_s
    if interrupted:
        result["partial"] = True
    result["server"] = {
        "pid": pid,
        "cpu_s": None if server is None else cpu_end[_TOTAL] - cpu_start[_TOTAL],
        "rss_idle_bytes": rss_idle,
        "rss_loaded_bytes": rss_loaded,
        "rss_end_bytes": rss_end,
    }
    ops = result["ops"]
    if server is not None and ops:
        result["server"]["cpu_us_per_op"] = (cpu_end[_TOTAL] - cpu_start[_TOTAL]) / ops * 1e6
    if len(cpu_end) > 2:  # a supervisor and its workers (netframe serve --workers N)
        result["server"]["processes"] = [
            {"pid": each, "cpu_s": cpu_end[each] - cpu_start.get(each, 0.0),
             "connections": connections.get(each)}
            for each in cpu_end if each != _TOTAL
        ]  # fmt: skip
    if options.scenario == "hold":
        held = sum(r["held"] for r in results)
        # Held connections do nothing: there is no throughput or latency to report.
        result.update(ops=None, ops_per_s=None, latency_us=None, latency_histogram=None,
                      timeline_ops_per_s=None)  # fmt: skip
        result["hold"] = hold = {"requested": options.conns, "held": held}
        if server is not None and held and rss_idle is not None and rss_end is not None:
            peak = max(rss_loaded or 0, rss_end)
            hold["bytes_per_conn"] = (peak - rss_idle) / held
            if held < HOLD_MEMORY_MIN_CONNS:
                hold["warning"] = (
                    f"{held:,} connections are too few for a memory figure per connection: "
                    f"the allocator's steps are as large; hold {HOLD_MEMORY_MIN_CONNS:,} or more"
                )
        elif server is None:
            hold["warning"] = "no memory figure without the server's pid (--server-pid)"
    result["connections_ready"] = sum(ready)
    result["options"] = _options_dict(options, target, len(jobs))
    result["environment"] = environment()
    return result


def _receive(pipe: Any, kind: str, timeout_s: float) -> Any:
    if not pipe.poll(timeout_s):
        raise BenchError(f"a load process sent no {kind!r} within {timeout_s:g} s")
    try:
        tag, value = pipe.recv()
    except EOFError:
        raise BenchError("a load process exited without reporting (see its error above)") from None
    if tag == "failed":
        raise BenchError(f"a load process failed: {value}")
    if tag != kind:
        raise BenchError(f"a load process sent {tag!r} instead of {kind!r}")
    return value


def _wait_and_read_cpu(
    server: psutil.Process | None,
    until_ns: int,
    start_ns: int,
    counters: Any,
    options: BenchOptions,
    progress: Progress | None,
) -> dict[int, float]:
    total = options.warmup_s + options.duration_s
    while (now := time.monotonic_ns()) < until_ns:
        if progress is not None:
            elapsed = (now - start_ns) / 1e9
            phase = "warmup" if elapsed < options.warmup_s else "measure"
            progress(phase, max(0.0, elapsed), total, sum(counters))
        time.sleep(min(0.1, (until_ns - now) / 1e9))
    return _read_cpu(server)


#: The key of the total in a CPU reading (no process has pid 0).
_TOTAL: Final = 0


def _read_cpu(server: psutil.Process | None) -> dict[int, float]:
    """CPU seconds used so far, by pid: the server's and each of its descendants' (the
    workers of ``netframe serve --workers N``), and under :data:`_TOTAL` all of them,
    with descendants that have ended and been reaped."""
    if server is None:
        return {_TOTAL: 0.0}
    times = server.cpu_times()
    reading = {server.pid: times.user + times.system}
    total = times.user + times.system
    if server.pid != os.getpid():  # this process's own children are the load processes
        total += times.children_user + times.children_system
        for child in server.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # it ended meanwhile
                child_times = child.cpu_times()
                reading[child.pid] = child_times.user + child_times.system
                total += reading[child.pid]
    reading[_TOTAL] = total
    return reading


def _connections_by_process(
    server: psutil.Process | None, target: Address | str, reading: dict[int, float]
) -> dict[int, int]:
    """Established TCP connections to ``target``'s port held by each process of a
    multi-process server now: how the kernel spread them over its workers (not counted
    for a Unix socket's path, which all workers share)."""
    if server is None or len(reading) <= 2 or isinstance(target, str):
        return {}
    port = target.port
    counts = {}
    for pid in reading:
        with contextlib.suppress(psutil.Error):
            counts[pid] = sum(
                1
                for conn in psutil.Process(pid).net_connections(kind="tcp")
                if conn.status == psutil.CONN_ESTABLISHED and conn.laddr and conn.laddr.port == port
            )
    return counts


def _combine(
    options: BenchOptions, results: list[dict[str, Any]], duration: float
) -> dict[str, Any]:
    """The workers' tallies as one result; rates over ``duration``, the window's seconds."""
    counts = {name: sum(r[name] for r in results) for name in COUNTERS if name != "client_cpu_s"}
    counts["client_cpu_s"] = sum(r["cpu_s"] for r in results)
    timelines = {name: [sum(steps) for steps in zip(*(r[name] for r in results), strict=True)]
                 for name in TIMELINES}  # fmt: skip
    return figures(
        options.scenario,
        options.size,
        counts,
        next((r["first_error"] for r in results if r["first_error"]), None),
        Histogram.merged(r["histogram"] for r in results),
        duration,
        timelines,
    )


def _options_dict(options: BenchOptions, target: Address | str, workers: int) -> dict[str, Any]:
    data = dataclasses.asdict(options)
    data["target"] = str(target)
    data["workers"] = workers
    data["framing"] = options.effective_framing
    return data


def environment() -> dict[str, Any]:
    """Where the figures were measured."""
    model = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    uvloop_version = None
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        uvloop_version = importlib.metadata.version("uvloop")
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "client_loop": resolve_loop_name("auto"),
        "uvloop": uvloop_version,
        "netframe": __version__,
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
