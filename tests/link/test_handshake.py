"""The opening handshake: requests and answers, good and bad."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from nursery_procs._errors import HandshakeError
from nursery_procs._link import Link, accept_link, connect_link

from .peers import (
    BINARY,
    SAMPLE_ACCEPT,
    accept_for,
    frame,
    open_pair,
    raw_server_handshake,
    read_head,
    read_to_eof,
    switching_response,
    upgrade_request,
)


async def test_client_request_is_a_valid_upgrade(kind: str) -> None:
    async with open_pair(kind) as (ours, theirs):

        async def check_request() -> None:
            first, headers, rest = await read_head(theirs)
            assert first == b"GET /some/where?x=1 HTTP/1.1"
            assert headers["host"] == "h.example"
            assert headers["upgrade"].lower() == "websocket"
            assert "upgrade" in headers["connection"].lower()
            assert headers["sec-websocket-version"] == "13"
            assert len(base64.b64decode(headers["sec-websocket-key"], validate=True)) == 16
            assert rest == b""
            await theirs.send_all(switching_response(accept_for(headers["sec-websocket-key"])))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(check_request)
            link = await connect_link(ours, resource="/some/where?x=1", host="h.example")
        assert link.client
        await link.aclose()


async def test_server_answers_the_rfc_example_key(kind: str) -> None:
    async with open_pair(kind) as (ours, theirs):
        await theirs.send_all(upgrade_request(target="/path"))
        link, path = await accept_link(ours)
        assert path == "/path"
        assert not link.client
        first, headers, _ = await read_head(theirs)
        assert first.startswith(b"HTTP/1.1 101 ")
        assert headers["sec-websocket-accept"] == SAMPLE_ACCEPT
        assert headers["upgrade"].lower() == "websocket"
        assert "upgrade" in headers["connection"].lower()
        await link.aclose()


async def test_frame_in_the_same_write_as_the_request_is_kept(kind: str) -> None:
    async with open_pair(kind) as (ours, theirs):
        first = frame(BINARY, b"early bird", mask=True)
        await theirs.send_all(upgrade_request() + first + frame(BINARY, b"second", mask=True))
        link, _ = await accept_link(ours)
        assert await link.receive() == b"early bird"
        assert await link.receive() == b"second"
        await link.aclose()


async def test_frame_in_the_same_write_as_the_response_is_kept(kind: str) -> None:
    async with open_pair(kind) as (ours, theirs):
        early = frame(BINARY, b"early bird", mask=False) + frame(BINARY, b"second", mask=False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(raw_server_handshake, theirs, early)
            link = await connect_link(ours)
        assert await link.receive() == b"early bird"
        assert await link.receive() == b"second"
        await link.aclose()


@pytest.mark.parametrize(
    "raw_request",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", id="not-an-upgrade"),
        pytest.param(upgrade_request(version="8"), id="wrong-version"),
        pytest.param(upgrade_request(version=None), id="no-version"),
        pytest.param(upgrade_request(key=None), id="no-key"),
        pytest.param(upgrade_request(upgrade="h2c"), id="upgrade-to-something-else"),
        pytest.param(upgrade_request(connection="keep-alive"), id="no-connection-upgrade"),
        pytest.param(upgrade_request(method="POST"), id="post"),
    ],
)
async def test_bad_upgrade_request_is_refused_with_400(kind: str, raw_request: bytes) -> None:
    async with open_pair(kind) as (ours, theirs):
        await theirs.send_all(raw_request)
        with pytest.raises(HandshakeError):
            await accept_link(ours)
        reply = await read_to_eof(theirs)
        assert reply.startswith(b"HTTP/1.1 400 "), reply


async def test_garbage_instead_of_a_request_is_refused(kind: str) -> None:
    async with open_pair(kind) as (ours, theirs):
        await theirs.send_all(b"\x16\x03\x01\x02\x00 this is not HTTP\r\n\r\n")
        with pytest.raises(HandshakeError):
            await accept_link(ours)
        reply = await read_to_eof(theirs)
        assert not reply.startswith(b"HTTP/1.1 101")


async def test_stream_ending_during_the_request_is_a_handshake_error(kind: str) -> None:
    async with open_pair(kind) as (ours, theirs):
        await theirs.send_all(upgrade_request()[:30])
        await theirs.aclose()
        with pytest.raises(HandshakeError):
            await accept_link(ours)


async def _connect_against(
    kind: str, answer: Callable[[trio.abc.Stream, str], Awaitable[None]]
) -> HandshakeError | Link:
    """Run connect_link against a server that reads the request, then calls *answer*."""
    async with open_pair(kind) as (ours, theirs):

        async def serve() -> None:
            _, headers, _ = await read_head(theirs)
            await answer(theirs, headers["sec-websocket-key"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            try:
                link = await connect_link(ours)
            except HandshakeError as exc:
                return exc
        await link.aclose()
        return link


async def _send_200(stream: trio.abc.Stream, key: str) -> None:
    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


async def _send_400(stream: trio.abc.Stream, key: str) -> None:
    await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


async def _send_wrong_accept(stream: trio.abc.Stream, key: str) -> None:
    wrong = accept_for(base64.b64encode(b"another key, 16").decode())
    assert wrong != accept_for(key)
    await stream.send_all(switching_response(wrong))


async def _send_accept_of_raw_key(stream: trio.abc.Stream, key: str) -> None:
    # The SHA-1 of the key alone, without the GUID.
    await stream.send_all(
        switching_response(base64.b64encode(hashlib.sha1(key.encode()).digest()).decode())
    )


async def _send_no_accept(stream: trio.abc.Stream, key: str) -> None:
    await stream.send_all(switching_response(None))


async def _send_garbage(stream: trio.abc.Stream, key: str) -> None:
    await stream.send_all(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")


async def _hang_up(stream: trio.abc.Stream, key: str) -> None:
    await stream.aclose()


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(_send_200, id="200"),
        pytest.param(_send_400, id="400"),
        pytest.param(_send_wrong_accept, id="wrong-accept"),
        pytest.param(_send_accept_of_raw_key, id="accept-without-guid"),
        pytest.param(_send_no_accept, id="no-accept"),
        pytest.param(_send_garbage, id="not-http"),
        pytest.param(_hang_up, id="hang-up"),
    ],
)
async def test_bad_server_answer_is_a_handshake_error(
    kind: str, answer: Callable[[trio.abc.Stream, str], Awaitable[None]]
) -> None:
    assert isinstance(await _connect_against(kind, answer), HandshakeError)


async def _send_no_upgrade_header(stream: trio.abc.Stream, key: str) -> None:
    await stream.send_all(switching_response(accept_for(key), upgrade=None))


async def _send_upgrade_to_h2c(stream: trio.abc.Stream, key: str) -> None:
    await stream.send_all(switching_response(accept_for(key), upgrade="h2c"))


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(_send_no_upgrade_header, id="no-upgrade-header"),
        pytest.param(_send_upgrade_to_h2c, id="upgrade-h2c"),
    ],
)
async def test_101_not_upgrading_to_websocket_is_a_handshake_error(
    kind: str, answer: Callable[[trio.abc.Stream, str], Awaitable[None]]
) -> None:
    assert isinstance(await _connect_against(kind, answer), HandshakeError)


async def test_a_child_whose_parent_hangs_up_in_the_handshake_says_so_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from nursery_procs._runtime import serve_stream

    ours, theirs = trio.socket.socketpair()
    theirs.close()  # the parent gave the start up before answering
    assert await serve_stream(trio.SocketStream(ours)) == 1
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 1
    assert said[0].startswith("nursery_procs child: no link to the parent: stream broke")
