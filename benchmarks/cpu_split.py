"""Server CPU per operation in user and system time, netframe against the raw server,
with a load generator in C.

    python benchmarks/cpu_split.py                      # bare sessions, 6 rounds, uvloop
    python benchmarks/cpu_split.py --rounds 4 --loop asyncio
    python benchmarks/cpu_split.py --work greet         # bare words, 50 held connections
    python benchmarks/cpu_split.py --work echo          # echo 1 KiB, 50 connections
    python benchmarks/cpu_split.py --work echo --pure   # netframe's pure-Python build

The comparison suite's figure is user + system time per operation, driven by netframe's
own Python load generator, which can keep the server only about half busy on a two-core
machine. This drives the seeds' bare session, their bare words on held connections, or
echo round trips
(``benchmarks/c_load.c``, built with ``cc``), from a client that costs far less, so the
server runs closer to its limit, as an outside load generator in C would have it, and
it splits the server's time into user
time (netframe's code, the interpreter, the loop) and system time (the kernel's TCP
work, which is the same for both servers), so a round that moved can be told apart from
a server that did more. Server on the first CPU, client on the second; the figures are
``utime`` and ``stime`` from ``/proc/PID/stat`` over the measured seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from netframe.bench._options import BenchError
from netframe.bench._run import free_port, wait_until_listening

HERE = Path(__file__).resolve().parent
TICKS_PER_S = os.sysconf("SC_CLK_TCK")
UNITS = {"bare": "session", "greet": "round trip", "echo": "round trip"}  # one operation


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) seconds the process has run."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS_PER_S, int(fields[12]) / TICKS_PER_S


def server_argv(side: str, args: argparse.Namespace, port: int) -> list[str]:
    """The server: netframe on its defaults (bare, greet: auto framing) or with the echo
    handler on raw framing, as the comparison suite runs it; or the raw server."""
    if side == "netframe":
        work = ("--handler", "echo", "--framing", "raw") if args.work == "echo" else ()
        return [args.python, "-m", "netframe", "serve", "--tcp", f"127.0.0.1:{port}",
                *work, "--loop", args.loop, "--log-level", "warning"]  # fmt: skip
    handler = "echo" if args.work == "echo" else "bare-greeting"
    return [sys.executable, str(HERE / "servers" / "raw_protocol.py"), "--port", str(port),
            "--handler", handler, "--loop", args.loop]  # fmt: skip


def load_argv(client: Path, args: argparse.Namespace, port: int) -> list[str]:
    """``c_load``'s command line for the run."""
    size = (str(args.size),) if args.work == "echo" else ()
    return [str(client), args.work, str(port), str(args.conns), str(args.duration),
            str(args.warmup), *size]  # fmt: skip


def one_run(
    client: Path, side: str, args: argparse.Namespace, cpus: tuple[int, int]
) -> tuple[float, float, float]:
    """(operations a second, user µs an operation, system µs an operation) of one run."""
    port = free_port()
    env = dict(os.environ)
    if args.pure and side == "netframe":
        env["NETFRAME_NO_EXTENSIONS"] = "1"
    server = subprocess.Popen(
        server_argv(side, args, port),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        os.sched_setaffinity(server.pid, {cpus[0]})
        wait_until_listening("127.0.0.1", port, server)
        load = subprocess.Popen(load_argv(client, args, port), stdout=subprocess.PIPE, text=True)
        os.sched_setaffinity(load.pid, {cpus[1]})
        time.sleep(args.warmup)
        user0, system0 = cpu_seconds(server.pid)
        began = time.monotonic()
        try:
            out, _ = load.communicate(timeout=args.duration + args.warmup + 30)
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
        user1, system1 = cpu_seconds(server.pid)
        span = time.monotonic() - began
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(15)
    operations, errors, window = out.split()
    if int(errors):
        print(f"  ! {side}: {errors} {UNITS[args.work]}s went wrong")
    if not int(operations):
        raise BenchError(f"no {UNITS[args.work]} completed (is it the {args.work} exchange?)")
    rate = int(operations) / float(window)
    per_operation = 1e6 / (rate * span)
    return rate, (user1 - user0) * per_operation, (system1 - system0) * per_operation


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--work", choices=tuple(UNITS), default="bare",
                        help="the seeds' bare session, bare words on held connections, or "
                        "echo round trips")  # fmt: skip
    parser.add_argument("--conns", type=int, help="connections at once (bare 20, else 50)")
    parser.add_argument("--size", type=int, default=1024, help="echo: bytes a message")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter whose netframe is measured")  # fmt: skip
    parser.add_argument("--pure", action="store_true",
                        help="netframe's pure-Python build (NETFRAME_NO_EXTENSIONS=1)")  # fmt: skip
    args = parser.parse_args()
    if args.conns is None:
        args.conns = 20 if args.work == "bare" else 50
    unit = UNITS[args.work]
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or shutil.which("cc") is None:
        print("benchmarks/cpu_split.py needs two CPUs and a C compiler (cc)")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        client = Path(tmp) / "c_load"
        subprocess.run(["cc", "-O2", "-o", str(client), str(HERE / "c_load.c")], check=True)
        runs: dict[str, list[tuple[float, float, float]]] = {"netframe": [], "raw": []}
        for number in range(1, args.rounds + 1):
            for side, found in runs.items():
                try:
                    rate, user, system = one_run(client, side, args, (cpus[0], cpus[1]))
                except BenchError as exc:
                    print(f"{side}: {exc}")
                    return 1
                found.append((rate, user, system))
                print(f"round {number}  {side:8} {rate:8,.0f} {unit}s/s  user {user:6.2f}  "
                      f"system {system:6.2f}  total {user + system:6.2f} µs a {unit}")  # fmt: skip
    build = "pure" if args.pure else "as installed"
    print(f"\nmedians over {args.rounds} rounds ({args.work}, {args.loop}, netframe {build}), "
          f"µs a {unit}:")  # fmt: skip
    for side, found in runs.items():
        user, system = (statistics.median(run[i] for run in found) for i in (1, 2))
        print(f"  {side:8} user {user:6.2f}  system {system:6.2f}")
    ratios = [
        (mine[1] + mine[2]) / (raw[1] + raw[2])
        for mine, raw in zip(runs["netframe"], runs["raw"], strict=True)
    ]
    users = [mine[1] / raw[1] for mine, raw in zip(runs["netframe"], runs["raw"], strict=True)]
    print("  netframe / raw, total per round: " + " ".join(f"{r:.3f}" for r in ratios)
          + f"  (median {statistics.median(ratios):.3f})")  # fmt: skip
    print("  netframe / raw, user per round:  " + " ".join(f"{r:.3f}" for r in users)
          + f"  (median {statistics.median(users):.3f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
