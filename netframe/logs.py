"""structlog set-up: console or JSON lines on stderr, filtered at the configured level.

netframe logs through ``structlog.get_logger("netframe")`` and binds one logger per
connection. :func:`configure_logging` is called by the command line and by
:func:`netframe.run`; an application that embeds :class:`netframe.Server` keeps its
own structlog configuration.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from netframe.config import LogFormat

__all__ = ["configure_logging", "get_logger"]


def get_logger() -> Any:
    """The framework's logger; bind per-connection context onto it."""
    return structlog.get_logger("netframe")


def configure_logging(
    log_format: LogFormat = "console", level: str = "info", stream: TextIO | None = None
) -> None:
    """Send netframe's events to ``stream`` (stderr) as console text or one JSON per line.

    Events below ``level`` cost one method call that does nothing: the bound logger is
    a filtering one, cached on first use.
    """
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if log_format == "json":
        # Tracebacks as data, without local variables: those would put message contents
        # and settings into the log.
        tracebacks = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        processors += [tracebacks, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.WriteLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=True,
    )
