"""The load generator: it counts, it checks every reply byte for byte, it stops on time.

These tests are about what the bench reports, never about how fast anything is: the
machine running them may be small and busy, so runs are short, with one load process and
few connections, and no figure is compared with a speed. Servers are real: netframe in a
background thread, a tiny hand-written UDP responder, or ``--spawn``'s subprocess.

Every test with a netframe server runs it on both loops (``loop_name``: ``Config.loop``
for the thread, ``--loop`` for a spawned one). The load processes themselves always run
on the ``auto`` loop (uvloop where installed): the bench has no option for theirs.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import psutil
import pytest
import structlog
from conftest import assert_one_line_error, run_netframe, udp_responder

from netframe import GreetingHandler
from netframe.bench import BenchError, BenchOptions, run_bench
from netframe.bench._report import summary_rows
from netframe.config import Address
from netframe.handlers import Connection, Handler
from netframe.logs import configure_logging
from netframe.testing import server_thread

GREETING = b"Welcome!\n"
PERCENTILE_KEYS = ("p50", "p90", "p99", "p99.9", "max")
# Only a guard against a hang: no test here is about speed.
HANG_GUARD_S = 30.0


@pytest.fixture(autouse=True, scope="module")
def _quiet_server_logs() -> Iterator[None]:
    """In-process servers log each connection; these runs open many: keep warnings only."""
    saved = structlog.get_config()
    configure_logging("console", "warning", sys.__stderr__)
    yield
    structlog.configure(**saved)


# -- servers -------------------------------------------------------------------------------


@contextmanager
def line_server(loop: str, handler: Any = "greeting", framing: str = "line") -> Iterator[Address]:
    """A netframe TCP server on ``loop`` in a background thread; yields its address."""
    with server_thread(handler=handler, framing=framing, loop=loop, tcp=["127.0.0.1:0"]) as server:
        host, port = server.address("tcp")
        yield Address(host, port)


class LoopRecordingGreeting(GreetingHandler):
    """The greeting handler, noting which kind of loop it was run on (``asyncio``/``uvloop``)."""

    __slots__ = ()
    loops: ClassVar[set[str]] = set()

    def on_connect(self, conn: Connection) -> None:
        type(self).loops.add(type(asyncio.get_running_loop()).__module__.partition(".")[0])
        super().on_connect(conn)


class HiHandler(Handler):
    """Greets correctly, then answers ``X`` with ``Hi, X!``: every reply is wrong."""

    __slots__ = ()

    def on_connect(self, conn: Connection) -> None:
        conn.send("Welcome!")

    def on_message(self, conn: Connection, message: str) -> None:
        conn.send(f"Hi, {message}!")


class LateTypoHandler(Handler):
    """Answers the first 20 messages right, then ``Hello, X!!``: wrong in its last byte."""

    __slots__ = ("answered",)
    good_replies = 20

    def __init__(self) -> None:
        self.answered = 0

    def on_connect(self, conn: Connection) -> None:
        conn.send("Welcome!")

    def on_message(self, conn: Connection, message: str) -> None:
        self.answered += 1
        bang = "!" if self.answered <= self.good_replies else "!!"
        conn.send(f"Hello, {message}{bang}")


class WrongGreetingHandler(Handler):
    """Greets with ``Howdy!`` instead of ``Welcome!``."""

    __slots__ = ()

    def on_connect(self, conn: Connection) -> None:
        conn.send("Howdy!")

    def on_message(self, conn: Connection, message: str) -> None:
        conn.send(f"Hello, {message}!")


def greet_udp(data: bytes) -> bytes:
    return b"Hello, " + data + b"!"


@contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port that is bound but not listening: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# -- running -------------------------------------------------------------------------------


def bench(**options: Any) -> dict[str, Any]:
    """run_bench with this module's small defaults, guarded against a hang."""
    settings: dict[str, Any] = {"conns": 2, "duration_s": 1, "warmup_s": 0.2, "workers": 1}
    settings.update(options)
    began = time.monotonic()
    result = run_bench(BenchOptions(**settings))
    assert time.monotonic() - began < HANG_GUARD_S
    return result


def assert_latency_ordered(result: dict[str, Any]) -> None:
    latency = result["latency_us"]
    values = [latency[key] for key in PERCENTILE_KEYS]
    assert all(v > 0 for v in values), latency
    assert values == sorted(values), latency
    assert 0 < latency["mean"] <= latency["max"]
    assert result["latency_samples"] == result["ops"]  # far below the sample cap


def assert_clean(result: dict[str, Any]) -> None:
    assert result["errors"] == 0, result["first_error"]
    assert result["first_error"] is None
    assert result["connect_errors"] == 0
    assert result["ops"] > 0


def assert_window_bytes(actual: int, ops: int, per_op: int, in_flight: int) -> None:
    """Bytes counted in the window match its operations, give or take those in flight
    at its two edges (``in_flight`` requests each)."""
    assert (ops - in_flight) * per_op <= actual <= (ops + in_flight) * per_op


def assert_server_cpu(result: dict[str, Any], window_s: float) -> None:
    """The server's CPU time in the window: some (it served every operation), no more than
    every core this process may use could give it, and the same figure per operation."""
    server, ops = result["server"], result["ops"]
    cores = len(os.sched_getaffinity(0))
    assert 0 < server["cpu_s"] <= window_s * cores + 0.05  # 0.05: the kernel's 10 ms ticks
    assert server["cpu_us_per_op"] == pytest.approx(server["cpu_s"] / ops * 1e6)


# -- 1, 4: a short run against a real server -----------------------------------------------


def test_greeting_run_counts_operations_and_checks_every_reply(loop_name: str) -> None:
    LoopRecordingGreeting.loops.clear()
    with line_server(loop_name, LoopRecordingGreeting) as target:
        began = time.monotonic()
        result = bench(scenario="greeting", target=target, server_pid=os.getpid())
        elapsed = time.monotonic() - began
    assert elapsed < HANG_GUARD_S
    assert_clean(result)
    ops = result["ops"]
    assert result["scenario"] == "greeting"
    assert result["connections_ready"] == 2
    assert result["ops_per_s"] == ops / 1
    assert_latency_ordered(result)
    # Connections c0 and c1 send b"cN\n" and must get b"Hello, cN!\n" back, after b"Welcome!\n".
    assert_window_bytes(result["bytes_out"], ops, len(b"c0\n"), in_flight=2)
    assert_window_bytes(result["bytes_in"], ops, len(b"Hello, c0!\n"), in_flight=2)
    # The timeline: one bucket per 100 ms of the window, in ops/s, adding up to the ops.
    timeline = result["timeline_ops_per_s"]
    assert len(timeline) == 10
    assert sum(timeline) == ops * 10
    # The server's CPU is read when its pid is known (here, this very process).
    assert result["server"]["pid"] == os.getpid()
    assert_server_cpu(result, 1)
    assert LoopRecordingGreeting.loops == {loop_name}
    options = result["options"]
    assert options["target"] == str(target)
    assert options["workers"] == 1
    assert options["framing"] == "line"


@pytest.mark.parametrize(("duration_s", "buckets"), [(0.5, 5), (0.3, 3)])
def test_a_run_stops_at_its_duration(loop_name: str, duration_s: float, buckets: int) -> None:
    with line_server(loop_name) as target:
        began = time.monotonic()
        result = bench(scenario="greeting", target=target, conns=1, duration_s=duration_s)
        elapsed = time.monotonic() - began
    # Not a speed figure: a run that ignored its duration would hang far past this.
    assert elapsed < HANG_GUARD_S
    # ... and it cannot be shorter than its warmup and window.
    assert elapsed >= 0.2 + duration_s
    assert len(result["timeline_ops_per_s"]) == buckets
    assert sum(result["timeline_ops_per_s"]) == result["ops"] * 10
    assert result["ops_per_s"] == pytest.approx(result["ops"] / duration_s)
    assert_clean(result)


# -- 2: a wrong server never looks fast ----------------------------------------------------


def test_a_wrong_reply_is_an_error_and_no_operation(loop_name: str) -> None:
    with line_server(loop_name, HiHandler) as target:
        result = bench(scenario="greeting", target=target, duration_s=0.5)
    assert result["ops"] == 0
    # Each connection is dropped at its first wrong byte: one error per connection.
    assert result["errors"] == 2
    assert "unexpected reply bytes" in result["first_error"]
    assert "Hi, c" in result["first_error"]
    assert "latency_us" not in result


def test_a_reply_wrong_only_in_its_last_byte_is_caught(loop_name: str) -> None:
    with line_server(loop_name, LateTypoHandler) as target:
        result = bench(scenario="greeting", target=target, warmup_s=0)
    # 20 right replies per connection count; the 21st ("Hello, cN!!") ends each connection.
    assert result["ops"] == 2 * LateTypoHandler.good_replies
    assert result["errors"] == 2
    assert re.search(r"unexpected reply bytes b'Hello, c[01]!!\\n'", result["first_error"])


def test_echo_scenario_against_a_greeting_server_is_an_error(loop_name: str) -> None:
    with line_server(loop_name, "greeting") as target:
        result = bench(scenario="echo", target=target, framing="line", size=16, duration_s=0.5)
    assert result["ops"] == 0
    assert result["errors"] == 2
    assert "Welcome!" in result["first_error"]


def test_the_cli_exits_1_when_replies_are_wrong(tmp_path: Path, loop_name: str) -> None:
    out = tmp_path / "wrong.json"
    with line_server(loop_name, HiHandler) as target:
        done = run_netframe(
            "bench", "--target", str(target), "--conns", "1", "--workers", "1",
            "--duration", "0.5", "--warmup", "0", "--no-progress", "--json", str(out),
        )  # fmt: skip
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr
    result = json.loads(out.read_text())
    assert result["errors"] == 1
    assert result["ops"] == 0


def test_a_wrong_greeting_names_the_bytes_received(loop_name: str) -> None:
    with (
        line_server(loop_name, WrongGreetingHandler) as target,
        pytest.raises(BenchError) as caught,
    ):
        bench(scenario="greeting", target=target, duration_s=0.5)
    assert "Howdy!" in str(caught.value)


# -- 3: UDP loss is counted, not hidden ----------------------------------------------------


def test_udp_loss_is_counted() -> None:
    # Answer every other datagram; the rest are lost.
    with udp_responder(lambda n, data: greet_udp(data) if n % 2 else None) as target:
        result = bench(scenario="udp", target=target, size=16, udp_timeout_s=0.05)
    assert result["errors"] == 0, result["first_error"]
    assert result["ops"] > 0
    assert result["lost"] > 0
    assert 0 < result["loss_ratio"] < 1
    assert result["loss_ratio"] == result["lost"] / (result["ops"] + result["lost"])
    assert_latency_ordered(result)


def test_udp_with_no_replies_at_all_is_total_loss() -> None:
    with udp_responder(lambda n, data: None) as target:
        result = bench(scenario="udp", target=target, size=16, udp_timeout_s=0.05, duration_s=0.5)
    assert result["ops"] == 0
    assert result["lost"] > 0
    assert result["loss_ratio"] == 1.0
    assert "latency_us" not in result


def test_udp_wrong_replies_are_errors() -> None:
    with udp_responder(lambda n, data: b"Hi, " + data + b"!") as target:
        result = bench(scenario="udp", target=target, size=16, udp_timeout_s=0.05, duration_s=0.5)
    assert result["ops"] == 0
    assert result["errors"] > 0
    assert "unexpected datagram b'Hi, u" in result["first_error"]


# -- 5: JSON and the plot, through the real command line (CI's smoke benchmark) ------------


def test_cli_spawn_writes_json_and_a_plot(tmp_path: Path, loop_name: str) -> None:
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    done = run_netframe(
        "bench", "--spawn", "--spawn-args", f"--loop {loop_name}",
        "--scenario", "greeting", "--conns", "2", "--workers", "1",
        "--duration", "1", "--warmup", "0.2", "--no-progress",
        "--json", str(json_path), "--plot", str(png_path),
    )  # fmt: skip
    assert done.returncode == 0, done
    assert "Traceback" not in done.stderr
    assert "operations" in done.stdout  # the summary table
    result = json.loads(json_path.read_text())
    assert_clean(result)
    assert result["ops_per_s"] == result["ops"] / 1
    assert_latency_ordered(result)
    assert set(result["options"]) == {f.name for f in dataclasses.fields(BenchOptions)}
    assert result["options"]["scenario"] == "greeting"
    assert result["options"]["conns"] == 2
    assert result["options"]["duration_s"] == 1
    assert result["options"]["warmup_s"] == 0.2
    assert result["options"]["spawn_args"] == ["--loop", loop_name]
    environment = result["environment"]
    for key in ("python", "cpu_count", "cpu_model", "netframe", "client_loop"):
        assert environment[key], key
    server = result["server"]
    assert_server_cpu(result, 1)
    assert server["command"][:3] == ["-m", "netframe", "serve"]
    assert server["command"][-2:] == ["--loop", loop_name]
    # The spawned server was a process of its own, and it is stopped after the run.
    assert server["pid"] != os.getpid()
    assert not psutil.pid_exists(server["pid"])
    assert png_path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_spawned_echo_with_64_kib_messages(loop_name: str) -> None:
    size = 65536
    result = bench(scenario="echo", spawn_args=("--loop", loop_name), size=size, duration_s=0.5)
    assert_clean(result)
    ops = result["ops"]
    assert_window_bytes(result["bytes_out"], ops, size, in_flight=2)
    assert_window_bytes(result["bytes_in"], ops, size, in_flight=2)
    assert result["mib_per_s"] == pytest.approx(ops * size / 0.5 / 2**20)
    assert result["options"]["framing"] == "raw"


def test_spawned_sessions(loop_name: str) -> None:
    result = bench(scenario="sessions", spawn_args=("--loop", loop_name), duration_s=0.5)
    assert_clean(result)
    ops = result["ops"]
    # Each session: greeting, b"cN\n" -> b"Hello, cN!\n", b"exit\n", the server closes.
    in_flight = result["options"]["conns"]
    per_session_in = len(GREETING) + len(b"Hello, c0!\n")
    assert_window_bytes(result["bytes_in"], ops, per_session_in, in_flight)
    assert_window_bytes(result["bytes_out"], ops, len(b"c0\n") + len(b"exit\n"), in_flight)
    assert_latency_ordered(result)


def test_a_server_with_workers_is_measured_across_its_processes(loop_name: str) -> None:
    result = bench(
        scenario="greeting", spawn_args=("--loop", loop_name, "--workers", "2"), conns=16,
        warmup_s=2.0,  # the workers start serving within it, even on a busy machine
    )  # fmt: skip
    assert_clean(result)
    assert_server_cpu(result, 1)  # the workers' CPU, not the idle supervisor's alone
    processes = result["server"]["processes"]
    assert processes[0]["pid"] == result["server"]["pid"]  # the supervisor, then the rest
    workers = [p for p in processes if p["connections"]]
    # Each connection is held by one worker for the whole run; the kernel's hash spread
    # them, so two workers hold some (never a fixed share).
    assert sum(p["connections"] for p in processes) == 16
    assert len(workers) == 2
    assert all(p["cpu_s"] > 0 for p in workers)
    rows = dict(summary_rows(result))
    assert rows["server processes"].startswith("2 busy, cpu split ")


def test_spawned_udp(loop_name: str) -> None:
    size = 64
    result = bench(scenario="udp", spawn_args=("--loop", loop_name), size=size, duration_s=0.5)
    assert result["errors"] == 0, result["first_error"]
    assert result["ops"] > 0
    assert result["loss_ratio"] == result["lost"] / (result["ops"] + result["lost"])
    assert result["loss_ratio"] < 1
    in_flight = result["options"]["conns"]
    assert_window_bytes(result["bytes_out"], result["ops"], size, in_flight)
    assert_window_bytes(result["bytes_in"], result["ops"], size + len(b"Hello, !"), in_flight)


# -- 6: hold -------------------------------------------------------------------------------


def test_hold_keeps_its_connections_and_reports_memory_per_connection(loop_name: str) -> None:
    result = bench(
        scenario="hold", spawn_args=("--loop", loop_name), conns=200, duration_s=0.5, warmup_s=0
    )
    assert result["errors"] == 0, result["first_error"]
    assert result["connect_errors"] == 0
    assert result["connections_ready"] == 200
    # Nothing was measured but memory: no operations, throughput or latency are reported.
    assert result["ops"] is result["ops_per_s"] is result["latency_us"] is None
    hold = result["hold"]
    assert hold["requested"] == 200
    assert hold["held"] == 200
    assert hold["bytes_per_conn"] > 0
    assert "too few for a memory figure per connection" in hold["warning"]
    rows = dict(summary_rows(result))
    assert "throughput" not in rows
    assert "latency p50" not in rows
    assert rows["warning"] == hold["warning"]


def test_hold_cannot_be_plotted(tmp_path: Path) -> None:
    done = run_netframe(
        "bench", "--spawn", "--scenario", "hold", "--plot", str(tmp_path / "hold.png")
    )
    assert_one_line_error(done, 2, "--plot draws throughput and latency, which hold does not")


# -- 7: open loop --------------------------------------------------------------------------


def test_open_loop_follows_its_schedule(loop_name: str) -> None:
    rate, warmup_s, duration_s, conns = 200, 0.2, 1.0, 2
    with line_server(loop_name) as target:
        result = bench(
            scenario="greeting",
            target=target,
            rate=rate,
            warmup_s=warmup_s,
            duration_s=duration_s,
            conns=conns,
        )
    assert_clean(result)
    # The schedule, not the server's speed, caps the count: no more requests are sent
    # than are due from the start of the warmup to the end of the window (one more per
    # connection for the stagger). A closed loop would answer thousands.
    ops = result["ops"]
    assert ops <= rate * (warmup_s + duration_s) + conns
    assert_window_bytes(result["bytes_out"], ops, len(b"c0\n"), in_flight=conns)
    assert result["ops_per_s"] == pytest.approx(ops / duration_s)
    assert result["options"]["rate"] == rate
    assert_latency_ordered(result)


# -- 9: command-line mistakes --------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "text"),
    [
        ([], "one of the arguments --target --spawn is required"),
        (["--target", "nothost:1", "--spawn"], "not allowed with argument"),
        (
            ["--spawn", "--scenario", "greeting", "--framing", "raw", "--pipeline", "4"],
            "raw framing has no message boundaries",
        ),
        (["--spawn", "--scenario", "udp", "--rate", "10"], "--rate applies to"),
        (["--target", "127.0.0.1:x"], "malformed address '127.0.0.1:x'"),
        (["--spawn", "--warmup", "-1"], "--warmup not negative"),
        (["--spawn", "--conns", "0"], "greater than 0"),
    ],
)
def test_bad_bench_command_lines_are_one_line_and_exit_2(args: list[str], text: str) -> None:
    assert_one_line_error(run_netframe("bench", *args), 2, text)


def test_a_unix_socket_target_is_benched(loop_name: str) -> None:
    folder = tempfile.mkdtemp(prefix="nf-", dir="/tmp")
    path = os.path.join(folder, "bench.sock")
    try:
        with server_thread(loop=loop_name, unix=[path]) as server:
            for scenario in ("greeting", "sessions"):
                result = bench(scenario=scenario, target=path)
                assert_clean(result)
                assert result["options"]["target"] == path
                assert result["options"]["framing"] == "raw"  # read from the greeting
            assert server.connection_count == 0
            done = run_netframe(
                "bench", "--target", f"unix:{path}", "--duration", "0.5", "--warmup", "0.1",
                "--conns", "2", "--workers", "1", "--no-progress",
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert path in done.stdout  # the report's target row
    finally:
        shutil.rmtree(folder)


def test_the_udp_scenario_needs_an_address_not_a_unix_socket() -> None:
    assert_one_line_error(
        run_netframe("bench", "--target", "unix:/tmp/x.sock", "--scenario", "udp"), 2,
        "the udp scenario needs --target HOST:PORT, not a Unix socket",
    )  # fmt: skip


def test_a_refused_target_is_one_line_and_exit_1() -> None:
    with refusing_port() as port:
        done = run_netframe(
            "bench", "--target", f"127.0.0.1:{port}", "--workers", "1", "--no-progress"
        )
    assert_one_line_error(done, 1, f"cannot connect to 127.0.0.1:{port}")


def test_run_bench_raises_bench_error_for_a_refused_target() -> None:
    with refusing_port() as port, pytest.raises(BenchError, match="cannot connect"):
        bench(scenario="greeting", target=Address("127.0.0.1", port))


def test_a_server_pid_that_does_not_exist_is_one_line(loop_name: str) -> None:
    with line_server(loop_name) as target:
        done = run_netframe(
            "bench", "--target", str(target), "--server-pid", "999999999", "--conns", "1",
            "--workers", "1", "--duration", "0.5", "--warmup", "0", "--no-progress",
        )  # fmt: skip
    assert done.returncode in (1, 2)
    assert_one_line_error(done, done.returncode, "999999999")


def test_server_cpus_that_do_not_exist_are_one_line() -> None:
    done = run_netframe(
        "bench", "--spawn", "--server-cpus", "4095", "--conns", "1", "--workers", "1",
        "--duration", "0.5", "--warmup", "0", "--no-progress",
    )  # fmt: skip
    assert done.returncode in (1, 2)
    assert_one_line_error(done, done.returncode, "4095")


def test_client_cpus_that_do_not_exist_fail_promptly() -> None:
    with refusing_port() as port:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "netframe", "bench", "--target", f"127.0.0.1:{port}",
                "--client-cpus", "4095", "--conns", "1", "--workers", "1", "--no-progress",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            _, stderr = proc.communicate(timeout=8)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    assert proc.returncode in (1, 2)
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


# -- 10: every reply checked byte for byte, pipelined and split ----------------------------


def test_pipelined_greeting_checks_every_reply(loop_name: str) -> None:
    with line_server(loop_name) as target:
        result = bench(scenario="greeting", target=target, pipeline=4, duration_s=0.5)
    assert_clean(result)
    assert_window_bytes(result["bytes_out"], result["ops"], len(b"c0\n"), in_flight=8)
    assert_window_bytes(result["bytes_in"], result["ops"], len(b"Hello, c0!\n"), in_flight=8)
    assert_latency_ordered(result)


def test_pipelined_wrong_replies_are_still_errors(loop_name: str) -> None:
    with line_server(loop_name, HiHandler) as target:
        result = bench(scenario="greeting", target=target, pipeline=4, duration_s=0.5)
    assert result["ops"] == 0
    assert result["errors"] == 2


@pytest.mark.parametrize("pipeline", [1, 3])
def test_raw_echo_of_large_messages_split_in_chunks(loop_name: str, pipeline: int) -> None:
    size = 100_000
    with line_server(loop_name, "echo", framing="raw") as target:
        result = bench(scenario="echo", target=target, size=size, pipeline=pipeline, duration_s=0.5)
    assert_clean(result)
    assert result["options"]["framing"] == "raw"
    assert_window_bytes(result["bytes_in"], result["ops"], size, in_flight=2 * pipeline)
    assert_window_bytes(result["bytes_out"], result["ops"], size, in_flight=2 * pipeline)


# -- counters ------------------------------------------------------------------------------


def test_byte_counters_cover_the_same_window_as_ops(loop_name: str) -> None:
    with line_server(loop_name) as target:
        result = bench(scenario="greeting", target=target, conns=1, duration_s=0.5, warmup_s=0.3)
    ops = result["ops"]
    assert ops > 0
    # One request may be in flight at each edge of the window; the greeting comes once.
    assert result["bytes_out"] <= (ops + 2) * len(b"c0\n")
    assert result["bytes_in"] <= len(GREETING) + (ops + 2) * len(b"Hello, c0!\n")


# -- a target's framing, read from its greeting ---------------------------------------------


def test_a_default_server_is_benched_with_no_framing_flag(loop_name: str) -> None:
    # netframe's default auto framing greets with a bare Welcome!: bare words, as the
    # tutorial's clients send them.
    with line_server(loop_name, framing="auto") as target:
        for scenario in ("greeting", "sessions"):
            result = bench(scenario=scenario, target=target)
            assert_clean(result)
            assert result["options"]["framing"] == "raw"
    with line_server(loop_name, framing="line") as target:
        result = bench(scenario="greeting", target=target)
        assert_clean(result)
        assert result["options"]["framing"] == "line"


@pytest.mark.parametrize(
    ("server_framing", "handler", "bench_framing", "text"),
    [
        ("auto", "echo", None, "sent no greeting within 3 s"),
        ("line", "greeting", "raw", "greets with a line (b'Welcome!\\n'): it frames lines"),
        ("auto", "greeting", "line", "greets with a bare b'Welcome!': leave --framing out"),
    ],
)
def test_a_target_that_cannot_be_benched_as_asked_says_what_to_pass(
    loop_name: str, server_framing: str, handler: str, bench_framing: str | None, text: str
) -> None:
    with (
        line_server(loop_name, handler, server_framing) as target,
        pytest.raises(BenchError) as caught,
    ):
        bench(scenario="greeting", target=target, framing=bench_framing)
    assert text in str(caught.value)


# -- Ctrl+C -----------------------------------------------------------------------------------


@pytest.mark.parametrize("during", ["window", "warmup"])
def test_ctrl_c_ends_the_run_with_what_it_has_and_stops_everything(during: str) -> None:
    warmup = "0.3" if during == "window" else "30"
    proc = subprocess.Popen(
        [sys.executable, "-m", "netframe", "bench", "--spawn", "--scenario", "greeting",
         "--conns", "4", "--duration", "60", "--warmup", warmup, "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # Wait until the spawned server and the load processes are all running.
        deadline = time.monotonic() + HANG_GUARD_S
        children: list[psutil.Process] = []
        while len(children) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            children = psutil.Process(proc.pid).children(recursive=True)
        time.sleep(2.0)  # well inside the window (or the warm-up)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    if during == "window":
        assert "interrupted: the figures below cover part of the window" in err
        assert re.search(r"partial .*interrupted: [\d.]+ s of the 60 s window", out), out
        assert re.search(r"operations +│ +[\d,]+", out), out
    else:
        assert err.strip() == "netframe: interrupted before there were figures to show"
    psutil.wait_procs(children, timeout=10)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_a_window_of_any_length_is_whole_unless_interrupted(loop_name: str) -> None:
    # 0.3 s is 299,999,999.99 ns: a window cut to whole nanoseconds is still all of it.
    with line_server(loop_name) as target:
        result = bench(scenario="greeting", target=target, duration_s=0.3)
    assert_clean(result)
    assert "partial" not in result
    assert result["window_s"] == 0.3  # all of --duration
