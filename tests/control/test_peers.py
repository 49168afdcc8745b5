"""Who may talk to whom: the server's peer check (SO_PEERCRED), the folder and
path checks, and the command's check of the server's user; with real
processes of another user (``runuser -u nobody``)."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

import nursery_procs
from nursery_procs._control import open_control

from .conftest import CURL, cli, exists, parse_http, raw, serving

RUNUSER = shutil.which("runuser")
#: A Python that another user may run (the test's own may live in /root).
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")
as_root = pytest.mark.skipif(
    os.getuid() != 0 or RUNUSER is None, reason="needs root and runuser (util-linux)"
)

try:
    NOBODY = pwd.getpwnam("nobody").pw_uid
except KeyError:  # pragma: no cover - every Linux system has nobody
    NOBODY = 65534


def _give_to_nobody(path: str, mode: int) -> None:
    os.chown(path, NOBODY, -1)
    os.chmod(path, mode)


async def _as_nobody(*command: str) -> subprocess.CompletedProcess[bytes]:
    assert RUNUSER is not None
    return await trio.run_process(
        [RUNUSER, "-u", "nobody", "--", *command],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


# -- the server checks its peers ------------------------------------------------------


@as_root
async def test_a_client_of_another_user_is_refused(
    sock_dir: str, sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    os.chmod(sock_dir, 0o711)  # others may pass through, not list or write
    async with serving(sock_path):
        # The file's 0600 mode keeps nobody out first.
        denied = await _as_nobody(CURL, "-s", "--unix-socket", sock_path, "http://x/status")
        assert denied.returncode == 7  # curl: could not connect
        # Past the mode (a mistake, a chmod), the peer check still refuses.
        _give_to_nobody(sock_path, 0o600)
        with caplog.at_level(logging.WARNING, logger="nursery_procs.control"):
            refused = await _as_nobody(
                CURL, "-s", "-i", "--unix-socket", sock_path, "http://x/status"
            )
        answer = parse_http(refused.stdout)
        assert answer.status == 403
        assert f"uid {NOBODY} (nobody) may not use this control socket" in answer.body["error"]
        assert f"refused uid {NOBODY} (nobody)" in caplog.text
        # Its own user is served.
        ok = await raw(sock_path, b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert ok.status == 200


@as_root
async def test_allowed_users_are_served(sock_dir: str, sock_path: str) -> None:
    os.chmod(sock_dir, 0o711)
    async with serving(sock_path, allow_uids=[NOBODY]):
        _give_to_nobody(sock_path, 0o600)
        served = await _as_nobody(CURL, "-s", "-i", "--unix-socket", sock_path, "http://x/status")
        answer = parse_http(served.stdout)
        assert answer.status == 200
        assert answer.body["pid"] == os.getpid()


async def test_allow_uids_must_be_user_ids(sock_path: str) -> None:
    async with nursery_procs.open_supervisor() as sup:
        with pytest.raises(ValueError, match="allow_uids"):
            async with open_control(sup, sock_path, allow_uids=["root"]):  # type: ignore[list-item]
                pass  # pragma: no cover
    assert not exists(sock_path)


# -- the path and its folder -----------------------------------------------------------


async def test_a_symlink_at_the_path_is_refused_and_not_followed(sock_dir: str) -> None:
    target = os.path.join(sock_dir, "elsewhere.sock")
    link = os.path.join(sock_dir, "control.sock")
    os.symlink(target, link)
    async with nursery_procs.open_supervisor() as sup:
        with pytest.raises(FileExistsError, match="symbolic link") as caught:
            async with open_control(sup, link):
                pytest.fail("served through a symlink")  # pragma: no cover
    assert caught.value.filename == link
    assert os.readlink(link) == target  # left as it was
    assert not exists(target)  # and not followed
    assert sorted(os.listdir(sock_dir)) == ["control.sock"]


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        pytest.param(0o777, r"other users can write to it \(mode 0777\)", id="world-writable"),
        pytest.param(0o770, r"other users can write to it \(mode 0770\)", id="group-writable"),
        pytest.param(0o1777, r"sticky, but the socket must not go in it", id="sticky"),
    ],
)
async def test_a_folder_others_can_write_to_is_refused(sock_dir: str, mode: int, why: str) -> None:
    shared = os.path.join(sock_dir, "shared")
    os.mkdir(shared)
    os.chmod(shared, mode)
    async with nursery_procs.open_supervisor() as sup:
        with pytest.raises(PermissionError, match=why) as caught:
            async with open_control(sup, os.path.join(shared, "control.sock")):
                pytest.fail("served in a shared folder")  # pragma: no cover
    assert caught.value.filename == shared
    assert "folder of its own" in str(caught.value)
    assert os.listdir(shared) == []


async def test_a_private_folder_inside_a_sticky_one_is_fine(sock_dir: str) -> None:
    sticky = os.path.join(sock_dir, "tmp")
    os.mkdir(sticky)
    os.chmod(sticky, 0o1777)
    private = os.path.join(sticky, "myapp")
    os.mkdir(private, 0o700)
    async with serving(os.path.join(private, "control.sock")) as sup:
        assert sup.children == []
        assert os.listdir(private) == ["control.sock"]


async def test_a_folder_above_that_others_can_write_to_is_refused(sock_dir: str) -> None:
    shared = os.path.join(sock_dir, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o777)  # not sticky: others may rename "mine" away
    mine = os.path.join(shared, "mine")
    os.mkdir(mine, 0o700)
    async with nursery_procs.open_supervisor() as sup:
        with pytest.raises(PermissionError, match="mode 0777") as caught:
            async with open_control(sup, os.path.join(mine, "control.sock")):
                pytest.fail("served below a shared folder")  # pragma: no cover
    assert caught.value.filename == shared


@as_root
async def test_a_folder_of_another_user_is_refused(sock_dir: str) -> None:
    theirs = os.path.join(sock_dir, "theirs")
    os.mkdir(theirs)
    _give_to_nobody(theirs, 0o700)
    async with nursery_procs.open_supervisor() as sup:
        with pytest.raises(PermissionError, match=f"belongs to uid {NOBODY}"):
            async with open_control(sup, os.path.join(theirs, "control.sock")):
                pytest.fail("served in another user's folder")  # pragma: no cover
    assert os.listdir(theirs) == []


async def test_a_missing_folder_is_named(sock_dir: str) -> None:
    folder = os.path.join(sock_dir, "run", "myapp")
    async with nursery_procs.open_supervisor() as sup:
        with pytest.raises(FileNotFoundError, match="folder does not exist") as caught:
            async with open_control(sup, os.path.join(folder, "control.sock")):
                pytest.fail("served in no folder")  # pragma: no cover
    assert caught.value.filename == folder


@as_root
async def test_a_socket_of_another_user_at_the_path_is_refused(sock_path: str) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with sock:
        await sock.bind(sock_path)  # stale: nobody listens
        os.chown(sock_path, NOBODY, -1)
        inode = os.lstat(sock_path).st_ino
        async with nursery_procs.open_supervisor() as sup:
            with pytest.raises(nursery_procs.ControlSocketBusy, match=f"uid {NOBODY}"):
                async with open_control(sup, sock_path):
                    pytest.fail("took over another user's socket")  # pragma: no cover
        assert os.lstat(sock_path).st_ino == inode


# -- the command checks the server -------------------------------------------------------

IMPOSTOR = """
import socket, sys
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(sys.argv[1])
server.listen(1)
print("ready", flush=True)
conn, _ = server.accept()
received = b""
while chunk := conn.recv(65536):
    received += chunk
print(len(received), flush=True)
"""


async def _line(stream: trio.abc.ReceiveStream) -> bytes:
    """The next line (a process's prints arrive in one or more pieces)."""
    line = b""
    with trio.fail_after(20):
        while not line.endswith(b"\n"):
            chunk = await stream.receive_some(1)
            assert chunk, f"the impostor ended after {line!r}"
            line += chunk
    return line


@asynccontextmanager
async def impostor(path: str) -> AsyncIterator[trio.Process]:
    """A server run by nobody at *path*, which reports how many bytes it got."""
    assert RUNUSER is not None and SYSTEM_PYTHON is not None
    process = await trio.lowlevel.open_process(
        [RUNUSER, "-u", "nobody", "--", SYSTEM_PYTHON, "-c", IMPOSTOR, path],
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        assert await _line(process.stdout) == b"ready\n"
        yield process
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            assert process.stdout is not None
            await process.stdout.aclose()


@as_root
@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="needs a system python3")
async def test_the_command_refuses_a_server_of_another_user(sock_dir: str) -> None:
    os.chmod(sock_dir, 0o711)
    theirs = os.path.join(sock_dir, "theirs")
    os.mkdir(theirs)
    _give_to_nobody(theirs, 0o755)
    path = os.path.join(theirs, "control.sock")
    async with impostor(path) as process:
        refused = await cli("--socket", path, "status")
        assert refused.returncode == 8
        assert f"runs as uid {NOBODY} (nobody), not as uid 0 (root)" in refused.stderr.decode()
        assert b"nothing was sent to it" in refused.stderr
        assert process.stdout is not None
        assert await _line(process.stdout) == b"0\n"  # not one byte


async def test_the_command_expects_the_server_uid_it_is_given(sock_path: str) -> None:
    async with serving(sock_path):
        other = await cli("--socket", sock_path, "--server-uid", "4242", "status")
        assert other.returncode == 8
        assert b"not as uid 4242" in other.stderr
        mine = str(os.getuid())
        assert (await cli("--socket", sock_path, "--server-uid", mine, "status")).returncode == 0


@as_root
async def test_the_command_run_by_another_user_is_refused(sock_dir: str, sock_path: str) -> None:
    os.chmod(sock_dir, 0o711)
    assert SYSTEM_PYTHON is not None
    async with serving(sock_path):
        # The command as nobody: 0600 keeps it out, and it says so.
        code = "import sys; from nursery_procs._cli import main; sys.exit(main(sys.argv[1:]))"
        where = [os.path.dirname(os.path.dirname(m.__file__)) for m in (nursery_procs, trio)]
        done = await _as_nobody(
            "env",
            f"PYTHONPATH={os.pathsep.join(where)}",
            *(SYSTEM_PYTHON, "-c", code, "--socket", sock_path, "status"),
        )
        if b"No module named" in done.stderr:
            pytest.skip("nursery_procs is not importable by another user here")
        assert done.returncode == 7, done.stderr
        assert b"permission denied" in done.stderr
