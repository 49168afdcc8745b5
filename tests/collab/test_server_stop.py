"""Stopping the collab server: by signal (as a separate process), by ``stop()``, at
the drain's deadline; and its control socket."""

from __future__ import annotations

import signal
import stat
import sys
from pathlib import Path

import pytest
import trio

from examples.collab.clients import CLOSE_GOING_AWAY, REASON_SHUTDOWN
from examples.collab.server import CollabServer, Settings, serve

from .servers import (
    REPO,
    TIMEOUT,
    closed_with,
    open_raw_websocket,
    running,
    server_process,
    ws_url,
)
from .yclient import connect


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_graceful_stop(tmp_path: Path, signum: signal.Signals) -> None:
    with trio.fail_after(TIMEOUT):
        async with server_process(tmp_path) as (process, port):
            url = ws_url(port, "stay")
            async with connect(url) as one, connect(url) as two, connect(ws_url(port, "x")) as x:
                for client in (one, two, x):
                    await client.synced.wait()
                await one.append("<one:0>")
                await two.wait_until(lambda: "<one:0>" in two.content())
                process.send_signal(signum)
                for client in (one, two, x):
                    assert await closed_with(client) == (CLOSE_GOING_AWAY, REASON_SHUTDOWN)
                assert await process.wait() == 0

        # Saved on the way out: a new server has it.
        async with running(tmp_path) as server, connect(ws_url(server, "stay")) as again:
            await again.synced.wait()
            assert again.content() == "<one:0>"


async def test_stop_drops_what_is_left_at_the_deadline(tmp_path: Path) -> None:
    # A client that never answers the close frame would hold the server for the whole
    # close_timeout; the drain's deadline (shutdown_timeout) cuts it short.
    with trio.fail_after(TIMEOUT):
        async with running(tmp_path, shutdown_timeout=0.5, close_timeout=10 * TIMEOUT) as server:
            stream, _ = await open_raw_websocket(server.port, "/doc/stuck")
            await server.wait_until(lambda: server.clients_of("stuck") == 1)
        # The server has stopped (well within TIMEOUT) and dropped the connection, after
        # sending its close frame: 1001 and the reason.
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
        await stream.aclose()
        close_frame = b"\x88" + bytes([2 + len(REASON_SHUTDOWN)]) + b"\x03\xe9"
        assert close_frame + REASON_SHUTDOWN.encode() in data


async def test_cancelling_serve_stops_gracefully(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        settings = Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "data", spare=1)
        async with trio.open_nursery() as nursery:
            server: CollabServer = await nursery.start(serve, settings)
            async with (
                connect(ws_url(server, "kept")) as one,
                connect(ws_url(server, "kept")) as two,
            ):
                await one.synced.wait()
                await two.synced.wait()
                await one.append("<one:0>")
                await two.wait_until(lambda: "<one:0>" in two.content())
                ctx = server.documents()["kept"]
                nursery.cancel_scope.cancel()  # as open_signal_shutdown does on SIGTERM
                for client in (one, two):
                    assert await closed_with(client) == (CLOSE_GOING_AWAY, REASON_SHUTDOWN)
        # The document's child was shut down gracefully and saved it.
        assert ctx.returncode == 0
        assert (tmp_path / "data" / "kept.snapshot").is_file()


async def test_control_socket(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with trio.fail_after(TIMEOUT):
        async with running(tmp_path, control=path):
            assert stat.S_ISSOCK(path.stat().st_mode)
            stream = await trio.open_unix_socket(str(path))
            async with stream:
                await stream.send_all(
                    b"GET /pools HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                data = b""
                while chunk := await stream.receive_some():
                    data += chunk
            assert data.startswith(b"HTTP/1.1 200 ")
            assert b'"collab"' in data  # the server's pool of document children
        assert not path.exists()


@pytest.mark.parametrize("refused", ["port", "control"])
async def test_a_refused_start_is_one_line_and_exit_status_1(tmp_path: Path, refused: str) -> None:
    taken = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = taken[0].socket.getsockname()[1]
    args = ["--port", str(port)] if refused == "port" else ["--port", "0"]
    if refused == "control":
        args += ["--control", str(tmp_path / "control.sock")]  # pytest's tmp_path is 0700
        await trio.Path(tmp_path).chmod(0o777)
    try:
        with trio.fail_after(TIMEOUT):
            done = await trio.run_process(
                [sys.executable, "-m", "examples.collab", "--data-dir", str(tmp_path), *args],
                cwd=REPO,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    finally:
        for listener in taken:
            await listener.aclose()
    refusal = [line for line in done.stderr.decode().splitlines() if line.startswith("collab: ")]
    assert done.returncode == 1
    assert "Traceback" not in done.stderr.decode()
    expected = "address already in use" if refused == "port" else "other users can write to it"
    assert len(refusal) == 1 and expected in refusal[0].lower(), done.stderr.decode()
