"""The socket file: created atomically, 0600, never stolen from a live server,
stale ones replaced, removed on exit only if still ours."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

import nursery_procs
from nursery_procs import ControlSocketBusy, _control_client
from nursery_procs._control import open_control, serve_control

from .conftest import ask, exists, read_bytes, serving, write_bytes


def _connect_when_it_appears(path: str, started: trio.Event, stop: threading.Event) -> str:
    """In a thread: spin until *path* exists, then connect and ask at once."""
    trio.from_thread.run_sync(started.set)
    while not os.path.exists(path):
        if stop.is_set():
            return "never appeared"
    try:
        status, _ = _control_client.request(path, "GET", "/status", timeout=10)
    except _control_client.ClientError as exc:
        return f"failed: {exc.message}"
    return f"status {status}"


async def _race(sup: nursery_procs.Supervisor, path: str) -> str:
    """Serve at *path* while a thread spins to connect the moment it appears."""
    stop = threading.Event()
    started, done = trio.Event(), trio.Event()
    outcome: list[str] = []

    async def watch() -> None:
        outcome.append(await trio.to_thread.run_sync(_connect_when_it_appears, path, started, stop))
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await started.wait()  # the thread is spinning
        try:
            async with open_control(sup, path):
                await done.wait()
        finally:
            stop.set()
    return outcome[0]


async def test_a_client_connecting_the_moment_the_file_appears_succeeds(sock_dir: str) -> None:
    async with nursery_procs.open_supervisor() as sup:
        for attempt in range(20):
            path = os.path.join(sock_dir, f"race{attempt}.sock")
            assert await _race(sup, path) == "status 200", f"attempt {attempt}"
            assert not exists(path)
        assert os.listdir(sock_dir) == []  # no temporary files left behind


HELPER = """
import sys, trio, nursery_procs
from nursery_procs._control import serve_control

async def main(path):
    async with nursery_procs.open_supervisor() as sup:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, sup, path)
            print("ready", flush=True)
            await trio.sleep_forever()

trio.run(main, sys.argv[1])
"""


@asynccontextmanager
async def helper_server(path: str) -> AsyncIterator[trio.Process]:
    """Another process serving a control socket at *path*; killed (if alive) on exit."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", HELPER, path], stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        seen = b""
        with trio.fail_after(20):
            while b"ready" not in seen:
                chunk = await process.stdout.receive_some(1024)
                assert chunk, "the helper exited before serving"
                seen += chunk
        yield process
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            assert process.stdout is not None
            await process.stdout.aclose()


async def test_a_live_socket_is_not_stolen_and_a_stale_one_is_replaced(sock_path: str) -> None:
    async with nursery_procs.open_supervisor() as sup, helper_server(sock_path) as helper:
        assert _control_client.request(sock_path, "GET", "/status")[1]["pid"] == helper.pid
        inode = os.stat(sock_path).st_ino

        with pytest.raises(ControlSocketBusy, match="in use") as caught:
            async with open_control(sup, sock_path):
                pytest.fail("served on a live server's socket")  # pragma: no cover
        assert caught.value.path == sock_path
        # Untouched, and the live server still answers.
        assert os.stat(sock_path).st_ino == inode
        assert _control_client.request(sock_path, "GET", "/status")[1]["pid"] == helper.pid
        assert sorted(os.listdir(os.path.dirname(sock_path))) == ["control.sock"]

        helper.send_signal(signal.SIGKILL)
        await helper.wait()
        # A stale file is left: it exists and refuses connections.
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
        with pytest.raises(_control_client.ClientError) as refused:
            _control_client.request(sock_path, "GET", "/status")
        assert refused.value.exit_code == _control_client.EXIT_STALE

        async with open_control(sup, sock_path):
            assert os.stat(sock_path).st_ino != inode
            assert (await ask(sock_path))[1]["pid"] == os.getpid()
        assert not exists(sock_path)


async def test_mode_0600_started_path_and_removal_on_exit(sock_path: str) -> None:
    async with nursery_procs.open_supervisor() as sup:
        async with trio.open_nursery() as nursery:
            started = await nursery.start(serve_control, sup, sock_path)
            assert started == sock_path
            st = os.lstat(sock_path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600
            assert st.st_uid == os.getuid()
            assert os.listdir(os.path.dirname(sock_path)) == ["control.sock"]
            nursery.cancel_scope.cancel()
        assert not exists(sock_path)

        # Removed on an error from the block too.
        with pytest.raises(KeyError):
            async with open_control(sup, sock_path):
                raise KeyError("boom")
        assert not exists(sock_path)


async def test_a_socket_replaced_by_another_server_is_left_alone(
    sock_path: str, sock_dir: str
) -> None:
    other = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with other:
        async with serving(sock_path):
            # Another server wins the path meanwhile (as when two start together).
            temp = os.path.join(sock_dir, "other.tmp")
            await other.bind(temp)
            other.listen(1)
            os.rename(temp, sock_path)
            theirs = os.lstat(sock_path).st_ino
        assert os.lstat(sock_path).st_ino == theirs
    os.unlink(sock_path)


async def test_two_servers_starting_together(sock_path: str) -> None:
    async with nursery_procs.open_supervisor() as sup:
        outcomes: list[str] = []
        both = trio.Event()

        def note(outcome: str) -> None:
            outcomes.append(outcome)
            if len(outcomes) == 2:
                both.set()

        async def one() -> None:
            try:
                async with open_control(sup, sock_path):
                    note("serving")
                    await trio.sleep_forever()
            except ControlSocketBusy:
                note("busy")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            nursery.start_soon(one)
            await both.wait()
            assert "serving" in outcomes
            # Whoever owns the path answers.
            assert (await ask(sock_path))[0] == 200
            nursery.cancel_scope.cancel()
        assert not exists(sock_path)


async def test_a_file_that_is_not_a_socket_is_not_replaced(sock_path: str) -> None:
    write_bytes(sock_path, b"precious")
    async with nursery_procs.open_supervisor() as sup:
        with pytest.raises(FileExistsError, match="not a socket"):
            async with open_control(sup, sock_path):
                pytest.fail("replaced a regular file")  # pragma: no cover
    assert read_bytes(sock_path) == b"precious"
    assert os.listdir(os.path.dirname(sock_path)) == ["control.sock"]


async def test_a_path_too_long_is_refused(sock_dir: str) -> None:
    async with nursery_procs.open_supervisor() as sup:
        with pytest.raises(ValueError, match="107 bytes"):
            async with open_control(sup, os.path.join(sock_dir, "x" * 120)):
                pass  # pragma: no cover
