"""Turning a comparison run (compare.py's JSON) into docs/benchmarks.md and its charts.

python benchmarks/report.py   # redraw docs/benchmarks.md from docs/benchmarks/compare.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

CPU_TARGETS = {"echo-1k": 1.05, "greeting": 1.05, "sessions": 1.10, "sessions-bare": 1.10}
#: netframe on stock asyncio against the raw asyncio Protocol server: it must beat it.
ASYNCIO_TARGETS = {"echo-1k": 1.00}
#: The default log level's two lines a connection, against the same server at warning.
LOG_TARGETS = {"netframe-uvloop-log-json": 1.20, "netframe-uvloop-log-console": 1.30}
UDP_TARGET = 0.95
HOLD_TARGET_BYTES = 2048
LOADGEN_TARGET = 100_000


def _spread(figure: dict[str, float] | None, fmt: str) -> str:
    if not figure or any(math.isnan(v) for v in figure.values()):
        return "n/a"
    median, low, high = (format(figure[k], fmt) for k in ("median", "min", "max"))
    return f"{median} ({low}-{high})"


def _baseline_name(name: str) -> str | None:
    for loop in ("uvloop", "asyncio"):
        if name.endswith(loop) and not name.startswith("raw-"):
            return f"raw-{loop}"
    return None


def _ratio(summary: dict[str, Any], scenario: str, name: str, key: str) -> float | None:
    base = _baseline_name(name)
    rows = summary.get(scenario, {})
    if base not in rows or name not in rows or key not in rows[name] or key not in rows[base]:
        return None
    return float(rows[name][key]["median"] / rows[base][key]["median"])


def scenario_table(summary: dict[str, Any], scenario: str) -> list[str]:
    lines = [
        "| server | ops/s median (min-max) | p50 us | p99 us | server CPU us/op median "
        "(min-max) | CPU/op vs raw, same loop | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary[scenario].items():
        ratio = _ratio(summary, scenario, name, "cpu_us_per_op")
        lines.append(
            f"| {name} | {_spread(row['ops_per_s'], ',.0f')} "
            f"| {_spread(row.get('latency_p50_us'), ',.0f')} "
            f"| {_spread(row.get('latency_p99_us'), ',.0f')} "
            f"| {_spread(row.get('cpu_us_per_op'), '.2f')} "
            f"| {'' if ratio is None else f'{ratio:.3f}x'} | {row['errors']} |"
        )
    return lines


def targets(document: dict[str, Any]) -> list[str]:
    summary = document["summary"]
    lines = ["| target | measured | met |", "|---|---:|:---:|"]
    cpu_targets = [("uvloop", s, limit) for s, limit in CPU_TARGETS.items()]
    cpu_targets += [("asyncio", s, limit) for s, limit in ASYNCIO_TARGETS.items()]
    for loop, scenario, limit in cpu_targets:
        ratio = _ratio(summary, scenario, f"netframe-{loop}", "cpu_us_per_op")
        if ratio is not None:
            lines.append(
                f"| {scenario}: netframe-{loop} server CPU/op <= {limit:.2f}x raw-{loop} "
                f"| {ratio:.3f}x | {'yes' if ratio <= limit else 'no'} |"
            )
    for scenario in ("sessions", "sessions-bare"):
        rows = summary.get(scenario, {})
        for name, limit in LOG_TARGETS.items():
            if name in rows and "netframe-uvloop" in rows:
                ratio = (
                    rows[name]["cpu_us_per_op"]["median"]
                    / rows["netframe-uvloop"]["cpu_us_per_op"]["median"]
                )
                lines.append(
                    f"| {scenario}: {name} (default level) server CPU/op <= {limit:.2f}x "
                    f"netframe-uvloop (warning) | {ratio:.3f}x | "
                    f"{'yes' if ratio <= limit else 'no'} |"
                )
    ratio = _ratio(summary, "udp", "netframe-uvloop", "ops_per_s")
    if ratio is not None:
        lines.append(
            f"| udp: netframe-uvloop throughput >= {UDP_TARGET:.2f}x raw-uvloop "
            f"| {ratio:.3f}x | {'yes' if ratio >= UDP_TARGET else 'no'} |"
        )
    hold = summary.get("hold", {}).get("netframe-uvloop")
    if hold:
        per_conn = hold["bytes_per_conn"]["median"]
        lines.append(
            f"| hold: netframe-uvloop memory per idle connection <= 2 KiB "
            f"({hold['held']:,} held) | {per_conn:,.0f} B | "
            f"{'yes' if per_conn <= HOLD_TARGET_BYTES else 'no'} |"
        )
    for run in document.get("loadgen_ceiling", []):
        rate = run["ops_per_s"]
        met = "yes" if rate >= LOADGEN_TARGET else "no"
        lines.append(
            f"| load generator, one process, echo 1 KiB, 50 conns, pipeline "
            f"{run['pipeline']}: >= 100,000 ops/s | {rate:,.0f} ops/s at "
            f"{run['client_cpu_pct']:.0f}% of a core | {met} |"
        )
    return lines


def _compact(value: float, key: str) -> str:
    """A bar's label: ops/s in thousands, CPU in us to two decimals, latency in us or ms."""
    if key == "ops_per_s":
        return f"{value / 1000:,.1f}k" if value >= 1000 else f"{value:,.0f}"
    if key == "cpu_us_per_op":
        return f"{value:.2f}"
    return f"{value / 1000:.2f} ms" if value >= 1000 else f"{value:,.0f} us"


def _note(row: dict[str, Any], scenario: str) -> tuple[str, bool]:
    """What a server's rounds say beside its bar (errors, UDP datagrams lost), and whether
    anything went wrong."""
    notes = []
    if row.get("errors"):
        notes.append(f"{row['errors']:,} errors")
    loss = row.get("loss_ratio")
    if scenario == "udp" and loss:
        lost = loss["max"] > 0
        notes.append(
            f"{loss['median']:.2%} lost (up to {loss['max']:.2%})" if lost else "none lost"
        )
    return ", ".join(notes), bool(row.get("errors")) or (
        scenario == "udp" and bool(loss) and loss["max"] > 0
    )


# (file, title, [(summary key, bar label)], log scale); errors and losses are named in
# the linear charts (the latency one has two bars a server).
CHARTS = [
    ("cpu_per_op.png", "server CPU per operation (us, lower is better)",
     [("cpu_us_per_op", None)], False),
    ("throughput.png", "throughput (ops/s, higher is better)", [("ops_per_s", None)], False),
    ("latency.png", "latency (log scale, lower is better)",
     [("latency_p50_us", "p50"), ("latency_p99_us", "p99")], True),
]  # fmt: skip


def charts(summary: dict[str, Any], folder: Path) -> list[str]:
    """One chart per figure, a panel per scenario: horizontal bars of the median over the
    rounds, whiskers from the lowest to the highest round, the value at each bar, and in
    red what went wrong (errors, UDP datagrams lost). Returns the files' names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    scenarios = [s for s in summary if s != "hold"]
    servers = list(dict.fromkeys(n for s in scenarios for n in summary[s]))
    written = []
    for name, title, series, log in CHARTS:
        # One panel per scenario: sessions cost several times a round trip.
        figure, axes = plt.subplots(
            1, len(scenarios), sharey=True,
            figsize=(3.6 * len(scenarios), 1.2 + 0.42 * len(servers) * len(series)),
        )  # fmt: skip
        for axis, scenario in zip(axes if len(scenarios) > 1 else [axes], scenarios, strict=True):
            _panel(axis, summary[scenario], scenario, servers, series, log)
        figure.suptitle(f"{title}; whiskers: lowest to highest round")
        figure.tight_layout()
        figure.savefig(folder / name, dpi=90)
        plt.close(figure)
        written.append(name)
    return written


def server_colour(servers: list[str], name: str) -> tuple[float, ...]:
    """A colour of its own for each server (tab20: the suite has more than ten)."""
    import matplotlib

    return tuple(matplotlib.colormaps["tab20"](servers.index(name) % 20))


#: How each peer library's servers are written (benchmarks/README.md has the details).
PEER_NOTES = {
    "twisted": "Twisted {v}: a `Protocol` and `Factory`, lines by `LineReceiver`; "
    "`twisted-epoll` on its default reactor, `twisted-asyncio` and `twisted-uvloop` on "
    "its asyncio reactor over that loop",
    "aiomisc": "aiomisc {v}: its `TCPServer` and `UDPServer` services under "
    "`aiomisc.entrypoint`, asyncio streams with a task per connection (and per datagram); "
    "`aiomisc-uvloop` is its default loop",
    "anyio": "AnyIO {v}: `create_tcp_listener` and `serve`, a task per connection, lines by "
    "`BufferedByteStream.receive_until`, UDP by `create_udp_socket`; `anyio-asyncio` is "
    "its default backend, `anyio-uvloop` the same with `use_uvloop`",
}


def peer_notes(document: dict[str, Any]) -> list[str]:
    """What the peers are, which were skipped, and which servers failed the byte check."""
    versions = document.get("peers")
    if versions is None:
        return []  # a run from before the peers
    described = [
        note.format(v=versions[lib]) for lib, note in PEER_NOTES.items() if lib in versions
    ]
    lines = [
        "The peers are what users would pick instead of netframe, each written the way its "
        "library's documentation writes servers (see "
        "[benchmarks/README.md](../benchmarks/README.md)): "
        + ("; ".join(described) or "none installed")
        + ". Every server, peers and baselines alike, was taken through a byte-for-byte "
        "exchange of each protocol it is measured in before every run "
        "(`benchmarks/exchanges.py`); a server that fails it gets no figure. No peer logs "
        "per connection.",
        "",
    ]
    if document.get("skipped"):
        lines += [f"Not run, their library not installed: {', '.join(document['skipped'])}.", ""]
    for scenario, by_server in document.get("rejected", {}).items():
        for name, problem in by_server.items():
            lines += [
                f"**{name}** failed the check in {scenario} and has no figure: `{problem}`",
                "",
            ]
    return lines


def _panel(
    axis: Any,
    rows: dict[str, Any],
    scenario: str,
    servers: list[str],
    series: list[tuple[str, str | None]],
    log: bool,
) -> None:
    height = 0.8 / len(series)
    for shift, (key, label) in enumerate(series):
        names = [n for n in servers if key in rows.get(n, {})]
        figures = [rows[n][key] for n in names]
        centres = [servers.index(n) + (shift - (len(series) - 1) / 2) * height for n in names]
        medians = [f["median"] for f in figures]
        whiskers = [[f["median"] - f["min"] for f in figures],
                    [f["max"] - f["median"] for f in figures]]  # fmt: skip
        colours = [server_colour(servers, n) for n in names]
        bars = axis.barh(centres, medians, height=height * 0.9, xerr=whiskers, capsize=2,
                         color=colours, alpha=1.0 if shift == 0 else 0.55,
                         error_kw={"elinewidth": 0.8})  # fmt: skip
        for bar, name, figure in zip(bars, names, figures, strict=True):
            text = " ".join(t for t in (label, _compact(figure["median"], key)) if t)
            note, wrong = _note(rows[name], scenario) if not log else ("", False)
            # Past the whisker, so that it never hides the label.
            axis.annotate(f"{text}  {note}" if note else text,
                          (figure["max"], bar.get_y() + bar.get_height() / 2),
                          xytext=(3, 0), textcoords="offset points", va="center",
                          fontsize="x-small", color="C3" if wrong else "0.15")  # fmt: skip
    if log:
        # Bars from a round power of ten; room on the right for the labels.
        lowest = min(rows[n][k]["min"] for n in rows for k, _ in series if k in rows[n])
        highest = max(rows[n][k]["max"] for n in rows for k, _ in series if k in rows[n])
        axis.set_xscale("log")
        axis.set_xlim(10 ** math.floor(math.log10(lowest)), highest * 4)
        axis.xaxis.set_major_formatter(lambda value, _: _compact(value, "latency"))
        axis.xaxis.set_minor_formatter(
            lambda value, _: _compact(value, "latency") if f"{value:e}"[0] in "25" else ""
        )
        axis.tick_params(axis="x", which="minor", labelsize="x-small")
    else:
        axis.xaxis.set_major_formatter(lambda value, _: _compact(value, "ops_per_s")
                                       if value >= 1000 else f"{value:g}")  # fmt: skip
    axis.set_yticks(range(len(servers)), servers, fontsize="small")
    axis.invert_yaxis()
    axis.set_title(scenario)
    if not log:
        axis.margins(x=0.35)


def write_report(document: dict[str, Any], out: Path) -> None:
    """Write the Markdown report and its charts (into a folder named after it)."""
    env = document["environment"]
    summary = document["summary"]
    image_dir = out.with_suffix("")
    images = charts(summary, image_dir)
    settings = document["settings"]
    lines = [
        "# Benchmarks",
        "",
        "Produced by the comparison suite; every figure below comes from one run of",
        "",
        f"    {document['command']}",
        "",
        f"on {env['time_utc']}: Python {env['python']}, uvloop {env['uvloop']}, netframe "
        f"{env['netframe']}, {env['cpu_count']} CPUs ({env['cpu_model']}), {env['platform']}. "
        f"Server pinned to CPUs {document['cpu_split']['server']}, load to "
        f"{document['cpu_split']['client']}. {settings['rounds']} interleaved rounds of "
        f"{settings['duration']:g} s after {settings['warmup']:g} s of warm-up; figures are "
        "the median over rounds, with the range in brackets. The load generator is "
        "`python -m netframe bench` (closed loop, one request in flight per connection). "
        "netframe runs with `--log-level warning` (no per-connection log lines; "
        "`netframe-uvloop-log-json` and `-log-console` are the same server at the default "
        "level, `info`, writing a line as each connection opens and closes to a file) and "
        "`--udp-rate 0` (one host sends all the load, so the per-source limit would "
        "measure itself), the "
        "baselines log nothing.",
        "",
        "Server CPU per operation is user + system time of the server process divided by "
        "the operations completed, the figure that holds when client and server share a "
        "small machine.",
        "",
        *peer_notes(document),
        "Every raw figure of this run is in [benchmarks/compare.json](benchmarks/compare.json). "
        "How much to trust a ratio: the streams baselines answer UDP with the very same "
        "`DatagramProtocol` as the raw ones, so their udp rows show this machine's "
        "run-to-run noise; the min-max ranges say the same. Differences of a few percent "
        "are within it.",
        "",
        "## Targets",
        "",
        *targets(document),
        "",
    ]
    if images:
        lines += [
            "Bars are the median over the rounds, whiskers the lowest and the highest round; "
            "errors and lost UDP datagrams, when there were any, are named in red beside "
            "their bar.",
            "",
        ]
    for name in images:
        lines += [f"![{name}]({image_dir.name}/{name})", ""]
    for scenario in summary:
        if scenario == "hold":
            continue
        lines += [f"## {scenario}", "", *scenario_table(summary, scenario), ""]
    if "hold" in summary:
        lines += [
            f"## hold ({settings['hold_conns']:,} idle connections)",
            "",
            "| server | held | server memory per connection (RSS growth / held) |",
            "|---|---:|---:|",
        ]
        for name, row in summary["hold"].items():
            lines.append(
                f"| {name} | {row['held']:,} | {_spread(row['bytes_per_conn'], ',.0f')} B |"
            )
        lines.append("")
    out.write_text("\n".join(lines))


def main() -> int:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/benchmarks/compare.json")
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("docs/benchmarks.md")
    write_report(json.loads(source.read_text()), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
