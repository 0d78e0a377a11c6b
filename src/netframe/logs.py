"""structlog set-up: console or JSON lines on stderr, filtered at the configured level.

netframe logs through ``structlog.get_logger("netframe")`` and binds one logger per
connection. :func:`configure_logging` is called by the command line and by
:func:`netframe.run`; an application that embeds :class:`netframe.Server` keeps its
own structlog configuration.

Logging must never stop the server. Rendered lines go into a bounded queue that a
thread of their own writes out (started by the first line, ended after a second with
none), so a log reader that stalls (a full pipe) or vanishes
(``netframe serve 2>&1 | head -1``) costs the event loop nothing: lines that do not fit
or cannot be written are dropped, counted, and reported in one ``log_lines_dropped``
event once writing works again. Python's own ``asyncio`` logger (where both loops report
errors such as ``accept()`` running out of descriptors) is routed through the same
renderer, at most one line a second per kind of message, so nothing bypasses the
configured format.
"""

from __future__ import annotations

import collections
import logging
import select
import sys
import threading
import time
from typing import Any, Final, TextIO, cast

import structlog
from structlog.typing import FilteringBoundLogger

from netframe._logline import ConnectionLog, LineQueue
from netframe.config import LogFormat

__all__ = [
    "ConnectionLog",
    "LineWriter",
    "configure_logging",
    "connection_log",
    "flush_logs",
    "get_logger",
    "lifecycle_logger",
]

#: Lines waiting for the writer thread before new ones are dropped: about 2-3 MiB of text,
#: some seconds of a busy server's output, so a reader that pauses briefly loses nothing.
MAX_QUEUED_LINES: Final = 10_000
#: Lines joined into one write.
_BATCH_LINES: Final = 512
#: How long the writer lets lines gather after the first wakes it: log lines reach the
#: stream up to this late, and a busy server writes them 512 at a time, not one by one.
_GATHER_S: Final = 0.005
#: A writer thread with nothing to write for this long ends; the next line starts one. A
#: server that logs nothing (``--log-level warning``, held connections) then runs on one
#: thread, and Linux takes the cheaper path for every socket call of a process whose
#: descriptor table no other thread shares (no reference taken on the file, none dropped).
_IDLE_S: Final = 1.0
#: Stdlib records of one kind (the same message template) logged at most this often.
STDLIB_LOG_INTERVAL_S: Final = 1.0


def get_logger() -> FilteringBoundLogger:
    """The framework's logger; bind per-connection context onto it.

    Typed as structlog's ``FilteringBoundLogger`` protocol, which the loggers of both
    set-ups meet: :func:`configure_logging`'s, and an application's own.
    """
    return cast(FilteringBoundLogger, structlog.get_logger("netframe"))


def lifecycle_logger() -> FilteringBoundLogger:
    """A logger for the few events an operator must always see, whatever the level: the
    addresses bound (with port 0 resolved) and that the server is serving.

    They are logged at ``info`` in the configured format, even under ``--log-level
    warning``, as a server's "listening on" line usually is. Where the application
    configured structlog itself, this is :func:`get_logger`.
    """
    if _level is None or _level <= logging.INFO:
        return get_logger()  # what the configured logger shows anyway
    # The processors and output in force now (a test's capture_logs too), without the level.
    config = structlog.get_config()
    return cast(
        FilteringBoundLogger,
        structlog.wrap_logger(
            config["logger_factory"](),
            processors=config["processors"],
            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        ),
    )


def connection_log() -> ConnectionLog | None:
    """The cheap way to log the per-connection ``info`` events, or ``None`` where the
    ordinary logger must be used.

    While the structlog configuration in force is the one :func:`configure_logging`
    made, a :class:`ConnectionLog` writes the lines straight into the line writer, exactly
    as that configuration's renderer would. Under any other configuration (an
    application's own, a test's ``capture_logs``), or with info events off, ``None``.
    """
    if _writer is None or _level is None or _level > logging.INFO:
        return None
    # capture_logs() and others change the processors list in place: compare its items.
    if tuple(structlog.get_config()["processors"]) != _processors:
        return None
    return ConnectionLog(_writer.queue, json=_json_format, worker=_worker)


class LineWriter:
    """A structlog logger that queues rendered lines for a writer thread.

    Every log method only appends to a bounded deque (thread-safe, no lock held while
    writing), so the caller never waits on the stream. The thread writes queued lines in
    batches. It is started by the first line and ends after ``_IDLE_S`` with none, so a
    process that logs nothing has no thread for it. A batch that fails (closed pipe,
    closed file) is dropped and counted, as are lines that arrive while the queue is
    full. After the next successful write, ``on_recovered(count)`` is called once with
    the number dropped since the last report.
    """

    def __init__(
        self,
        stream: TextIO,
        max_lines: int = MAX_QUEUED_LINES,
        max_write_bytes: int | None = None,
    ) -> None:
        self._stream = stream
        self._max_write_bytes = max_write_bytes
        self._wake = threading.Event()
        #: The lines waiting; the event loop's side of it (and the per-connection lines,
        #: which go in directly) is compiled with the hot path. (Made below, once the
        #: fields its wake-up reads exist.)
        self.queue: LineQueue
        # True while the writer holds lines it took from the queue and has not written:
        # with the queue empty, that is all flush() must wait for.
        self._writing = False
        self._stopped = False
        # Lines dropped because a write failed, counted by the writer thread only (those
        # refused by a full queue are counted by the queue, on the event loop's side).
        self._dropped_failed = 0
        self._reported = 0
        self.on_recovered: Any = None
        # Guards the decision to start a thread against one deciding to end.
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.queue = LineQueue(max_lines, self._wake_writer)

    def _wake_writer(self) -> None:
        """The queue's wake-up: lines wait. Start a writer thread if none is running."""
        with self._lock:
            self._wake.set()
            thread = self._thread
            if self._stopped or (thread is not None and thread.is_alive()):
                return
            thread = threading.Thread(target=self._run, name="netframe-log", daemon=True)
            thread.start()
            self._thread = thread

    @property
    def dropped(self) -> int:
        """Lines dropped so far, full queue and failed writes together."""
        return self.queue.dropped_full + self._dropped_failed

    def msg(self, message: str) -> None:
        """Queue one rendered line (never blocks)."""
        self.queue.put(message)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg
    failure = msg

    def flush(self, timeout_s: float = 2.0) -> bool:
        """Wait up to ``timeout_s`` for queued lines to be written; True when they were."""
        deadline = time.monotonic() + timeout_s
        while self.queue.lines or self._writing:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)
        return True

    def stop(self, timeout_s: float = 2.0) -> None:
        """Write what is queued (within ``timeout_s``) and end the thread."""
        self.flush(timeout_s)
        self._stopped = True
        self._wake.set()

    def _run(self) -> None:
        queue = self.queue
        lines = queue.lines
        while not self._stopped:
            if not self._wake.wait(_IDLE_S):
                with self._lock:
                    if not self._wake.is_set():  # (else a line came just now: go on)
                        self._thread = None
                        return
                continue
            # Let the burst that woke us gather: one write for many lines, and the
            # event loop keeps the GIL meanwhile.
            time.sleep(_GATHER_S)
            self._wake.clear()
            queue.wake_pending = False
            while lines:
                self._writing = True
                batch = self._take(lines)
                count = len(batch)
                try:
                    batch.append("")  # the last line's newline, without a copy of them all
                    self._stream.write("\n".join(batch))
                    self._stream.flush()
                except (OSError, ValueError):  # a closed pipe or file: drop, keep going
                    self._dropped_failed += count
                    continue
                finally:
                    self._writing = False
                dropped = self.dropped - self._reported
                if dropped and self.on_recovered is not None:
                    self._reported += dropped
                    queue.reporting = True
                    try:
                        self.on_recovered(dropped)
                    finally:
                        queue.reporting = False

    def _take(self, lines: collections.deque[str]) -> list[str]:
        """The next batch: up to ``_BATCH_LINES`` lines, and with ``max_write_bytes`` set,
        as many as fit in that many bytes (always at least one line)."""
        count = min(len(lines), _BATCH_LINES)
        cap = self._max_write_bytes
        if cap is None:
            return [lines.popleft() for _ in range(count)]
        batch = [lines.popleft()]
        size = _encoded_size(batch[0]) + 1
        while len(batch) < count:
            more = _encoded_size(lines[0]) + 1
            if size + more > cap:
                break
            batch.append(lines.popleft())
            size += more
        return batch


def _encoded_size(line: str) -> int:
    return len(line) if line.isascii() else len(line.encode("utf-8", "replace"))


class _StdlibToStructlog(logging.Handler):
    """Sends stdlib records (``asyncio``'s) through structlog, one line a second per kind."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[tuple[str, object], float] = {}
        self._suppressed: collections.Counter[tuple[str, object]] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        key = (record.name, record.msg)
        now = time.monotonic()
        if now - self._last.get(key, -STDLIB_LOG_INTERVAL_S) < STDLIB_LOG_INTERVAL_S:
            self._suppressed[key] += 1
            return
        if len(self._last) > 1000:  # message templates are few; this only bounds the dict
            self._last.clear()
        self._last[key] = now
        fields: dict[str, Any] = {"logger": record.name, "message": record.getMessage()}
        if suppressed := self._suppressed.pop(key, 0):
            fields["suppressed"] = suppressed
        if record.exc_info:
            fields["exc_info"] = record.exc_info
        get_logger().log(record.levelno, f"{record.name}_log", **fields)


_writer: LineWriter | None = None
# The processors configure_logging installed (to know they are still in force), and
# whether they render JSON, for connection_log().
_processors: tuple[Any, ...] = ()
_json_format = False
# The level configure_logging set; None: the application configured structlog itself.
_level: int | None = None
# The `worker` field configure_logging adds to every line (None: a single process).
_worker: str | None = None
_stdlib_handler = _StdlibToStructlog()


def configure_logging(
    log_format: LogFormat = "console",
    level: str = "info",
    stream: TextIO | None = None,
    *,
    worker: str | None = None,
) -> None:
    """Send netframe's events to ``stream`` (stderr) as console text or one JSON per line.

    Events below ``level`` cost one method call that does nothing: the bound logger is
    a filtering one, cached on first use. Lines are written by a thread (see
    :class:`LineWriter`); :func:`flush_logs` waits for them. Python's ``asyncio`` logger
    is routed through the same format.

    ``worker`` (set by the ``--workers`` supervisor in itself and in each worker process)
    adds a ``worker`` field to every line, and keeps each write to the shared stream
    within ``PIPE_BUF`` bytes, which a pipe writes whole: lines of several processes
    then never interleave mid-line.
    """
    global _writer, _level, _processors, _json_format, _worker
    _level = logging.getLevelNamesMapping()[level.upper()]
    _worker = worker
    processors: list[Any] = [] if worker is None else [_WorkerLabel(worker)]
    processors += [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if log_format == "json":
        # Tracebacks as data, without local variables: those would put message contents
        # and settings into the log.
        tracebacks = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        processors += [tracebacks, structlog.processors.JSONRenderer()]
    else:
        # The plain formatter: with rich installed, the default one prints every local
        # variable of every frame, message contents included.
        processors.append(
            structlog.dev.ConsoleRenderer(
                colors=False, exception_formatter=structlog.dev.plain_traceback
            )
        )
    _json_format = log_format == "json"
    _processors = tuple(processors)
    if _writer is not None:
        _writer.stop()
    # A pipe writes up to PIPE_BUF bytes at once whole, however many processes share it.
    shared = None if worker is None else select.PIPE_BUF
    writer = _writer = LineWriter(stream or sys.stderr, max_write_bytes=shared)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_level),
        logger_factory=lambda *_: writer,
        cache_logger_on_first_use=True,
    )
    writer.on_recovered = lambda dropped: get_logger().warning("log_lines_dropped", dropped=dropped)
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.propagate = False
    if _stdlib_handler not in asyncio_logger.handlers:
        asyncio_logger.addHandler(_stdlib_handler)


class _WorkerLabel:
    """The structlog processor that adds ``worker`` to every event of a worker process."""

    __slots__ = ("_worker",)

    def __init__(self, worker: str) -> None:
        self._worker = worker

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        event_dict["worker"] = self._worker
        return event_dict


def flush_logs(timeout_s: float = 2.0) -> None:
    """Wait up to ``timeout_s`` for queued log lines to be written (before exiting)."""
    if _writer is not None:
        _writer.flush(timeout_s)
