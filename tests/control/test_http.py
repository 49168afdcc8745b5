"""The HTTP server: keep-alive, malformed input, and the limits on what a client takes."""

from __future__ import annotations

import json
import os

import h11
import pytest
import trio
import trio.testing

import nursery_procs
from nursery_procs._pool import open_pool

from .conftest import curl, needs_curl, raw, serving, write_bytes


async def _exchange(stream: trio.SocketStream, conn: h11.Connection, target: str) -> int:
    """One GET on a kept-alive connection; the answer's status (its body is JSON)."""
    request = h11.Request(method="GET", target=target, headers=[("Host", "x")])
    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
    body = b""
    status = 0
    with trio.fail_after(10):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
    json.loads(body)
    conn.start_next_cycle()
    return status


async def test_keep_alive_serves_several_requests_on_one_connection(sock_path: str) -> None:
    async with serving(sock_path):
        stream = await trio.open_unix_socket(sock_path)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            for target in ("/status", "/pools", "/contexts"):
                assert await _exchange(stream, conn, target) == 200


async def test_malformed_requests_get_400_and_the_server_keeps_going(sock_path: str) -> None:
    async with serving(sock_path) as sup:
        child = await sup.start_child(None, name="survivor")
        garbage = await raw(sock_path, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
        assert garbage.status == 400
        assert "malformed HTTP request" in garbage.body["error"]

        bad_header = await raw(
            sock_path, b"GET /status HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n"
        )
        assert bad_header.status == 400
        assert "error" in bad_header.body

        bad_length = await raw(
            sock_path, b"PUT /pools/x HTTP/1.1\r\nHost: x\r\nContent-Length: many\r\n\r\n"
        )
        assert bad_length.status == 400

        huge = await raw(
            sock_path, b"GET /status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n"
        )
        assert huge.status == 431

        bad_escape = await raw(
            sock_path, b"GET /contexts/%ff%fe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert bad_escape.status == 400

        ok = await raw(sock_path, b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert ok.status == 200
        assert child.state is nursery_procs.State.READY


@needs_curl
async def test_bodies_over_the_limit_get_413(sock_path: str, sock_dir: str) -> None:
    async with serving(sock_path) as sup, open_pool(sup, None, name="worker", spare=0, max=2):
        big = os.path.join(sock_dir, "big.json")
        write_bytes(big, b" " * (70 * 1024) + b"{}")
        too_large = await curl(sock_path, "/pools/worker", "-X", "PUT", "--data-binary", f"@{big}")
        assert too_large.status == 413
        assert "65536" in too_large.body["error"]
        chunked = await curl(
            sock_path,
            "/pools/worker",
            "-X",
            "PUT",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            f"@{big}",
        )
        assert chunked.status == 413
        assert (await curl(sock_path, "/status")).status == 200


async def test_a_silent_client_is_disconnected(
    sock_path: str, autojump_clock: trio.testing.MockClock
) -> None:
    # The server is in this process, so its read timeout runs on the fake clock;
    # the sockets are real.
    async with serving(sock_path, read_timeout=0.3):
        for opening in (b"", b"GET /status HTTP/1.1\r\nHo"):
            stream = await trio.open_unix_socket(sock_path)
            async with stream:
                await stream.send_all(opening)
                with trio.fail_after(5):
                    assert await stream.receive_some(1024) == b""
        # A client dripping a byte now and then is cut off too: the whole request
        # must arrive within the timeout, not each byte.
        stream = await trio.open_unix_socket(sock_path)
        async with stream:
            start = trio.current_time()
            with trio.fail_after(5):
                try:
                    for byte in b"GET /status HTTP/1.1\r\nHost: xxxxxxxxxxxxxxxxxxxxxxxx":
                        await stream.send_all(bytes([byte]))
                        await trio.sleep(0.05)
                except trio.BrokenResourceError:
                    pass
                else:  # pragma: no cover - the server would have waited 2 s
                    pytest.fail("the server kept a dripping client")
            assert trio.current_time() - start < 1.0
        ok = await raw(sock_path, b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert ok.status == 200


async def test_connections_over_the_limit_get_503(sock_path: str) -> None:
    async with serving(sock_path, max_connections=1):
        held = await trio.open_unix_socket(sock_path)
        async with held:
            # Answered: the server holds this connection's slot now.
            assert await _exchange(held, h11.Connection(h11.CLIENT), "/status") == 200
            over = await raw(sock_path, b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
            assert over.status == 503
        # The server has seen the held connection close and freed its slot.
        await trio.testing.wait_all_tasks_blocked()
        ok = await raw(sock_path, b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert ok.status == 200
