"""Prometheus metrics: what a server has counted, read when it is scraped.

``--metrics HOST:PORT`` (``Config.metrics``) serves ``/metrics`` in Prometheus's text
format through `prometheus-client <https://prometheus.github.io/client_python/>`_, the
``metrics`` extra. Nothing here runs per message: the endpoints keep counting what they
always counted (each TCP connection its bytes and messages, folded into per-transport
totals when it closes; UDP listeners their datagrams and drops), and a scrape reads
those and adds the open connections' own counters (:func:`snapshot`). Every figure is
a plain number in a :data:`Snapshot`, so the snapshots of several worker processes add
up (:class:`WorkerTotals`), and a worker that dies leaves its counters behind instead
of taking them with it.

The families, their labels and what they mean are listed in :data:`FAMILIES` and in
``docs/operations.md`` ("Metrics").
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias

from netframe._build import BUILD
from netframe._version import __version__
from netframe.config import ConfigError
from netframe.handlers import CloseReason

if TYPE_CHECKING:
    from netframe._endpoint import EndpointContext

__all__ = ["Family", "collector_registry"]

#: One time series: its family's name and its label values, in the family's order.
Series: TypeAlias = tuple[str, tuple[str, ...]]
#: Every series of one server (or of several, added up) and its value.
Snapshot: TypeAlias = dict[Series, float]


@dataclasses.dataclass(frozen=True, slots=True)
class Family:
    """A metric family as Prometheus shows it: name, type, label names, help text."""

    name: str
    kind: Literal["counter", "gauge"]
    labels: tuple[str, ...]
    help: str


#: Every family netframe serves (besides prometheus-client's own ``process_*``,
#: ``python_*`` families). Counters never go down, also with workers.
FAMILIES: Final[tuple[Family, ...]] = (
    Family("netframe_connections_open", "gauge", ("transport",),
           "Stream connections open now (tcp, unix)."),
    Family("netframe_connections_max", "gauge", (),
           "The stream connection cap in force (max_connections, auto resolved); with "
           "workers, the sum of the workers' caps."),
    Family("netframe_connections_total", "counter", ("transport",),
           "Stream connections accepted and served; refused ones are not counted here."),
    Family("netframe_connections_closed_total", "counter", ("transport", "reason"),
           "Stream connections closed, by close reason (the reason of connection_closed)."),
    Family("netframe_connections_refused_total", "counter", ("transport", "reason"),
           "Stream connections refused before any handler was made (max_connections, "
           "max_per_ip, no_file_descriptors)."),
    Family("netframe_messages_received_total", "counter", ("transport",),
           "Messages received: framed messages on a stream, every datagram over UDP."),
    Family("netframe_messages_sent_total", "counter", ("transport",),
           "Messages sent: replies, greetings, pushes and error lines; datagrams over UDP."),
    Family("netframe_bytes_received_total", "counter", ("transport",),
           "Bytes received from clients (PROXY headers excluded)."),
    Family("netframe_bytes_sent_total", "counter", ("transport",),
           "Bytes sent to clients (refusals' error lines excluded)."),
    Family("netframe_udp_datagrams_dropped_total", "counter", ("reason",),
           "UDP datagrams dropped without a reply, and replies not sent, by reason."),
    Family("netframe_proxy_headers_rejected_total", "counter", ("reason",),
           "Connections closed because their PROXY protocol header was refused."),
    Family("netframe_workers", "gauge", (),
           "Worker processes serving now (with --workers)."),
    Family("netframe_worker_restarts_total", "counter", (),
           "Worker processes that died and were replaced (with --workers)."),
    Family("netframe_worker_cpu_seconds_total", "counter", ("worker",),
           "CPU time of the worker process in each place (with --workers); starts again "
           "from 0 when a worker is replaced, as process_cpu_seconds_total does."),
    Family("netframe_worker_resident_memory_bytes", "gauge", ("worker",),
           "Resident memory of the worker process in each place (with --workers)."),
    Family("netframe_worker_open_fds", "gauge", ("worker",),
           "Open file descriptors of the worker process in each place (with --workers)."),
    Family("netframe_info", "gauge", ("version", "build"),
           "Always 1: the netframe version and build (compiled or pure)."),
)  # fmt: skip
#: What a worker that died leaves behind: its counters (not those of its process).
_COUNTERS: Final = frozenset(
    family.name
    for family in FAMILIES
    if family.kind == "counter" and family.name != "netframe_worker_cpu_seconds_total"
)

STREAMS: Final = ("tcp", "unix")
#: Refusal and drop reasons shown at 0 before they first happen, so that a rate over
#: them exists from the start (Prometheus cannot tell "never" from "not scraped").
_REFUSALS: Final = ("max_connections", "max_per_ip", "no_file_descriptors")
_DROPS: Final = (
    "too_large", "low_source_port", "rate_limited", "empty", "undecodable",
    "handler_error", "async_handler_busy", "reply_too_large", "send_paused",
)  # fmt: skip
_CLOSE_REASONS: Final = tuple(
    r.value for r in CloseReason if r not in (CloseReason.MAX_CONNECTIONS, CloseReason.MAX_PER_IP)
)


def require() -> None:
    """Check that prometheus-client can be imported.

    Raises:
        ConfigError: it cannot; the message names the extra to install.
    """
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--metrics needs prometheus-client: pip install 'netframe[metrics]'"
        ) from None


def snapshot(
    ctx: EndpointContext, transports: Collection[str] = ("tcp", "udp", "unix")
) -> Snapshot:
    """Every netframe series of one server now: the closed connections' totals plus
    the open ones' own counters, UDP's counts, refusals and rejections, for the
    ``transports`` it serves (a series that has counted something is there anyway).

    Runs on the server's loop (a scrape, or a worker asked by its supervisor), so no
    connection opens or closes while it reads; it costs one pass over the open
    connections.
    """
    live = {network: [0, 0, 0, 0, 0] for network in STREAMS}
    for conn in ctx.connections:
        figures = live.get(conn.network)
        if figures is not None:
            figures[0] += 1
            figures[1] += conn.bytes_in
            figures[2] += conn.bytes_out
            figures[3] += conn.messages_in
            figures[4] += conn.messages_out
    values: Snapshot = {}
    if "tcp" in transports or "unix" in transports:
        values["netframe_connections_max", ()] = ctx.max_connections
    counters = ctx.counters
    for network, totals in (("tcp", counters.tcp), ("unix", counters.unix)):
        if network not in transports and not totals.connections:
            continue
        count, bytes_in, bytes_out, messages_in, messages_out = live[network]
        labels = (network,)
        values["netframe_connections_open", labels] = count
        values["netframe_connections_total", labels] = totals.connections + count
        values["netframe_bytes_received_total", labels] = totals.bytes_in + bytes_in
        values["netframe_bytes_sent_total", labels] = totals.bytes_out + bytes_out
        values["netframe_messages_received_total", labels] = totals.messages_in + messages_in
        values["netframe_messages_sent_total", labels] = totals.messages_out + messages_out
        for reason in _CLOSE_REASONS:
            values["netframe_connections_closed_total", (network, reason)] = 0
        for reason, closed in totals.closes().items():
            values["netframe_connections_closed_total", (network, reason)] = closed
        for reason in _REFUSALS:
            values["netframe_connections_refused_total", (network, reason)] = 0
    for (network, reason), refused in counters.refusals.items():
        values["netframe_connections_refused_total", (network, reason)] = refused
    for reason, rejected in counters.proxy_rejected.items():
        values["netframe_proxy_headers_rejected_total", (reason,)] = rejected
    udp = counters.udp
    if "udp" not in transports and not udp.received:
        return values
    values["netframe_messages_received_total", ("udp",)] = udp.received
    values["netframe_messages_sent_total", ("udp",)] = udp.sent
    values["netframe_bytes_received_total", ("udp",)] = udp.bytes_in
    values["netframe_bytes_sent_total", ("udp",)] = udp.bytes_out
    for reason in _DROPS:
        values["netframe_udp_datagrams_dropped_total", (reason,)] = 0
    for reason, dropped in udp.dropped.items():
        values["netframe_udp_datagrams_dropped_total", (reason,)] = dropped
    return values


def add(into: Snapshot, other: Mapping[Series, float], *, counters_only: bool = False) -> None:
    """Add ``other``'s values to ``into``'s, series by series (``counters_only``: its
    counters alone, as a dead worker leaves them)."""
    for series, value in other.items():
        if counters_only and series[0] not in _COUNTERS:
            continue
        into[series] = into.get(series, 0) + value


class WorkerTotals:
    """The workers' snapshots added up, for the supervisor's ``/metrics``.

    The supervisor's loop stores each worker's latest snapshot (:meth:`update`) and,
    when a worker's process ends, keeps its counters (:meth:`retire`): a counter must
    never go down, and the process that replaces it starts from zero. The page's thread
    reads the sum (:meth:`total`); a lock keeps it from seeing half of a change.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[int, tuple[int, Snapshot]] = {}  # by worker index: (pid, values)
        self._retired: Snapshot = {}
        #: Workers that died and were replaced (the supervisor's loop counts them).
        self.restarts = 0

    def update(self, index: int, pid: int, values: Snapshot) -> None:
        """Worker ``index``, process ``pid``, reported ``values`` (newer than its last)."""
        with self._lock:
            self._live[index] = (pid, values)

    def retire(self, index: int) -> None:
        """Worker ``index``'s process ended: its last counters join the dead ones'."""
        with self._lock:
            _, values = self._live.pop(index, (0, {}))
            add(self._retired, values, counters_only=True)

    def total(self) -> Snapshot:
        """The sum over the live workers' latest snapshots and the dead ones' counters,
        with the supervisor's own series (``netframe_workers``, restarts)."""
        with self._lock:
            values = dict(self._retired)
            live = dict(self._live)
        for index, (pid, each) in live.items():
            add(values, each)
            figures = process_figures(pid)
            if figures is not None:
                label = (str(index),)
                values["netframe_worker_cpu_seconds_total", label] = figures[0]
                values["netframe_worker_resident_memory_bytes", label] = figures[1]
                values["netframe_worker_open_fds", label] = figures[2]
        values["netframe_workers", ()] = len(live)
        values["netframe_worker_restarts_total", ()] = self.restarts
        return values


def process_figures(pid: int) -> tuple[float, int, int] | None:
    """CPU seconds, resident bytes and open descriptors of process ``pid``, read from
    Linux's ``/proc`` (as prometheus-client's process collector reads its own); ``None``
    where they cannot be read (gone, or not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            # The fields after the command name, which is in parentheses and may hold any.
            fields = file.read().rpartition(b")")[2].split()
        descriptors = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    cpu_s = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14, 15)
    return cpu_s, int(fields[21]) * os.sysconf("SC_PAGE_SIZE"), descriptors  # rss (24)


class _Collector:
    """A prometheus-client collector that turns a :data:`Snapshot` into families,
    read anew at each scrape."""

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self._source = source

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        values = self._source()
        values["netframe_info", (__version__, "compiled" if BUILD.compiled else "pure")] = 1
        by_family: dict[str, list[tuple[tuple[str, ...], float]]] = {}
        for (name, labels), value in values.items():
            by_family.setdefault(name, []).append((labels, value))
        for family in FAMILIES:  # a series of a name not listed there is not served
            samples = by_family.get(family.name)
            if not samples:
                continue
            kind = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
            metric = kind(family.name, family.help, labels=family.labels)
            for labels, value in sorted(samples):
                metric.add_metric(labels, value)
            yield metric


def collector_registry(source: Callable[[], Snapshot]) -> Any:
    """A prometheus-client registry of netframe's families, read from ``source`` at
    each scrape, and of prometheus-client's process, platform and garbage-collector
    collectors, which describe the process that serves the page.

    ``--metrics`` serves one; an application that embeds a :class:`~netframe.Server`
    and has an HTTP endpoint of its own can serve
    ``prometheus_client.generate_latest(collector_registry(server.metrics))`` there (on
    the server's loop). Needs prometheus-client (the ``metrics`` extra).
    """
    from prometheus_client import (
        CollectorRegistry,
        GCCollector,
        PlatformCollector,
        ProcessCollector,
    )

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(source))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def render(registry: Any) -> tuple[bytes, str]:
    """The page for ``registry`` in the text format, and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry), CONTENT_TYPE_LATEST
