"""Build netframe: the hot path compiled with mypyc where it can be, pure Python where not.

Everything else about the package is in ``pyproject.toml``; this file only decides the
extension modules. The compiled build needs CPython, mypyc (a build requirement, from
the ``mypy`` package) and a working C compiler with the Python headers. Where any of
them is missing, or ``NETFRAME_NO_EXTENSIONS`` is set, or compiling fails, the install
goes on with the pure-Python build and says so in one line (``pip install -v`` shows
it; ``python -m netframe --version`` always tells which build runs).

A compile that succeeds writes ``netframe/_extensions.json`` beside the extension
modules: the SHA-256 of each source compiled. ``netframe._build`` reads it at import and
runs the pure build if a source has changed since, so an edited ``.py`` is never
shadowed by a stale extension module in an editable install.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
PACKAGE = ROOT / "src" / "netframe"
# The same list as netframe._build.COMPILED_MODULES (a test keeps them equal); read from
# there so that building needs nothing imported from the package itself.
COMPILED_MODULES = ("framing", "limits", "_logline", "_endpoint", "tcp", "udp")
MANIFEST = "_extensions.json"


def say(line: str) -> None:
    print(f"netframe: {line}", file=sys.stderr, flush=True)


def why_pure() -> str | None:
    """Why the compiled build cannot be made here, or None when it can."""
    if os.environ.get("NETFRAME_NO_EXTENSIONS", "") not in ("", "0"):
        return "NETFRAME_NO_EXTENSIONS is set"
    if platform.python_implementation() != "CPython":
        return f"{platform.python_implementation()} runs the pure build"
    try:
        import mypyc.build  # noqa: F401
    except ImportError as exc:
        return f"mypyc is not available ({exc})"
    return compiler_problem()


def compiler_problem() -> str | None:
    """Compile a one-line C file against Python.h; None if that works."""
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    compiler: Any = new_compiler()
    customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "probe.c"
        source.write_text("#include <Python.h>\nint netframe_probe(void) { return 0; }\n")
        try:
            compiler.compile(
                [str(source)], output_dir=tmp, include_dirs=[sysconfig.get_paths()["include"]]
            )
        except Exception as exc:
            first = str(exc).strip().splitlines()
            return f"no working C compiler with the Python headers ({first[0] if first else exc})"
    return None


class BuildExt(build_ext):
    """build_ext that falls back to the pure build instead of failing the install, and
    records what it compiled."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            say(f"compiling failed, installing the pure-Python build: {exc}")
            self._remove_record()
            return
        if self.extensions:
            self._write_record()

    def _package_dir(self) -> Path:
        # Where netframe/tcp*.so went: the source tree (in place, an editable install)
        # or the build directory a wheel is made from.
        return Path(self.get_ext_fullpath("netframe.tcp")).parent

    def _write_record(self) -> None:
        import hashlib

        import mypy.version

        record = {
            "compiler": f"mypyc {mypy.version.__version__}",
            "sources": {
                name: hashlib.sha256((PACKAGE / f"{name}.py").read_bytes()).hexdigest()
                for name in COMPILED_MODULES
            },
        }
        target = self._package_dir() / MANIFEST
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    def _remove_record(self) -> None:
        (self._package_dir() / MANIFEST).unlink(missing_ok=True)


def metadata_only() -> bool:
    """Whether setup.py runs only to write metadata (pip asks for it before building), when
    there is nothing to compile and checking the compiler would be wasted."""
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), "")
    return command in ("egg_info", "dist_info", "sdist")


def extensions() -> list[Any]:
    if metadata_only():
        return []
    reason = why_pure()
    if reason is not None:
        say(f"installing the pure-Python build: {reason}")
        return []
    from mypyc.build import mypycify

    say("compiling the hot path with mypyc")
    try:
        return mypycify(  # type: ignore[no-any-return]
            # Errors in the modules it only follows (loops.py without uvloop installed in
            # the build environment, say) are not the compile's business.
            ["--follow-imports=silent", *(f"src/netframe/{name}.py" for name in COMPILED_MODULES)],
            opt_level="3",
            group_name="netframe",
        )
    except (Exception, SystemExit) as exc:  # mypy reports its errors and exits
        say(f"mypyc could not translate the hot path, installing the pure-Python build: {exc}")
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
