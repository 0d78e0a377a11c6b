"""The compiled and the pure build: which one runs, and that a stale one never does.

``.ci/run`` runs the whole suite twice, on the compiled build the README's command makes
and with ``NETFRAME_NO_EXTENSIONS=1``; these tests check the choosing itself.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import netframe
import netframe.tcp
from netframe import _build

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(netframe.__file__).resolve().parent
COMPILED = netframe.BUILD.compiled
needs_compiled = pytest.mark.skipif(
    not COMPILED, reason=f"this run is on the pure build: {netframe.BUILD}"
)


def python(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=60, env=environ
    )


def test_setup_compiles_the_modules_the_package_expects() -> None:
    tree = ast.parse((ROOT / "setup.py").read_text())
    listed = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "COMPILED_MODULES" for t in node.targets)
    )
    assert tuple(listed) == _build.COMPILED_MODULES


def test_version_names_the_build() -> None:
    done = python("-m", "netframe", "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"netframe {netframe.__version__}, {netframe.BUILD}"
    forced = python("-m", "netframe", "--version", env={"NETFRAME_NO_EXTENSIONS": "1"})
    assert forced.stdout.strip().endswith("pure Python (NETFRAME_NO_EXTENSIONS is set)")


def test_the_hot_path_modules_come_from_the_build_in_use() -> None:
    for name in _build.COMPILED_MODULES:
        module = sys.modules.get(f"netframe.{name}") or __import__(f"netframe.{name}")
        path = Path(sys.modules[f"netframe.{name}"].__file__ or "")
        assert (path.suffix == ".py") is (not COMPILED), (name, path, module)


@needs_compiled
def test_no_extensions_loads_every_module_from_source() -> None:
    script = (
        "import netframe, sys\n"
        "print(netframe.BUILD.compiled)\n"
        "import netframe.tcp, netframe.udp, netframe.framing, netframe.limits, netframe._endpoint\n"
        "print(sorted(m.__file__.rsplit('.', 1)[1] for n, m in sys.modules.items()"
        " if n.startswith('netframe.') and n.split('.')[1] in netframe._build.COMPILED_MODULES))"
    )
    done = python("-c", script, env={"NETFRAME_NO_EXTENSIONS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["False", str(["py"] * len(_build.COMPILED_MODULES))]
    assert python("-c", script, env={"NETFRAME_NO_EXTENSIONS": "0"}).stdout.startswith("True")


@needs_compiled
def test_an_edited_source_is_never_shadowed_by_its_stale_extension(tmp_path: Path) -> None:
    # A copy of the installed build (the package, its extension modules, the shared
    # runtime beside it), then one source edited as a developer would.
    shutil.copytree(PACKAGE, tmp_path / "netframe", ignore=shutil.ignore_patterns("__pycache__"))
    for runtime in PACKAGE.parent.glob("netframe__mypyc*"):
        shutil.copy2(runtime, tmp_path)
    tcp = tmp_path / "netframe" / "tcp.py"
    tcp.write_text(tcp.read_text() + "\nEDITED = True\n")
    script = (
        "import netframe, netframe.tcp\n"
        "print(netframe.BUILD.compiled, netframe.tcp.EDITED, netframe.tcp.__file__)"
    )
    done = python("-c", script, env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    compiled, edited, path = done.stdout.split()
    assert (compiled, edited, path) == ("False", "True", str(tcp))
    assert "tcp.py changed since it was compiled" in done.stderr
    assert "pip install -e ." in done.stderr
    # The stale build still serves, in its pure form.
    served = python(
        "-c",
        "import netframe.testing as t, netframe\n"
        "c = t.MemoryConnection(netframe.GreetingHandler, framing='auto')\n"
        "print(c.feed(b'Bob'))",
        env={"PYTHONPATH": str(tmp_path), "PYTHONWARNINGS": "ignore"},
    )
    assert served.returncode == 0, served.stderr


def fake_package(tmp_path: Path, *, record: object = None, extensions: bool = True) -> Path:
    for name in _build.COMPILED_MODULES:
        (tmp_path / f"{name}.py").write_text(f"# {name}\n")
        if extensions:
            suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
            (tmp_path / f"{name}{suffix}").write_bytes(b"")
    if record is None:
        record = {
            "compiler": "mypyc 1.0",
            "sources": {
                name: hashlib.sha256(f"# {name}\n".encode()).hexdigest()
                for name in _build.COMPILED_MODULES
            },
        }
    if record is not False:
        text = record if isinstance(record, str) else json.dumps(record)
        (tmp_path / _build.MANIFEST).write_text(text)
    return tmp_path


@pytest.fixture
def no_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_build.NO_EXTENSIONS_VARIABLE, raising=False)


@pytest.mark.usefixtures("no_override")
def test_choose_a_complete_current_build_is_compiled(tmp_path: Path) -> None:
    assert _build.choose(fake_package(tmp_path)) == _build.Build(True, "mypyc 1.0")
    assert str(_build.choose(tmp_path)) == "compiled (mypyc 1.0)"


@pytest.mark.usefixtures("no_override")
@pytest.mark.parametrize(
    ("record", "extensions", "detail"),
    [
        (False, True, "not compiled when it was installed"),
        ("{not json", True, "_extensions.json is unreadable"),
        ({"compiler": "x"}, True, "_extensions.json is unreadable"),
        ({"compiler": "x", "sources": {"tcp": "0"}}, True, "_extensions.json is from another"),
        (None, False, "the extension module of framing.py is missing"),
    ],
)
def test_choose_anything_less_is_pure(
    tmp_path: Path, record: object, extensions: bool, detail: str
) -> None:
    build = _build.choose(fake_package(tmp_path, record=record, extensions=extensions))
    assert not build.compiled
    assert build.detail.startswith(detail)


@pytest.mark.usefixtures("no_override")
def test_choose_a_changed_source_is_pure_and_warns(tmp_path: Path) -> None:
    package = fake_package(tmp_path)
    (package / "udp.py").write_text("# udp, edited\n")
    with pytest.warns(RuntimeWarning, match=r"udp\.py changed since it was compiled"):
        build = _build.choose(package)
    assert not build.compiled


def test_choose_the_variable_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_build.NO_EXTENSIONS_VARIABLE, "1")
    assert _build.choose(fake_package(tmp_path)) == _build.Build(
        False, "NETFRAME_NO_EXTENSIONS is set"
    )
    monkeypatch.setenv(_build.NO_EXTENSIONS_VARIABLE, "0")
    assert _build.choose(tmp_path).compiled
