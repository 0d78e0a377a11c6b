"""Choosing the event loop: ``auto``, ``asyncio`` or ``uvloop``, as a small registry."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from netframe._errors import Error
from netframe.config import LoopName

__all__ = ["LoopUnavailable", "loop_factory", "resolve_loop_name"]

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


class LoopUnavailable(Error, RuntimeError):
    """The requested event loop is not installed."""


def _uvloop() -> LoopFactory:
    try:
        import uvloop
    except ImportError:
        raise LoopUnavailable(
            "uvloop is not installed: pip install 'netframe[uvloop]', or use --loop asyncio"
        ) from None
    return uvloop.new_event_loop


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
        LoopUnavailable: ``uvloop`` was asked for and is not installed.
    """
    if resolve_loop_name(name) == "uvloop":
        return _uvloop()
    return asyncio.new_event_loop
