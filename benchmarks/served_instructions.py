"""Instructions per session or message of a real server, netframe against the raw baseline.

    python benchmarks/served_instructions.py                  # every case, uvloop
    python benchmarks/served_instructions.py --loop asyncio bare echo
    python benchmarks/served_instructions.py bare --netframe-args="--log-level info"

``benchmarks/instructions.py`` feeds the protocol objects directly, with a stand-in
transport: it sees netframe's Python-level work and nothing of the loop. This runs the
real thing instead: the server process (``python -m netframe serve`` on its defaults,
or ``benchmarks/servers/raw_protocol.py``) under ``valgrind --tool=callgrind``, serving
real clients over loopback. Everything the server process executes in user space is
counted, the event loop and the transport included; the kernel's side is not. Each
server runs twice, for two different amounts of work, and the difference divided by the
difference in work is the cost of one more session (or message), start-up and shutdown
excluded, and what each server does per second while idle (measured the same way) taken
out, since valgrind stretches every run's seconds. Wall-clock figures on a shared machine
wander by several percent; these wander less (a few percent between runs: how many events
the loop finds per wake-up still depends on timing), so a change of several percent can
be judged here before it is timed.

Cases:

``bare``
    the seeds' session: connect, ``Welcome!``, one bare name, ``Hello, name!``,
    ``exit``, the server's close (netframe on its defaults, auto framing);
``line``
    the same session with newline-ended lines (netframe with ``--framing line``);
``echo``
    1 KiB echoed on one open connection, lock-step (netframe ``--handler echo
    --framing raw``).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = ("bare", "line", "echo")
#: Work done by the short and the long run of each server.
LOW, HIGH = {"bare": 300, "line": 300, "echo": 2000}, {"bare": 1300, "line": 1300, "echo": 12000}
#: Valgrind runs the server some 50 times slower: generous, but bounded.
TIMEOUT_S = 600.0


#: More ``serve`` options for netframe (``--netframe-args``), after the case's own.
NETFRAME_ARGS: list[str] = []


def serve_argv(side: str, case: str, loop: str, port: int) -> list[str]:
    if side == "netframe":
        extra = {"bare": [], "line": ["--framing", "line"],
                 "echo": ["--handler", "echo", "--framing", "raw"]}[case]  # fmt: skip
        return [sys.executable, "-m", "netframe", "serve", "--tcp", f"127.0.0.1:{port}",
                "--loop", loop, "--log-level", "warning", *extra, *NETFRAME_ARGS]  # fmt: skip
    handler = {"bare": "bare-greeting", "line": "greeting", "echo": "echo"}[case]
    return [sys.executable, str(HERE / "servers" / "raw_protocol.py"), "--port", str(port),
            "--handler", handler, "--loop", loop]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the server did not listen in time")


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def session(port: int, ending: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        welcome = b"Welcome!" + ending
        if read_exactly(sock, len(welcome)) != welcome:
            raise RuntimeError("no greeting")
        sock.sendall(b"c1" + ending)
        reply = b"Hello, c1!" + ending
        if read_exactly(sock, len(reply)) != reply:
            raise RuntimeError("wrong reply")
        sock.sendall(b"exit" + ending)
        if sock.recv(64) != b"":
            raise RuntimeError("not closed after exit")


def echo(port: int, count: int) -> None:
    payload = os.urandom(1024)
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        for _ in range(count):
            sock.sendall(payload)
            if read_exactly(sock, len(payload)) != payload:
                raise RuntimeError("echo differs")


def count(side: str, case: str, loop: str, work: int, idle_s: float = 0.0) -> tuple[int, float]:
    """Instructions the server process executes to start, serve ``work`` (or sit idle
    for ``idle_s``), and stop; and the seconds it was serving."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                *serve_argv(side, case, loop, port)]  # fmt: skip
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_listening(port, proc)
            started = time.monotonic()
            if idle_s:
                time.sleep(idle_s)
            elif case == "echo":
                echo(port, work)
            else:
                for _ in range(work):
                    session(port, b"" if case == "bare" else b"\n")
            serving_s = time.monotonic() - started
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        match = re.search(rb"Collected : (\d+)", err)
        if match is None:
            raise RuntimeError(f"no count from valgrind: {err[-300:]!r}")
        return int(match.group(1)), serving_s


def per_second(side: str, loop: str) -> float:
    """What the server executes per second while idle: netframe's coarse clock ticks
    ten times a second, whatever the load. Under valgrind a run lasts some 50 times
    longer than it would, so that cost is taken out of the per-session figure (it is a
    few microseconds a second on a real server, nothing per session)."""
    short, short_s = count(side, "bare", loop, 0, idle_s=2.0)
    long, long_s = count(side, "bare", loop, 0, idle_s=10.0)
    return max(0.0, (long - short) / (long_s - short_s))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else "")
    parser.add_argument("cases", nargs="*", default=list(CASES), help=", ".join(CASES))
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--netframe-args", default="", metavar="ARGS",
                        help='more serve options, e.g. "--log-level info"')  # fmt: skip
    args = parser.parse_args()
    NETFRAME_ARGS[:] = shlex.split(args.netframe_args)
    if unknown := set(args.cases) - set(CASES):
        parser.error(f"unknown case {sorted(unknown)[0]!r}: choose from {', '.join(CASES)}")
    if shutil.which("valgrind") is None:
        print("benchmarks/served_instructions.py needs valgrind: apt-get install valgrind")
        return 2
    unit = "message" if args.cases == ["echo"] else "session or message"
    print(f"{'case':<16} {'netframe':>12} {'raw':>12} {'ratio':>7}"
          f"   (instructions per {unit}, {args.loop})")  # fmt: skip
    idle = {side: per_second(side, args.loop) for side in ("netframe", "raw")}
    print(f"idle, per second: netframe {idle['netframe']:,.0f}, raw {idle['raw']:,.0f}"
          " (taken out of each figure below)")  # fmt: skip
    for case in args.cases:
        per = {}
        for side in ("netframe", "raw"):
            low, low_s = count(side, case, args.loop, LOW[case])
            high, high_s = count(side, case, args.loop, HIGH[case])
            ticking = idle[side] * (high_s - low_s)
            per[side] = (high - low - ticking) / (HIGH[case] - LOW[case])
        print(f"{case:<16} {per['netframe']:>12,.0f} {per['raw']:>12,.0f} "
              f"{per['netframe'] / per['raw']:>6.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
