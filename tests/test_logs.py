"""The log writer: bounded, never blocking, and honest about what it dropped."""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import re
import threading
import time
from collections.abc import Callable

import pytest
import structlog
from hypothesis import example, given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from netframe import InetAddress, _logline, logs
from netframe._endpoint import format_peer, inet_text
from netframe._logline import ConnectionLog, LineQueue
from netframe.logs import LineWriter


class StallingStream(io.StringIO):
    """A stream whose writes block until released, like a pipe nobody reads."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.release.wait(10)
        return super().write(text)


def test_a_stalled_reader_never_blocks_the_caller_and_drops_are_counted_once() -> None:
    stream = StallingStream()
    writer = LineWriter(stream, max_lines=100)
    reports: list[int] = []
    writer.on_recovered = lambda dropped: (
        reports.append(dropped),
        writer.msg(f"dropped {dropped}"),
    )
    started = time.monotonic()
    for i in range(1000):
        writer.msg(f"line {i}")
    assert time.monotonic() - started < 1  # never waited on the stream
    stream.release.set()
    assert writer.flush(10)
    lines = stream.getvalue().splitlines()
    dropped = 1000 - sum(line.startswith("line ") for line in lines)
    assert dropped > 0
    assert reports == [dropped]  # every dropped line counted, in one report
    assert lines[-1] == f"dropped {dropped}"
    writer.stop()


def test_a_closed_stream_drops_lines_without_raising() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = os.fdopen(write_end, "w")
    writer = LineWriter(stream)
    for i in range(10):
        writer.msg(f"line {i}")  # would be BrokenPipeError if written here
    assert writer.flush(10)
    assert writer.dropped == 10
    writer.stop()
    with contextlib.suppress(BrokenPipeError):
        stream.close()


def writer_threads() -> int:
    return sum(thread.name == "netframe-log" for thread in threading.enumerate())


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_the_writer_thread_runs_only_while_there_are_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Started by the first line, ended when idle, started again by the next line: a
    server that logs nothing runs on one thread."""
    monkeypatch.setattr(logs, "_IDLE_S", 0.05)
    assert wait_for(lambda: writer_threads() == 0)  # other tests' writers gone
    stream = io.StringIO()
    writer = LineWriter(stream)
    assert writer_threads() == 0
    writer.msg("first")
    assert writer_threads() == 1
    assert writer.flush(10)
    assert wait_for(lambda: writer_threads() == 0)
    for i in range(200):  # lines arriving while a thread decides to end are written too
        writer.msg(f"line {i}")
        if i % 50 == 0:
            time.sleep(0.05)
    assert writer.flush(10)
    assert stream.getvalue().splitlines() == ["first", *(f"line {i}" for i in range(200))]
    writer.stop()
    assert wait_for(lambda: writer_threads() == 0)
    writer.msg("after the stop")  # queued, and no thread is started for it
    assert writer_threads() == 0


PEERS = ["127.0.0.1:50312", "[fe80::1%eth0]:9", '/tmp/a "quoted" \\ säugling\n', "unknown"]
# (reason, duration in microseconds, bytes in, bytes out, messages in, messages out)
CLOSED = [
    ("peer_closed", 123, 0, 10, 0, 1),
    ("handler_error", 12_345_678_901, 10**12, 7, 3, 2),
    ("idle_timeout", 7, 5, 5, 5, 5),  # 7e-06 s: written with an exponent
    ("server_shutdown", 3_000_000, 5, 5, 5, 5),  # 3.0 s
]
CLOSED_FIELDS = ("reason", "duration_s", "bytes_in", "bytes_out", "messages_in", "messages_out")
STAMP = "2026-11-29T19:02:34.000123Z"
#: A timestamp as netframe writes it.
STAMP_FORM = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def structlog_line(
    log_format: str, event: str, fields: dict[str, object], worker: str | None = None
) -> str:
    """What netframe's structlog set-up writes for this event (a fixed timestamp)."""
    label = {} if worker is None else {"worker": worker}
    event_dict = {**fields, "event": event, **label, "level": "info", "timestamp": STAMP}
    if log_format == "json":
        return str(structlog.processors.JSONRenderer()(None, "info", event_dict))
    return str(structlog.dev.ConsoleRenderer(colors=False)(None, "info", event_dict))


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("closed", CLOSED)
@pytest.mark.parametrize("log_format", ["json", "console"])
@pytest.mark.parametrize("worker", [None, "12"])
def test_the_connection_lines_are_the_ones_structlog_writes(
    log_format: str, peer: str, closed: tuple[str, int, int, int, int, int],
    worker: str | None,
) -> None:  # fmt: skip
    queue = LineQueue(10, lambda: None)
    fast = ConnectionLog(queue, json=log_format == "json", worker=worker)
    shown = fast.opened("tcp", peer, 7)
    fast.closed("tcp", shown, 7, *closed)
    # The timestamp (the time now, in the form the last test checks) as in structlog_line.
    lines = [STAMP_FORM.sub(STAMP, line, count=1) for line in queue.lines]
    bound = {"transport": "tcp", "peer": peer, "conn": 7}
    reason, micros, *counts = closed
    fields = (reason, micros / 1_000_000, *counts)  # what the structlog path logs
    assert lines == [
        structlog_line(log_format, "connection_opened", bound, worker),
        structlog_line(
            log_format,
            "connection_closed",
            {**bound, **dict(zip(CLOSED_FIELDS, fields, strict=True))},
            worker,
        ),
    ]


@given(st.text())
def test_any_peer_text_is_quoted_as_structlog_quotes_it(peer: str) -> None:
    for log_format in ("json", "console"):
        queue = LineQueue(10, lambda: None)
        ConnectionLog(queue, json=log_format == "json").opened("tcp", peer, 1)
        line = STAMP_FORM.sub(STAMP, queue.lines[0], count=1)
        bound = {"transport": "tcp", "peer": peer, "conn": 1}
        assert line == structlog_line(log_format, "connection_opened", bound)


_HOSTS = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.ip_addresses(v=4).map(lambda ip: f"::ffff:{ip}"),  # IPv4 through an IPv6 socket
    st.ip_addresses(v=6).map(lambda ip: f"{ip}%eth0"),  # scoped
    st.text(),
)


@given(_HOSTS, st.integers(min_value=0, max_value=65535), st.lists(st.integers(), max_size=2))
def test_a_socket_tuple_is_written_as_its_address_object_prints(
    host: str, port: int, rest: list[int]
) -> None:
    # The log lines write a peer nothing asked an InetAddress for straight from the tuple.
    sockaddr = (host, port, *rest)
    assert inet_text(sockaddr) == str(InetAddress.from_sockaddr(sockaddr))
    assert format_peer(sockaddr) == format_peer(InetAddress.from_sockaddr(sockaddr))


@pytest.mark.parametrize("other", [None, "/run/app.sock", b"", ("host",), (1, 2), ("h", "80")])
def test_what_is_not_an_ip_tuple_is_left_to_the_address_objects(other: object) -> None:
    assert inet_text(other) is None


@given(st.integers(min_value=0, max_value=10**18))
@example(9_999_999_999_999_999)  # above 2**53: a division of doubles would round it to 1e10
def test_a_duration_is_written_as_repr_writes_its_float(micros: int) -> None:
    assert _logline.seconds_text(micros) == repr(micros / 1_000_000)


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_a_worker_label_is_on_every_line_where_structlog_puts_it(log_format: str) -> None:
    stream = io.StringIO()
    logs.configure_logging(log_format, "info", stream=stream, worker="3")
    try:
        fast = logs.connection_log()
        assert fast is not None  # the label keeps the fast path
        logs.get_logger().info("connection_opened", transport="tcp", peer="127.0.0.1:5", conn=1)
        fast.opened("tcp", "127.0.0.1:5", 1)
        logs.get_logger().warning("something_else", count=2)
        logs.flush_logs()
    finally:
        logs.configure_logging("console", "info")  # the suite's own set-up
    slow, quick, other = stream.getvalue().splitlines()
    if log_format == "json":
        assert list(json.loads(slow)) == list(json.loads(quick))  # same fields, same order
        assert json.loads(quick)["worker"] == json.loads(other)["worker"] == "3"
    else:
        assert slow[27:] == quick[27:]  # all but the timestamp
        assert quick.endswith(" worker=3")
        assert other.endswith(" worker=3")


class RecordingStream(io.StringIO):
    """A stream that keeps each write apart, as each becomes one write(2) to a pipe."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_writes_shared_by_workers_fit_in_pipe_buf_and_end_with_whole_lines() -> None:
    stream = RecordingStream()
    writer = LineWriter(stream, max_write_bytes=4096)
    lines = [f"line {i} " + "x" * (i % 300) + "ü" * (i % 7) for i in range(2000)]
    lines.insert(1000, "y" * 5000)  # longer than the cap: written alone
    for line in lines:
        writer.msg(line)
    assert writer.flush(10)
    writer.stop()
    assert stream.getvalue().splitlines() == lines
    for text in stream.writes:
        assert text.endswith("\n")
        assert len(text.encode()) <= 4096 or text == "y" * 5000 + "\n"
    assert len(stream.writes) < len(lines) / 5  # still batched


def test_the_fast_path_is_taken_only_under_netframes_own_configuration() -> None:
    stream = io.StringIO()
    logs.configure_logging("json", "info", stream=stream)
    try:
        fast = logs.connection_log()
        assert fast is not None
        fast.opened("tcp", "127.0.0.1:5", 1)
        logs.flush_logs()
        line = json.loads(stream.getvalue())
        assert (line["event"], line["conn"], line["level"]) == ("connection_opened", 1, "info")
        assert line["timestamp"].endswith("Z")
        with capture_logs():
            assert logs.connection_log() is None  # a test's capture sees every event
        logs.configure_logging("json", "warning", stream=stream)
        assert logs.connection_log() is None  # info events are off
    finally:
        logs.configure_logging("console", "info")  # the suite's own set-up


def test_timestamps_keep_their_form_across_seconds() -> None:
    for now in (1_700_000_000.0, 1_700_000_000.999999, 1_700_000_001.5, 1_700_000_001.000001):
        stamp = _logline.timestamp(now)
        moment = datetime.datetime.fromtimestamp(now, datetime.UTC)
        assert stamp[:19] == moment.strftime("%Y-%m-%dT%H:%M:%S"), stamp
        assert STAMP_FORM.fullmatch(stamp), stamp
        assert abs(float(stamp[19:-1]) - (now - int(now))) < 1e-6, stamp
    fast = ConnectionLog(LineQueue(10, lambda: None), json=True)
    before = datetime.datetime.now(datetime.UTC)
    stamps = [fast.now() for _ in range(3)]  # the second's text made once, then reused
    after = datetime.datetime.now(datetime.UTC)
    for stamp in stamps:
        assert STAMP_FORM.fullmatch(stamp), stamp
        moment = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        assert before - datetime.timedelta(microseconds=1) <= moment <= after  # truncated
