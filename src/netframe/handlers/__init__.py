"""Handlers: the interface a user implements, the built-in ones, and finding one by name.

Built-in handlers are named in a small registry and imported lazily; any other name is
read as ``module:attribute``, where the attribute is a :class:`Handler` subclass or any
callable that returns a new handler.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, cast

from netframe._errors import Error
from netframe.handlers._interface import (
    CloseReason,
    Connection,
    Handler,
    InetAddress,
    Message,
    Network,
    PeerAddress,
    TlsInfo,
    UnixAddress,
)

__all__ = [
    "BUILTIN_HANDLERS",
    "CloseReason",
    "Connection",
    "Handler",
    "HandlerError",
    "InetAddress",
    "Message",
    "Network",
    "PeerAddress",
    "TlsInfo",
    "UnixAddress",
    "resolve_handler",
]

HandlerFactory = Callable[[], Handler]

# name -> "module:attribute"
BUILTIN_HANDLERS: dict[str, str] = {
    "greeting": "netframe.handlers.greeting:GreetingHandler",
    "echo": "netframe.handlers.echo:EchoHandler",
}


class HandlerError(Error, ValueError):
    """The ``handler`` setting is unusable: a name that does not resolve, something
    that does not make handlers, or a factory that failed when it was tried (the
    factory's exception is then the cause). Like :class:`ConfigError`, a bad value."""


def resolve_handler(spec: str | HandlerFactory) -> HandlerFactory:
    """Turn a built-in name, ``"module:attribute"`` or a factory into a handler factory.

    A class must have ``on_message``; any other callable is called once here to check
    that it makes handlers (a wrong one then fails when the server is built, not on
    every connection).

    Raises:
        HandlerError: with a one-line reason when the module or attribute cannot be
            found or imported, or is not something that makes handlers.
    """
    if not isinstance(spec, str):
        return _checked(spec, getattr(spec, "__qualname__", repr(spec)))
    target = BUILTIN_HANDLERS.get(spec, spec)
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        known = ", ".join(BUILTIN_HANDLERS)
        raise HandlerError(f"unknown handler {spec!r}: use one of {known} or module:attribute")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HandlerError(f"cannot import handler module {module_name!r}: {exc}") from None
    except Exception as exc:  # the user's module raised while importing
        raise HandlerError(f"importing {module_name!r} failed: {exc!r}") from None
    factory: Any = module
    for part in attribute.split("."):
        try:
            factory = getattr(factory, part)
        except AttributeError:
            raise HandlerError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not callable(factory):
        raise HandlerError(f"handler {spec!r} is not a class or callable")
    return _checked(cast(HandlerFactory, factory), spec)


def _checked(factory: HandlerFactory, name: str) -> HandlerFactory:
    """``factory`` if it makes handlers; a class is checked as it is, any other callable
    is called once, here, so that a wrong one fails at start and not per connection."""
    if isinstance(factory, type):
        if not callable(getattr(factory, "on_message", None)):
            raise HandlerError(f"handler {name!r} is a class with no on_message method")
        return factory
    try:
        made = factory()
    except Exception as exc:
        raise HandlerError(f"the handler factory {name!r} failed: {exc!r}") from exc
    if not callable(getattr(made, "on_message", None)):
        kind = type(made).__name__
        raise HandlerError(f"handler {name!r} made a {kind}, not a handler (no on_message)")
    return factory
