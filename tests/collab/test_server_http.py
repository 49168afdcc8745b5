"""The collab server's plain HTTP: the page, its files, and everything else refused."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import trio

from examples.collab.front import MAX_HEAD_BYTES

from .servers import REPO, TIMEOUT, check_works, http_get, running


async def test_http(tmp_path: Path) -> None:
    static = REPO / "examples" / "collab" / "static"
    async with running(tmp_path) as server:
        with trio.fail_after(TIMEOUT):
            for path in ("/", "/d/notes", "/d/team%2Fnotes?user=Ann"):
                status, headers, body = await http_get(server.port, path)
                assert status == 200
                assert headers["content-type"] == "text/html; charset=utf-8"
                assert body == (static / "index.html").read_bytes()
            status, headers, body = await http_get(server.port, "/static/app.js")
            assert (status, headers["content-type"]) == (200, "text/javascript; charset=utf-8")
            assert body == (static / "app.js").read_bytes()
            status, headers, body = await http_get(server.port, "/static/style.css")
            assert (status, headers["content-type"]) == (200, "text/css; charset=utf-8")
            status, headers, body = await http_get(server.port, "/", method="HEAD")
            assert status == 200 and body == b""
            assert int(headers["content-length"]) == len((static / "index.html").read_bytes())

            for path in (
                "/nope",
                "/static/",
                "/static/../server.py",
                "/static/%2e%2e/server.py",
                "/static/..%2Fserver.py",
                "/../examples/collab/server.py",
                "/d/",
            ):
                status, _, body = await http_get(server.port, path)
                assert status == 404, path
                assert b"import" not in body
            status, headers, _ = await http_get(server.port, "/", method="POST")
            assert status == 405 and "GET" in headers["allow"]
            status, _, _ = await http_get(server.port, "/doc/notes")
            assert status == 426

            # Keep-alive: two requests on one connection.
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                one = b"GET /static/style.css HTTP/1.1\r\nHost: x\r\n\r\n"
                two = b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                await stream.send_all(one + two)
                data = b""
                while chunk := await stream.receive_some():
                    data += chunk
                assert data.startswith(b"HTTP/1.1 200 ")
                assert b"HTTP/1.1 404 " in data

            # Garbage instead of HTTP.
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                await stream.send_all(b"\x16\x03\x01 not http at all\r\n\r\n")
                data = b""
                while chunk := await stream.receive_some():
                    data += chunk
                assert data.startswith(b"HTTP/1.1 400 ")
            await check_works(server)


async def send_head(port: int, pad: int, piece: int | None) -> int:
    """Send a GET whose head is padded to about *pad* bytes, in one write or in pieces of
    *piece* bytes; return the response's status."""
    request = (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Pad: {'a' * pad}\r\n\r\n"
    ).encode()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError):
            if piece is None:
                await stream.send_all(request)
            else:
                for start in range(0, len(request), piece):
                    await stream.send_all(request[start : start + piece])
        data = b""
        with contextlib.suppress(trio.BrokenResourceError):
            while chunk := await stream.receive_some():
                data += chunk
    return int(data.split(b" ", 2)[1])


@pytest.mark.parametrize("piece", [None, 1000, 7])
async def test_the_head_limit_holds_however_the_bytes_arrive(
    tmp_path: Path, piece: int | None
) -> None:
    async with running(tmp_path) as server:
        with trio.fail_after(TIMEOUT):
            for size in (17_000, 24_000, 40_000, 65_000):
                if piece == 7 and size > 17_000:
                    continue  # byte by byte is slow: one size is enough
                assert await send_head(server.port, size, piece) == 431, (size, piece)
            # Just under the limit is fine, whole or in pieces.
            assert await send_head(server.port, MAX_HEAD_BYTES - 200, piece) == 200
            await check_works(server)
