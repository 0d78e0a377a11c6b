"""The log writer: bounded, never blocking, and honest about what it dropped."""

from __future__ import annotations

import contextlib
import io
import os
import threading
import time

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
