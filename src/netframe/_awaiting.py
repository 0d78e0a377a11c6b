"""The coroutines that await a handler's awaitables, kept out of the compiled build.

A coroutine compiled by mypyc hands an exception thrown into it on to what it awaits
with the three-argument ``throw(type, value, tb)``, which Python 3.12 deprecates. Where
warnings are errors (``-W error``, a test suite), that DeprecationWarning would replace
the ``CancelledError`` a handler's await raised, and a cancelled lookup would be logged
as some other failure. Written here in plain Python (this module is never compiled),
the awaits of handler code keep Python's own semantics on every version.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from netframe.tcp import TcpEndpoint

__all__ = ["finish", "run_handler_calls"]


async def run_handler_calls(endpoint: TcpEndpoint) -> None:
    """Await the handler's pending call, then hand over what queued behind it, until
    the queue is empty or the handler awaits again (``TcpEndpoint``'s one task).

    A failing or cancelled await (a lookup that raised, a future another task
    cancelled) is the handler's failure: it is logged and the connection closes after
    the replies made so far. Only a cancellation of this task itself (the connection
    went away) ends the loop quietly.
    """
    try:
        while (waiting := endpoint._waiting) is not None:
            try:
                await waiting
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                endpoint._handler_failed(endpoint._waiting_hook, cancelled=True)
                break
            except Exception:
                endpoint._handler_failed(endpoint._waiting_hook)
                break
            endpoint._waiting = None
            endpoint._pump()
    finally:
        endpoint._task = None
        endpoint._waiting = None


async def finish(awaitable: Any, failed: Callable[[], None]) -> None:
    """Await a handler's awaitable to the end; ``failed()`` if it raises."""
    try:
        await awaitable
    except Exception:
        failed()
