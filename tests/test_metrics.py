"""``--metrics HOST:PORT``: the Prometheus page, scraped over HTTP from real
``netframe serve`` subprocesses (one process and ``--workers``), read with
prometheus-client's own text parser and compared with what the clients did."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    REPLY_TIMEOUT_S,
    CliServer,
    assert_one_line_error,
    recv_exactly,
    recv_until_closed,
    run_netframe,
)
from prometheus_client.parser import text_string_to_metric_families

from netframe import Server
from netframe._metrics_http import MAX_REQUEST_BYTES, respond
from netframe.metrics import FAMILIES, WorkerTotals, add
from netframe.proxy import encode_v1

#: Bound for anything a test waits for: generous for a busy machine.
WAIT_S = 20.0

Page = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int, path: str = "/metrics") -> Page:
    """The page at ``port``, parsed: ``(sample name, sorted labels) -> value``."""
    url = f"http://127.0.0.1:{port}{path}"
    with urllib.request.urlopen(url, timeout=REPLY_TIMEOUT_S) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    page: Page = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            page[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return page


def value(page: Page, name: str, **labels: str) -> float:
    """One series' value; a KeyError if the page does not have it."""
    return page[name, tuple(sorted(labels.items()))]


def shows(page: Page, name: str, expected: float, **labels: str) -> bool:
    """Whether the page has that series at ``expected`` (for waits: a worker's series
    appear with its first report)."""
    return page.get((name, tuple(sorted(labels.items())))) == expected


def counters(page: Page) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """netframe's counter series on the page."""
    names = {f.name for f in FAMILIES if f.kind == "counter"}
    names.discard("netframe_worker_cpu_seconds_total")  # a process's: restarts at 0
    return {key: v for key, v in page.items() if key[0] in names}


def metrics_port(server: CliServer) -> int:
    return int(server.wait_for("metrics_listening")[0]["port"])


def wait_for_page(
    port: int, condition: Callable[[Page], bool], what: str, timeout_s: float = WAIT_S
) -> Page:
    """Scrape until ``condition(page)`` holds (a worker's counters reach the supervisor
    within a second); fail after ``timeout_s`` showing the last page."""
    deadline = time.monotonic() + timeout_s
    page = scrape(port)
    while not condition(page):
        if time.monotonic() > deadline:
            shown = {k: v for k, v in page.items() if k[0].startswith("netframe") and v}
            raise AssertionError(f"{what} did not show within {timeout_s} s: {shown}")
        time.sleep(0.05)
        page = scrape(port)
    return page


def greeting_session(port: int, name: bytes, host: str = "127.0.0.1") -> bytes:
    """Connect, read the greeting, send ``name``, read the reply, send exit, read to the
    close; returns all that was read."""
    with socket.create_connection((host, port), timeout=WAIT_S) as sock:
        got = recv_exactly(sock, len(b"Welcome!\n"))
        sock.sendall(name + b"\n")
        got += recv_exactly(sock, len(b"Hello, " + name + b"!\n"))
        sock.sendall(b"exit\n")
        return got + recv_until_closed(sock)


@pytest.fixture
def metrics_server(loop_name: str) -> Iterator[Callable[..., CliServer]]:
    """``netframe serve --metrics 127.0.0.1:0 ...`` on the parametrized loop, killed
    after the test."""
    servers: list[CliServer] = []

    def start(*args: str, workers: int = 1) -> CliServer:
        server = CliServer(
            ["--loop", loop_name, "--metrics", "127.0.0.1:0", "--workers", str(workers), *args]
        )
        servers.append(server)
        server.wait_for("workers_ready" if workers > 1 else "serving", timeout_s=WAIT_S)
        return server

    yield start
    for server in servers:
        server.kill()


# -- one process ---------------------------------------------------------------------------


def test_every_session_is_counted_exactly(metrics_server: Callable[..., CliServer]) -> None:
    server = metrics_server("--tcp", "127.0.0.1:0", "--framing", "line")
    port, page_port = server.address("tcp")[1], metrics_port(server)
    page = scrape(page_port)
    assert value(page, "netframe_connections_total", transport="tcp") == 0
    assert [v for k, v in page.items() if k[0] == "netframe_info"] == [1]
    assert ("netframe_connections_total", (("transport", "udp"),)) not in page  # not served
    sent = received = 0
    for number in range(12):
        name = b"client%d" % number
        got = greeting_session(port, name)
        assert got == b"Welcome!\nHello, " + name + b"!\n"
        sent += len(name) + 1 + len(b"exit\n")
        received += len(got)
    server.wait_for("connection_closed", 12)
    page = scrape(page_port)
    assert value(page, "netframe_connections_open", transport="tcp") == 0
    assert value(page, "netframe_connections_total", transport="tcp") == 12
    # The greeting handler closes the session when it reads exit.
    assert value(page, "netframe_connections_closed_total", transport="tcp",
                 reason="handler_closed") == 12  # fmt: skip
    assert value(page, "netframe_messages_received_total", transport="tcp") == 24
    assert value(page, "netframe_messages_sent_total", transport="tcp") == 24  # greeting, reply
    assert value(page, "netframe_bytes_received_total", transport="tcp") == sent
    assert value(page, "netframe_bytes_sent_total", transport="tcp") == received
    # prometheus-client's process collector describes the serving process.
    assert value(page, "process_open_fds") > 0


def test_a_scrape_during_a_load_run_matches_the_load_generator(
    metrics_server: Callable[..., CliServer], tmp_path: Path
) -> None:
    server = metrics_server("--tcp", "127.0.0.1:0", "--framing", "line")
    port, page_port = server.address("tcp")[1], metrics_port(server)
    conns = 6
    out = tmp_path / "bench.json"
    bench = subprocess.Popen(
        [
            sys.executable, "-m", "netframe", "bench", "--target", f"127.0.0.1:{port}",
            "--scenario", "greeting", "--conns", str(conns), "--workers", "1",
            "--duration", "2", "--warmup", "0", "--no-progress", "--json", str(out),
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    pages = []
    try:
        deadline = time.monotonic() + 60
        while bench.poll() is None and time.monotonic() < deadline:
            pages.append(scrape(page_port))
            time.sleep(0.1)
        _, errors = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert bench.returncode == 0, errors
    result = json.loads(out.read_text())
    assert result["errors"] == 0
    assert result["connect_errors"] == 0
    ops = result["ops"]
    assert ops > 0
    # Scrapes while the load ran: every counter only grew, and the bench's connections
    # were seen open, all at once.
    for before, after in itertools.pairwise(pages):
        for key, count in counters(before).items():
            assert after[key] >= count, key
    assert max(value(p, "netframe_connections_open", transport="tcp") for p in pages) == conns
    # After the run, with every connection closed, the figures are final.
    page = wait_for_page(
        page_port,
        lambda p: shows(p, "netframe_connections_open", 0, transport="tcp"),
        "the bench's connections closing",
    )
    # The bench's connections, and the one it first probes the greeting with.
    assert value(page, "netframe_connections_total", transport="tcp") == conns + 1
    closed = sum(v for (name, _), v in page.items() if name == "netframe_connections_closed_total")
    assert closed == conns + 1
    messages_in = value(page, "netframe_messages_received_total", transport="tcp")
    # The bench counts the round trips that finished inside its window; the server also
    # saw the ones in flight when the window closed: at most one per connection.
    assert ops <= messages_in <= ops + conns
    greetings = conns + 1
    assert value(page, "netframe_messages_sent_total", transport="tcp") == messages_in + greetings
    # Requests are c0\n .. c5\n; replies Hello, cN!\n; one Welcome!\n per connection.
    assert value(page, "netframe_bytes_received_total", transport="tcp") == 3 * messages_in
    assert value(page, "netframe_bytes_sent_total", transport="tcp") == (
        9 * greetings + 11 * messages_in
    )
    assert result["bytes_out"] == 3 * ops
    assert result["bytes_in"] == 11 * ops


def test_refusals_and_closes_show_under_their_reasons(
    metrics_server: Callable[..., CliServer],
) -> None:
    server = metrics_server(
        "--tcp", "127.0.0.1:0", "--framing", "line", "--max-connections", "3",
        "--max-per-ip", "2", "--idle-timeout", "2", "--max-line-bytes", "16",
    )  # fmt: skip
    port, page_port = server.address("tcp")[1], metrics_port(server)

    def connect(host: str) -> socket.socket:
        sock = socket.socket()
        sock.settimeout(WAIT_S)
        sock.bind((host, 0))
        sock.connect(("127.0.0.1", port))
        return sock

    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(connect(host)) for host in ("127.0.0.1", "127.0.0.1")]
        for sock in held:
            assert recv_exactly(sock, 9) == b"Welcome!\n"
        with connect("127.0.0.1") as third:  # a third from one address: max_per_ip
            assert recv_until_closed(third) == b"Error: too many connections from your address\n"
        held.append(stack.enter_context(connect("127.0.0.2")))
        assert recv_exactly(held[-1], 9) == b"Welcome!\n"
        with connect("127.0.0.3") as fourth:  # a fourth in all: max_connections
            assert recv_until_closed(fourth) == b"Error: too many connections\n"
        page = scrape(page_port)
        assert value(page, "netframe_connections_open", transport="tcp") == 3
        assert value(page, "netframe_connections_max") == 3
        # The three held connections are left silent: the idle timeout closes them.
        for sock in held:
            assert recv_until_closed(sock) == b""
    with connect("127.0.0.1") as long_line:
        assert recv_exactly(long_line, 9) == b"Welcome!\n"
        long_line.sendall(b"x" * 40 + b"\n")
        assert recv_until_closed(long_line) == b"Error: line exceeds 16 bytes\n"
    server.wait_for("connection_closed", 4)
    page = scrape(page_port)

    def closed(reason: str) -> float:
        return value(page, "netframe_connections_closed_total", transport="tcp", reason=reason)

    def refused(reason: str) -> float:
        return value(page, "netframe_connections_refused_total", transport="tcp", reason=reason)

    assert refused("max_per_ip") == 1
    assert refused("max_connections") == 1
    assert refused("no_file_descriptors") == 0
    assert closed("idle_timeout") == 3
    assert closed("line_too_long") == 1
    assert closed("peer_closed") == 0
    assert value(page, "netframe_connections_total", transport="tcp") == 4  # refused: not
    assert value(page, "netframe_connections_open", transport="tcp") == 0


def test_udp_datagrams_and_drops(metrics_server: Callable[..., CliServer]) -> None:
    # One datagram a second per source: the rest of a burst is dropped (the limiter reads
    # the server's coarse clock, so only a pause of a whole second could refill it).
    server = metrics_server("--udp", "127.0.0.1:0", "--udp-rate", "1", "--udp-max-datagram", "64")
    port, page_port = server.address("udp")[1], metrics_port(server)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(WAIT_S)
        client.sendto(b"y" * 100, ("127.0.0.1", port))  # too large: dropped first
        for _ in range(5):
            client.sendto(b"Ann\n", ("127.0.0.1", port))
        assert client.recv(100) == b"Hello, Ann!\n"
    page = wait_for_page(
        page_port,
        lambda p: shows(p, "netframe_messages_received_total", 6, transport="udp"),
        "six datagrams",
    )
    assert value(page, "netframe_messages_sent_total", transport="udp") == 1
    assert value(page, "netframe_bytes_sent_total", transport="udp") == len(b"Hello, Ann!\n")
    # The standard loop reads one byte past the limit, enough to know it is too large.
    assert value(page, "netframe_bytes_received_total", transport="udp") in (
        100 + 5 * 4,
        65 + 5 * 4,
    )
    assert value(page, "netframe_udp_datagrams_dropped_total", reason="too_large") == 1
    assert value(page, "netframe_udp_datagrams_dropped_total", reason="rate_limited") == 4
    assert value(page, "netframe_udp_datagrams_dropped_total", reason="empty") == 0


def test_unix_connections_and_proxy_rejections_are_counted(loop_name: str, tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    server = CliServer(
        [
            "--loop", loop_name, "--metrics", "127.0.0.1:0", "--tcp", "127.0.0.1:0",
            "--unix", str(path), "--proxy-protocol", "v1", "--proxy-allow", "127.0.0.1",
        ]
    )  # fmt: skip
    try:
        server.wait_for("serving")
        port, page_port = server.address("tcp")[1], metrics_port(server)
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(WAIT_S)
            client.connect(str(path))
            assert recv_exactly(client, 8) == b"Welcome!"
            client.sendall(b"Ann")
            assert recv_exactly(client, 11) == b"Hello, Ann!"
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as proxied:
            proxied.sendall(encode_v1(("192.0.2.1", 4000), ("192.0.2.2", 80)) + b"Bob")
            assert recv_exactly(proxied, 19) == b"Welcome!Hello, Bob!"
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as bad:
            bad.sendall(b"GET / HTTP/1.0\r\n\r\n")  # no header: refused
            assert recv_until_closed(bad) == b""
        server.wait_for("connection_closed", 2)
        page = scrape(page_port)
        assert value(page, "netframe_connections_total", transport="unix") == 1
        assert value(page, "netframe_bytes_received_total", transport="unix") == 3
        assert value(page, "netframe_connections_total", transport="tcp") == 1
        # The PROXY header is not the client's: only "Bob" counts.
        assert value(page, "netframe_bytes_received_total", transport="tcp") == 3
        rejected = {dict(k[1])["reason"]: v for k, v in page.items()
                    if k[0] == "netframe_proxy_headers_rejected_total"}  # fmt: skip
        assert sum(rejected.values()) == 1, rejected
    finally:
        server.kill()


# -- workers ---------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="workers need Linux")
def test_workers_are_added_up_and_a_killed_one_takes_nothing_away(
    metrics_server: Callable[..., CliServer],
) -> None:
    server = metrics_server("--tcp", "127.0.0.1:0", "--framing", "line", workers=2)
    port, page_port = server.address("tcp")[1], metrics_port(server)
    assert server.wait_for("metrics_listening")[0]["worker"] == "supervisor"
    for number in range(30):
        greeting_session(port, b"c%d" % number)
    opened = server.wait_for("connection_opened", 30, timeout_s=WAIT_S)
    assert {e["worker"] for e in opened} == {"1", "2"}  # the kernel spread them
    page = wait_for_page(
        page_port,
        lambda p: (
            shows(p, "netframe_connections_total", 30, transport="tcp")
            and shows(p, "netframe_messages_received_total", 60, transport="tcp")
        ),
        "both workers' counts",
    )
    assert value(page, "netframe_workers") == 2
    assert value(page, "netframe_worker_restarts_total") == 0
    for worker in ("1", "2"):
        assert value(page, "netframe_worker_resident_memory_bytes", worker=worker) > 0
        assert value(page, "netframe_worker_open_fds", worker=worker) > 0
    before = counters(page)

    victim = next(e for e in server.events if e["event"] == "worker_ready" and e["index"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    server.wait_for("worker_ready", 3, timeout_s=WAIT_S)  # its replacement serves
    page = wait_for_page(page_port, lambda p: shows(p, "netframe_workers", 2), "the replacement")
    for key, count in before.items():  # nothing went down with the dead worker
        assert page[key] >= count, key
    assert value(page, "netframe_connections_total", transport="tcp") == 30
    assert value(page, "netframe_worker_restarts_total") == 1
    for number in range(10):
        greeting_session(port, b"d%d" % number)
    wait_for_page(
        page_port,
        lambda p: shows(p, "netframe_connections_total", 40, transport="tcp"),
        "the later sessions",
    )


# -- settings and errors ----------------------------------------------------------------------


def test_metrics_from_the_environment_and_the_file(tmp_path: Path) -> None:
    config = tmp_path / "netframe.toml"
    config.write_text('tcp = ["127.0.0.1:0"]\nmetrics = "127.0.0.1:0"\n')
    for server in (
        CliServer(["--config", str(config)]),
        CliServer(["--tcp", "127.0.0.1:0"], env={"NETFRAME_METRICS": "127.0.0.1:0"}),
    ):
        try:
            scrape(metrics_port(server))
        finally:
            server.kill()


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--metrics", "nowhere"], "malformed address 'nowhere'"),
        (["--metrics", "127.0.0.1:99999"], "port must be a number from 0 to 65535"),
    ],
)
def test_a_bad_metrics_address_is_a_usage_error(args: list[str], text: str) -> None:
    assert_one_line_error(run_netframe("serve", *args), 2, text)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_metrics_port_in_use_fails_in_one_line(workers: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_netframe(
            "serve", "--tcp", "127.0.0.1:0", "--workers", workers, "--metrics",
            f"127.0.0.1:{port}",
        )  # fmt: skip
    assert_one_line_error(done, 1, f"cannot listen on metrics 127.0.0.1:{port}")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_without_prometheus_client_the_extra_is_named(tmp_path: Path, workers: str) -> None:
    blocker = tmp_path / "prometheus_client"
    blocker.mkdir()
    (blocker / "__init__.py").write_text('raise ImportError("not installed here")\n')
    done = subprocess.run(
        [
            sys.executable, "-m", "netframe", "serve", "--tcp", "127.0.0.1:0", "--workers",
            workers, "--metrics", "127.0.0.1:0",
        ],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert_one_line_error(done, 2, "pip install 'netframe[metrics]'")


# -- the HTTP exchange ------------------------------------------------------------------------


def page_render() -> tuple[bytes, str]:
    return b"page\n", "text/plain; version=1.0.0"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"200"),
        (b"GET /metrics?name=x HTTP/1.0\n\n", b"200"),
        (b"GET / HTTP/1.1\r\n\r\n", b"404"),
        (b"GET /metricsx HTTP/1.1\r\n\r\n", b"404"),
        (b"POST /metrics HTTP/1.1\r\n\r\n", b"405"),
        (b"hello\r\n\r\n", b"400"),
        (b"GET /metrics SPDY/3\r\n\r\n", b"400"),
        (b"GET /" + b"x" * MAX_REQUEST_BYTES, b"431"),
    ],
)
def test_the_exchange_answers_metrics_only(request_bytes: bytes, status: bytes) -> None:
    response = respond(request_bytes, page_render)
    assert response is not None
    assert response.split(b" ", 2)[1] == status
    assert b"Connection: close\r\n" in response
    assert response.endswith(b"page\n") == (status == b"200")


def test_the_exchange_waits_for_the_whole_head_and_head_has_no_body() -> None:
    request = b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    for end in range(len(request) - 1):
        assert respond(request[:end], page_render) is None
    response = respond(request, page_render)
    assert response is not None
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length: 5\r\n" in response
    assert response.endswith(b"\r\n\r\n")


@pytest.mark.asyncio
@pytest.mark.usefixtures("loop_checked")
async def test_the_page_is_served_on_the_loop_beside_a_client_that_never_asks() -> None:
    async with Server(tcp=["127.0.0.1:0"], metrics="127.0.0.1:0") as server:
        address = server.metrics_address
        assert address is not None
        silent = socket.create_connection(address, timeout=WAIT_S)
        try:
            page = await asyncio.to_thread(scrape, address[1])
            assert value(page, "netframe_connections_total", transport="tcp") == 0
            with pytest.raises(urllib.error.HTTPError) as caught:
                await asyncio.to_thread(scrape, address[1], "/")
            assert caught.value.code == 404
            caught.value.close()  # it holds the response, and so the socket
            assert server.metrics()["netframe_connections_open", ("tcp",)] == 0
        finally:
            silent.close()


# -- the sum over workers ---------------------------------------------------------------------


def test_a_dead_worker_leaves_its_counters_and_takes_its_gauges() -> None:
    totals = WorkerTotals()
    one: dict[Any, float] = {
        ("netframe_connections_total", ("tcp",)): 5,
        ("netframe_connections_open", ("tcp",)): 2,
    }
    totals.update(1, 0, one)
    totals.update(2, 0, {("netframe_connections_total", ("tcp",)): 3})
    assert totals.total()["netframe_connections_total", ("tcp",)] == 8
    assert totals.total()["netframe_workers", ()] == 2
    totals.retire(1)
    totals.restarts += 1
    after = totals.total()
    assert after["netframe_connections_total", ("tcp",)] == 8  # kept
    assert ("netframe_connections_open", ("tcp",)) not in after  # gone with the process
    assert after["netframe_workers", ()] == 1
    assert after["netframe_worker_restarts_total", ()] == 1
    totals.update(1, 0, {("netframe_connections_total", ("tcp",)): 1})  # the replacement
    assert totals.total()["netframe_connections_total", ("tcp",)] == 9
    added: dict[Any, float] = {}
    add(added, one, counters_only=True)
    assert added == {("netframe_connections_total", ("tcp",)): 5}
