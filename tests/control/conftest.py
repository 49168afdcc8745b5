"""Helpers shared by the control socket's tests: a short socket path, a served
supervisor, curl, raw HTTP, the blocking client and the command line."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import pytest
import trio

import nursery_procs
from nursery_procs import _control_client
from nursery_procs._control import open_control

CURL = shutil.which("curl") or "/usr/bin/curl"
needs_curl = pytest.mark.skipif(not os.path.exists(CURL), reason="curl is not installed")


@pytest.fixture
def sock_dir() -> Iterator[str]:
    """A short private directory (Unix socket paths are limited to 107 bytes)."""
    directory = tempfile.mkdtemp(prefix="npctl", dir="/tmp")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def sock_path(sock_dir: str) -> str:
    return os.path.join(sock_dir, "control.sock")


class Answer(NamedTuple):
    status: int
    headers: dict[str, str]
    body: Any


def parse_http(data: bytes) -> Answer:
    """Parse a raw HTTP/1.1 answer (skipping 1xx ones) with a JSON body."""
    while True:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if 100 <= status < 200:
            data = rest
            continue
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        if headers.get("content-type", "").startswith("application/json") and rest:
            return Answer(status, headers, json.loads(rest))
        return Answer(status, headers, rest.decode())


async def curl(path: str, target: str, *args: str) -> Answer:
    """``curl --unix-socket path http://localhost<target>`` with extra *args*."""
    result = await trio.run_process(
        [
            CURL,
            "-s",
            "-i",
            "--max-time",
            "20",
            "--unix-socket",
            path,
            *args,
            f"http://localhost{target}",
        ],
        capture_stdout=True,
        check=False,
    )
    assert result.returncode == 0, f"curl failed with {result.returncode}"
    return parse_http(result.stdout)


async def raw(path: str, data: bytes) -> Answer:
    """Send *data* as it is, read the answer until the server closes."""
    stream = await trio.open_unix_socket(path)
    async with stream:
        await stream.send_all(data)
        received = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                received += chunk
    return parse_http(received)


async def ask(path: str, method: str = "GET", target: str = "/status", body: Any = None) -> Any:
    """The blocking client in a thread, so that a server in this process can answer."""
    return await trio.to_thread.run_sync(
        functools.partial(_control_client.request, path, method, target, body, timeout=10)
    )


@asynccontextmanager
async def serving(path: str, **options: Any) -> AsyncIterator[nursery_procs.Supervisor]:
    """A supervisor with its control socket at *path*."""
    async with nursery_procs.open_supervisor() as sup, open_control(sup, path, **options):
        yield sup


async def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """``python -m nursery_procs ARGS`` in a process of its own."""
    return await trio.run_process(
        [sys.executable, "-m", "nursery_procs", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=env,
    )


def exists(path: str) -> bool:
    return os.path.lexists(path)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
