"""Make ``.venv`` (a virtual environment with pip) with nothing but the standard library.

    python3 tools/make_venv.py            # then: .venv/bin/python -m pip install ...
    python3 tools/make_venv.py --without-ensurepip   # take the PyPI path even where it works

A system Python on Debian or Ubuntu refuses ``pip install`` outside a virtual
environment (PEP 668), and without the ``python3-venv`` package it cannot put pip into
one either (``ensurepip`` is missing). This script makes ``.venv`` in the current
directory either way: with ``ensurepip`` where it works, and otherwise without pip,
then installs pip from its wheel on PyPI (a wheel can run itself: ``python
pip.whl/pip install ...``). An existing ``.venv`` with a working pip is kept as it is.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import tempfile
import urllib.parse
import urllib.request
import venv
from pathlib import Path

TARGET = Path(".venv")
PIP_RELEASE = "https://pypi.org/pypi/pip/json"


def main() -> int:
    python = TARGET / "bin" / "python"
    if _has_pip(python):
        print(f"{TARGET} is ready")
        return 0
    try:
        if "--without-ensurepip" in sys.argv or not _has_ensurepip():
            raise LookupError("ensurepip")
        venv.EnvBuilder(with_pip=True, clear=True).create(TARGET)
    except (LookupError, subprocess.CalledProcessError, SystemExit):
        print("ensurepip is not available here: installing pip from PyPI instead")
        venv.EnvBuilder(with_pip=False, clear=True).create(TARGET)
        _install_pip(python)
    if not _has_pip(python):
        print(f"could not install pip into {TARGET}", file=sys.stderr)
        return 1
    print(f"{TARGET} is ready")
    return 0


def _has_ensurepip() -> bool:
    # Debian and Ubuntu ship ensurepip without its __main__ (and its wheels) unless the
    # python3-venv package is installed; their venv then exits with advice to install it.
    return (Path(sysconfig.get_path("stdlib")) / "ensurepip" / "__main__.py").exists()


def _has_pip(python: Path) -> bool:
    if not python.exists():
        return False
    done = subprocess.run([python, "-m", "pip", "--version"], capture_output=True, check=False)
    return done.returncode == 0


def _install_pip(python: Path) -> None:
    with urllib.request.urlopen(PIP_RELEASE, timeout=60) as response:
        release = json.load(response)
    wheel = next(f for f in release["urls"] if f["filename"].endswith("-py3-none-any.whl"))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / wheel["filename"]
        url = urllib.parse.urljoin(PIP_RELEASE, wheel["url"])  # a mirror may give it relative
        with urllib.request.urlopen(url, timeout=120) as response:
            path.write_bytes(response.read())
        subprocess.run([python, f"{path}/pip", "install", "--quiet", str(path)], check=True)


if __name__ == "__main__":
    sys.exit(main())
