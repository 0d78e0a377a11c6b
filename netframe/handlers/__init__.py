"""Handlers: the interface a user implements, the built-in ones, and finding one by name.

Built-in handlers are named in a small registry and imported lazily; any other name is
read as ``module:attribute``, where the attribute is a :class:`Handler` subclass or any
callable that returns a new handler.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, cast

from netframe.handlers._interface import Connection, Handler, Message, Transport

__all__ = [
    "BUILTIN_HANDLERS",
    "Connection",
    "Handler",
    "HandlerError",
    "Message",
    "Transport",
    "resolve_handler",
]

HandlerFactory = Callable[[], Handler]

# name -> "module:attribute"
BUILTIN_HANDLERS: dict[str, str] = {
    "greeting": "netframe.handlers.greeting:GreetingHandler",
    "echo": "netframe.handlers.echo:EchoHandler",
}


class HandlerError(LookupError):
    """A handler name does not resolve to something that makes handlers."""


def resolve_handler(spec: str | HandlerFactory) -> HandlerFactory:
    """Turn a built-in name, ``"module:attribute"`` or a factory into a handler factory.

    Raises:
        HandlerError: with a one-line reason when the module or attribute cannot be
            found or imported, or the attribute is not callable.
    """
    if not isinstance(spec, str):
        return spec
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
    return cast(HandlerFactory, factory)
