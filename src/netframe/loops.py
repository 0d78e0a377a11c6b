"""Choosing the event loop: ``auto``, ``asyncio``, ``uvloop``, ``rloop`` or ``module:attribute``.

``rloop`` is the Rust asyncio loop (the ``rloop`` extra). Version 0.5 lacks TLS and Unix
sockets, and its ``transport.close()`` leaves the socket open, so the peer never sees
the end of the stream; ``write_eof()`` before ``close()`` does end it, and netframe's TCP
endpoint does that on this loop (:data:`EOF_BEFORE_CLOSE`). ``module:attribute`` names any
other loop by a callable that returns a new one (``uvloop:new_event_loop``, say); what
it lacks shows as the loop's own error when a feature needs it.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable
from typing import Any, Final

from netframe._errors import Error
from netframe.config import LoopName

__all__ = [
    "EOF_BEFORE_CLOSE",
    "LoopUnavailable",
    "loop_factory",
    "loop_lacks",
    "resolve_loop_name",
]

LoopFactory = Callable[[], asyncio.AbstractEventLoop]

#: Loops whose transports must be sent ``write_eof()`` before ``close()`` for the peer to
#: see the end of the stream.
EOF_BEFORE_CLOSE: Final = frozenset({"rloop"})
#: What a named loop cannot do: features netframe refuses to start with on it.
_LACKS: Final = {"rloop": frozenset({"unix", "tls"})}


class LoopUnavailable(Error, RuntimeError):
    """The requested event loop is not installed, or cannot do what was asked of it."""


def _uvloop() -> LoopFactory:
    try:
        import uvloop
    except ImportError:
        raise LoopUnavailable(
            "uvloop is not installed: pip install 'netframe[uvloop]', or use --loop asyncio"
        ) from None
    return uvloop.new_event_loop


def _rloop() -> LoopFactory:
    try:
        module: Any = importlib.import_module("rloop")
    except ImportError:
        raise LoopUnavailable(
            "rloop is not installed: pip install 'netframe[rloop]', or use --loop asyncio"
        ) from None
    factory: LoopFactory = module.new_event_loop
    return factory


def _imported(spec: str) -> LoopFactory:
    module_name, _, attribute = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise LoopUnavailable(f"cannot load loop {spec!r}: {exc}") from None
    if not callable(target):
        raise LoopUnavailable(f"loop {spec!r} is a {type(target).__name__}, not a callable")
    return target  # type: ignore[no-any-return]


def resolve_loop_name(name: LoopName) -> str:
    """Return the loop ``name`` stands for here: ``auto`` becomes uvloop when installed."""
    if name != "auto":
        return name
    try:
        _uvloop()
    except LoopUnavailable:
        return "asyncio"
    return "uvloop"


def loop_factory(name: LoopName) -> LoopFactory:
    """Return a callable that makes a new event loop of the chosen kind.

    Raises:
        LoopUnavailable: the loop is not installed, or ``module:attribute`` names
            nothing callable.
    """
    resolved = resolve_loop_name(name)
    if resolved == "uvloop":
        return _uvloop()
    if resolved == "rloop":
        return _rloop()
    if ":" in resolved:
        return _imported(resolved)
    return asyncio.new_event_loop


def loop_lacks(name: LoopName, features: dict[str, bool]) -> None:
    """Refuse, in one line, a feature that the named loop is known to lack.

    ``features`` maps a feature (``unix``, ``tls``) to whether the configuration uses it.

    Raises:
        LoopUnavailable: naming the loop and the feature.
    """
    lacking = _LACKS.get(resolve_loop_name(name), frozenset())
    for feature, used in features.items():
        if used and feature in lacking:
            raise LoopUnavailable(
                f"--loop {name} cannot serve {feature} listeners: it has no {feature} support; "
                "use --loop uvloop or asyncio"
            )
