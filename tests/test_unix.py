"""Unix-domain stream listeners (``--unix``): the path, its mode, who is connected, limits.

Library servers on both loops, and ``netframe serve`` subprocesses read through their JSON
logs. Every socket file lives in the test's own temporary directory.
"""

from __future__ import annotations

import asyncio
import errno
import os
import pwd
import socket
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from conftest import (
    REPLY_TIMEOUT_S,
    CliServer,
    assert_one_line_error,
    recv_exactly,
    recv_until_closed,
    run_netframe,
)
from structlog.testing import capture_logs

from netframe import Connection, Handler, ListenError, Server, UnixAddress
from netframe import _unix as unix_module
from netframe.testing import serving

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[str]:
    """A socket path in a directory of its own, short enough for a socket address."""
    folder = tempfile.mkdtemp(prefix="nf-", dir="/tmp")
    yield os.path.join(folder, "app.sock")
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        else:
            os.unlink(path)
    os.rmdir(folder)


async def open_unix(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_unix_connection(path), REPLY_TIMEOUT_S)


async def read(reader: asyncio.StreamReader, size: int) -> bytes:
    return await asyncio.wait_for(reader.readexactly(size), REPLY_TIMEOUT_S)


def gone(path: str) -> bool:
    return not os.path.lexists(path)


def unix_socket() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)


def leftover_socket(path: str) -> os.stat_result:
    """A socket file as a crashed server leaves it: bound, then closed, never removed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)
    return os.lstat(path)


class Recorder(Handler):
    """Greets, and records what each connection reports about itself."""

    seen: ClassVar[list[tuple[str, Any, Any]]] = []

    def on_connect(self, conn: Connection) -> None:
        Recorder.seen.append((conn.network, conn.peer, conn.local))
        conn.send("Welcome!")

    def on_message(self, conn: Connection, message: str) -> None:
        conn.send(f"Hello, {message}!")


# -- serving, and what the handler and the logs see --------------------------------------------


@pytest.mark.asyncio
@pytest.mark.usefixtures("loop_checked")
async def test_a_unix_socket_is_served_and_the_handler_sees_who_is_connected(
    sock_path: str,
) -> None:
    Recorder.seen = []
    async with serving(handler=Recorder, unix=[sock_path]) as server:
        assert [str(a) for a in server.addresses] == [f"unix {sock_path}"]
        assert server.address("unix") == (sock_path, 0)
        reader, writer = await open_unix(sock_path)
        assert await read(reader, 8) == b"Welcome!"
        writer.write(b"Bob\n")
        assert await read(reader, 12) == b"Hello, Bob!\n"
        writer.close()
    network, peer, local = Recorder.seen[0]
    assert network == "unix"
    assert peer == UnixAddress("", os.getpid(), os.getuid(), os.getgid())
    assert str(peer) == f"unix:pid={os.getpid()},uid={os.getuid()},gid={os.getgid()}"
    assert local == UnixAddress(sock_path)
    assert gone(sock_path)  # removed at the stop


@pytest.mark.asyncio
@pytest.mark.usefixtures("loop_checked")
async def test_unix_and_tcp_listeners_serve_side_by_side(sock_path: str) -> None:
    Recorder.seen = []
    async with serving(handler=Recorder, unix=[sock_path], tcp=["127.0.0.1:0"]) as server:
        reader, writer = await open_unix(sock_path)
        assert await read(reader, 8) == b"Welcome!"
        tcp_reader, tcp_writer = await asyncio.open_connection(*server.address("tcp"))
        assert await read(tcp_reader, 8) == b"Welcome!"
        assert server.connection_count == 2  # one cap, one registry for both
        writer.close()
        tcp_writer.close()
    assert sorted(network for network, _, _ in Recorder.seen) == ["tcp", "unix"]


def test_serve_logs_unix_connections_with_the_peer_process(
    cli_server: Callable[..., CliServer], sock_path: str
) -> None:
    server = cli_server("--unix", sock_path, "--unix-mode", "600", "--handler", "greeting")
    listening = server.wait_for("listening")[0]
    assert listening["transport"] == "unix"
    assert listening["path"] == sock_path
    assert listening["mode"] == "0600"
    assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(REPLY_TIMEOUT_S)
        client.connect(sock_path)
        assert recv_exactly(client, 8) == b"Welcome!"
        client.sendall(b"exit")
        assert recv_until_closed(client) == b""
    peer = f"unix:pid={os.getpid()},uid={os.getuid()},gid={os.getgid()}"
    opened = server.wait_for("connection_opened")[0]
    assert (opened["transport"], opened["peer"]) == ("unix", peer)
    closed = server.wait_for("connection_closed")[0]
    assert (closed["transport"], closed["peer"], closed["conn"]) == ("unix", peer, opened["conn"])
    assert closed["reason"] == "handler_closed"
    assert server.stop() == 0
    assert not os.path.exists(sock_path)


@pytest.mark.parametrize("form", ["unix:{}", "{}"])
def test_the_client_speaks_to_a_unix_socket(
    cli_server: Callable[..., CliServer], sock_path: str, form: str
) -> None:
    cli_server("--unix", sock_path)
    done = run_netframe("client", form.format(sock_path), "Ann")
    assert (done.returncode, done.stdout, done.stderr) == (0, "Welcome!\nHello, Ann!\n", "")


def test_the_client_refuses_udp_to_a_unix_socket_and_names_a_missing_one(sock_path: str) -> None:
    assert_one_line_error(
        run_netframe("client", sock_path, "--udp"), 2, "--udp: needs HOST:PORT, not the Unix"
    )
    assert_one_line_error(
        run_netframe("client", sock_path), 1, f"cannot connect to {sock_path}: No such file"
    )


# -- the path: stale, live, not a socket ---------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.usefixtures("loop_checked")
async def test_a_stale_socket_file_is_replaced(sock_path: str) -> None:
    previous = os.umask(0o022)
    try:
        stale = leftover_socket(sock_path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(stale.st_mode) == 0o755
    with capture_logs() as logs:
        async with serving(unix=[sock_path]) as server:
            # A new file (the inode number may well be reused): the one bound here.
            assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o660
            reader, writer = await open_unix(sock_path)
            assert await read(reader, 8) == b"Welcome!"
            writer.close()
            assert server.address("unix") == (sock_path, 0)
    assert {"event": "stale_socket_replaced", "path": sock_path, "log_level": "warning"} in logs


@pytest.mark.asyncio
@pytest.mark.usefixtures("loop_checked")
async def test_a_live_socket_is_never_stolen(sock_path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as owner:
        owner.bind(sock_path)
        owner.listen(8)
        before = os.lstat(sock_path)
        server = Server(unix=[sock_path])
        with pytest.raises(ListenError, match=f"cannot listen on unix {sock_path}: Address alre"):
            await server.start()
        assert os.lstat(sock_path).st_ino == before.st_ino
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(sock_path)  # the owner still has its socket


def test_a_live_socket_with_a_full_backlog_is_not_stolen_either(sock_path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as owner:
        owner.bind(sock_path)
        owner.listen(0)
        queued = []
        for _ in range(8):  # fill the backlog: a further connect would have to wait
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            queued.append(client)
            if client.connect_ex(sock_path) == errno.EAGAIN:
                break
        else:
            pytest.fail("the backlog never filled")
        with pytest.raises(OSError, match="Address already in use") as failure:
            unix_module.bind_unix_listener(sock_path, 0o600, 8, unix_socket)
        assert failure.value.errno == errno.EADDRINUSE
        for client in queued:
            client.close()


def test_serve_on_a_live_socket_is_one_line_and_exit_1(sock_path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as owner:
        owner.bind(sock_path)
        owner.listen(8)
        done = run_netframe("serve", "--unix", sock_path)
    assert_one_line_error(
        done, 1, f"cannot listen on unix {sock_path}: Address already in use (a process is "
    )


@pytest.mark.parametrize("kind", ["file", "directory", "dangling symlink", "fifo"])
def test_a_path_that_is_not_a_socket_is_refused_and_kept(sock_path: str, kind: str) -> None:
    if kind == "file":
        Path(sock_path).write_text("precious")
    elif kind == "directory":
        os.mkdir(sock_path)
    elif kind == "fifo":
        os.mkfifo(sock_path)
    else:
        os.symlink("/nonexistent/target", sock_path)
    before = os.lstat(sock_path)
    done = run_netframe("serve", "--unix", sock_path)
    assert_one_line_error(done, 1, f"cannot listen on unix {sock_path}: the path exists and is")
    after = os.lstat(sock_path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    if kind == "file":
        assert Path(sock_path).read_text() == "precious"


def test_a_directory_that_does_not_exist_is_named(sock_path: str) -> None:
    # A wrong address, as an IP address of no interface is: a usage error (status 2).
    missing = os.path.join(os.path.dirname(sock_path), "no", "app.sock")
    assert_one_line_error(
        run_netframe("serve", "--unix", missing), 2, f"unix {missing}: No such file or directory"
    )


def test_a_bad_path_or_mode_is_a_usage_error(sock_path: str) -> None:
    assert_one_line_error(run_netframe("serve", "--unix", "@abstract"), 2, "abstract-namespace")
    assert_one_line_error(
        run_netframe("serve", "--unix", sock_path, "--unix-mode", "rw-"), 2,
        "argument --unix-mode: 'rw-' is not an octal file mode like 660",
    )  # fmt: skip


# -- the file: its mode, and removing it -----------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.usefixtures("loop_checked")
@pytest.mark.parametrize("mode", [0o600, 0o660, 0o666])
async def test_the_file_has_the_mode_asked_for_whatever_the_umask(
    sock_path: str, mode: int
) -> None:
    previous = os.umask(0o077)  # stricter than some modes asked for, looser than others
    try:
        async with serving(unix=[sock_path], unix_mode=mode):
            status = os.stat(sock_path)
    finally:
        os.umask(previous)
    assert stat.S_ISSOCK(status.st_mode)
    assert stat.S_IMODE(status.st_mode) == mode


def test_no_client_can_connect_before_the_mode_is_set(
    sock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mode is set between bind and listen: a connect in that moment is refused."""
    attempts: list[int] = []
    real_chmod = os.chmod

    def chmod_and_probe(path: Any, mode: int, **kwargs: Any) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            attempts.append(probe.connect_ex(path))
        real_chmod(path, mode, **kwargs)

    monkeypatch.setattr(unix_module.os, "chmod", chmod_and_probe)
    bound = unix_module.bind_unix_listener(sock_path, 0o600, 8, unix_socket)
    monkeypatch.undo()
    with bound.sock:
        assert attempts == [errno.ECONNREFUSED]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(sock_path)  # and after listen(), one can


def _nobody() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
@pytest.mark.skipif(_nobody() is None, reason="no user 'nobody' to connect as")
@pytest.mark.parametrize(("mode", "allowed"), [(0o660, False), (0o666, True)])
def test_the_mode_decides_who_may_connect(sock_path: str, mode: int, allowed: bool) -> None:
    os.chmod(os.path.dirname(sock_path), 0o711)  # others may reach the file, not list
    nobody = _nobody()
    assert nobody is not None
    server = CliServer(["--unix", sock_path, "--unix-mode", f"{mode:o}"])
    try:
        server.wait_for("serving")
        result = _connect_as(nobody, sock_path)
    finally:
        server.kill()
    assert result == (0 if allowed else errno.EACCES)


def _connect_as(user: pwd.struct_passwd, path: str) -> int:
    """``connect_ex`` to ``path`` from a forked child running as ``user``: no interpreter
    to exec, so it works wherever Python itself lives (a 0700 home, say)."""
    read, write = os.pipe()
    with warnings.catch_warnings():  # 3.12+: fork() in a process with threads
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: drop to the user, connect, report, and leave at once
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            with socket.socket(socket.AF_UNIX) as client:
                os.write(write, str(client.connect_ex(path)).encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        os.waitpid(pid, 0)
        return int(os.read(read, 32))
    finally:
        os.close(read)


@pytest.mark.asyncio
@pytest.mark.usefixtures("loop_checked")
async def test_the_file_is_removed_only_while_it_is_still_ours(sock_path: str) -> None:
    async with serving(unix=[sock_path]):
        os.unlink(sock_path)  # a newer server takes the path over while this one runs
        newer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        newer.bind(sock_path)
        newer.listen(8)
        taken = os.lstat(sock_path).st_ino
    with newer:
        assert os.lstat(sock_path).st_ino == taken  # the stop left the newer one's file
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(sock_path)


@pytest.mark.asyncio
@pytest.mark.usefixtures("loop_checked")
async def test_a_failed_start_removes_the_file_it_made(sock_path: str, tmp_path: Path) -> None:
    in_use = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    in_use.bind(("127.0.0.1", 0))
    in_use.listen(1)
    with in_use:
        port = in_use.getsockname()[1]
        server = Server(unix=[sock_path], tcp=[f"127.0.0.1:{port}"], udp=[])
        with pytest.raises(ListenError, match="cannot listen on tcp"):
            await server.start()
    assert gone(sock_path)


# -- limits per source ----------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.usefixtures("loop_checked")
async def test_max_per_ip_counts_unix_peers_per_user(sock_path: str) -> None:
    """Every Unix peer of one user is one source: the second is refused, TCP is not."""
    async with serving(unix=[sock_path], tcp=["127.0.0.1:0"], max_per_ip=1) as server:
        reader, writer = await open_unix(sock_path)
        assert await read(reader, 8) == b"Welcome!"
        second, second_writer = await open_unix(sock_path)
        refusal = b"Error: too many connections from your address\n"
        assert await read(second, len(refusal)) == refusal
        tcp_reader, tcp_writer = await asyncio.open_connection(*server.address("tcp"))
        assert await read(tcp_reader, 8) == b"Welcome!"
        for each in (writer, second_writer, tcp_writer):
            each.close()


def test_limit_key_is_the_user_id() -> None:
    assert unix_module.limit_key(UnixAddress("", 10, 1000, 1000)) == "uid:1000"
    assert unix_module.limit_key(UnixAddress("/x")) == "unix"  # the system did not say
    assert unix_module.limit_key(None) == ""
