"""``python -m netframe bench``: argument parsing that maps onto :class:`BenchOptions`,
and ``bench merge``, which combines the ``--json`` files of several runs."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from netframe.bench._options import SCENARIOS, BenchError, BenchOptions
from netframe.config import FRAMINGS

#: The shell's convention for a command stopped by SIGINT (Ctrl+C).
EXIT_INTERRUPTED = 130

__all__ = ["add_bench_parser"]


def _cpus(text: str) -> tuple[int, ...]:
    try:
        cpus: set[int] = set()
        for part in text.split(","):
            low, _, high = part.partition("-")
            cpus.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a CPU list like 0 or 1-3") from None
    return tuple(sorted(cpus))


def add_bench_parser(commands: Any, address: Any, positive_int: Any, positive_float: Any) -> None:
    """Add the ``bench`` subcommand (and its ``merge``) to the main parser's ``commands``."""
    bench = commands.add_parser(
        "bench",
        help="load-test a server",
        description="Load-test a server at --target, or one it starts itself with --spawn "
        "(--spawn-args gives that server's extra `serve` flags as one string). "
        "`bench merge A.json B.json ...` combines the --json files of runs made at the "
        "same time from several load machines.",
    )
    # Either --target or --spawn is required, but not by `bench merge`: checked in _bench.
    where = bench.add_mutually_exclusive_group()
    where.add_argument(
        "--target",
        type=address,
        metavar="HOST:PORT",
        help="the running server to test: HOST:PORT, or a Unix socket as unix:PATH or a "
        "path with a / (this or --spawn is required)",
    )
    where.add_argument(
        "--spawn",
        action="store_true",
        help="start a netframe server to test, on a free port of 127.0.0.1 (default: off)",
    )
    bench.add_argument(
        "--spawn-args",
        default="",
        metavar="'FLAGS'",
        help="extra `netframe serve` flags for --spawn, as one string, e.g. '--loop asyncio' "
        "(default: none)",
    )
    bench.add_argument(
        "--server-pid",
        type=positive_int,
        help="the target server's process id, to read its CPU and memory (default: none, "
        "no server figures; --spawn knows its own)",
    )
    bench.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="greeting",
        help="sessions: connect, greeting, one name, exit, close; greeting: round trips on "
        "open connections; echo: --size bytes echoed; udp: datagrams; hold: idle "
        "connections held for memory (default: %(default)s)",
    )
    bench.add_argument(
        "--conns",
        type=positive_int,
        default=50,
        help="concurrent connections (default: %(default)s)",
    )
    bench.add_argument(
        "--duration",
        type=positive_float,
        default=10.0,
        dest="duration_s",
        help="seconds measured (default: %(default)s)",
    )
    bench.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        dest="warmup_s",
        help="seconds of load before measuring (default: %(default)s)",
    )
    bench.add_argument(
        "--workers",
        type=positive_int,
        help="load processes (default: one per core the client may use)",
    )
    bench.add_argument(
        "--pipeline",
        type=positive_int,
        default=1,
        help="requests in flight per connection (default: %(default)s)",
    )
    bench.add_argument(
        "--size",
        type=positive_int,
        default=1024,
        help="echo/udp payload bytes (default: %(default)s)",
    )
    bench.add_argument(
        "--framing",
        choices=FRAMINGS,
        help="match the server's (default: raw for echo, line otherwise)",
    )
    bench.add_argument(
        "--rate",
        type=positive_float,
        help="open loop: requests per second in total, latency measured from "
        "the intended send time (default: none, a closed loop)",
    )
    bench.add_argument(
        "--udp-timeout",
        type=positive_float,
        default=0.5,
        dest="udp_timeout_s",
        help="seconds before a datagram counts as lost (default: %(default)s)",
    )
    bench.add_argument(
        "--client-cpus",
        type=_cpus,
        help="pin load processes to these CPUs, e.g. 1 or 1,2 (default: not pinned)",
    )
    bench.add_argument(
        "--server-cpus",
        type=_cpus,
        help="pin a spawned server to these CPUs (default: not pinned)",
    )
    bench.add_argument(
        "--tls",
        action="store_true",
        help="speak TLS to the server (TCP and Unix scenarios), checking its certificate "
        "against the HOST of --target (localhost for a Unix socket) (default: off)",
    )
    bench.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="trust the CA certificates in this PEM file for the server's certificate "
        "(default: the system's CAs)",
    )
    _add_outputs(bench)
    bench.add_argument(
        "--no-progress", action="store_true", help="no live progress bar (default: off)"
    )
    bench.set_defaults(func=_bench, parser=bench)
    actions = bench.add_subparsers(title="subcommands", dest="action", parser_class=type(bench))
    merge = actions.add_parser(
        "merge",
        help="combine runs of several load machines",
        description="Combine the --json files of runs made at the same time against one "
        "server (from several load machines): counts add up, latency histograms merge "
        "(percentiles are never averaged), and the throughput is all operations over the "
        "span of the runs' windows.",
    )
    merge.add_argument("runs", nargs="+", type=Path, metavar="RUN.json",
                       help="the --json files of the runs")  # fmt: skip
    _add_outputs(merge)
    merge.set_defaults(func=_merge)


def _add_outputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", type=Path, dest="json_path", help="write every figure here (default: none)"
    )
    parser.add_argument(
        "--hdr",
        type=Path,
        dest="hdr_path",
        help="write the latency distribution here in HdrHistogram's .hgrm text (wrk2's "
        "form), values in milliseconds (default: none)",
    )
    parser.add_argument(
        "--plot", type=Path, dest="plot_path", help="draw the results as a PNG (default: none)"
    )


def _fail(message: str, status: int) -> int:
    print(f"netframe: error: {message}", file=sys.stderr)
    return status


def _bench(args: argparse.Namespace) -> int:
    if args.target is None and not args.spawn:
        args.parser.error("one of the arguments --target --spawn is required")
    options = BenchOptions(
        scenario=args.scenario,
        target=args.target,
        spawn_args=tuple(shlex.split(args.spawn_args)) if args.spawn else None,
        server_pid=args.server_pid,
        conns=args.conns,
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
        workers=args.workers,
        pipeline=args.pipeline,
        size=args.size,
        framing=args.framing,
        rate=args.rate,
        udp_timeout_s=args.udp_timeout_s,
        client_cpus=args.client_cpus,
        server_cpus=args.server_cpus,
        tls=args.tls,
        tls_ca=args.tls_ca,
    )
    try:
        options.check()
        if args.plot_path and options.scenario == "hold":
            raise BenchError("--plot draws throughput and latency, which hold does not measure")
        if args.hdr_path and options.scenario == "hold":
            raise BenchError("--hdr writes a latency distribution, which hold does not measure")
    except BenchError as exc:
        return _fail(str(exc), 2)
    try:
        from netframe.bench._report import live_progress
        from netframe.bench._run import run_bench
    except ImportError as exc:
        return _fail(f"bench needs {exc.name}: pip install 'netframe[bench]'", 2)
    try:
        with live_progress(not args.no_progress and sys.stderr.isatty()) as progress:
            result = run_bench(options, progress)
    except BenchError as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:  # before the window began, or while its figures were read
        print("netframe: interrupted before there were figures to show", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.get("partial"):
        print("netframe: interrupted: the figures below cover part of the window",
              file=sys.stderr)  # fmt: skip
    status = _show(result, args)
    if status:
        return status
    if result.get("partial"):
        return EXIT_INTERRUPTED
    return 1 if result["errors"] else 0


def _show(result: dict[str, Any], args: argparse.Namespace) -> int:
    """Print the summary and write what was asked for; a status when that fails."""
    from netframe.bench._plot import MissingExtra, plot
    from netframe.bench._report import print_summary, write_hdr, write_json

    print_summary(result)
    outputs = [(args.json_path, write_json), (args.hdr_path, write_hdr), (args.plot_path, plot)]
    for path, write in outputs:
        if path is None:
            continue
        try:
            write(result, path)
        except MissingExtra as exc:
            return _fail(str(exc), 2)
        except OSError as exc:
            return _fail(f"cannot write {path}: {exc.strerror or exc}", 1)
    return 0


def _merge(args: argparse.Namespace) -> int:
    try:
        from netframe.bench._merge import load_result, merge_results
    except ImportError as exc:
        return _fail(f"bench merge needs {exc.name}: pip install 'netframe[bench]'", 2)
    try:
        results = [load_result(path) for path in args.runs]
        merged = merge_results(results, [str(path) for path in args.runs])
    except BenchError as exc:
        return _fail(str(exc), 2)
    return _show(merged, args)
