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

import pytest
import structlog
from structlog.testing import capture_logs

from netframe import logs
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


FIELDS: list[dict[str, object]] = [
    {},
    {"transport": "tcp", "peer": "127.0.0.1:50312", "conn": 7},
    {"transport": "tcp", "peer": "[fe80::1%eth0]:9", "conn": 1, "reason": "peer_closed",
     "duration_s": 0.000123, "bytes_in": 0, "bytes_out": 10**12, "ratio": 12345.678901},
    {"path": '/tmp/a "quoted" \\ säugling\n', "flag": True, "none": None, "tiny": 1e-07},
]  # fmt: skip


@pytest.mark.parametrize("fields", FIELDS)
@pytest.mark.parametrize("log_format", ["json", "console"])
def test_the_fast_path_renders_as_structlog_does(
    fields: dict[str, object], log_format: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "_now", lambda: "2026-11-29T19:02:34.000123Z")
    event = {**fields, "event": "connection_closed", "level": "info"}
    event["timestamp"] = "2026-11-29T19:02:34.000123Z"
    if log_format == "json":
        expected = structlog.processors.JSONRenderer()(None, "info", event)
        got = logs._render_json("connection_closed", dict(fields))
        assert json.loads(got) == json.loads(str(expected))
    else:
        expected = structlog.dev.ConsoleRenderer(colors=False)(None, "info", event)
        got = logs._render_console("connection_closed", dict(fields))
    assert got == expected


def test_the_fast_path_is_taken_only_under_netframes_own_configuration() -> None:
    stream = io.StringIO()
    logs.configure_logging("json", "info", stream=stream)
    try:
        emit = logs.info_emitter()
        assert emit is not None
        emit("connection_opened", {"conn": 1})
        logs.flush_logs()
        line = json.loads(stream.getvalue())
        assert (line["event"], line["conn"], line["level"]) == ("connection_opened", 1, "info")
        assert line["timestamp"].endswith("Z")
        with capture_logs():
            assert logs.info_emitter() is None  # a test's capture sees every event
        logs.configure_logging("json", "warning", stream=stream)
        assert logs.info_emitter() is None  # info events are off
    finally:
        logs.configure_logging("console", "info")  # the suite's own set-up


def test_timestamps_keep_their_form_across_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    for now in (1_700_000_000.0, 1_700_000_000.999999, 1_700_000_001.5):
        monkeypatch.setattr(logs.time, "time", lambda now=now: now)
        stamp = logs._now()
        moment = datetime.datetime.fromtimestamp(now, datetime.UTC)
        assert stamp[:19] == moment.strftime("%Y-%m-%dT%H:%M:%S"), stamp
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp), stamp
