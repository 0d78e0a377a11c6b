"""More loops than asyncio and uvloop: ``--loop rloop`` and ``--loop module:attribute``.

Real ``python -m netframe serve`` subprocesses, real sockets. rloop is in the test extra
on Linux; where it does not install, its tests skip and say so.
"""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CliServer, assert_one_line_error, recv_exactly, recv_until_closed, run_netframe

from netframe.config import Config, ConfigError

needs_rloop = pytest.mark.skipif(
    importlib.util.find_spec("rloop") is None, reason="rloop is not installed here"
)
# rloop by name; any loop by the callable that makes it.
LOOPS = [
    pytest.param("rloop", marks=needs_rloop, id="rloop"),
    pytest.param("asyncio:new_event_loop", id="module-attribute"),
    pytest.param("uvloop:new_event_loop", id="uvloop-by-attribute"),
]


@pytest.fixture(params=LOOPS)
def server(request: pytest.FixtureRequest) -> Iterator[CliServer]:
    started = CliServer(["--loop", request.param, "--tcp", "127.0.0.1:0", "--udp", "127.0.0.1:0"])
    try:
        yield started
    finally:
        started.kill()


def test_the_tutorial_exchange_ends_with_the_peer_seeing_the_close(server: CliServer) -> None:
    # rloop 0.5's close() alone leaves the socket open; the endpoint sends write_eof()
    # first there, so the client sees the end of the stream after "exit".
    with socket.create_connection(server.address("tcp"), timeout=10) as sock:
        assert recv_exactly(sock, len(b"Welcome!")) == b"Welcome!"
        sock.sendall(b"Bob")
        assert recv_exactly(sock, len(b"Hello, Bob!")) == b"Hello, Bob!"
        sock.sendall(b"exit")
        assert recv_until_closed(sock) == b""
    closed = server.wait_for("connection_closed")
    assert closed[0]["reason"] == "handler_closed"


def test_datagrams_are_answered(server: CliServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.sendto(b"Ann\n", server.address("udp"))
        assert sock.recv(100) == b"Hello, Ann!\n"


def test_a_stop_signal_drains_and_exits_zero(server: CliServer) -> None:
    with socket.create_connection(server.address("tcp"), timeout=10) as sock:
        assert recv_exactly(sock, len(b"Welcome!")) == b"Welcome!"
        assert server.stop() == 0
    assert server.wait_for("shutdown_finished")


def test_a_loop_that_cannot_be_loaded_is_one_line() -> None:
    done = run_netframe("serve", "--loop", "no_such_module:new_event_loop")
    assert_one_line_error(done, 2, "cannot load loop 'no_such_module:new_event_loop'")
    done = run_netframe("serve", "--loop", "asyncio:get_event_loop_policy.nope")
    assert_one_line_error(done, 2, "cannot load loop")
    done = run_netframe("serve", "--loop", "warpdrive")
    assert_one_line_error(done, 2, "or module:attribute")


@needs_rloop
def test_rloop_refuses_unix_listeners_in_one_line(tmp_path: Path) -> None:
    done = run_netframe("serve", "--loop", "rloop", "--unix", f"{tmp_path}/netframe.sock")
    assert_one_line_error(done, 2, "--loop rloop cannot serve unix listeners")


def test_config_takes_a_loop_by_name_or_by_attribute() -> None:
    assert Config(loop="rloop").loop == "rloop"
    assert Config(loop="uvloop:new_event_loop").loop == "uvloop:new_event_loop"
    with pytest.raises(ConfigError, match="loop must be one of"):
        Config(loop="warpdrive")
