"""The one base class of the exceptions netframe raises on purpose."""

from __future__ import annotations

import socket

__all__ = ["Error", "name_not_found"]


class Error(Exception):
    """Base of every exception netframe raises on purpose (``except netframe.Error``).

    Each subclass also derives from the built-in exception it is a kind of
    (``ConfigError`` is a ``ValueError``, ``ListenError`` an ``OSError``, ...), so code
    that catches those keeps working.
    """


#: getaddrinfo's answers that the name itself is wrong, not that the resolver failed
#: this time (EAI_AGAIN, EAI_FAIL) or ran out of something (EAI_MEMORY, EAI_SYSTEM).
_NAME_ERRORS = frozenset(
    getattr(socket, name)
    for name in ("EAI_NONAME", "EAI_NODATA", "EAI_ADDRFAMILY", "EAI_SERVICE", "EAI_FAMILY")
    if hasattr(socket, name)
)


def name_not_found(exc: OSError) -> bool:
    """True when ``exc`` says a host (or service) name does not resolve: a mistake in the
    address given, which trying again will not mend, so the command line treats it as a
    usage error (exit status 2) rather than a failure."""
    return isinstance(exc, socket.gaierror) and exc.errno in _NAME_ERRORS
