"""What a benchmark run is asked to do: the options and their checks (no heavy imports).

The command line builds a :class:`BenchOptions` from these names without importing the
load generator itself, so ``netframe serve`` never needs numpy or psutil.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from netframe.config import Address, Framing

__all__ = ["SCENARIOS", "BenchError", "BenchOptions", "Progress"]

SCENARIOS = ("sessions", "greeting", "echo", "udp", "hold")

Progress = Callable[[str, float, float, int], None]  # phase, elapsed_s, total_s, ops


class BenchError(RuntimeError):
    """The benchmark could not run; the message says why in one line."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchOptions:
    """Every knob of a run; defaults are the command line's."""

    scenario: str = "greeting"
    target: Address | str | None = None  # str: the path of a Unix socket
    spawn_args: tuple[str, ...] | None = None  # extra `serve` flags; None: do not spawn
    server_pid: int | None = None
    conns: int = 50
    duration_s: float = 10.0
    warmup_s: float = 2.0
    workers: int | None = None
    pipeline: int = 1
    size: int = 1024
    framing: Framing | None = None
    rate: float | None = None
    udp_timeout_s: float = 0.5
    client_cpus: tuple[int, ...] | None = None
    server_cpus: tuple[int, ...] | None = None
    #: Speak TLS to the server, trusting the CAs in ``tls_ca`` (the system's when None).
    tls: bool = False
    tls_ca: str | None = None

    @property
    def effective_framing(self) -> Framing:
        """The framing to speak: echo defaults to raw (any payload), the rest to line."""
        return self.framing or ("raw" if self.scenario == "echo" else "line")

    def check(self) -> None:
        """Raise :class:`BenchError` when the options cannot make a valid run."""
        if self.scenario not in SCENARIOS:
            raise BenchError(f"unknown scenario {self.scenario!r}")
        if (self.target is None) == (self.spawn_args is None):
            raise BenchError("give exactly one of --target HOST:PORT and --spawn")
        if isinstance(self.target, str) and self.scenario == "udp":
            raise BenchError("the udp scenario needs --target HOST:PORT, not a Unix socket")
        if self.conns < 1 or self.pipeline < 1 or self.size < 1:
            raise BenchError("--conns, --pipeline and --size must be at least 1")
        if self.duration_s <= 0 or self.warmup_s < 0:
            raise BenchError("--duration must be positive and --warmup not negative")
        bare = self.effective_framing == "raw" and self.scenario == "greeting"
        if bare and self.pipeline > 1:
            raise BenchError("raw framing has no message boundaries: use --pipeline 1")
        if self.tls and self.scenario == "udp":
            raise BenchError("--tls applies to TCP and Unix scenarios, not udp")
        if self.tls_ca is not None and not self.tls:
            raise BenchError("--tls-ca needs --tls")
        if self.rate is not None and self.scenario not in ("greeting", "echo"):
            raise BenchError("--rate applies to the greeting and echo scenarios")
