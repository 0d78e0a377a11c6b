"""The command line, through real `python -m netframe` subprocesses and their JSON logs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CliServer, assert_one_line_error, run_netframe


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["serve", "--bogus"], "unrecognized arguments: --bogus"),
        (["serve", "--tcp", "127.0.0.1"], "malformed address '127.0.0.1'"),
        (["serve", "--udp", "[::1]x"], "malformed address"),
        (["serve", "--tcp", "127.0.0.1:99999"], "port must be a number"),
        (["serve", "--handler", "nosuch"], "unknown handler 'nosuch'"),
        (["serve", "--handler", "no_such_module:H"], "cannot import handler module"),
        (["serve", "--handler", "os:getcwd"], "handler 'os:getcwd' made a str, not a handler"),
        (["serve", "--handler", "json:JSONDecoder"], "is a class with no on_message method"),
        (["serve", "--framing", "lines"], "'lines' is not one of auto, line, raw"),
        (["serve", "--loop", "trio"], "'trio' is not one of"),
        (["serve", "--encoding", "klingon"], "unknown encoding 'klingon'"),
        (["serve", "--max-line-bytes", "0"], "'0' must be at least 1"),
        (["serve", "--max-line-bytes", "1.5"], "'1.5' is not a whole number"),
        (["serve", "--backlog", "1e3"], "'1e3' is not a whole number"),
        (["serve", "--idle-timeout", "-1"], "must be 0 (off) or more seconds"),
        (["serve", "--max-connections", "many"], "'many' is not a whole number"),
        (["serve", "--udp-allow-port", "70000"], "must be at most 65535"),
        (["client", "localhost"], "malformed address"),
        (["client"], "required: HOST:PORT (see --help)"),
        (
            ["client", "127.0.0.1:1", "--encoding", "ascii", "Zo\u00eb"],
            "cannot encode 'ë' as ascii",
        ),
        (["client", "127.0.0.1:1", "--timeout", "x"], "is not a number"),
        (["nosuchcommand"], "invalid choice"),
        ([], "required: command"),
    ],
)
def test_bad_command_lines_are_one_line_and_exit_2(args: list[str], text: str) -> None:
    assert_one_line_error(run_netframe(*args), 2, text)


def test_asking_for_uvloop_without_it_is_a_usage_error() -> None:
    code = (
        "import sys; sys.modules['uvloop'] = None\n"
        "from netframe.cli import main\n"
        "sys.exit(main(['serve', '--loop', 'uvloop', '--tcp', '127.0.0.1:0']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert_one_line_error(done, 2, "uvloop is not installed")


def test_serve_needs_none_of_the_bench_extras() -> None:
    code = (
        "import sys; sys.modules['numpy'] = sys.modules['psutil'] = None\n"
        "from netframe.cli import main\n"
        "sys.exit(main(sys.argv[1:]))"
    )

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-c", code, *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=30)

    assert run("serve", "--help").returncode == 0
    assert_one_line_error(run("bench", "--spawn"), 2, "pip install 'netframe[bench]'")


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_non_finite_numbers_are_usage_errors(value: str) -> None:
    done = run_netframe("serve", "--shutdown-timeout", value)
    assert_one_line_error(done, 2, "must be more than 0 seconds")


def test_address_in_use_names_it_and_fails(cli_server: Callable[..., CliServer]) -> None:
    server = cli_server("--tcp", "127.0.0.1:0")
    host, port = server.address("tcp")
    done = run_netframe("serve", "--tcp", f"{host}:{port}", "--log-format", "json")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert f"cannot listen on tcp {host}:{port}" in done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_the_server_with_status_0(
    cli_server: Callable[..., CliServer], signum: signal.Signals
) -> None:
    server = cli_server("--tcp", "127.0.0.1:0", "--udp", "127.0.0.1:0")
    with socket.create_connection(server.address("tcp"), timeout=10) as open_client:
        assert open_client.recv(100) == b"Welcome!"
        server.proc.send_signal(signum)
        assert server.proc.wait(15) == 0
        assert open_client.recv(100) == b""  # closed by the graceful stop
    server.stop()
    started = server.wait_for("shutdown_started")[0]
    assert (started["connections"], started["idle_closed"], started["draining"]) == (1, 1, 0)
    finished = server.wait_for("shutdown_finished")[0]
    assert (finished["closed"], finished["aborted"]) == (1, 0)


def test_json_logs_tell_the_story_of_a_connection(
    cli_server: Callable[..., CliServer], loop_name: str
) -> None:
    server = cli_server("--tcp", "127.0.0.1:0", "--udp", "[::1]:0", "--log-level", "debug")
    listening = server.wait_for("listening", 2)
    bound = {(e["transport"], e["host"]) for e in listening}
    assert bound == {("tcp", "127.0.0.1"), ("udp", "::1")}
    assert all(e["port"] > 0 for e in listening)
    assert server.wait_for("serving")[0]["loop"] == loop_name
    with socket.create_connection(server.address("tcp"), timeout=10) as client:
        assert client.recv(100) == b"Welcome!"
        client.sendall(b"Bob\n")
        assert client.recv(100) == b"Hello, Bob!\n"
    closed = server.wait_for("connection_closed")[0]
    opened = server.wait_for("connection_opened")[0]
    assert closed["conn"] == opened["conn"]
    assert closed["peer"] == opened["peer"]
    assert closed["peer"].startswith("127.0.0.1:")
    assert (closed["bytes_in"], closed["bytes_out"]) == (4, 20)
    assert (closed["messages_in"], closed["messages_out"]) == (1, 2)
    assert "duration_s" in closed
    assert server.wait_for("message_received")[0]["size"] == 3
    assert {e["level"] for e in server.events} <= {"debug", "info"}


def test_per_message_events_are_not_logged_at_info(cli_server: Callable[..., CliServer]) -> None:
    server = cli_server("--tcp", "127.0.0.1:0")
    with socket.create_connection(server.address("tcp"), timeout=10) as client:
        client.recv(100)
        client.sendall(b"Bob\n")
        client.recv(100)
    server.wait_for("connection_closed")
    assert server.stop() == 0
    assert not [e for e in server.events if e["event"] == "message_received"]


@pytest.mark.parametrize("level", ["warning", "error"])
def test_bound_addresses_are_logged_at_any_level(
    cli_server: Callable[..., CliServer], level: str
) -> None:
    server = cli_server("--log-level", level, "--tcp", "127.0.0.1:0", "--udp", "127.0.0.1:0")
    host, port = server.address("tcp")
    with socket.create_connection((host, port), timeout=10) as client:
        assert client.recv(100) == b"Welcome!"  # the logged port is the one bound
    assert server.address("udp")[1] > 0
    assert server.stop() == 0
    # Only the start-up lines are exempt from the level: nothing per connection shows.
    assert {e["event"] for e in server.events} == {"listening", "serving"}


def test_console_log_format_is_readable_text() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "netframe", "serve", "--tcp", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    with proc.stderr:
        first = proc.stderr.readline()
        proc.terminate()
        assert proc.wait(15) == 0
    assert "listening" in first
    assert "transport=tcp" in first
    assert not first.startswith("{")


def test_client_command_runs_the_seeds_exchange(cli_server: Callable[..., CliServer]) -> None:
    server = cli_server("--tcp", "127.0.0.1:0", "--udp", "127.0.0.1:0")
    host, port = server.address("tcp")
    done = run_netframe("client", f"{host}:{port}")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Welcome!\nHello, Michael!\nHello, Tracy!\nHello, Sarah!\n"
    uhost, uport = server.address("udp")
    done = run_netframe("client", f"{uhost}:{uport}", "--udp", "Ann")
    assert (done.returncode, done.stdout) == (0, "Hello, Ann!\n")
    assert server.wait_for("connection_closed")[0]["reason"] == "handler_closed"  # "exit"
    line_server = cli_server("--tcp", "127.0.0.1:0", "--framing", "line")
    host, port = line_server.address("tcp")
    done = run_netframe("client", f"{host}:{port}", "--framing", "line", "Ann", "Bo Li")
    assert (done.returncode, done.stdout) == (0, "Welcome!\nHello, Ann!\nHello, Bo Li!\n")


def test_client_refused_and_timeout_are_one_line_errors() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    assert_one_line_error(run_netframe("client", f"127.0.0.1:{port}"), 1, "cannot connect")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        done = run_netframe("client", f"127.0.0.1:{port}", "--udp", "--timeout", "0.3")
    assert_one_line_error(done, 1, "no reply within 0.3 s")
    # Nothing listens at all: the system says so, and the client says so at once, not
    # after its timeout (60 s here, far above the test's own bound).
    done = run_netframe("client", f"127.0.0.1:{port}", "--udp", "--timeout", "60", timeout_s=30)
    assert_one_line_error(done, 1, "no reply: Connection refused")


def test_custom_handler_by_module_path(
    cli_server: Callable[..., CliServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "shout.py").write_text(
        textwrap.dedent(
            """
            from netframe import Handler

            class Shout(Handler):
                def on_message(self, conn, message):
                    conn.send(message.upper())
            """
        )
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))
    server = cli_server("--tcp", "127.0.0.1:0", "--handler", "shout:Shout", "--framing", "line")
    with socket.create_connection(server.address("tcp"), timeout=10) as client:
        client.sendall(b"hi\n")
        assert client.recv(100) == b"HI\n"


def test_udp_address_in_use_names_the_reason(cli_server: Callable[..., CliServer]) -> None:
    server = cli_server("--udp", "127.0.0.1:0")
    host, port = server.address("udp")
    done = run_netframe("serve", "--udp", f"{host}:{port}")
    assert_one_line_error(done, 1, f"cannot listen on udp {host}:{port}: Address already in use")
