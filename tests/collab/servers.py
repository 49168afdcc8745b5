"""Running the collab server for tests: in this process, or as ``python -m
examples.collab``; and plain sockets that speak to it."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import trio

from examples.collab.server import CollabServer, Settings, serve
from nursery_procs._groups import unwrap_sole_exception

from .yclient import YClient, connect

__all__ = [
    "REPO",
    "TIMEOUT",
    "check_works",
    "closed_with",
    "http_get",
    "open_raw_websocket",
    "running",
    "server_process",
    "ws_url",
]

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 30


@asynccontextmanager
async def running(tmp_path: Path, **options: Any) -> AsyncIterator[CollabServer]:
    """An in-process server on a free port; stopped gracefully when the block ends."""
    options.setdefault("spare", 1)
    options.setdefault("linger", 0.2)
    settings = Settings(host="127.0.0.1", port=0, data_dir=tmp_path / "data", **options)
    with unwrap_sole_exception():
        async with trio.open_nursery() as nursery:
            server: CollabServer = await nursery.start(serve, settings)
            try:
                yield server
            finally:
                server.stop()


def ws_url(server: CollabServer | int, name: str, *, raw: bool = False) -> str:
    port = server if isinstance(server, int) else server.port
    return f"ws://127.0.0.1:{port}/doc/{name if raw else quote(name, safe='')}"


async def check_works(server: CollabServer, name: str = "probe") -> None:
    """A client can still open *name*, edit it, and a second client sees the edit."""
    token = f"<probe:{server.client_count}{len(name)}>"
    async with connect(ws_url(server, name)) as one:
        await one.synced.wait()
        await one.append(token)
        async with connect(ws_url(server, name)) as two:
            await two.wait_until(lambda: token in two.content())
            assert not one.closed.is_set()


async def closed_with(client: YClient) -> tuple[int | None, str | None]:
    await client.closed.wait()
    return client.close_code, client.close_reason


@asynccontextmanager
async def server_process(tmp_path: Path, *args: str) -> AsyncIterator[tuple[trio.Process, int]]:
    """``python -m examples.collab`` on a free port; yields the process and the port."""
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "examples.collab",
            "--port",
            "0",
            "--spare",
            "1",
            "--linger",
            "0.2",
            "--data-dir",
            str(tmp_path / "data"),
            *args,
        ],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    lines: list[str] = []
    try:
        assert process.stderr is not None
        buffer = b""
        port = None
        with trio.fail_after(TIMEOUT):
            while port is None:
                chunk = await process.stderr.receive_some()
                if not chunk:
                    raise AssertionError("the server exited:\n" + buffer.decode())
                buffer += chunk
                match = re.search(rb"serving on http://127\.0\.0\.1:(\d+)/", buffer)
                if match:
                    port = int(match.group(1))
        with unwrap_sole_exception():
            async with trio.open_nursery() as nursery:

                async def drain() -> None:
                    assert process.stderr is not None
                    while chunk := await process.stderr.receive_some():
                        lines.extend(chunk.decode(errors="replace").splitlines())

                nursery.start_soon(drain)
                yield process, port
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            assert process.stderr is not None
            await process.stderr.aclose()


async def http_get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        request = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        await stream.send_all(request.encode())
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


async def open_raw_websocket(port: int, path: str) -> tuple[trio.SocketStream, bytes]:
    """A WebSocket opened by hand, which will never read or answer anything: the
    stream and what arrived with the server's 101 response."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    )
    await stream.send_all(request.encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some()
        assert chunk, data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    return stream, rest
