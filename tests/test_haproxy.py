"""A real load balancer: HAProxy with ``send-proxy-v2`` in front of two netframe servers.

HAProxy (Debian's ``haproxy`` package, which ``.ci/run`` installs) runs in the
foreground with a configuration written to the test's temporary directory, balancing
round-robin over two ``python -m netframe serve`` processes with the PROXY protocol on
and health checks every half second. Clients connect to HAProxy from several loopback
source addresses (127.0.0.2, 127.0.0.3, ...). Each backend's handler answers with the
client address it was given, and its JSON log names the client of every connection, so
the test checks, end to end, that both backends served and that each saw the clients'
real addresses, not HAProxy's. Where HAProxy is not installed the test is skipped, and
says so.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPLY_TIMEOUT_S, CliServer, recv_exactly, recv_until_closed

pytestmark = pytest.mark.timeout(120)

#: Client source addresses: all of 127.0.0.0/8 is loopback on Linux.
SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
#: Sessions through HAProxy: enough that round-robin gives each backend several.
SESSIONS = 12
#: How long HAProxy may take to listen and to see both backends up.
START_BOUND_S = 20.0
DEPLOYMENT = Path(__file__).resolve().parent.parent / "docs" / "deployment.md"

WHOIS = '''
import os
from netframe import Handler

class WhoIs(Handler):
    """Greets, then answers each line with this backend's name and the client's address."""

    def on_connect(self, conn):
        conn.send("Welcome!")

    def on_message(self, conn, message):
        if message == "exit":
            conn.close()
        else:
            conn.send(f"{os.environ['WHOIS_BACKEND']} {conn.peer} via {conn.via}")
'''


def haproxy_binary() -> str | None:
    found = shutil.which("haproxy")
    if found is None:  # /usr/sbin is not on every PATH
        found = next(
            (path for path in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")
             if os.access(path, os.X_OK)),
            None,
        )  # fmt: skip
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def haproxy_config(front_port: int, backends: list[tuple[str, int]], stats: Path) -> str:
    """The configuration docs/deployment.md shows, on loopback ports, with a stats socket
    the test reads the health-check results from."""
    servers = "\n".join(
        f"    server {name} 127.0.0.1:{port} send-proxy-v2 check inter 500ms"
        for name, port in backends
    )
    return (
        textwrap.dedent(
            f"""\
        global
            maxconn 512
            stats socket {stats} mode 600 level admin

        defaults
            mode tcp
            timeout connect 5s
            timeout client 30s
            timeout server 30s

        frontend clients
            bind 127.0.0.1:{front_port}
            default_backend netframe

        backend netframe
            balance roundrobin
            # The health check is a real session: the PROXY header (a LOCAL one), then
            # the greeting must come.
            option tcp-check
            tcp-check expect string Welcome!
        """
        )
        + servers
        + "\n"
    )


@contextlib.contextmanager
def running_haproxy(binary: str, config: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """HAProxy in the foreground (``-db``) until the block ends; killed then."""
    proc = subprocess.Popen(
        [binary, "-db", "-f", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + START_BOUND_S
        while True:
            if proc.poll() is not None:
                output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                pytest.fail(f"haproxy exited with {proc.returncode}: {output}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert time.monotonic() < deadline, "haproxy did not listen in time"
            time.sleep(0.05)
        yield proc
    finally:
        proc.kill()
        proc.wait(REPLY_TIMEOUT_S)
        if proc.stdout:
            proc.stdout.close()


def server_states(stats: Path) -> dict[str, tuple[str, str]]:
    """``{server: (status, last check status)}`` of the netframe backend, from HAProxy's
    stats socket (``show stat`` is CSV with a header line)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(REPLY_TIMEOUT_S)
        sock.connect(str(stats))
        sock.sendall(b"show stat\n")
        text = recv_until_closed(sock).decode()
    lines = text.strip().splitlines()
    columns = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(columns, line.split(","), strict=False)) for line in lines[1:]]
    return {
        row["svname"]: (row["status"], row["check_status"])
        for row in rows
        if row["pxname"] == "netframe" and row["svname"] not in ("FRONTEND", "BACKEND")
    }


def wait_for_checks(stats: Path, names: list[str]) -> dict[str, tuple[str, str]]:
    """Until every server has passed a health check (or the bound is reached)."""
    deadline = time.monotonic() + START_BOUND_S
    while True:
        states = server_states(stats)
        if all(states.get(name) == ("UP", "L7OK") for name in names):
            return states
        if time.monotonic() > deadline:
            return states
        time.sleep(0.1)


def session(port: int, source: str, name: str) -> tuple[str, tuple[str, int], bytes]:
    """One greeting session through HAProxy from ``source``: (the backend's name, our
    own address, the reply)."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=REPLY_TIMEOUT_S, source_address=(source, 0)
    ) as sock:
        own = sock.getsockname()[:2]
        assert recv_exactly(sock, 9) == b"Welcome!\n"
        sock.sendall(name.encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(200)
            assert chunk, f"closed after {reply!r}"
            reply += chunk
        sock.sendall(b"exit\n")
        assert recv_until_closed(sock) == b""
    return reply.decode().split()[0], own, reply


requires_haproxy = pytest.mark.skipif(
    haproxy_binary() is None,
    reason="haproxy is not installed (apt-get install haproxy; .ci/run installs it)",
)


@requires_haproxy
def test_the_haproxy_configurations_in_deployment_md_are_valid(tmp_path: Path) -> None:
    binary = haproxy_binary()
    assert binary is not None
    blocks = re.findall(r"```haproxy\n(.*?)```", DEPLOYMENT.read_text(), re.DOTALL)
    assert len(blocks) == 2  # one machine's balancer, then several machines'
    for number, block in enumerate(blocks):
        assert "send-proxy-v2" in block
        config = tmp_path / f"haproxy{number}.cfg"
        config.write_text(block)
        done = subprocess.run(
            [binary, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stdout + done.stderr


@requires_haproxy
def test_haproxy_with_send_proxy_v2_in_front_of_two_servers(
    cli_server: Callable[..., CliServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = haproxy_binary()
    assert binary is not None
    (tmp_path / "whois.py").write_text(WHOIS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))
    backends: dict[str, CliServer] = {}
    for name in ("one", "two"):
        monkeypatch.setenv("WHOIS_BACKEND", name)
        backends[name] = cli_server(
            "--tcp", "127.0.0.1:0", "--handler", "whois:WhoIs", "--framing", "line",
            "--proxy-protocol", "v2", "--proxy-allow", "127.0.0.1",
        )  # fmt: skip
    ports = [(name, server.address("tcp")[1]) for name, server in backends.items()]
    front = free_port()
    config = tmp_path / "haproxy.cfg"
    stats = tmp_path / "haproxy.sock"
    assert len(str(stats)) < 100, "a Unix socket path must fit 108 bytes"
    config.write_text(haproxy_config(front, ports, stats))

    with running_haproxy(binary, config, front):
        # HAProxy's own health checks (a LOCAL header, then the greeting) pass on both.
        states = wait_for_checks(stats, list(backends))
        assert states == {"one": ("UP", "L7OK"), "two": ("UP", "L7OK")}, states
        served: dict[str, list[tuple[str, int]]] = {"one": [], "two": []}
        for i in range(SESSIONS):
            # Pairs of sessions per source, so round-robin gives each backend every source.
            source = SOURCES[(i // 2) % len(SOURCES)]
            backend, own, reply = session(front, source, f"n{i}")
            # The handler was told the client's own address, and the balancer in via.
            _, peer, _, via = reply.decode().split()
            assert peer == f"{own[0]}:{own[1]}"
            assert via.startswith("127.0.0.1:")
            served[backend].append(own)

    assert served["one"], served
    assert served["two"], served
    for name, server in backends.items():
        assert server.stop() == 0  # and its log is read to the end
        opened = [e["peer"] for e in server.events if e["event"] == "connection_opened"]
        clients = {f"{host}:{port}" for host, port in served[name]}
        assert len({host for host, _ in served[name]}) >= 2, served[name]
        # Every client this backend served is in its log under its real address ...
        assert clients <= set(opened), (name, clients, opened)
        # ... and every other connection it logged is HAProxy's own (health checks,
        # PROXY LOCAL headers: the balancer's address, 127.0.0.1).
        others = [peer for peer in opened if peer not in clients]
        assert all(peer.startswith("127.0.0.1:") for peer in others), others
        assert others, f"no health check reached {name}"
        rejected = [e for e in server.events if e["event"] == "proxy_header_rejected"]
        assert rejected == [], rejected
