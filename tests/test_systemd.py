"""systemd: sockets handed over (LISTEN_FDS), the notify socket, the watchdog.

The real thing three ways: sockets the test binds itself and hands to a ``netframe
serve`` subprocess as systemd does (moved to descriptors 3 and up, ``LISTEN_PID`` set to
the server's own pid); a ``NOTIFY_SOCKET`` the test listens on; and
``systemd-socket-activate``, where it is installed, binding a port and starting the
server on the first connection. Small in-process tests of the parsing come last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    REPLY_TIMEOUT_S,
    CliServer,
    assert_one_line_error,
    recv_exactly,
    recv_until_closed,
)

from netframe import ConfigError, systemd

pytestmark = pytest.mark.timeout(90)

#: Runs a command as systemd runs a socket-activated service: the descriptors named in
#: argv[1] moved to 3, 4, ..., the LISTEN_* variables set, LISTEN_PID to its own pid
#: (which exec keeps), then exec.
LAUNCHER = """
import fcntl, os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for index, fd in enumerate(moved):
    os.dup2(fd, 3 + index)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = str(len(fds))
if sys.argv[2]:
    os.environ["LISTEN_FDNAMES"] = sys.argv[2]
os.execv(sys.argv[3], sys.argv[3:])
"""

#: A handler that answers ``env NAME`` with the variable as its process sees it (what a
#: child process it started would inherit), and whose on_start leaves a mark first.
PROBE_HANDLER = """
import asyncio
import os
import netframe


class Probe(netframe.Handler):
    @classmethod
    async def on_start(cls, server):
        await asyncio.sleep(0.3)
        with open(os.environ["PROBE_MARK"], "w") as mark:
            mark.write("started")

    def on_connect(self, conn):
        conn.send("Welcome!")

    def on_message(self, conn, message):
        name = message.removeprefix("env ")
        conn.send(f"{name}={os.environ.get(name, '(unset)')}")
"""


def launcher(fds: list[int], names: str = "") -> tuple[str, ...]:
    return (sys.executable, "-c", LAUNCHER, ",".join(map(str, fds)), names)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory whose paths fit a Unix socket address."""
    folder = Path(tempfile.mkdtemp(prefix="nf-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder)


@pytest.fixture
def servers() -> Iterator[list[CliServer]]:
    started: list[CliServer] = []
    yield started
    for server in started:
        server.kill()


def listening_tcp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def ask(sock: socket.socket, message: bytes, size: int) -> bytes:
    sock.sendall(message)
    return recv_exactly(sock, size)


# -- sockets handed over by the test itself ------------------------------------------------


def test_handed_over_tcp_udp_and_unix_sockets_are_served(
    loop_name: str, short_dir: Path, servers: list[CliServer]
) -> None:
    (short_dir / "probe.py").write_text(PROBE_HANDLER)
    path = str(short_dir / "app.sock")
    tcp = listening_tcp()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    local = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    local.bind(path)
    local.listen(16)
    handed = [tcp, udp, local]
    server = CliServer(
        ["--loop", loop_name, "--handler", "probe:Probe"],
        env={"PYTHONPATH": str(short_dir), "PROBE_MARK": str(short_dir / "mark")},
        pass_fds=tuple(s.fileno() for s in handed),
        launcher=launcher([s.fileno() for s in handed], "web:dns:local"),
    )
    servers.append(server)
    tcp_port, udp_port = tcp.getsockname()[1], udp.getsockname()[1]
    for sock in handed:  # the server holds its own copies now
        sock.close()
    server.wait_for("serving")
    handover = server.wait_for("sockets_handed_over")[0]
    assert (handover["fds"], handover["names"]) == ([3, 4, 5], ["web", "dns", "local"])
    listening = [
        {k: v for k, v in e.items() if k in ("transport", "port", "path", "fd")}
        for e in server.events
        if e["event"] == "listening"
    ]
    # Exactly the three handed over: the default 127.0.0.1:9999 is not bound besides.
    assert listening == [
        {"transport": "tcp", "port": tcp_port, "fd": 3},
        {"transport": "udp", "port": udp_port, "fd": 4},
        {"transport": "unix", "path": path, "fd": 5},
    ]
    with socket.create_connection(("127.0.0.1", tcp_port), timeout=REPLY_TIMEOUT_S) as client:
        assert recv_exactly(client, 8) == b"Welcome!"
        # Taken out of the environment: a process the handler starts does not see them.
        for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            reply = f"{name}=(unset)\n".encode()
            assert ask(client, f"env {name}\n".encode(), len(reply)) == reply
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(REPLY_TIMEOUT_S)
        client.sendto(b"env HOME", ("127.0.0.1", udp_port))
        assert client.recv(100) == f"HOME={os.environ['HOME']}".encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(REPLY_TIMEOUT_S)
        client.connect(path)
        assert recv_exactly(client, 8) == b"Welcome!"
    opened = [e for e in server.wait_for("connection_opened", 2) if e["transport"] == "unix"]
    assert opened
    assert opened[0]["peer"].startswith(f"unix:pid={os.getpid()},")
    assert server.stop() == 0
    assert os.path.exists(path)  # the unit's socket file is not the server's to remove


def test_handed_over_sockets_replace_the_addresses_asked_for_with_a_warning(
    loop_name: str, servers: list[CliServer], short_dir: Path
) -> None:
    tcp = listening_tcp()
    path = str(short_dir / "not-bound.sock")
    server = CliServer(
        ["--loop", loop_name, "--tcp", "127.0.0.1:0", "--unix", path],
        pass_fds=(tcp.fileno(),),
        launcher=launcher([tcp.fileno()]),
    )
    servers.append(server)
    port = tcp.getsockname()[1]
    tcp.close()
    server.wait_for("serving")
    listening = [e for e in server.events if e["event"] == "listening"]
    assert [(e["transport"], e["port"], e["fd"]) for e in listening] == [("tcp", port, 3)]
    assert server.wait_for("sockets_handed_over")[0]["names"] == ["unknown"]
    ignored = server.wait_for("listeners_ignored")[0]
    assert (ignored["tcp"], ignored["udp"], ignored["unix"]) == (["127.0.0.1:0"], [], [path])
    assert not os.path.exists(path)


def test_sockets_meant_for_another_process_are_left_alone(servers: list[CliServer]) -> None:
    tcp = listening_tcp()
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}  # as a careless parent would leave them
    server = CliServer(["--tcp", "127.0.0.1:0"], env=env, pass_fds=(tcp.fileno(),))
    servers.append(server)
    with tcp:
        server.wait_for("serving")
        listening = [e for e in server.events if e["event"] == "listening"]
        assert len(listening) == 1
        assert "fd" not in listening[0]
        assert not any(e["event"] == "sockets_handed_over" for e in server.events)


@pytest.mark.parametrize("kind", ["connected", "pipe", "unix datagram"])
def test_a_descriptor_that_cannot_be_served_is_one_line_and_exit_2(kind: str) -> None:
    keep: list[Any] = []
    if kind == "connected":  # what a socket unit with Accept=yes hands over
        keep = list(socket.socketpair())
        fd = keep[0].fileno()
        expected = "descriptor 3 is a stream socket that does not listen (a socket unit"
    elif kind == "pipe":
        read_end, write_end = os.pipe()
        keep = [read_end, write_end]
        fd = read_end
        expected = "cannot use descriptor 3 (unknown) handed over by systemd: Socket op"
    else:
        keep = [socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)]
        fd = keep[0].fileno()
        expected = "descriptor 3 is a socket of family AF_UNIX and type SOCK_DGRAM: netframe"
    try:
        done = subprocess.run(
            [*launcher([fd]), sys.executable, "-m", "netframe", "serve"],
            capture_output=True, text=True, timeout=60, pass_fds=(fd,),
        )  # fmt: skip
    finally:
        for item in keep:
            item.close() if isinstance(item, socket.socket) else os.close(item)
    assert_one_line_error(done, 2, expected)


# -- the notify socket and the watchdog -------------------------------------------------------


class NotifyListener:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages: list[dict[str, str]] = []

    def next(self, timeout_s: float = REPLY_TIMEOUT_S) -> dict[str, str]:
        self.sock.settimeout(timeout_s)
        data = self.sock.recv(4096).decode()
        message = dict(line.split("=", 1) for line in data.splitlines())
        self.messages.append(message)
        return message

    def until(self, key: str, limit: int = 200) -> dict[str, str]:
        """The next message with ``key``; at most ``limit`` messages are read."""
        for _ in range(limit):
            message = self.next()
            if key in message:
                return message
        raise AssertionError(f"no {key} in {limit} messages: {self.messages}")


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[tuple[str, Any]]:
    """(NOTIFY_SOCKET's value, the listener), for a path and for an abstract name."""
    if request.param == "path":
        text = str(short_dir / "notify")
        listener = NotifyListener(text)
    else:
        name = f"netframe-test-{uuid.uuid4().hex}"
        text = "@" + name
        listener = NotifyListener("\0" + name)
    with listener.sock:
        yield text, listener


def test_ready_watchdog_and_stopping_reach_the_notify_socket(
    loop_name: str, short_dir: Path, notify_socket: tuple[str, NotifyListener]
) -> None:
    address, listener = notify_socket
    (short_dir / "probe.py").write_text(PROBE_HANDLER)
    mark = short_dir / "mark"
    path = str(short_dir / "app.sock")
    server = CliServer(
        ["--loop", loop_name, "--handler", "probe:Probe", "--unix", path],
        env={
            "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000", "PYTHONPATH": str(short_dir),
            "PROBE_MARK": str(mark),
        },
    )  # fmt: skip
    try:
        ready = listener.until("READY")
        assert ready["READY"] == "1"
        assert ready["STATUS"] == f"Serving on unix {path}"
        # READY comes after on_start ran and the listener is bound: both hold at once.
        assert mark.read_text() == "started"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(REPLY_TIMEOUT_S)
            client.connect(path)
            assert recv_exactly(client, 8) == b"Welcome!"
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC"):  # not for child processes
                reply = f"{name}=(unset)\n".encode()
                assert ask(client, f"env {name}\n".encode(), len(reply)) == reply
        for _ in range(3):  # fed again and again, every 0.1 s (half of 0.2 s)
            assert listener.until("WATCHDOG") == {"WATCHDOG": "1"}
        server.proc.send_signal(signal.SIGTERM)
        stopping = listener.until("STOPPING")
        assert stopping == {"STOPPING": "1", "STATUS": "Stopping: finishing open connections"}
        assert server.proc.wait(30) == 0
    finally:
        server.kill()
    readies = [m for m in listener.messages if "READY" in m]
    assert len(readies) == 1


def test_a_watchdog_for_another_process_is_not_fed(short_dir: Path) -> None:
    listener = NotifyListener(str(short_dir / "notify"))
    server = CliServer(
        ["--tcp", "127.0.0.1:0", "--udp", "127.0.0.1:0"],
        env={
            "NOTIFY_SOCKET": str(short_dir / "notify"), "WATCHDOG_USEC": "100000",
            "WATCHDOG_PID": "1",
        },
    )  # fmt: skip
    with listener.sock:
        try:
            assert "READY" in listener.next()
            # Ten of the would-be intervals pass without a WATCHDOG=1.
            with pytest.raises(TimeoutError):
                listener.next(timeout_s=0.5)
        finally:
            server.kill()


def test_a_start_that_fails_says_so_in_the_status(short_dir: Path) -> None:
    listener = NotifyListener(str(short_dir / "notify"))
    with listener.sock, listening_tcp() as taken:
        host, port = taken.getsockname()
        done = subprocess.run(
            [sys.executable, "-m", "netframe", "serve", "--tcp", f"{host}:{port}"],
            env={**os.environ, "NOTIFY_SOCKET": str(short_dir / "notify")},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        message = listener.next()
    assert done.returncode == 1
    assert message == {"STATUS": f"Failed to start: cannot listen on tcp {host}:{port}: "
                       "Address already in use"}  # fmt: skip


def test_a_notify_socket_nobody_listens_on_is_one_warning(
    short_dir: Path, servers: list[CliServer]
) -> None:
    missing = str(short_dir / "gone")
    server = CliServer(
        ["--tcp", "127.0.0.1:0", "--udp", "127.0.0.1:0"],
        env={"NOTIFY_SOCKET": missing, "WATCHDOG_USEC": "100000"},
    )
    servers.append(server)
    server.wait_for("serving")
    time.sleep(0.5)  # several watchdog intervals, each failing
    assert server.stop() == 0
    failures = [e for e in server.events if e["event"] == "systemd_notify_failed"]
    assert [(e["socket"], e["error"]) for e in failures] == [(missing, "No such file or directory")]


# -- systemd-socket-activate ---------------------------------------------------------------------

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")


@pytest.mark.skipif(
    SOCKET_ACTIVATE is None,
    reason="systemd-socket-activate is not installed (Debian: apt-get install systemd)",
)
def test_systemd_socket_activate_starts_the_server_on_its_port(loop_name: str) -> None:
    assert SOCKET_ACTIVATE is not None
    with socket.socket() as probe:  # a free port for systemd-socket-activate to bind
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port}", "--fdname=greeting",
         sys.executable, "-m", "netframe", "serve", "--log-format", "json", "--loop", loop_name],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        client = None
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while client is None:  # until systemd-socket-activate listens
            try:
                client = socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT_S)
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "systemd-socket-activate never listened"
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.05)
        with client:  # this first connection waits in the backlog until the server runs
            assert recv_exactly(client, 8) == b"Welcome!"
            client.sendall(b"Bob")
            assert recv_exactly(client, 11) == b"Hello, Bob!"
            client.sendall(b"exit")
            assert recv_until_closed(client) == b""
        proc.send_signal(signal.SIGTERM)  # the server is that process now (exec)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert names.count("listening") == 1  # the activated socket only, no default 9999
    listening = next(e for e in events if e["event"] == "listening")
    assert (listening["transport"], listening["port"], listening["fd"]) == ("tcp", port, 3)
    handed = next(e for e in events if e["event"] == "sockets_handed_over")
    assert handed["names"] == ["greeting"]
    assert "shutdown_finished" in names


ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian: apt-get install systemd)"
)
def test_the_units_in_deployment_md_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    assert ANALYZE is not None
    text = (Path(__file__).parent.parent / "docs" / "deployment.md").read_text()
    section = text.partition("\n## systemd\n")[2].partition("\n## ")[0]
    socket_unit, service_unit = re.findall(r"```ini\n(.*?)```", section, re.DOTALL)
    (tmp_path / "netframe.socket").write_text(socket_unit)
    # The checkout's Python stands in for /opt/netframe's (verify wants it to exist).
    service = service_unit.replace("/opt/netframe/.venv/bin/python", sys.executable)
    assert service != service_unit
    (tmp_path / "netframe.service").write_text(service)
    done = subprocess.run(
        [ANALYZE, "verify", "--man=no", "netframe.socket", "netframe.service"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    # verify exits 0 even for unknown keys: a clean run prints nothing at all.
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


# -- the parsing, in process --------------------------------------------------------------------


def test_listen_sockets_take_nothing_meant_for_another_pid_and_clear_the_variables() -> None:
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "HOME": "/"}
    assert systemd.listen_sockets(environ, pid=2) == []
    assert environ == {"HOME": "/"}


@pytest.mark.parametrize("count", ["two", "-1", "100000"])
def test_a_listen_fds_that_is_no_count_is_refused(count: str) -> None:
    with pytest.raises(ConfigError, match="is not a count of descriptors"):
        systemd.listen_sockets({"LISTEN_PID": "7", "LISTEN_FDS": count}, pid=7)


def test_no_listen_fds_is_no_sockets() -> None:
    assert systemd.listen_sockets({"LISTEN_PID": "7", "LISTEN_FDS": "0"}, pid=7) == []


@pytest.mark.parametrize(
    ("variables", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process(
    variables: dict[str, str], interval: float | None
) -> None:
    environ = dict(variables)
    assert systemd.watchdog_interval(environ, pid=7) == interval
    assert environ == {}


def test_the_notifier_speaks_to_paths_and_abstract_names(short_dir: Path) -> None:
    name = f"netframe-test-{uuid.uuid4().hex}"
    for text, address in ((str(short_dir / "n"), str(short_dir / "n")), ("@" + name, "\0" + name)):
        listener = NotifyListener(address)
        with listener.sock:
            environ = {"NOTIFY_SOCKET": text}
            notify = systemd.notifier(environ)
            assert environ == {}
            assert notify is not None
            assert notify.ready("Serving")
            assert listener.next() == {"READY": "1", "STATUS": "Serving"}
    assert systemd.notifier({"NOTIFY_SOCKET": "vsock:2:1234"}) is None
    assert systemd.notifier({}) is None


# -- with workers ------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="workers need Linux")
def test_workers_share_the_handed_over_sockets_and_the_supervisor_notifies(
    loop_name: str, short_dir: Path, servers: list[CliServer]
) -> None:
    listener = NotifyListener(str(short_dir / "notify"))
    (short_dir / "probe.py").write_text(PROBE_HANDLER)
    tcp = listening_tcp()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    handed = [tcp, udp]
    server = CliServer(
        ["--loop", loop_name, "--workers", "2", "--handler", "probe:Probe",
         "--tcp", "127.0.0.1:0"],
        env={
            "NOTIFY_SOCKET": str(short_dir / "notify"), "WATCHDOG_USEC": "200000",
            "PYTHONPATH": str(short_dir), "PROBE_MARK": str(short_dir / "mark"),
        },
        pass_fds=tuple(s.fileno() for s in handed),
        launcher=launcher([s.fileno() for s in handed], "web:dns"),
    )  # fmt: skip
    servers.append(server)
    tcp_port, udp_port = tcp.getsockname()[1], udp.getsockname()[1]
    for sock in handed:
        sock.close()
    with listener.sock:
        ready = listener.until("READY")
        assert ready == {"READY": "1", "STATUS": "Serving with 2 workers"}
        # READY once both workers serve, from the supervisor (the unit's main process).
        assert len(server.wait_for("serving", 2)) == 2
        assert server.wait_for("workers_ready")[0]["worker"] == "supervisor"
        handover = server.wait_for("sockets_handed_over")[0]
        assert (handover["worker"], handover["names"]) == ("supervisor", ["web", "dns"])
        assert server.wait_for("listeners_ignored")[0]["tcp"] == ["127.0.0.1:0"]
        listening = sorted(
            (e["worker"], e["transport"], e["port"])
            for e in server.events
            if e["event"] == "listening"
        )
        assert listening == [
            ("1", "tcp", tcp_port), ("1", "udp", udp_port),
            ("2", "tcp", tcp_port), ("2", "udp", udp_port),
        ]  # fmt: skip
        with socket.create_connection(("127.0.0.1", tcp_port), timeout=REPLY_TIMEOUT_S) as client:
            assert recv_exactly(client, 8) == b"Welcome!"
            # The workers see none of systemd's variables: they are the supervisor's.
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS", "LISTEN_PID"):
                reply = f"{name}=(unset)\n".encode()
                assert ask(client, f"env {name}\n".encode(), len(reply)) == reply
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(REPLY_TIMEOUT_S)
            client.sendto(b"env HOME", ("127.0.0.1", udp_port))
            assert client.recv(100) == f"HOME={os.environ['HOME']}".encode()
        for _ in range(3):  # fed by the supervisor, every 0.1 s
            assert listener.until("WATCHDOG") == {"WATCHDOG": "1"}
        server.proc.send_signal(signal.SIGTERM)
        stopping = listener.until("STOPPING")
        assert stopping == {"STOPPING": "1", "STATUS": "Stopping: finishing open connections"}
        assert server.proc.wait(30) == 0
    assert len([m for m in listener.messages if "READY" in m]) == 1


@pytest.mark.skipif(sys.platform != "linux", reason="workers need Linux")
def test_workers_refuse_a_handed_over_descriptor_they_cannot_serve() -> None:
    left, right = socket.socketpair()
    with left, right:
        done = subprocess.run(
            [*launcher([left.fileno()]), sys.executable, "-m", "netframe", "serve",
             "--workers", "2"],
            capture_output=True, text=True, timeout=60, pass_fds=(left.fileno(),),
        )  # fmt: skip
    assert_one_line_error(done, 2, "descriptor 3 is a stream socket that does not listen")
