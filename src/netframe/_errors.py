"""The one base class of the exceptions netframe raises on purpose."""

from __future__ import annotations

__all__ = ["Error"]


class Error(Exception):
    """Base of every exception netframe raises on purpose (``except netframe.Error``).

    Each subclass also derives from the built-in exception it is a kind of
    (``ConfigError`` is a ``ValueError``, ``ListenError`` an ``OSError``, ...), so code
    that catches those keeps working.
    """
