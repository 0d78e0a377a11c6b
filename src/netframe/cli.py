"""The command line: ``python -m netframe serve | client | bench``.

Each ``serve`` flag maps onto one :class:`~netframe.Config` field. Mistakes on the
command line (a bad flag, a malformed address, an unknown handler or loop) are one line
on stderr and exit status 2, and so is an address that cannot exist here (a name that
does not resolve, an IP address this machine does not have); a server that cannot bind
an address it could have (in use, a privileged port) exits 1 naming it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from netframe._build import BUILD
from netframe._interactive import (
    InputError,
    encode,
    interact_tcp,
    interact_udp,
    open_stream,
    show,
)
from netframe._version import __version__
from netframe.client import ClientError, UdpClient, tls_context
from netframe.config import (
    FRAMINGS,
    LOOPS,
    REPEATABLE_KINDS,
    Address,
    Config,
    ConfigError,
    Setting,
    default_text,
    parse_address,
    parse_unix_path,
    settings,
)
from netframe.handlers import HandlerError
from netframe.loops import LoopUnavailable, loop_factory
from netframe.server import ListenError, StartError
from netframe.workers import run

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130  # the shell's convention for SIGINT
DEFAULT_NAMES = ("Michael", "Tracy", "Sarah")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, and flags may come between positionals.

    ``client HOST:PORT --udp Ann Bob`` needs intermixed parsing: plain argparse would
    take the (empty) names before ``--udp`` and refuse ``Ann Bob``.
    """

    _intermixing = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # Intermixed parsing cannot hold subcommands, and calls back into this method.
        if self._subparsers is not None or self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _address(text: str) -> Address:
    try:
        return parse_address(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _target(text: str) -> Address | str:
    """A server to connect to: ``HOST:PORT``, or a Unix socket as ``unix:PATH`` or any
    path with a ``/`` in it (which no ``HOST:PORT`` has): ``./app.sock``, ``/run/x``."""
    try:
        if text.startswith("unix:"):
            return parse_unix_path(text.removeprefix("unix:"))
        if "/" in text:
            return parse_unix_path(text)
        return parse_address(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_target.__name__ = "address"  # argparse names it in "invalid address value"


def _positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number greater than 0")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`Config` setting, made from the setting's own definition."""
    for name, setting in settings().items():
        repeatable = setting.kind in REPEATABLE_KINDS
        parser.add_argument(
            setting.flag,
            dest=name,
            type=_from_text(setting),
            action="append" if repeatable else "store",
            # Absent unless given: flags then override the environment and the file.
            default=argparse.SUPPRESS,
            choices=(setting.choices or None) if setting.kind == "choice" else None,
            metavar=setting.metavar,
            help=f"{setting.help} (default: {default_text(name)})",
        )


def _from_text(setting: Setting) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return setting.parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = setting.kind  # argparse names it in "invalid <name> value"
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = _Parser(prog="netframe", description="Fast TCP and UDP servers on asyncio.")
    parser.add_argument("--version", action="version", version=f"netframe {__version__}, {BUILD}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser(
        "serve",
        help="run a server",
        description="Run a server. With no --tcp or --udp it listens on both at "
        "127.0.0.1:9999; giving either replaces that default set.",
    )
    serve.add_argument(
        "--config",
        dest="config_file",
        metavar="FILE",
        help="read settings from this TOML file, keys named as Config fields "
        "(default: $NETFRAME_CONFIG, else none); NETFRAME_* environment variables "
        "override it, and flags override both",
    )
    add_setting_flags(serve)
    serve.set_defaults(func=_serve)

    client = commands.add_parser(
        "client",
        help="talk to a server as the tutorial's client does, or like nc with -i",
        description="Connect, print what the server says, send each NAME and print each "
        "reply, then send exit (TCP). With -i, send each line of stdin instead and print "
        "the replies as they arrive, like nc.",
    )
    # Optional to argparse only so that its message names what is missing: HOST:PORT.
    client.add_argument(
        "address",
        type=_target,
        metavar="HOST:PORT",
        nargs="?",
        help="the server: HOST:PORT, or a Unix socket as unix:PATH or a path with a / "
        "(./app.sock, /run/app.sock)",
    )
    client.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"messages to send (default: {' '.join(DEFAULT_NAMES)}; none with -i)",
    )
    client.add_argument("--udp", action="store_true", help="use UDP instead of TCP (default: off)")
    client.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="send each line of stdin as one message and print replies as they arrive, "
        "like nc; at the end of stdin, half-close and wait for the server to close (UDP: "
        "for the missing replies, each for at most --timeout) (default: off)",
    )
    client.add_argument(
        "--no-greeting",
        action="store_true",
        help="TCP: send the first NAME (with -i in bare framing, the first line) at once "
        "instead of first waiting for a greeting (default: off)",
    )
    client.add_argument(
        "--no-exit",
        action="store_true",
        help="TCP: close the connection after the last reply instead of sending exit and "
        "waiting for the server to close it (default: off)",
    )
    client.add_argument(
        "--framing",
        choices=FRAMINGS,
        default="auto",
        help="line sends each NAME (or line of stdin) with a newline; auto and raw send "
        "bare words as the tutorial's client does (default: %(default)s)",
    )
    client.add_argument(
        "--encoding",
        default="utf-8",
        help="text encoding of the messages sent and the replies shown (default: %(default)s)",
    )
    client.add_argument(
        "--timeout",
        type=_positive(float),
        default=5.0,
        dest="timeout_s",
        help="seconds to wait for each step (default: %(default)s)",
    )
    client.add_argument(
        "--loop",
        choices=LOOPS,
        default="auto",
        help="event loop; auto uses uvloop when installed (default: %(default)s)",
    )
    client.add_argument(
        "--tls",
        action="store_true",
        help="speak TLS (TLS 1.2 or later), checking the server's certificate (default: off)",
    )
    client.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="trust the CA certificates in this PEM file for the server's certificate "
        "(default: the system's CAs)",
    )
    client.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="present this client certificate (PEM; the key too unless --tls-key), for "
        "servers that ask for one (default: none)",
    )
    client.add_argument(
        "--tls-key", metavar="FILE", help="the client certificate's key (default: none)"
    )
    client.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="the name the server's certificate must hold, also sent as SNI (default: the "
        "HOST of HOST:PORT; localhost for a Unix socket)",
    )
    client.set_defaults(func=_client)

    from netframe.bench.cli import add_bench_parser

    add_bench_parser(commands, _target, _positive(int), _positive(float))
    return parser


def _fail(message: str, status: int) -> int:
    print(f"netframe: error: {message}", file=sys.stderr)
    return status


def _serve(args: argparse.Namespace) -> int:
    try:
        flags = {name: getattr(args, name) for name in settings() if hasattr(args, name)}
        return run(Config.load(args.config_file, **flags))
    except (ConfigError, HandlerError, LoopUnavailable) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except ListenError as exc:  # a wrong address is a usage error; one in use is not
        return _fail(exc.strerror or str(exc), EXIT_USAGE if exc.wrong_address else EXIT_FAILURE)
    except StartError as exc:  # its traceback is in the log
        return _fail(str(exc), EXIT_FAILURE)


def _client(args: argparse.Namespace) -> int:
    if args.address is None:
        return _fail("the following argument is required: HOST:PORT (see --help)", EXIT_USAGE)
    if args.interactive and args.names:
        return _fail(
            "argument -i/--interactive: not allowed with NAME arguments (see --help)",
            EXIT_USAGE,
        )
    if args.udp and isinstance(args.address, str):
        return _fail(
            f"argument --udp: needs HOST:PORT, not the Unix socket {args.address} (see --help)",
            EXIT_USAGE,
        )
    given = [flag for flag in ("tls_ca", "tls_cert", "tls_key", "tls_server_name")
             if getattr(args, flag) is not None]  # fmt: skip
    if given and not args.tls:
        option = "--" + given[0].replace("_", "-")
        return _fail(f"argument {option}: needs --tls (see --help)", EXIT_USAGE)
    if args.tls and args.udp:
        return _fail("argument --tls: not allowed with --udp (see --help)", EXIT_USAGE)
    try:
        args.tls_context = (
            tls_context(args.tls_ca, args.tls_cert, args.tls_key) if args.tls else None
        )
        factory = loop_factory(args.loop)
        Config(encoding=args.encoding)  # validates the encoding name
        names = [] if args.interactive else args.names or list(DEFAULT_NAMES)
        for name in names:  # before connecting: a name that cannot be sent is a usage error
            encode(name, args.encoding)
    except (LoopUnavailable, ConfigError, InputError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    if args.interactive:
        session = functools.partial(interact_udp if args.udp else interact_tcp, args)
    else:
        session = functools.partial(_talk_udp if args.udp else _talk_tcp, args, names)
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(session())
    except InputError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except ClientError as exc:  # a host name that does not resolve is a usage error
        return _fail(str(exc), EXIT_USAGE if exc.wrong_address else EXIT_FAILURE)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Whoever read stdout has stopped (``| head``): end quietly, as other tools do,
        # and point stdout at the null device, where Python's last flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    return 0


async def _talk_tcp(args: argparse.Namespace, names: Sequence[str]) -> None:
    async with await open_stream(args) as client:
        if not args.no_greeting:
            show(await client.receive(), args.encoding)
        for name in names:
            client.send(name, args.encoding)
            show(await client.receive(), args.encoding)
        if not args.no_exit:
            client.send("exit", args.encoding)
            await client.wait_closed()


async def _talk_udp(args: argparse.Namespace, names: Sequence[str]) -> None:
    address: Address = args.address
    async with await UdpClient.connect(
        address.host, address.port, timeout_s=args.timeout_s
    ) as client:
        for name in names:
            message = name + "\n" if args.framing == "line" else name
            reply = await client.request(message, args.encoding)
            show(reply.removesuffix(b"\n"), args.encoding)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        # Ctrl+C before the server's own signal handling is in place.
        return 0
    return status
