"""The comparison suite: the same load against netframe and the baselines, interleaved.

    python benchmarks/compare.py                 # the full run behind docs/benchmarks.md
    python benchmarks/compare.py --quick         # a one-round smoke run (about a minute)

Rounds are interleaved (A B C ... A B C ...) so a machine that speeds up or slows down
during the run shifts every server alike. For each server and scenario it reports the
median and spread of throughput, latency and the server's CPU time (user + system) per
operation, read from the server process. CPU per operation is the figure that holds on
a small machine where client and server share cores; with two or more cores the server
is pinned to the first and the load to the others.

It writes a Markdown report with charts (``--out``, default docs/benchmarks.md) and the
raw figures as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exchanges import check  # the byte-for-byte check before a run, beside this file
from report import write_report  # the Markdown and charts, beside this file

from netframe.bench import BenchOptions, run_bench
from netframe.bench._run import environment, free_port, netframe_serve_argv, spawned_server
from netframe.config import Address

HERE = Path(__file__).resolve().parent
SERVERS_DIR = HERE / "servers"
ROOT = HERE.parent

Argv = Callable[[str, int], list[str]]  # (handler, port) -> command line


def _netframe(
    loop: str, *, pure: bool = False, log_format: str | None = None, python: str | None = None
) -> Argv:
    """``python -m netframe serve`` on ``loop``; ``python`` is another interpreter (another
    build of netframe, such as an older commit's, installed in its own environment)."""

    def argv(handler: str, port: int) -> list[str]:
        scenario = "echo" if handler == "echo" else "greeting"
        # The tutorial's bare exchange: netframe on its defaults (auto framing).
        framing = ("--framing", "auto") if handler == "bare-greeting" else ()
        # At the default level, two lines a connection, to the spawned server's log file.
        logging = ("--log-level", "info", "--log-format", log_format) if log_format else ()
        # The per-source UDP rate limit off: every datagram comes from one host here.
        spawn = ("--loop", loop, "--udp-rate", "0", *framing, *logging)
        options = BenchOptions(scenario=scenario, spawn_args=spawn)
        command = netframe_serve_argv(options, port)
        if python is not None:
            command[0] = python
        # env(1) execs the server, so the process measured is still the server itself.
        return ["env", "NETFRAME_NO_EXTENSIONS=1", *command] if pure else command

    return argv


def _baseline(script: str, loop: str) -> Argv:
    def argv(handler: str, port: int) -> list[str]:
        return [sys.executable, str(SERVERS_DIR / script), "--port", str(port),
                "--udp-port", str(port), "--handler", handler, "--loop", loop]  # fmt: skip

    return argv


SERVERS: dict[str, Argv] = {
    "netframe-uvloop": _netframe("uvloop"),
    "netframe-asyncio": _netframe("asyncio"),
    # The same servers on the pure-Python build (where the compiled one is installed).
    "netframe-uvloop-pure": _netframe("uvloop", pure=True),
    "netframe-asyncio-pure": _netframe("asyncio", pure=True),
    # netframe-uvloop at the default log level (a line as a connection opens and closes).
    "netframe-uvloop-log-console": _netframe("uvloop", log_format="console"),
    "netframe-uvloop-log-json": _netframe("uvloop", log_format="json"),
    "raw-uvloop": _baseline("raw_protocol.py", "uvloop"),
    "raw-asyncio": _baseline("raw_protocol.py", "asyncio"),
    "streams-uvloop": _baseline("streams.py", "uvloop"),
    "streams-asyncio": _baseline("streams.py", "asyncio"),
    "threaded": _baseline("threaded.py", "asyncio"),
    # The peers: what users would pick instead (the peers extra; see benchmarks/README.md).
    "twisted-epoll": _baseline("peer_twisted.py", "epoll"),
    "twisted-asyncio": _baseline("peer_twisted.py", "asyncio"),
    "twisted-uvloop": _baseline("peer_twisted.py", "uvloop"),
    "aiomisc-uvloop": _baseline("peer_aiomisc.py", "uvloop"),
    "aiomisc-asyncio": _baseline("peer_aiomisc.py", "asyncio"),
    "anyio-asyncio": _baseline("peer_anyio.py", "asyncio"),
    "anyio-uvloop": _baseline("peer_anyio.py", "uvloop"),
}
#: The libraries a server needs beyond netframe's bench extra: one whose library is not
#: installed is skipped, and said so in one line.
NEEDS: dict[str, tuple[str, ...]] = {
    name: tuple(lib for lib in ("twisted", "aiomisc", "anyio", "uvloop") if lib in name.split("-"))
    for name in SERVERS
}
PEER_LIBRARIES = ("twisted", "aiomisc", "anyio")
PEERS = tuple(name for name in SERVERS if name.partition("-")[0] in PEER_LIBRARIES)
# (scenario, BenchOptions overrides, handler the server runs)
SCENARIOS: dict[str, tuple[dict[str, Any], str]] = {
    "echo-1k": ({"scenario": "echo", "size": 1024, "conns": 50}, "echo"),
    "greeting": ({"scenario": "greeting", "conns": 50}, "greeting"),
    "sessions": ({"scenario": "sessions", "conns": 20}, "greeting"),
    # The tutorial's own clients: bare words (the load generator reads the bare greeting).
    "sessions-bare": ({"scenario": "sessions", "conns": 20}, "bare-greeting"),
    "udp": ({"scenario": "udp", "conns": 50}, "greeting"),
}
HOLD_SERVERS = (
    "netframe-uvloop", "netframe-uvloop-pure", "raw-uvloop",
    "netframe-asyncio", "netframe-asyncio-pure", "raw-asyncio",
)  # fmt: skip
LOGGING = ("netframe-uvloop-log-console", "netframe-uvloop-log-json")
#: Scenarios only some servers are run in: the streams and threaded baselines speak lines
#: only, and hold (10,000 connections) is kept to netframe, the raw reference and the peers.
#: The logging servers are run where log lines are made: in sessions, a line pair each.
ONLY: dict[str, tuple[str, ...]] = {
    "hold": HOLD_SERVERS + PEERS,
    "sessions-bare": HOLD_SERVERS + PEERS + LOGGING,
}
NOT_IN = dict.fromkeys(LOGGING, ("echo-1k", "greeting", "udp", "hold"))


def add_before(python: str) -> None:
    """The ``before-*`` servers: netframe's own, run by ``python``, beside the others (in
    the scenarios theirs are run in)."""
    for name in [n for n in SERVERS if n.startswith("netframe-")]:
        rest = name.removeprefix("netframe-")
        loop = rest.split("-")[0]
        log_format = rest.rpartition("log-")[2] if "-log-" in f"-{rest}" else None
        twin = f"before-{rest}"
        SERVERS[twin] = _netframe(loop, pure=rest.endswith("-pure"), log_format=log_format,
                                  python=python)  # fmt: skip
        NEEDS[twin] = NEEDS[name]
        if name in NOT_IN:
            NOT_IN[twin] = NOT_IN[name]
        for scenario, names in list(ONLY.items()):
            if name in names:
                ONLY[scenario] = (*names, twin)


class Rejected(Exception):
    """The server's bytes differ from the exchange's: it gets no figure."""


def missing_libraries(name: str) -> list[str]:
    """The libraries ``name`` needs that this interpreter cannot import."""
    return [lib for lib in NEEDS.get(name, ()) if importlib.util.find_spec(lib) is None]


def unavailable(servers: list[str]) -> dict[str, list[str]]:
    """The servers whose libraries are not installed, with those libraries; says in one
    line which are skipped and how to install them."""
    skipped = {name: libs for name in servers if (libs := missing_libraries(name))}
    if skipped:
        libraries = sorted({lib for libs in skipped.values() for lib in libs})
        print(
            f"skipping {', '.join(skipped)}: {', '.join(libraries)} not installed "
            '(pip install -e ".[bench,peers]")'
        )
    return skipped


def peer_versions() -> dict[str, str]:
    """The installed version of each peer's library (those installed)."""
    versions = {}
    for lib in PEER_LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def cpu_split() -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """(server CPUs, client CPUs): the first core for the server, the rest for load."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return (cpus[0],), tuple(cpus[1:])


def measure(name: str, scenario: str, args: argparse.Namespace) -> dict[str, Any]:
    overrides, handler = SCENARIOS.get(scenario, ({}, "greeting"))
    if scenario == "hold":
        overrides = {"scenario": "hold", "conns": args.hold_conns}
    server_cpus, client_cpus = cpu_split()
    port = free_port()
    with spawned_server(SERVERS[name](handler, port), "127.0.0.1", port, server_cpus) as proc:
        problem = check("udp" if scenario == "udp" else handler, "127.0.0.1", port)
        if problem is not None:
            raise Rejected(problem)
        options = BenchOptions(
            target=Address("127.0.0.1", port), server_pid=proc.pid,
            duration_s=args.duration if scenario != "hold" else args.hold_duration,
            warmup_s=args.warmup if scenario != "hold" else 0.0,
            client_cpus=client_cpus, **overrides,
        )  # fmt: skip
        result = run_bench(options)
    if result["errors"]:
        print(f"  ! {name} {scenario}: {result['errors']} errors: {result['first_error']}")
    return result


def c_echo_server(workdir: Path) -> list[str] | None:
    """Compile the C echo server used to measure the load generator alone."""
    binary = workdir / "c_echo"
    done = subprocess.run(["cc", "-O2", "-o", str(binary), str(SERVERS_DIR / "c_echo.c")],
                          capture_output=True, check=False)  # fmt: skip
    return [str(binary)] if done.returncode == 0 else None


def loadgen_ceiling(args: argparse.Namespace) -> list[dict[str, Any]]:
    """How fast one load process drives echo (1 KiB, 50 connections) against a C server."""
    server_cpus, client_cpus = cpu_split()
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        binary = c_echo_server(Path(workdir))
        if binary is None:
            print("  ! no C compiler: skipping the load generator's ceiling")
            return []
        for pipeline in (1, 8):
            port = free_port()
            with spawned_server([*binary, str(port)], "127.0.0.1", port, server_cpus) as proc:
                problem = check("echo", "127.0.0.1", port)
                if problem is not None:
                    print(f"  ! the C echo server is not measured: {problem}")
                    return results
                options = BenchOptions(
                    target=Address("127.0.0.1", port), server_pid=proc.pid, scenario="echo",
                    size=1024, conns=50, pipeline=pipeline, workers=1,
                    client_cpus=client_cpus[:1] if client_cpus else None,
                    duration_s=args.duration, warmup_s=args.warmup,
                )  # fmt: skip
                results.append(run_bench(options))
    return results


def summarize(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def collect(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per scenario and server: median and spread of each figure over the rounds."""
    table: dict[str, Any] = {}
    for scenario, by_server in runs.items():
        for name, results in by_server.items():
            entry: dict[str, Any] = {"errors": sum(r["errors"] for r in results)}
            # hold measures no throughput or latency: its runs report None for both.
            ops = [r["ops_per_s"] for r in results]
            if all(o is not None for o in ops):
                entry["ops_per_s"] = summarize(ops)
            cpu = [r["server"].get("cpu_us_per_op") for r in results]
            if all(c is not None for c in cpu):
                entry["cpu_us_per_op"] = summarize(cpu)  # type: ignore[arg-type]
            if all(r.get("latency_us") for r in results):
                for key in ("p50", "p99"):
                    entry[f"latency_{key}_us"] = summarize([r["latency_us"][key] for r in results])
            if scenario == "udp":
                entry["loss_ratio"] = summarize([r["loss_ratio"] for r in results])
            if scenario == "hold":
                entry["bytes_per_conn"] = summarize(
                    [r["hold"].get("bytes_per_conn", float("nan")) for r in results]
                )
                entry["held"] = min(r["hold"]["held"] for r in results)
            table.setdefault(scenario, {})[name] = entry
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--servers", help="comma-separated names (default: all)")
    parser.add_argument("--scenarios", default=",".join([*SCENARIOS, "hold"]))
    parser.add_argument("--hold-conns", type=int, default=10_000)
    parser.add_argument("--hold-duration", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "benchmarks" / "compare.json")
    parser.add_argument("--before", metavar="PYTHON",
                        help="also run netframe's servers under this interpreter (another "
                        "build's environment) as before-uvloop, before-asyncio, ...")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="one round of 2 s, 2,000 held connections: a smoke run")  # fmt: skip
    args = parser.parse_args()
    if args.before:
        add_before(args.before)
    if args.quick:
        args.rounds, args.duration, args.warmup, args.hold_conns = 1, 2.0, 0.5, 2000
    servers = [s for s in (args.servers or ",".join(SERVERS)).split(",") if s]
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in servers if s not in SERVERS] + [
        s for s in scenarios if s not in SCENARIOS and s != "hold"
    ]
    if unknown:
        parser.error(f"unknown server or scenario: {', '.join(unknown)}")
    skipped = unavailable(servers)
    servers = [s for s in servers if s not in skipped]

    started = time.monotonic()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    rejected: dict[str, dict[str, str]] = {}
    for round_no in range(1, args.rounds + 1):
        for scenario in scenarios:
            names = [
                s
                for s in servers
                if s in ONLY.get(scenario, servers) and scenario not in NOT_IN.get(s, ())
            ]
            for name in names:
                if name in rejected.get(scenario, {}):
                    continue  # wrong once is wrong: no figure in any round
                print(f"round {round_no}/{args.rounds}  {scenario:<9} {name}", flush=True)
                try:
                    result = measure(name, scenario, args)
                except Rejected as exc:
                    print(f"  ! {name} {scenario}: wrong bytes, not measured: {exc}")
                    rejected.setdefault(scenario, {})[name] = str(exc)
                    runs.get(scenario, {}).pop(name, None)
                    continue
                runs.setdefault(scenario, {}).setdefault(name, []).append(result)
    print("load generator ceiling (C echo server)", flush=True)
    ceiling = loadgen_ceiling(args)
    document = {
        "command": " ".join(["python", "benchmarks/compare.py", *sys.argv[1:]]),
        "environment": environment(),
        "cpu_split": {"server": cpu_split()[0], "client": cpu_split()[1]},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "json")},
        "peers": peer_versions(),
        "skipped": skipped,
        "rejected": rejected,
        "elapsed_s": time.monotonic() - started,
        "summary": collect(runs),
        "loadgen_ceiling": [
            {
                "pipeline": r["options"]["pipeline"],
                "ops_per_s": r["ops_per_s"],
                "client_cpu_pct": r["client_cpu_pct"],
                "errors": r["errors"],
            }
            for r in ceiling
        ],
        "runs": {s: {n: [_slim(r) for r in rs] for n, rs in by.items()} for s, by in runs.items()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")

    write_report(document, args.out)
    print(f"wrote {args.out} and {args.json}")
    return 0


def _slim(result: dict[str, Any]) -> dict[str, Any]:
    """A run without its per-100 ms timelines and its latency histogram (a few KiB of
    base64 each), to keep the JSON readable."""
    return {
        k: v
        for k, v in result.items()
        if not k.startswith("timeline_") and k not in ("environment", "latency_histogram")
    }


if __name__ == "__main__":
    sys.exit(main())
