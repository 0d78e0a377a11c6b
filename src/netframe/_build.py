"""Which build of the hot path runs: the one compiled with mypyc, or the pure-Python source.

The modules in :data:`COMPILED_MODULES` are compiled by ``setup.py`` where a C compiler
is at hand, into extension modules that sit beside their ``.py`` files (in a wheel, and
in the source tree of an editable install). Python imports an extension module before a
source file of the same name, so left to itself an edited ``.py`` would be silently
shadowed by the extension compiled from its old text. This module decides once, at
``import netframe`` and before any hot-path module is imported:

- ``NETFRAME_NO_EXTENSIONS`` set (to anything but empty or ``0``): the pure build;
- no build record (``_extensions.json``, written by a compile that succeeded): the pure
  build, because nothing was compiled, or not all of it;
- a source whose SHA-256 differs from the record's: the pure build, with a
  ``RuntimeWarning`` naming the file and the command that rebuilds;
- otherwise the compiled build.

When the pure build is chosen, a finder placed first on ``sys.meta_path`` loads the
hot-path modules from their ``.py`` files, whatever extension modules lie beside them.
The build is all or nothing: compiled native classes and their pure twins never mix.
This module itself is never compiled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Final

__all__ = ["BUILD", "COMPILED_MODULES", "MANIFEST", "NO_EXTENSIONS_VARIABLE", "Build"]

#: The modules ``setup.py`` compiles, by their name in the package.
COMPILED_MODULES: Final = ("framing", "limits", "_logline", "_endpoint", "tcp", "udp")
#: The build record a successful compile writes beside the extension modules.
MANIFEST: Final = "_extensions.json"
NO_EXTENSIONS_VARIABLE: Final = "NETFRAME_NO_EXTENSIONS"
_HERE: Final = Path(__file__).resolve().parent
_REBUILD: Final = "rebuild with `pip install -e .` (or set NETFRAME_NO_EXTENSIONS=1)"


@dataclasses.dataclass(frozen=True, slots=True)
class Build:
    """The build in use: ``compiled`` or not, and in words why (shown by ``--version``)."""

    compiled: bool
    detail: str

    def __str__(self) -> str:
        return f"compiled ({self.detail})" if self.compiled else f"pure Python ({self.detail})"


def source_digest(path: Path) -> str:
    """The SHA-256 of a source file, as the build record keeps it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def extensions_disabled(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether ``NETFRAME_NO_EXTENSIONS`` asks for the pure build."""
    return environ.get(NO_EXTENSIONS_VARIABLE, "") not in ("", "0")


def choose(here: Path = _HERE) -> Build:
    """Decide which build runs from the package directory ``here`` (see the module doc)."""
    if extensions_disabled():
        return Build(False, f"{NO_EXTENSIONS_VARIABLE} is set")
    try:
        record = json.loads((here / MANIFEST).read_text(encoding="utf-8"))
        sources: dict[str, str] = record["sources"]
        compiler = str(record["compiler"])
    except FileNotFoundError:
        return Build(False, "not compiled when it was installed")
    except (OSError, ValueError, KeyError, TypeError):
        return Build(False, f"{MANIFEST} is unreadable")
    if set(sources) != set(COMPILED_MODULES):
        return Build(False, f"{MANIFEST} is from another version")
    for name in COMPILED_MODULES:
        source = here / f"{name}.py"
        try:
            changed = source_digest(source) != sources[name]
        except OSError:
            return Build(False, f"{source.name} is missing")
        if changed:
            message = f"{source.name} changed since it was compiled: {_REBUILD}"
            warnings.warn(f"netframe: running the pure-Python build: {message}", RuntimeWarning, 3)
            return Build(False, message)
        if not _has_extension(here, name):
            return Build(False, f"the extension module of {source.name} is missing")
    return Build(True, compiler)


def _has_extension(here: Path, name: str) -> bool:
    return any(
        (here / f"{name}{suffix}").is_file() for suffix in importlib.machinery.EXTENSION_SUFFIXES
    )


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Loads the hot-path modules from their ``.py`` files (the pure build)."""

    def __init__(self, here: Path) -> None:
        self._paths = {f"netframe.{name}": here / f"{name}.py" for name in COMPILED_MODULES}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        source = self._paths.get(fullname)
        if source is None:
            return None
        return importlib.util.spec_from_file_location(fullname, source)


def _install(build: Build) -> None:
    if not build.compiled and not any(isinstance(f, _SourceFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFinder(_HERE))


BUILD: Final = choose()
_install(BUILD)
