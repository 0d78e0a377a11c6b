"""The command line, through real `python -m netframe` subprocesses and their JSON logs."""

from __future__ import annotations

import argparse
import errno
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CliServer, assert_one_line_error, run_netframe

from netframe.bench._run import free_port


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


@pytest.mark.parametrize(
    ("args", "text"),
    [
        # 192.0.2.1 (TEST-NET-1) is no address of this machine: bind() refuses it, and
        # nothing is sent anywhere.
        (["--tcp", "192.0.2.1:0"], "cannot listen on tcp 192.0.2.1:0: Cannot assign"),
        (["--udp", "192.0.2.1:0"], "cannot listen on udp 192.0.2.1:0: Cannot assign"),
        (["--workers", "2", "--tcp", "192.0.2.1:0"], "cannot listen on tcp 192.0.2.1:0"),
        (["--unix", "/no/such/directory/n.sock"], "cannot listen on unix /no/such/directory"),
    ],
)
def test_an_address_that_cannot_exist_here_is_a_usage_error(args: list[str], text: str) -> None:
    """Unlike an address in use (status 1, above), the address itself is the mistake."""
    assert_one_line_error(run_netframe("serve", *args), 2, text)


def test_a_name_that_does_not_resolve_is_a_wrong_address_and_a_resolver_failure_is_not() -> None:
    # (Checked on the errors themselves: looking a name up for real would ask a DNS server.)
    from netframe._errors import name_not_found
    from netframe.server import listen_error

    unknown = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    later = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    assert name_not_found(unknown)
    assert not name_not_found(later)
    assert listen_error("tcp", "nowhere.invalid:1", unknown).wrong_address
    assert not listen_error("tcp", "example.org:1", later).wrong_address
    in_use = OSError(errno.EADDRINUSE, "Address already in use")
    assert not listen_error("tcp", "127.0.0.1:1", in_use).wrong_address
    # A resolver's code is not an errno (on BSD, EAI_AGAIN is 2, as ENOENT is).
    assert not listen_error("tcp", "example.org:1", socket.gaierror(2, "again")).wrong_address
    # ENOENT names a missing directory only if the directory is indeed missing (the file
    # can also vanish between bind and chmod, taken by another server's stale check).
    gone = FileNotFoundError(errno.ENOENT, "No such file or directory")
    assert listen_error("unix", "/no/such/directory/n.sock", gone).wrong_address
    assert not listen_error("unix", f"{os.getcwd()}/n.sock", gone).wrong_address
    # The client's side of the same rule (status 2 for a name, 1 for a refusal).
    from netframe.client import _unreachable

    assert _unreachable("cannot connect to nowhere.invalid:1", unknown).wrong_address
    refused = _unreachable("cannot connect to 127.0.0.1:1", ConnectionRefusedError(111, "no"))
    assert not refused.wrong_address
    assert str(refused) == "cannot connect to 127.0.0.1:1: no"


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


def test_udp_is_bound_before_tcp_takes_connections(loop_name: str) -> None:
    """A client that waits for the TCP port, as health checks and load generators do,
    then sends a datagram at once must get its answer: the UDP socket is bound first.
    (Before, the standard loop lost that datagram about one start in five.)"""
    for _ in range(3):
        port = free_port()  # free for both TCP and UDP
        where = f"127.0.0.1:{port}"
        server = CliServer(["--loop", loop_name, "--tcp", where, "--udp", where])
        try:
            deadline = time.monotonic() + 15
            while True:
                assert server.proc.poll() is None, server.events
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the TCP port never took a connection"
                    time.sleep(0.01)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.settimeout(10)
                client.sendto(b"Bob", ("127.0.0.1", port))
                assert client.recvfrom(100)[0] == b"Hello, Bob!"
            server.wait_for("serving")
            listening = [e["transport"] for e in server.events if e["event"] == "listening"]
            assert listening == ["udp", "tcp"]
        finally:
            server.kill()


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


# The client beyond the tutorial's exchange: no greeting, no exit, and -i, which sends the
# lines of stdin.


def client_env() -> dict[str, str]:
    """The environment, with the client's stdin decoded as UTF-8 whatever the locale."""
    return {**os.environ, "PYTHONIOENCODING": "utf-8"}


def run_client(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    """``python -m netframe client ARGS`` fed ``stdin``, its output captured as text.

    Surrogate escapes stand for bytes that are not UTF-8 (``"\\udcff"`` is the byte 0xff).
    """
    return subprocess.run(
        [sys.executable, "-m", "netframe", "client", *args],
        input=stdin, capture_output=True, encoding="utf-8", errors="surrogateescape",
        timeout=60, env=client_env(),
    )  # fmt: skip


class InteractiveClient:
    """``python -m netframe client -i`` with its stdin open, its stdout read line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "netframe", "client", "-i", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            encoding="utf-8", env=client_env(),
        )  # fmt: skip
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def line(self) -> str:
        """The next line printed (waiting at most 30 s for it)."""
        return self._lines.get(timeout=30)

    def type(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def finish(self) -> tuple[int, str]:
        """Wait for the exit; return the status and what was written on stderr."""
        try:
            code = self.proc.wait(30)
        finally:
            self.proc.kill()
            self.proc.wait(15)
            self._reader.join(15)
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None:
                    pipe.close()
        assert self.proc.stderr is not None
        with self.proc.stderr:
            return code, self.proc.stderr.read()


def test_client_without_greeting_or_exit_talks_to_an_echo_server(
    cli_server: Callable[..., CliServer], loop_name: str
) -> None:
    server = cli_server("--tcp", "127.0.0.1:0", "--handler", "echo", "--framing", "line")
    host, port = server.address("tcp")
    done = run_netframe(
        "client", f"{host}:{port}", "--no-greeting", "--no-exit", "--framing", "line",
        "--loop", loop_name, "Ann", "Bo Li",
    )  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (0, "Ann\nBo Li\n", "")
    closed = server.wait_for("connection_closed")[0]
    # The client closed the connection itself: no "exit" went out (it would be echoed).
    assert (closed["reason"], closed["messages_in"]) == ("peer_closed", 2)


def test_interactive_client_sends_each_stdin_line(
    cli_server: Callable[..., CliServer], loop_name: str
) -> None:
    server = cli_server("--tcp", "127.0.0.1:0", "--handler", "echo", "--framing", "line")
    host, port = server.address("tcp")
    # \r\n ends a line too, and a last line needs no newline. The end of stdin
    # half-closes the connection; the server answers and closes; the client exits 0.
    stdin = "one\ntwo words\r\n\nZo\u00eb\nlast"
    done = run_client(f"{host}:{port}", "-i", "--framing", "line", "--loop", loop_name, stdin=stdin)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == "one\ntwo words\n\nZo\u00eb\nlast\n"
    closed = server.wait_for("connection_closed")[0]
    assert (closed["reason"], closed["messages_in"]) == ("peer_closed", 5)
    # --encoding applies to what is sent, and to the replies printed.
    done = run_client(
        f"{host}:{port}", "-i", "--framing", "line", "--encoding", "latin-1", stdin="Zo\u00eb\n"
    )
    assert (done.returncode, done.stdout) == (0, "Zo\u00eb\n")
    closed = server.wait_for("connection_closed", 2)[1]
    assert closed["bytes_in"] == len("Zo\u00eb\n".encode("latin-1"))


def test_interactive_client_sends_bare_lines_in_raw_framing(
    cli_server: Callable[..., CliServer],
) -> None:
    server = cli_server("--tcp", "127.0.0.1:0", "--handler", "echo", "--framing", "raw")
    host, port = server.address("tcp")
    done = run_client(f"{host}:{port}", "-i", "--framing", "raw", stdin="hi\n")
    # Sent as "hi": a newline sent would have come back, and shown as an empty line.
    assert (done.returncode, done.stdout, done.stderr) == (0, "hi\n", "")
    assert server.wait_for("connection_closed")[0]["bytes_in"] == 2


def test_interactive_client_prints_pushes_as_they_arrive(
    cli_server: Callable[..., CliServer],
    loop_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "pusher.py").write_text(
        textwrap.dedent(
            """
            import asyncio

            from netframe import Handler

            class Pusher(Handler):
                async def on_connect(self, conn):
                    conn.send("first push")
                    await asyncio.sleep(0.2)
                    conn.send("second push")

                def on_message(self, conn, message):
                    conn.send(f"got {message}")
            """
        )
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))
    server = cli_server("--tcp", "127.0.0.1:0", "--handler", "pusher:Pusher", "--framing", "line")
    host, port = server.address("tcp")
    client = InteractiveClient(f"{host}:{port}", "--framing", "line", "--loop", loop_name)
    try:
        # Both pushes are printed while nothing has been typed and stdin is still open.
        assert client.line() == "first push\n"
        assert client.line() == "second push\n"
        client.type("hello\n")
        assert client.line() == "got hello\n"
    finally:
        assert client.proc.stdin is not None
        client.proc.stdin.close()  # the end of stdin: the server closes, the client exits
        code, errors = client.finish()
    assert (code, errors) == (0, "")
    assert server.wait_for("connection_closed")[0]["reason"] == "peer_closed"


def test_interactive_client_exits_quietly_on_ctrl_c(
    cli_server: Callable[..., CliServer], loop_name: str
) -> None:
    server = cli_server("--tcp", "127.0.0.1:0")
    host, port = server.address("tcp")
    client = InteractiveClient(f"{host}:{port}", "--loop", loop_name)
    try:
        assert client.line() == "Welcome!\n"  # connected, waiting on stdin
    finally:
        client.proc.send_signal(signal.SIGINT)
        code, errors = client.finish()
    assert (code, errors) == (130, "")


@pytest.mark.parametrize(("framing", "sizes"), [("line", [4, 10]), ("raw", [3, 9])])
def test_interactive_client_over_udp(
    cli_server: Callable[..., CliServer], loop_name: str, framing: str, sizes: list[int]
) -> None:
    server = cli_server(
        "--udp", "127.0.0.1:0", "--handler", "echo", "--framing", framing, "--log-level", "debug"
    )
    host, port = server.address("udp")
    # Every datagram sent got its reply: the client exits then, without waiting out its
    # --timeout (here longer than the test's own bound).
    done = run_client(
        f"{host}:{port}", "--udp", "-i", "--framing", framing, "--loop", loop_name,
        "--timeout", "120", stdin="one\ntwo words\n",
    )  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (0, "one\ntwo words\n", "")
    assert [e["size"] for e in server.wait_for("datagram_received", 2)] == sizes


def test_interactive_client_over_udp_stops_waiting_after_its_timeout() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.settimeout(30)
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        done = run_client(f"127.0.0.1:{port}", "--udp", "-i", "--timeout", "0.2", stdin="a\n")
        assert silent.recv(100) == b"a"
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["-i", "Ann"], "argument -i/--interactive: not allowed with NAME arguments"),
        (["--no-exit=yes"], "ignored explicit argument 'yes'"),
        (["-i", "--timeout", "0"], "'0' must be a finite number greater than 0"),
    ],
)
def test_bad_client_flags_are_one_line_and_exit_2(args: list[str], text: str) -> None:
    assert_one_line_error(run_netframe("client", "127.0.0.1:1", *args), 2, text)


def test_interactive_input_the_client_cannot_send_is_a_usage_error(
    cli_server: Callable[..., CliServer],
) -> None:
    server = cli_server("--tcp", "127.0.0.1:0", "--handler", "echo", "--framing", "line")
    host, port = server.address("tcp")
    done = run_client(f"{host}:{port}", "-i", "--encoding", "ascii", stdin="Zo\u00eb\n")
    assert_one_line_error(done, 2, "cannot encode '\u00eb' as ascii")
    done = run_client(f"{host}:{port}", "-i", stdin="ok\n\udcff\n")  # the byte 0xff
    assert_one_line_error(done, 2, "cannot read stdin as utf-8: invalid start byte")


def test_interactive_client_reads_a_file_and_ends_quietly_when_its_reader_does(
    cli_server: Callable[..., CliServer], tmp_path: Path
) -> None:
    server = cli_server("--tcp", "127.0.0.1:0", "--handler", "echo", "--framing", "line")
    host, port = server.address("tcp")
    lines = tmp_path / "lines.txt"  # a regular file, and far more than a pipe's buffer
    lines.write_text("".join(f"{n}\n" for n in range(100_000)))
    with lines.open("rb") as stdin:
        proc = subprocess.Popen(
            [sys.executable, "-m", "netframe", "client", f"{host}:{port}", "-i",
             "--framing", "line"],
            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        assert select.select([proc.stdout], [], [], 30)[0], "no output within 30 s"
        assert proc.stdout.readline() == b"0\n"
        proc.stdout.close()  # as `| head -1` does
        code = proc.wait(60)
    finally:
        proc.kill()
        proc.wait(15)
    with proc.stderr:
        assert (code, proc.stderr.read()) == (1, b"")


@pytest.mark.parametrize("command", ["serve", "client", "bench"])
def test_every_flag_says_what_it_does_and_its_default(command: str) -> None:
    from netframe.cli import build_parser

    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    sub = commands.choices[command]
    flags = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert flags
    for action in flags:
        text = action.help or ""
        assert len(text) > 10, action.option_strings
        assert "(default: " in text or "required" in text, (action.option_strings, text)


def test_interactive_bare_words_piped_together_are_answered_one_by_one(
    cli_server: Callable[..., CliServer],
) -> None:
    server = cli_server("--tcp", "127.0.0.1:0")  # the defaults: auto framing, greeting
    host, port = server.address("tcp")
    done = run_client(f"{host}:{port}", "-i", stdin="Bob\nAlice\nexit\n")
    # Sent back to back, bare words would be one message ("Hello, BobAliceexit!").
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == "Welcome!\nHello, Bob!\nHello, Alice!\n"
