"""Settings from a TOML file, ``NETFRAME_*`` environment variables and code, merged.

Precedence, highest first: values given in code or as command-line flags, then the
environment, then the file, then :class:`~netframe.Config`'s defaults. Every source is
read through the same :class:`~netframe.config.Setting` definitions as the flags, so a
new ``Config`` field is reachable from all of them with no edit here.

- The file holds ``Config`` field names as top-level keys (``idle_timeout_s = 60``,
  ``tcp = ["127.0.0.1:9000"]``), read with :mod:`tomllib`.
- The environment holds ``NETFRAME_`` and the field name in capitals
  (``NETFRAME_IDLE_TIMEOUT_S=60``, ``NETFRAME_TCP=127.0.0.1:9000,[::1]:9000``: repeatable
  settings are comma-separated, and empty means none). ``NETFRAME_CONFIG`` names the file
  when no path is given.

Every error names its source (the file, or the variable), the key and the reason.
"""

from __future__ import annotations

import codecs
import difflib
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final

from netframe.config import REPEATABLE_KINDS, Address, Config, ConfigError, Setting, settings
from netframe.handlers import HandlerError, resolve_handler

__all__ = ["ENV_PREFIX", "load_config"]

ENV_PREFIX: Final = "NETFRAME_"
#: The environment variable naming the settings file.
CONFIG_VARIABLE: Final = "NETFRAME_CONFIG"
#: ``NETFRAME_*`` variables that are not settings; any other unknown one is a typo.
OTHER_VARIABLES: Final = frozenset({CONFIG_VARIABLE, "NETFRAME_NO_EXTENSIONS"})


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    given: Mapping[str, Any] | None = None,
) -> Config:
    """A :class:`Config` from ``path`` (or ``$NETFRAME_CONFIG``), ``environ`` (default:
    ``os.environ``) and ``given``, in rising precedence.

    Raises:
        ConfigError: a file that cannot be read or parsed, an unknown key or variable,
            or a value out of range, each naming where it came from.
    """
    environ = os.environ if environ is None else environ
    if path is None and environ.get(CONFIG_VARIABLE):
        path = environ[CONFIG_VARIABLE]
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_from_file(Path(path)))
    values.update(_from_environment(environ))
    values.update(given or {})
    return Config(**values)


def _from_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            table = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return _read(
        table.items(),
        _file_value,
        where=lambda key: f"{path}: {key}",
        unknown=lambda key: f"{path}: unknown setting {key!r}{_suggestion(key)}",
    )


def _file_value(setting: Setting, value: Any) -> Any:
    """A TOML value as the field holds it: text parsed as a flag's argument would be,
    numbers and lists as they are (checked next)."""
    if setting.kind in REPEATABLE_KINDS:
        items = value if isinstance(value, list) else [value]
        return tuple(setting.parse(item) if isinstance(item, str) else item for item in items)
    if isinstance(value, str) and (
        setting.kind in ("choice", "pluggable", "mode", "address")
        or value.strip().lower() == "auto"
    ):
        return setting.parse(value)
    return value


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    return _read(
        (
            (variable[len(ENV_PREFIX) :].lower(), text)
            for variable, text in environ.items()
            if variable.startswith(ENV_PREFIX) and variable not in OTHER_VARIABLES
        ),
        _text_value,
        where=lambda key: ENV_PREFIX + key.upper(),
        unknown=lambda key: (
            f"unknown environment variable {ENV_PREFIX}{key.upper()}"
            f"{_suggestion(key, prefix=ENV_PREFIX)}"
        ),
    )


def _read(
    items: Iterable[tuple[str, Any]],
    convert: Callable[[Setting, Any], Any],
    *,
    where: Callable[[str], str],
    unknown: Callable[[str], str],
) -> dict[str, Any]:
    """Each ``(key, raw value)`` converted and checked as its setting says; errors
    name ``where(key)`` the value came from."""
    known = settings()
    values = {}
    for key, raw in items:
        setting = known.get(key)
        if setting is None:
            raise ConfigError(unknown(key))
        try:
            values[key] = _checked(key, setting, convert(setting, raw))
        except ConfigError as exc:
            raise ConfigError(f"{where(key)}: {_reason(key, exc)}") from None
    return values


def _text_value(setting: Setting, text: str) -> Any:
    if setting.kind in REPEATABLE_KINDS:
        return tuple(setting.parse(item) for item in text.split(",") if item.strip())
    if not text.strip():
        raise ConfigError("is empty")
    return setting.parse(text)


def _checked(key: str, setting: Setting, value: Any) -> Any:
    if setting.kind == "addresses":  # parsed from text, which checks them
        for item in value:
            if not isinstance(item, Address):
                raise ConfigError(f"{key} must hold addresses like 127.0.0.1:9999, not {item!r}")
    else:
        setting.check(key, value)
    if key == "encoding":
        try:
            codecs.lookup(value)
        except (LookupError, TypeError):
            raise ConfigError(f"unknown encoding {value!r}") from None
    elif key == "handler":  # found now, so that its error names where it was set
        try:
            resolve_handler(value)
        except HandlerError as exc:
            raise ConfigError(str(exc)) from None
    return value


def _reason(key: str, exc: ConfigError) -> str:
    """The error without the key it starts with (the caller names the key once)."""
    return str(exc).removeprefix(f"{key} ")


def _suggestion(key: str, prefix: str = "") -> str:
    """`` (did you mean ...?)`` for a near miss, or for a flag name given as a key."""
    known = settings()
    by_flag = {setting.flag.lstrip("-").replace("-", "_"): name for name, setting in known.items()}
    name = by_flag.get(key.replace("-", "_"))
    if name is None:
        close = difflib.get_close_matches(key, list(known), n=1)
        name = close[0] if close else None
    if name is None:
        return ""
    shown = prefix + name.upper() if prefix else name
    return f" (did you mean {shown}?)"
