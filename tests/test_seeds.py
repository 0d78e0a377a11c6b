"""The seeds' own clients, unchanged but for Python 3, against `python -m netframe serve`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CliServer

SEEDS = Path(__file__).parent / "seeds"
TCP_TRANSCRIPT = "Welcome!\nHello, Michael!\nHello, Tracy!\nHello, Sarah!\n"
UDP_TRANSCRIPT = "Hello, Michael!\nHello, Tracy!\nHello, Sarah!\n"


def run_seed(script: str, port: int) -> str:
    done = subprocess.run(
        [sys.executable, str(SEEDS / script)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "SEED_PORT": str(port)},
        check=True,
    )
    return done.stdout


def port_9999_free() -> bool:
    """Free for the server: bound as the server binds, so that a connection of an earlier
    run still in TIME_WAIT (which the server's SO_REUSEADDR ignores) does not count."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as probe:
            if kind == socket.SOCK_STREAM:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", 9999))
            except OSError:
                return False
    return True


@pytest.mark.skipif(not port_9999_free(), reason="127.0.0.1:9999 is taken on this machine")
def test_seed_clients_against_the_default_server(cli_server: Callable[..., CliServer]) -> None:
    server = cli_server()  # no flags: greeting on TCP and UDP at 127.0.0.1:9999
    assert server.address("tcp") == ("127.0.0.1", 9999)
    assert server.address("udp") == ("127.0.0.1", 9999)
    assert run_seed("tcp_client.py", 9999) == TCP_TRANSCRIPT
    assert run_seed("udp_client.py", 9999) == UDP_TRANSCRIPT
    server.wait_for("connection_closed")
    assert server.stop() == 0


@pytest.mark.parametrize("framing", ["auto", "raw"])
def test_seed_clients_in_bare_framings(cli_server: Callable[..., CliServer], framing: str) -> None:
    server = cli_server("--tcp", "127.0.0.1:0", "--udp", "127.0.0.1:0", "--framing", framing)
    assert run_seed("tcp_client.py", server.address("tcp")[1]) == TCP_TRANSCRIPT
    assert run_seed("udp_client.py", server.address("udp")[1]) == UDP_TRANSCRIPT
    closed = server.wait_for("connection_closed")[0]
    assert closed["messages_in"] == 4  # three names and exit
    assert closed["bytes_out"] == len(TCP_TRANSCRIPT) - 4  # the transcript's newlines are print()'s
