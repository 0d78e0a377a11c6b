"""``--workers``: the supervisor and its worker processes, as real ``netframe serve``
subprocesses on loopback, read through their JSON logs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CliServer, assert_one_line_error, recv_exactly, run_netframe

from netframe import Config
from netframe.workers import worker_count

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="workers need Linux")

#: Bound for anything a test waits for: generous for a busy machine.
WAIT_S = 20.0


class Supervised(CliServer):
    """A ``netframe serve --workers N`` subprocess and its log."""

    def __init__(self, args: list[str], workers: int, *, new_session: bool = False) -> None:
        super().__init__(["--workers", str(workers), *args], new_session=new_session)
        self.workers = workers

    def matching(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        with self._changed:
            events = list(self.events)
        return [
            e
            for e in events
            if e["event"] == name and all(e.get(k) == v for k, v in fields.items())
        ]

    def wait_until(self, what: str, condition: Callable[[], object]) -> None:
        with self._changed:
            if not self._changed.wait_for(condition, WAIT_S):
                raise AssertionError(f"{what} did not happen; log so far: {self.events}")

    def pids(self) -> dict[str, int]:
        """The pid of each worker serving now, by its ``worker`` label."""
        return {str(e["index"]): e["pid"] for e in self.matching("worker_ready")}

    def port(self, transport: str) -> int:
        ports = {e["port"] for e in self.matching("listening", transport=transport)}
        assert len(ports) == 1, f"workers listen on different ports: {ports}"
        return ports.pop()


@pytest.fixture
def supervised(loop_name: str) -> Iterator[Callable[..., Supervised]]:
    """Start ``netframe serve --workers N`` on the parametrized loop; killed after the test
    (its workers then stop by themselves, see test_orphaned_workers_stop)."""
    started: list[Supervised] = []

    def start(*args: str, workers: int = 2) -> Supervised:
        server = Supervised(["--loop", loop_name, *args], workers)
        started.append(server)
        server.wait_for("workers_ready", timeout_s=WAIT_S)
        return server

    yield start
    for server in started:
        server.kill()


@contextlib.contextmanager
def greeted(port: int, count: int, greeting: bytes = b"Welcome!") -> Iterator[list[socket.socket]]:
    """``count`` connections that have read their greeting; closed on the way out."""
    with contextlib.ExitStack() as stack:
        clients = []
        for _ in range(count):
            client = stack.enter_context(
                socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
            )
            assert recv_exactly(client, len(greeting)) == greeting
            clients.append(client)
        yield clients


def session(port: int, name: bytes = b"Bob") -> tuple[int, bytes]:
    """One greeting session; returns the client's own port and what it was sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        local = sock.getsockname()[1]
        got = recv_exactly(sock, len(b"Welcome!"), WAIT_S)
        sock.sendall(name)
        got += recv_exactly(sock, len(b"Hello, " + name + b"!"), WAIT_S)
    return local, got


def test_connections_land_on_more_than_one_worker_on_one_port(
    supervised: Callable[..., Supervised],
) -> None:
    server = supervised("--tcp", "127.0.0.1:0")
    port = server.port("tcp")
    assert {e["worker"] for e in server.matching("serving")} == {"1", "2"}
    assert {e["worker"] for e in server.matching("listening")} == {"1", "2"}
    for e in server.matching("workers_ready"):
        assert e["worker"] == "supervisor"
    clients = [session(port) for _ in range(40)]
    assert all(got == b"Welcome!Hello, Bob!" for _, got in clients)
    opened = server.wait_for("connection_opened", 40, timeout_s=WAIT_S)
    # The kernel spreads by a hash of the addresses: more than one worker, never exactly half.
    served_by = {e["worker"] for e in opened}
    assert served_by == {"1", "2"}, served_by
    assert {int(e["peer"].rsplit(":", 1)[1]) for e in opened} == {local for local, _ in clients}


def test_udp_is_shared_by_the_workers_and_answered(supervised: Callable[..., Supervised]) -> None:
    server = supervised("--udp", "127.0.0.1:0", "--log-level", "debug")
    port = server.port("udp")
    for _ in range(30):  # one socket each: a flow of its own for the kernel's hash
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(WAIT_S)
            client.sendto(b"Ann", ("127.0.0.1", port))
            assert client.recv(100) == b"Hello, Ann!"
    received = server.wait_for("datagram_received", 30, timeout_s=WAIT_S)
    assert {e["worker"] for e in received} == {"1", "2"}


def test_a_killed_worker_is_replaced_while_the_others_keep_serving(
    supervised: Callable[..., Supervised],
) -> None:
    server = supervised("--tcp", "127.0.0.1:0")
    port = server.port("tcp")
    # A client that stays connected, and the worker that serves it.
    steady = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    assert recv_exactly(steady, 8) == b"Welcome!"
    mine = f"127.0.0.1:{steady.getsockname()[1]}"
    server.wait_until(
        "the steady client is seen", lambda: server.matching("connection_opened", peer=mine)
    )
    survivor = server.matching("connection_opened", peer=mine)[0]["worker"]
    victim = "2" if survivor == "1" else "1"
    old_pid = server.pids()[victim]

    # Load: sessions one after another, while the victim is killed.
    errors: list[str] = []
    done = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal done
        while not stop.is_set() and done < 5000:
            try:
                _, got = session(port)
                assert got == b"Welcome!Hello, Bob!", got
            except (OSError, AssertionError) as exc:
                errors.append(repr(exc))
            done += 1

    loader = threading.Thread(target=load)
    loader.start()
    try:
        time.sleep(0.3)
        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        server.wait_until(
            "a replacement serves",
            lambda: any(
                e["pid"] != old_pid for e in server.matching("worker_ready", index=int(victim))
            ),
        )
        replaced_s = time.monotonic() - killed_at
        # The steady client, on the other worker, never noticed.
        steady.sendall(b"Ann")
        assert recv_exactly(steady, len(b"Hello, Ann!")) == b"Hello, Ann!"
        # New connections reach the replacement too.
        ready_seen = len(server.events)
        server.wait_until(
            "the replacement serves a connection",
            lambda: any(
                e["event"] == "connection_opened" and e["worker"] == victim
                for e in server.events[ready_seen:]
            ),
        )
    finally:
        stop.set()
        loader.join(WAIT_S)
        steady.close()
    exited = server.matching("worker_exited", index=int(victim))
    assert exited[0]["signal"] == "SIGKILL"
    replacement = [
        e for e in server.matching("worker_ready", index=int(victim)) if e["pid"] != old_pid
    ]
    assert "replaced_after_s" in replacement[0]
    # Sessions run one at a time: only the one in flight on the killed worker may fail.
    assert len(errors) <= 1, errors
    assert done > len(errors)
    print(f"replaced in {replaced_s:.2f} s (supervisor: {replacement[0]['replaced_after_s']} s)")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_drains_every_worker_and_exits_0(
    supervised: Callable[..., Supervised], signum: signal.Signals
) -> None:
    server = supervised("--tcp", "127.0.0.1:0", "--udp", "127.0.0.1:0")
    port = server.port("tcp")
    with greeted(port, 8) as clients:
        server.proc.send_signal(signum)
        assert server.proc.wait(WAIT_S) == 0
        for client in clients:
            assert client.recv(100) == b""  # closed by the graceful stop
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=WAIT_S).close()
    finished = server.matching("shutdown_finished")
    assert {e["worker"] for e in finished} == {"1", "2"}
    assert sum(e["closed"] for e in finished) == 8
    assert {e["index"] for e in server.matching("worker_stopped", status=0)} == {1, 2}
    assert server.matching("workers_stopped", status=0)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_whole_group_is_one_graceful_stop(
    loop_name: str, signum: signal.Signals
) -> None:
    # What systemd's KillMode=control-group (SIGTERM) and a terminal's Ctrl+C (SIGINT) do:
    # every process gets the signal, in no set order with the supervisor's own message.
    server = Supervised(["--loop", loop_name, "--tcp", "127.0.0.1:0"], 2, new_session=True)
    try:
        server.wait_for("workers_ready", timeout_s=WAIT_S)
        with greeted(server.port("tcp"), 1) as (client,):
            os.killpg(server.proc.pid, signum)
            assert server.proc.wait(WAIT_S) == 0
            assert client.recv(100) == b""
        server.stop()
    finally:
        server.kill()
    assert not server.matching("shutdown_forced")
    assert {e["worker"] for e in server.matching("shutdown_finished")} == {"1", "2"}
    assert {e["index"] for e in server.matching("worker_stopped", status=0)} == {1, 2}


def test_a_second_signal_forces_the_stop_with_status_1(
    supervised: Callable[..., Supervised],
) -> None:
    server = supervised("--tcp", "127.0.0.1:0", "--framing", "line", "--shutdown-timeout", "60")
    with greeted(server.port("tcp"), 6, b"Welcome!\n") as clients:
        for client in clients:  # unfinished lines: the drain would wait for them
            client.sendall(b"Bo")
        opened = server.wait_for("connection_opened", 6)
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for("shutdown_started", 2)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(WAIT_S) == 1
    server.stop()
    # Each worker holding an unfinished line was still draining, and was forced (a worker
    # the kernel gave no connection has finished its stop before the second signal).
    holding = {e["worker"] for e in opened}
    assert {e["worker"] for e in server.matching("shutdown_forced")} == {"supervisor", *holding}
    assert server.matching("workers_stopped", status=1)


@pytest.mark.parametrize(
    ("first", "second", "transport"),
    [(1, 2, "tcp"), (2, 1, "tcp"), (2, 3, "tcp"), (2, 1, "udp"), (2, 2, "udp")],
)
def test_a_port_in_use_fails_with_and_without_workers(
    first: int, second: int, transport: str, loop_name: str
) -> None:
    holder = Supervised(["--loop", loop_name, f"--{transport}", "127.0.0.1:0"], first)
    try:
        holder.wait_for("serving", first, timeout_s=WAIT_S)
        port = holder.address(transport)[1]
        done = run_netframe(
            "serve", "--workers", str(second), f"--{transport}", f"127.0.0.1:{port}"
        )
        assert_one_line_error(
            done, 1, f"cannot listen on {transport} 127.0.0.1:{port}: Address already in use"
        )
    finally:
        holder.kill()


@pytest.fixture
def handlers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module of test handlers on the path of every netframe subprocess."""
    (tmp_path / "wk_handlers.py").write_text(
        textwrap.dedent(
            """
            import os
            from netframe import Handler

            class FailsToStart(Handler):
                @classmethod
                def on_start(cls, server):
                    raise RuntimeError("no database today")

                def on_message(self, conn, message):
                    conn.send(message)

            class DiesWhenMarked(Handler):
                '''Starts normally until the file WK_MARKER names exists.'''

                @classmethod
                def on_start(cls, server):
                    if os.path.exists(os.environ["WK_MARKER"]):
                        os._exit(3)

                def on_message(self, conn, message):
                    conn.send(message)
            """
        )
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))
    monkeypatch.setenv("WK_MARKER", str(tmp_path / "marker"))
    return tmp_path


def test_a_worker_that_fails_on_start_fails_the_start_once(handlers: Path) -> None:
    done = run_netframe(
        "serve", "--workers", "2", "--tcp", "127.0.0.1:0", "--log-format", "json",
        "--handler", "wk_handlers:FailsToStart",
    )  # fmt: skip
    *log, last = done.stderr.strip().splitlines()
    assert done.returncode == 1
    assert last == (
        "netframe: error: the handler's on_start failed: RuntimeError('no database today')"
    )
    events = [json.loads(line) for line in log]  # everything else is the JSON log
    assert len([e for e in events if e["event"] == "worker_started"]) <= 2  # no restarts
    assert not [e for e in events if e["event"] == "workers_ready"]


def test_a_worker_that_keeps_dying_at_start_makes_the_supervisor_give_up(
    handlers: Path, loop_name: str
) -> None:
    server = Supervised(
        ["--loop", loop_name, "--tcp", "127.0.0.1:0", "--handler", "wk_handlers:DiesWhenMarked"], 2
    )
    try:
        server.wait_for("workers_ready", timeout_s=WAIT_S)
        (handlers / "marker").touch()
        os.kill(server.pids()["1"], signal.SIGKILL)
        assert server.proc.wait(60) == 1  # back-off 0.25 + 0.5 + 1 + 2 s, then it gives up
        server.stop()
    finally:
        server.kill()
    failing = server.matching("workers_failing")
    assert failing[0]["index"] == 1
    assert "giving up" in failing[0]["message"]
    delays = [e["restart_in_s"] for e in server.matching("worker_exited", index=1)[:-1]]
    assert delays == [0.25, 0.5, 1.0, 2.0]
    assert server.matching("worker_stopped", index=2, status=0)  # the other drained


def test_a_worker_sent_sigterm_drains_and_is_replaced(
    supervised: Callable[..., Supervised],
) -> None:
    server = supervised("--tcp", "127.0.0.1:0")
    for pid in server.pids().values():
        # SIGINT ignored (Ctrl+C is the supervisor's), SIGTERM handled, not left blocked.
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        status = dict(line.split(":\t", 1) for line in lines)
        assert int(status["SigIgn"], 16) & 1 << (signal.SIGINT - 1)
        assert not int(status["SigBlk"], 16) & 1 << (signal.SIGTERM - 1)
    old_pid = server.pids()["2"]
    os.kill(old_pid, signal.SIGTERM)
    server.wait_until(
        "a replacement serves",
        lambda: any(e["pid"] != old_pid for e in server.matching("worker_ready", index=2)),
    )
    assert server.matching("stop_requested", worker="2", signal="SIGTERM")
    assert server.matching("worker_exited", index=2, status=0)
    assert session(server.port("tcp"))[1] == b"Welcome!Hello, Bob!"


def test_orphaned_workers_stop_when_the_supervisor_is_killed(
    supervised: Callable[..., Supervised],
) -> None:
    server = supervised("--tcp", "127.0.0.1:0")
    pids = server.pids().values()
    server.proc.kill()
    server.wait_until(
        "both workers stop",
        lambda: len(server.matching("stop_requested", by="supervisor_gone")) == 2,
    )
    deadline = time.monotonic() + WAIT_S
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "workers still running without their supervisor"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie waiting for init counts as gone
        return stat.read().split(") ", 1)[1][0] != "Z"


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--workers", "0"], "'0' must be at least 1"),
        (["--workers", "many"], "'many' is not a whole number"),
        (["--workers", "2", "--handler", "nosuch"], "unknown handler 'nosuch'"),
    ],
)
def test_bad_worker_settings_are_usage_errors(args: list[str], text: str) -> None:
    assert_one_line_error(run_netframe("serve", "--tcp", "127.0.0.1:0", *args), 2, text)


def test_auto_is_one_worker_per_usable_core() -> None:
    assert Config.load(environ={"NETFRAME_WORKERS": "auto"}).workers is None
    assert worker_count(None) == len(os.sched_getaffinity(0))
    assert worker_count(3) == 3
    assert Config().workers == 1


def test_a_script_runs_its_own_handler_class_in_workers(tmp_path: Path) -> None:
    script = tmp_path / "shout.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import netframe

            class Shout(netframe.Handler):
                def on_message(self, conn, message):
                    conn.send(message.upper())

            if __name__ == "__main__":
                sys.exit(netframe.run(handler=Shout, framing="line", tcp=["127.0.0.1:0"],
                                      udp=[], workers=2, log_format="json"))
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stderr is not None
        port = None
        for _ in range(100):
            event = json.loads(proc.stderr.readline())
            if event["event"] == "listening":
                port = event["port"]
            if event["event"] == "workers_ready":
                break
        assert port is not None
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as client:
            client.sendall(b"hi\n")
            assert recv_exactly(client, 3) == b"HI\n"
        proc.terminate()
        assert proc.wait(WAIT_S) == 0
    finally:
        proc.kill()
        proc.wait(WAIT_S)
        if proc.stderr is not None:
            proc.stderr.close()


def test_a_unix_socket_is_one_socket_shared_by_the_workers(
    supervised: Callable[..., Supervised],
) -> None:
    folder = Path(tempfile.mkdtemp(prefix="nf-", dir="/tmp"))  # short enough for a socket path
    path = str(folder / "app.sock")
    try:
        (folder / "app.sock").touch()  # not a socket: refused and left alone, as without workers
        done = run_netframe("serve", "--workers", "2", "--unix", path)
        assert_one_line_error(done, 1, f"cannot listen on unix {path}: the path exists and is not")
        assert (folder / "app.sock").read_bytes() == b""
        os.unlink(path)
        server = supervised("--unix", path, "--tcp", "127.0.0.1:0")
        listening = server.matching("listening", transport="unix")
        assert sorted((e["worker"], e["path"]) for e in listening) == [("1", path), ("2", path)]
        for _ in range(10):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(WAIT_S)
                client.connect(path)
                assert recv_exactly(client, 8) == b"Welcome!"
                client.sendall(b"Bob")
                assert recv_exactly(client, 11) == b"Hello, Bob!"
        opened = server.wait_for("connection_opened", 10, timeout_s=WAIT_S)
        assert {e["transport"] for e in opened} == {"unix"}
        assert {e["worker"] for e in opened} <= {"1", "2"}
        assert os.path.exists(path)  # a worker that stops never removes it
        assert server.stop() == 0
        assert not os.path.exists(path)  # the supervisor bound it, and removed it
        # A stale file (a supervisor killed outright) is replaced at the next start.
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()
        server = supervised("--unix", path)
        assert server.matching("stale_socket_replaced", path=path, worker="supervisor")
        assert server.stop() == 0
    finally:
        shutil.rmtree(folder)
