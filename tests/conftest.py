"""Shared fixtures: every async test runs on both event loops; CLI servers as subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
import uvloop

from netframe.logs import configure_logging

LOOPS: Mapping[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    """Log as the CLI does by default (info, to stderr): no per-message debug events."""
    configure_logging("console", "info")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Run every ``@pytest.mark.asyncio`` test once on asyncio and once on uvloop."""
    return LOOPS


@pytest.fixture(params=list(LOOPS))
def loop_name(request: pytest.FixtureRequest) -> str:
    """The loop name, for tests that start a loop themselves (subprocesses, threads)."""
    return str(request.param)


class CliServer:
    """A ``python -m netframe serve`` subprocess, read through its JSON log on stderr."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "netframe", "serve", "--log-format", "json", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            event = json.loads(raw)  # every stderr line must be one JSON object
            with self._changed:
                self.events.append(event)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, name: str, count: int = 1, timeout_s: float = 15) -> list[dict[str, Any]]:
        """Wait until ``count`` events called ``name`` were logged; return them."""

        def found() -> list[dict[str, Any]]:
            return [e for e in self.events if e["event"] == name]

        with self._changed:
            ok = self._changed.wait_for(
                lambda: len(found()) >= count or self.proc.poll() is not None, timeout_s
            )
        events = found()
        if not ok or len(events) < count:
            raise AssertionError(f"no {count} {name!r} events; log so far: {self.events}")
        return events

    def address(self, transport: str) -> tuple[str, int]:
        for event in self.wait_for("serving") and self.events:
            if event["event"] == "listening" and event["transport"] == transport:
                return event["host"], event["port"]
        raise AssertionError(f"no {transport} listener in {self.events}")

    def stop(self, timeout_s: float = 15) -> int:
        """SIGTERM the server; return its exit status once its log is read to the end."""
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(timeout_s)
        self._reader.join(timeout_s)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(15)
        self._reader.join(15)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture
def cli_server(loop_name: str) -> Iterator[Callable[..., CliServer]]:
    """Start ``netframe serve`` subprocesses on the parametrized loop; stopped after the test."""
    servers: list[CliServer] = []

    def start(*args: str) -> CliServer:
        server = CliServer(["--loop", loop_name, *args])
        servers.append(server)
        server.wait_for("serving")
        return server

    yield start
    for server in servers:
        server.kill()


def run_netframe(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m netframe ARGS`` as a subprocess, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "netframe", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(done: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    """The command failed with ``code`` and one stderr line containing ``text``."""
    assert done.returncode == code, done
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert text in lines[0], lines[0]
