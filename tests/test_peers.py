"""The comparison suite's servers speak the exchange byte for byte, and a wrong one is refused.

Every server ``benchmarks/compare.py`` runs (netframe, the hand-written baselines and
the peers: Twisted, aiomisc, AnyIO) is started here exactly as compare.py starts it, on
loopback, and taken through ``benchmarks/exchanges.py``'s exchange for each protocol it
is measured in (lines, bare words, echo, UDP): the check compare.py itself runs before
measuring. A peer whose library is not installed is skipped, with the command that
installs it; with the ``peers`` extra installed, all of them run. The netframe servers
on the pure build are left to compare.py: they are the same code.

The check must be able to fail: servers that answer otherwise (real ones given another
exchange, and small hand-written ones wrong in one way each) are caught, and
compare.py measures none of them.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import compare  # noqa: E402  (benchmarks/ is not a package)
from exchanges import EXCHANGES, check  # noqa: E402

from netframe.bench._run import free_port, spawned_server  # noqa: E402

INSTALL = 'pip install -e ".[bench,peers]"'
#: How long the checks expected to fail wait for a reply that will not come.
QUICK_TIMEOUT_S = 0.5


def _cases() -> list[tuple[str, str, tuple[str, ...]]]:
    """(server, handler it runs, exchanges to check) for every server compare.py runs,
    one server process per handler; UDP is checked on the greeting server, as measured."""
    cases = []
    for name in compare.SERVERS:
        if name.endswith("-pure"):
            continue
        by_handler: dict[str, list[str]] = {}
        for scenario, (_, handler) in [*compare.SCENARIOS.items(), ("hold", ({}, "greeting"))]:
            if name not in compare.ONLY.get(scenario, compare.SERVERS):
                continue
            exchange = "udp" if scenario == "udp" else handler
            if exchange not in by_handler.setdefault(handler, []):
                by_handler[handler].append(exchange)
        cases += [(name, handler, tuple(found)) for handler, found in by_handler.items()]
    return cases


CASES = _cases()


@contextmanager
def started(name: str, handler: str) -> Iterator[int]:
    """``name`` serving ``handler`` as compare.py starts it; yields its (TCP and UDP) port."""
    port = free_port()
    with spawned_server(compare.SERVERS[name](handler, port), "127.0.0.1", port):
        yield port


def test_every_peer_is_in_the_cases() -> None:
    """The cases come from compare.py's own tables, so a peer added there is tested here."""
    peers = {name for name, _, _ in CASES if name in compare.PEERS}
    assert peers == set(compare.PEERS)
    assert {"twisted-epoll", "aiomisc-uvloop", "anyio-asyncio"} <= peers
    for peer in compare.PEERS:
        exchanges = {e for name, _, found in CASES if name == peer for e in found}
        assert exchanges == set(EXCHANGES), (peer, exchanges)


@pytest.mark.parametrize(
    ("name", "handler", "exchanges"), CASES, ids=[f"{n}-{h}" for n, h, _ in CASES]
)
def test_each_server_speaks_each_exchange_it_is_measured_in(
    name: str, handler: str, exchanges: tuple[str, ...]
) -> None:
    if missing := compare.missing_libraries(name):
        pytest.skip(f"{', '.join(missing)} not installed: {INSTALL}")
    with started(name, handler) as port:
        for exchange in exchanges:
            assert check(exchange, "127.0.0.1", port) is None


# -- the check fails when it should ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "handler", "exchange", "expected"),
    [
        # bare greeting where lines are expected
        (
            "raw-uvloop",
            "bare-greeting",
            "greeting",
            "on connecting: expected b'Welcome!\\n', got b'Welcome!', then nothing for 0.5 s",
        ),
        # lines where bare words are expected: the greeting's newline is one byte too many
        (
            "raw-asyncio",
            "greeting",
            "bare-greeting",
            "after b'c0': expected b'Hello, c0!', got b'\\n'",
        ),
        # echo where greetings are expected, over UDP
        ("raw-uvloop", "echo", "udp", "expected b'Hello, u0-1!', got b'u0-1'"),
    ],
)
def test_a_real_server_asked_for_another_exchange_fails_the_check(
    name: str, handler: str, exchange: str, expected: str
) -> None:
    with started(name, handler) as port:
        problem = check(exchange, "127.0.0.1", port, timeout_s=QUICK_TIMEOUT_S)
    assert problem is not None
    assert problem.startswith(f"{exchange}: ")
    assert expected in problem


Answer = Callable[[socket.socket, bytes], bool]


@contextmanager
def tiny_server(make_answer: Callable[[], Answer]) -> Iterator[int]:
    """A thread greeting each connection with ``Welcome!\\n``, then calling
    ``answer(conn, data)`` for each read until it returns False, with a new ``answer`` from
    ``make_answer()`` per connection; yields the port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            answer = make_answer()
            with conn, suppress(OSError):
                conn.settimeout(5)
                conn.sendall(b"Welcome!\n")
                while (data := conn.recv(65536)) and answer(conn, data):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def per_read() -> Answer:
    """Answers each read as one line: wrong when two lines arrive together."""

    def answer(conn: socket.socket, data: bytes) -> bool:
        if data == b"exit\n":
            return False
        conn.sendall(b"Hello, " + data.rstrip(b"\n") + b"!\n")
        return True

    return answer


def lines(close_on_exit: bool = True) -> Answer:
    """Answers whole lines, and closes at ``exit`` only if ``close_on_exit``."""
    pending = bytearray()

    def answer(conn: socket.socket, data: bytes) -> bool:
        pending.extend(data)
        *complete, rest = bytes(pending).split(b"\n")
        pending[:] = rest
        for line in complete:
            if line == b"exit" and close_on_exit:
                return False
            conn.sendall(b"Hello, " + line + b"!\n")
        return True

    return answer


def half_lines() -> Answer:
    """Answers what has come of a line without waiting for its end."""

    def answer(conn: socket.socket, data: bytes) -> bool:
        if data == b"exit\n":
            return False
        for line in data.split(b"\n")[: -1 if data.endswith(b"\n") else None]:
            conn.sendall(b"Hello, " + line + b"!\n")
        return True

    return answer


def test_the_tiny_line_server_itself_passes() -> None:
    """So the failures below are each server's one fault, not the harness's."""
    with tiny_server(lines) as port:
        assert check("greeting", "127.0.0.1", port) is None


@pytest.mark.parametrize(
    ("make_answer", "expected"),
    [
        (per_read, "after b'c1\\nc2\\n': expected b'Hello, c1!\\nHello, c2!\\n', got"),
        (
            lambda: lines(close_on_exit=False),
            "after b'exit\\n': expected the connection closed, got b'Hello, exit!\\n'",
        ),
        (half_lines, "after b'ael\\n': expected b'Hello, Michael!\\n', got b'Hello, Mich!\\n"),
    ],
    ids=["two-lines-in-one-read", "exit-does-not-close", "half-a-line-answered"],
)
def test_a_server_wrong_in_one_way_fails_the_line_check(
    make_answer: Callable[[], Answer], expected: str
) -> None:
    with tiny_server(make_answer) as port:
        problem = check("greeting", "127.0.0.1", port, timeout_s=QUICK_TIMEOUT_S)
    assert problem is not None
    assert expected in problem


def test_compare_measures_no_server_that_fails_the_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server giving the bare greeting in the greeting scenario is refused before any load."""
    bare = compare.SERVERS["raw-uvloop"]
    monkeypatch.setattr(compare, "check", functools.partial(check, timeout_s=QUICK_TIMEOUT_S))
    monkeypatch.setitem(
        compare.SERVERS, "wrong", lambda _handler, port: bare("bare-greeting", port)
    )
    args = argparse.Namespace(duration=60.0, warmup=60.0, hold_conns=10, hold_duration=60.0)
    with pytest.raises(compare.Rejected, match="expected b'Welcome!\\\\n', got b'Welcome!'"):
        compare.measure("wrong", "greeting", args)


def test_a_server_whose_library_is_missing_is_skipped_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(compare.NEEDS, "twisted-epoll", ("twisted", "no_such_library_here"))
    monkeypatch.setitem(compare.NEEDS, "anyio-uvloop", ("no_such_library_here",))
    skipped = compare.unavailable(["raw-uvloop", "twisted-epoll", "anyio-uvloop"])
    assert set(skipped) == {"twisted-epoll", "anyio-uvloop"}
    assert skipped["anyio-uvloop"] == ["no_such_library_here"]
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert out.startswith("skipping twisted-epoll, anyio-uvloop: ")
    assert "no_such_library_here" in out
    assert INSTALL in out


@pytest.fixture(scope="module")
def c_load(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """benchmarks/c_load.c, built (``cpu_split.py``'s load generator)."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc)")
    binary = tmp_path_factory.mktemp("c") / "c_load"
    subprocess.run(["cc", "-O2", "-o", str(binary), str(BENCHMARKS / "c_load.c")], check=True)
    return binary


def run_c_load(c_load: Path, work: str, port: int, *more: str) -> tuple[int, int]:
    """(operations, errors) of a short ``c_load`` run against ``port``."""
    done = subprocess.run(
        [str(c_load), work, str(port), "4", "0.5", "0.1", *more],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    operations, errors, _ = done.stdout.split()
    return int(operations), int(errors)


@pytest.mark.parametrize("work", ["bare", "greet"])
@pytest.mark.parametrize("name", ["netframe-uvloop", "netframe-asyncio", "raw-uvloop"])
def test_the_c_load_generator_speaks_the_seeds_bare_exchange_without_errors(
    c_load: Path, name: str, work: str
) -> None:
    """Whole sessions (bare), and bare words on held connections (greet)."""
    with started(name, "bare-greeting") as port:
        operations, errors = run_c_load(c_load, work, port)
    assert operations > 0
    assert errors == 0


@pytest.mark.parametrize("name", ["netframe-uvloop", "netframe-asyncio", "raw-asyncio"])
def test_the_c_load_generator_completes_echo_round_trips_without_errors(
    c_load: Path, name: str
) -> None:
    with started(name, "echo") as port:
        round_trips, errors = run_c_load(c_load, "echo", port, "1024")
    assert round_trips > 0
    assert errors == 0


def test_the_c_load_generator_counts_a_wrong_reply_as_an_error(c_load: Path) -> None:
    with started("raw-uvloop", "greeting") as port:  # "Welcome!\n": not the bare exchange
        sessions, errors = run_c_load(c_load, "bare", port)
    assert sessions == 0
    assert errors > 0
    with started("raw-uvloop", "bare-greeting") as port:  # a greeting is not an echo
        round_trips, errors = run_c_load(c_load, "echo", port, "64")
    assert round_trips == 0
    assert errors > 0
