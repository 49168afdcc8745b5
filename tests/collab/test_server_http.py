"""The collab server's plain HTTP: the page, its files, and everything else refused."""

from __future__ import annotations

from pathlib import Path

import trio

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
