"""The docs tell the truth: their listings are the example files, and the examples run."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CliServer, recv_exactly, recv_until_closed

from netframe.config import settings_markdown

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.DOTALL)
TABLE_START = "<!-- settings-table:start -->\n"
TABLE_END = "<!-- settings-table:end -->"


def code_blocks(path: Path) -> list[tuple[str, str]]:
    return BLOCK.findall(path.read_text())


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second() -> None:
    blocks = [body.strip() for _, body in code_blocks(ROOT / "README.md")]
    assert blocks[0] == (
        'python3 tools/make_venv.py && .venv/bin/python -m pip install ".[uvloop]" '
        "&& .venv/bin/python -m netframe serve"
    )
    assert blocks[1] == (
        'python3 tools/make_venv.py && .venv/bin/python -m pip install -e ".[test]" '
        "&& .venv/bin/python -m pytest"
    )
    assert blocks[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_settings_table_in_operations_md_is_the_generated_one() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    _, start, rest = text.partition(TABLE_START)
    table, end, _ = rest.partition(TABLE_END)
    assert start, "docs/operations.md has lost its settings-table:start marker line"
    assert end, "docs/operations.md has lost its settings-table:end marker line"
    assert table == settings_markdown(), (
        "the settings table in docs/operations.md differs from src/netframe/config.py: "
        "regenerate it with netframe.config.settings_markdown() (see the command in the "
        "page) and paste the output between the settings-table marker lines"
    )


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_listed_example_files_match_the_files(doc: Path) -> None:
    for _, body in code_blocks(doc):
        first, _, rest = body.partition("\n")
        if first.startswith("# docs/examples/"):
            assert rest == (ROOT / first[2:]).read_text(), f"{doc.name}: {first} is stale"


def test_embed_example_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "embed.py")],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    lines = done.stdout.splitlines()
    assert re.fullmatch(r"listening on 127\.0\.0\.1:\d+", lines[0])
    assert lines[1:] == [
        "Send me text; bye ends.",
        "2 words, 2 so far",
        "3 words, 5 so far",
        "5 words in all. Bye!",
    ]


@pytest.fixture
def examples_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(EXAMPLES), *sys.path]))


def client(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "netframe", "client", *args],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout


@pytest.mark.usefixtures("examples_on_path")
def test_custom_handler_from_the_docs_over_tcp_and_udp(
    cli_server: Callable[..., CliServer],
) -> None:
    server = cli_server(
        "--handler", "wordcount:WordCount", "--framing", "line",
        "--tcp", "127.0.0.1:0", "--udp", "127.0.0.1:0",
    )  # fmt: skip
    host, port = server.address("tcp")
    tcp = client(f"{host}:{port}", "--framing", "line", "hello", "two words", "bye")
    assert (
        tcp
        == "Send me text; bye ends.\n1 word, 1 so far\n2 words, 3 so far\n3 words in all. Bye!\n"
    )
    host, port = server.address("udp")
    udp = client(f"{host}:{port}", "--udp", "--framing", "line", "hello", "two words", "bye")
    assert udp == "1 word, 1 so far\n2 words, 3 so far\n3 words in all. Bye!\n"
    again = client(f"{host}:{port}", "--udp", "--framing", "line", "hello")
    assert again == "1 word, 4 so far\n"  # one handler serves the whole UDP listener


@pytest.mark.usefixtures("examples_on_path")
def test_async_handler_from_the_docs(cli_server: Callable[..., CliServer]) -> None:
    server = cli_server(
        "--handler", "lookup:PhoneLookup", "--framing", "line", "--tcp", "127.0.0.1:0"
    )
    with socket.create_connection(server.address("tcp"), timeout=10) as sock:
        sock.sendall(b"alice\nnobody\nBob\n")
        expected = b"alice: 555-0100\nnobody: unknown\nBob: 555-0199\n"
        assert recv_exactly(sock, len(expected)) == expected


@pytest.mark.usefixtures("examples_on_path")
def test_custom_framer_from_the_docs_over_tcp(cli_server: Callable[..., CliServer]) -> None:
    server = cli_server("--framing", "netstring:Netstring", "--tcp", "127.0.0.1:0")
    with socket.create_connection(server.address("tcp"), timeout=10) as sock:
        sock.sendall(b"3:Bob,5:Ali")  # one whole message and the start of another
        sock.sendall(b"ce,")
        expected = b"8:Welcome!,11:Hello, Bob!,13:Hello, Alice!,"
        assert recv_exactly(sock, len(expected)) == expected
        sock.sendall(b"x:")  # not a netstring: one framed error, then the close
        error = b"Error: line exceeds 65536 bytes"
        assert recv_until_closed(sock, limit=1024) == b"%d:%s," % (len(error), error)


@pytest.mark.usefixtures("examples_on_path")
def test_chat_example_pushes_and_opens_and_closes_with_the_server(
    cli_server: Callable[..., CliServer],
) -> None:
    server = cli_server("--handler", "chat:Chat", "--framing", "line", "--tcp", "127.0.0.1:0")
    with (
        socket.create_connection(server.address("tcp"), timeout=10) as first,
        first.makefile("rb") as first_lines,
    ):
        assert re.fullmatch(rb"Welcome, #\d+! 0 others here\.\n", first_lines.readline(1024))
        with socket.create_connection(server.address("tcp"), timeout=10) as second:
            port = second.getsockname()[1]
            with second.makefile("rb") as second_lines:
                assert second_lines.readline(1024).endswith(b"! 1 others here.\n")
            joined = first_lines.readline(1024)
            number = int(re.fullmatch(rb"#(\d+) joined from 127\.0\.0\.1:(\d+)\n", joined)[1])  # type: ignore[index]
            assert joined.endswith(b":%d\n" % port)
            second.sendall(b"hi all\n/quit\n")
            assert first_lines.readline(1024) == b"#%d: hi all\n" % number
            assert first_lines.readline(1024) == b"#%d left (handler_closed)\n" % number
    assert server.stop() == 0
    events = [e["event"] for e in server.events]
    assert events.index("chat_opened") < events.index("listening")
    assert events.index("shutdown_started") < events.index("chat_closed")
    assert events.index("chat_closed") < events.index("shutdown_finished")


def test_a_failing_start_hook_is_one_error_line_and_exit_1(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text(
        "import netframe\n\n"
        "class Broken(netframe.Handler):\n"
        "    @classmethod\n"
        "    def on_start(cls, server):\n"
        "        raise ConnectionRefusedError('database down')\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "netframe", "serve", "--handler", "broken:Broken",
         "--tcp", "127.0.0.1:0", "--log-format", "json"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 1
    *log, last = done.stderr.strip().splitlines()
    assert last == (
        "netframe: error: the handler's on_start failed: ConnectionRefusedError('database down')"
    )
    failure = json.loads(log[-1])
    assert (failure["event"], failure["hook"]) == ("handler_error", "on_start")
    assert failure["exception"][0]["exc_value"] == "database down"
    assert not any(json.loads(line)["event"] == "listening" for line in log)


def test_the_unit_test_listing_in_handlers_md_passes(tmp_path: Path) -> None:
    listing = next(
        body
        for _, body in code_blocks(ROOT / "docs" / "handlers.md")
        if "from netframe.testing import MemoryConnection" in body
    )
    (tmp_path / "test_wordcount.py").write_text(listing)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_wordcount.py"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(EXAMPLES)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout


def test_the_api_reference_is_the_generated_one() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "api_reference.py")],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert (ROOT / "docs" / "api.md").read_text() == done.stdout, (
        "docs/api.md differs from the code's public names and docstrings: regenerate it "
        "with `python docs/api_reference.py > docs/api.md`"
    )
