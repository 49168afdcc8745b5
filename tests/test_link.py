"""The WebSocket link: interoperability with wsproto, protocol errors, handshakes."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
)

from nursery_procs._errors import HandshakeError, LinkClosed
from nursery_procs._link import Link, accept_link, connect_link
from nursery_procs._wire import DEFAULT_MAX_MESSAGE_SIZE

# Opcodes and codes are spelled out here rather than imported, so that the tests
# check the numbers on the wire against RFC 6455 and not against themselves.
CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# The example handshake of RFC 6455 section 1.3.
SAMPLE_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
SAMPLE_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

SIZES = [0, 1, 125, 126, 65535, 65536, 1 << 20]
# Generous bound for tests that must not hang; nothing waits for it to pass.
GUARD = 10


# -- streams -----------------------------------------------------------------


@asynccontextmanager
async def open_pair(kind: str) -> AsyncIterator[tuple[trio.abc.Stream, trio.abc.Stream]]:
    """Two connected byte streams: a real socketpair or Trio's in-memory pair."""
    left: trio.abc.Stream
    right: trio.abc.Stream
    if kind == "socket":
        a, b = socket.socketpair()
        left = trio.SocketStream(trio.socket.from_stdlib_socket(a))
        right = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    else:
        left, right = trio.testing.memory_stream_pair()
    try:
        yield left, right
    finally:
        # Shielded so that both are closed even when the test was cancelled.
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(left)
            await trio.aclose_forcefully(right)


@pytest.fixture(params=["socket", "memory"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["client", "server"])
def our_role(request: pytest.FixtureRequest) -> str:
    """Which side of the connection is ours; the other side is the test's peer."""
    return str(request.param)


async def read_to_eof(stream: trio.abc.Stream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data += chunk
    return bytes(data)


def digest(messages: list[bytes]) -> list[tuple[int, str]]:
    """Sizes and hashes: equal iff the messages are, and short in a failure report."""
    return [(len(m), hashlib.sha256(m).hexdigest()[:16]) for m in messages]


def pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# -- raw frames --------------------------------------------------------------


def xor_mask(data: bytes, key: bytes) -> bytes:
    if not data:
        return b""
    repeated = (key * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(data), "big"
    )


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    mask: bool,
    fin: bool = True,
    rsv: int = 0,
    length: int | None = None,
) -> bytes:
    """One frame built by hand; *length* overrides the declared payload length."""
    declared = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | rsv | opcode
    mask_bit = 0x80 if mask else 0
    if declared < 126:
        head = bytes((b0, mask_bit | declared))
    elif declared < 65536:
        head = bytes((b0, mask_bit | 126)) + struct.pack("!H", declared)
    else:
        head = bytes((b0, mask_bit | 127)) + struct.pack("!Q", declared)
    if mask:
        key = os.urandom(4)
        return head + key + xor_mask(payload, key)
    return head + payload


@dataclass
class RawFrame:
    fin: bool
    rsv: int
    opcode: int
    masked: bool
    payload: bytes

    def close_code_and_reason(self) -> tuple[int, str]:
        assert self.opcode == CLOSE
        assert len(self.payload) >= 2, self.payload
        return struct.unpack("!H", self.payload[:2])[0], self.payload[2:].decode("utf-8")


def parse_frames(data: bytes) -> list[RawFrame]:
    frames = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 2, f"truncated frame header: {data[pos:]!r}"
        b0, b1 = data[pos], data[pos + 1]
        pos += 2
        length = b1 & 0x7F
        if length == 126:
            (length,) = struct.unpack_from("!H", data, pos)
            pos += 2
        elif length == 127:
            (length,) = struct.unpack_from("!Q", data, pos)
            pos += 8
        key = b""
        if b1 & 0x80:
            key = data[pos : pos + 4]
            pos += 4
        payload = data[pos : pos + length]
        assert len(payload) == length, "truncated frame payload"
        pos += length
        if key:
            payload = xor_mask(payload, key)
        frames.append(RawFrame(bool(b0 & 0x80), b0 & 0x70, b0 & 0x0F, bool(key), payload))
    return frames


# -- raw handshakes ----------------------------------------------------------


def upgrade_request(
    *,
    method: str = "GET",
    target: str = "/",
    key: str | None = SAMPLE_KEY,
    version: str | None = "13",
    upgrade: str | None = "websocket",
    connection: str | None = "Upgrade",
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost"]
    for name, value in (
        ("Upgrade", upgrade),
        ("Connection", connection),
        ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", version),
    ):
        if value is not None:
            lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


async def read_head(stream: trio.abc.Stream) -> tuple[bytes, dict[str, str], bytes]:
    """Read an HTTP head: its first line, its headers (lower-cased names), what followed."""
    data = bytearray()
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        assert chunk, f"stream ended inside an HTTP head: {bytes(data)!r}"
        data += chunk
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    first, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return first, headers, rest


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


def switching_response(accept: str | None, *, upgrade: str | None = "websocket") -> bytes:
    lines = ["HTTP/1.1 101 Switching Protocols", "Connection: Upgrade"]
    if upgrade is not None:
        lines.append(f"Upgrade: {upgrade}")
    if accept is not None:
        lines.append(f"Sec-WebSocket-Accept: {accept}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


async def raw_server_handshake(stream: trio.abc.Stream, after: bytes = b"") -> None:
    """Answer a client's upgrade correctly by hand, then send *after* in the same write."""
    first, headers, rest = await read_head(stream)
    assert first == b"GET / HTTP/1.1"
    assert rest == b""
    await stream.send_all(switching_response(accept_for(headers["sec-websocket-key"])) + after)


@asynccontextmanager
async def open_raw(
    kind: str, our_role: str, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
) -> AsyncIterator[tuple[Link, trio.abc.Stream]]:
    """Our link, past a valid handshake, facing a peer that the test drives byte by byte."""
    async with open_pair(kind) as (ours, theirs):
        if our_role == "server":
            await theirs.send_all(upgrade_request())
            link, path = await accept_link(ours, max_message_size=max_message_size)
            assert path == "/"
            first, headers, rest = await read_head(theirs)
            assert first.startswith(b"HTTP/1.1 101 ")
            assert headers["sec-websocket-accept"] == SAMPLE_ACCEPT
            assert rest == b""
        else:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(raw_server_handshake, theirs)
                link = await connect_link(ours, max_message_size=max_message_size)
        try:
            yield link, theirs
        finally:
            await link.aclose()


# -- a wsproto peer ----------------------------------------------------------


class WsPeer:
    """An independent WebSocket endpoint: wsproto driven over a Trio stream."""

    def __init__(self, stream: trio.abc.Stream, role: ConnectionType) -> None:
        self.stream = stream
        self.ws = WSConnection(role)
        self._pending: deque[Event] = deque()

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def next_event(self) -> Event:
        while not self._pending:
            data = await self.stream.receive_some(65536)
            assert data, "the stream ended while wsproto waited for an event"
            self.ws.receive_data(data)
            self._pending.extend(self.ws.events())
        return self._pending.popleft()

    async def receive_message(self) -> bytes:
        parts = []
        while True:
            event = await self.next_event()
            assert isinstance(event, BytesMessage), event
            parts.append(bytes(event.data))
            if event.message_finished:
                return b"".join(parts)

    async def assert_eof(self) -> None:
        assert await self.stream.receive_some(1) == b""


@asynccontextmanager
async def open_interop(
    kind: str, our_role: str, *, resource: str = "/chat?room=1"
) -> AsyncIterator[tuple[Link, WsPeer]]:
    """Our link connected to wsproto, which plays the other role."""
    async with open_pair(kind) as (ours, theirs):
        if our_role == "server":
            peer = WsPeer(theirs, ConnectionType.CLIENT)
            await peer.send(Request(host="localhost", target=resource))
            link, path = await accept_link(ours)
            assert path == resource
            assert isinstance(await peer.next_event(), AcceptConnection)
        else:
            peer = WsPeer(theirs, ConnectionType.SERVER)

            async def serve() -> None:
                event = await peer.next_event()
                assert isinstance(event, Request), event
                assert event.target == resource
                assert event.host == "example.test"
                await peer.send(AcceptConnection())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                link = await connect_link(ours, resource=resource, host="example.test")
        assert peer.ws.state is ConnectionState.OPEN
        try:
            yield link, peer
        finally:
            await link.aclose()


# -- interoperability with wsproto -------------------------------------------


async def test_messages_of_every_size_both_ways(kind: str, our_role: str) -> None:
    outgoing = [pattern(n, n) for n in SIZES]
    incoming = [pattern(n, n + 1) for n in SIZES]
    async with open_interop(kind, our_role) as (link, peer):
        received_by_peer: list[bytes] = []

        async def send_ours() -> None:
            for message in outgoing:
                await link.send(message)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_ours)
            for _ in outgoing:
                received_by_peer.append(await peer.receive_message())
        assert digest(received_by_peer) == digest(outgoing)

        async def send_theirs() -> None:
            for message in incoming:
                await peer.send(BytesMessage(data=message))

        received: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_theirs)
            for _ in incoming:
                received.append(await link.receive())
        assert digest(received) == digest(incoming)
        assert all(type(m) is bytes for m in received)
        assert (link.messages_sent, link.messages_received) == (len(SIZES), len(SIZES))
        assert link.bytes_sent == link.bytes_received == sum(SIZES)


async def test_message_in_several_parts_arrives_as_one(kind: str, our_role: str) -> None:
    parts = [b"head:", pattern(100_000, 1), b"", pattern(70_000, 2), b":tail"]
    async with open_interop(kind, our_role) as (link, peer):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.send, *parts)
            got = await peer.receive_message()
        assert digest([got]) == digest([b"".join(parts)])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.send, b"a", b"b", b"c")
            assert await peer.receive_message() == b"abc"


async def test_our_close_code_and_reason_reach_wsproto(kind: str, our_role: str) -> None:
    async with open_interop(kind, our_role) as (link, peer):
        await link.aclose(1001, "bye")
        event = await peer.next_event()
        assert isinstance(event, CloseConnection)
        assert (event.code, event.reason) == (1001, "bye")
        await peer.assert_eof()
        assert (link.close_code, link.close_reason) == (1001, "bye")


async def test_long_ascii_close_reason_is_cut_to_fit_a_control_frame(
    kind: str, our_role: str
) -> None:
    async with open_interop(kind, our_role) as (link, peer):
        await link.aclose(1000, "x" * 300)
        event = await peer.next_event()
        assert isinstance(event, CloseConnection)
        assert (event.code, event.reason) == (1000, "x" * 123)


@pytest.mark.parametrize("code", [1000, 1001, 1011, 4000])
async def test_wsproto_close_reaches_us_and_is_answered(
    kind: str, our_role: str, code: int
) -> None:
    async with open_interop(kind, our_role) as (link, peer):
        await peer.send(CloseConnection(code=code, reason="done"))
        with pytest.raises(LinkClosed) as info:
            await link.receive()
        assert (info.value.code, info.value.reason) == (code, "done")
        assert link.closed
        event = await peer.next_event()
        assert isinstance(event, CloseConnection)
        assert event.code == code
        assert peer.ws.state is ConnectionState.CLOSED
        await peer.assert_eof()
        with pytest.raises(LinkClosed) as info:
            await link.send(b"late")
        assert info.value.code == code


async def test_fragmented_message_from_wsproto_is_reassembled(kind: str, our_role: str) -> None:
    parts = [b"alpha-", b"", b"beta-" * 1000, pattern(100_000, 3), b"-omega"]
    async with open_interop(kind, our_role) as (link, peer):

        async def send_fragments() -> None:
            for i, part in enumerate(parts):
                await peer.send(BytesMessage(data=part, message_finished=i == len(parts) - 1))
                if i == 1:
                    # Control frames may come between the frames of a message.
                    await peer.send(Ping(payload=b"between"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_fragments)
            got = await link.receive()
        assert digest([got]) == digest([b"".join(parts)])
        event = await peer.next_event()
        assert isinstance(event, Pong)
        assert event.payload == b"between"
        await peer.send(BytesMessage(data=b"next"))
        assert await link.receive() == b"next"


async def test_wsproto_ping_gets_a_pong(kind: str, our_role: str) -> None:
    async with open_interop(kind, our_role) as (link, peer):
        for payload in (b"", b"are you there?", bytes(range(125))):
            await peer.send(Ping(payload=payload))
            await peer.send(BytesMessage(data=b"after " + payload))
            assert await link.receive() == b"after " + payload
            event = await peer.next_event()
            assert isinstance(event, Pong)
            assert event.payload == payload


async def test_unsolicited_pong_is_ignored(kind: str, our_role: str) -> None:
    async with open_interop(kind, our_role) as (link, peer):
        await peer.send(Pong(payload=b"unasked"))
        await peer.send(BytesMessage(data=b"payload"))
        assert await link.receive() == b"payload"


# -- handshakes --------------------------------------------------------------


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


# -- protocol violations -----------------------------------------------------

FrameBuilder = Callable[[bool], bytes]

BAD_FRAMES = [
    pytest.param(lambda m: frame(BINARY, b"x", rsv=0x40, mask=m), (1002,), id="rsv1"),
    pytest.param(lambda m: frame(BINARY, b"x", rsv=0x20, mask=m), (1002,), id="rsv2"),
    pytest.param(lambda m: frame(BINARY, b"x", rsv=0x10, mask=m), (1002,), id="rsv3"),
    pytest.param(lambda m: frame(PING, b"x", rsv=0x40, mask=m), (1002,), id="rsv1-on-ping"),
    pytest.param(lambda m: frame(BINARY, b"x", mask=not m), (1002,), id="wrong-masking"),
    pytest.param(lambda m: frame(0x3, b"x", mask=m), (1002,), id="opcode-0x3"),
    pytest.param(lambda m: frame(0x7, b"x", mask=m), (1002,), id="opcode-0x7"),
    pytest.param(lambda m: frame(0xB, b"x", mask=m), (1002,), id="opcode-0xb"),
    pytest.param(lambda m: frame(0xF, b"", mask=m), (1002,), id="opcode-0xf"),
    pytest.param(lambda m: frame(TEXT, b"hello", mask=m), (1003,), id="text"),
    pytest.param(
        lambda m: frame(TEXT, b"he", fin=False, mask=m) + frame(CONT, b"llo", mask=m),
        (1003,),
        id="fragmented-text",
    ),
    # The payload is never sent: our side must judge by the header alone.
    pytest.param(lambda m: frame(BINARY, length=2**40, mask=m), (1009,), id="too-big"),
    pytest.param(lambda m: frame(BINARY, length=2**63, mask=m), (1002,), id="length-top-bit-set"),
    pytest.param(lambda m: frame(PING, b"p" * 126, mask=m), (1002,), id="ping-over-125"),
    pytest.param(lambda m: frame(CLOSE, b"\x03\xe8" + b"r" * 124, mask=m), (1002,), id="close-126"),
    pytest.param(lambda m: frame(PONG, b"p" * 200, mask=m), (1002,), id="pong-over-125"),
    pytest.param(lambda m: frame(PING, b"p", fin=False, mask=m), (1002,), id="fragmented-ping"),
    pytest.param(
        lambda m: frame(CLOSE, b"\x03\xe8", fin=False, mask=m), (1002,), id="fragmented-close"
    ),
    pytest.param(lambda m: frame(CONT, b"orphan", mask=m), (1002,), id="continuation-first"),
    pytest.param(
        lambda m: frame(BINARY, b"a", fin=False, mask=m) + frame(BINARY, b"b", mask=m),
        (1002,),
        id="new-message-inside-fragmented",
    ),
    pytest.param(lambda m: frame(CLOSE, b"\x03", mask=m), (1002,), id="close-1-byte"),
    pytest.param(
        lambda m: frame(CLOSE, b"\x03\xe8\xff\xfe", mask=m), (1002, 1007), id="close-reason-utf8"
    ),
]


@pytest.mark.parametrize(("build", "codes"), BAD_FRAMES)
async def test_protocol_violation_is_answered_with_its_close_code(
    kind: str, our_role: str, build: FrameBuilder, codes: tuple[int, ...]
) -> None:
    peer_masks = our_role == "server"
    with trio.fail_after(GUARD):
        async with open_raw(kind, our_role) as (link, peer):
            await peer.send_all(build(peer_masks))
            with pytest.raises(LinkClosed) as info:
                await link.receive()
            code = info.value.code
            assert code in codes
            assert link.close_code == code
            # What our side sent back, as the peer reads it.
            sent = parse_frames(await read_to_eof(peer))
            assert [f.opcode for f in sent] == [CLOSE]
            assert sent[0].fin
            assert sent[0].rsv == 0
            assert sent[0].masked == (our_role == "client")
            sent_code, sent_reason = sent[0].close_code_and_reason()
            assert sent_code == code
            assert sent_reason == info.value.reason[:123]
            with pytest.raises(LinkClosed) as again:
                await link.receive()
            assert again.value.code == code
            with pytest.raises(LinkClosed):
                await link.send(b"after the violation")


@pytest.mark.parametrize(
    ("opcode", "code"), [(TEXT, 1003), (CONT, 1002)], ids=["text", "orphan-continuation"]
)
async def test_message_before_the_violation_is_delivered(
    kind: str, our_role: str, opcode: int, code: int
) -> None:
    mask = our_role == "server"
    async with open_raw(kind, our_role) as (link, peer):
        await peer.send_all(frame(BINARY, b"fine", mask=mask) + frame(opcode, b"bad", mask=mask))
        assert await link.receive() == b"fine"
        with pytest.raises(LinkClosed) as info:
            await link.receive()
        assert info.value.code == code
        sent = parse_frames(await read_to_eof(peer))
        assert [f.close_code_and_reason()[0] for f in sent] == [code]


@pytest.mark.parametrize("size", [999, 1000])
async def test_message_up_to_the_limit_is_accepted(kind: str, our_role: str, size: int) -> None:
    mask = our_role == "server"
    async with open_raw(kind, our_role, max_message_size=1000) as (link, peer):
        payload = pattern(size, size)
        await peer.send_all(frame(BINARY, payload, mask=mask))
        assert await link.receive() == payload
        half = size // 2
        await peer.send_all(
            frame(BINARY, payload[:half], fin=False, mask=mask)
            + frame(CONT, payload[half:], mask=mask)
        )
        assert await link.receive() == payload


@pytest.mark.parametrize(
    "fragments",
    [[1001], [600, 401], [500, 0, 500, 1], [1, 1, 1, 998]],
    ids=["single", "two", "four-with-empty", "small-then-big"],
)
async def test_message_over_the_limit_closes_with_1009(
    kind: str, our_role: str, fragments: list[int]
) -> None:
    mask = our_role == "server"
    with trio.fail_after(GUARD):
        async with open_raw(kind, our_role, max_message_size=1000) as (link, peer):
            data = b"".join(
                frame(BINARY if i == 0 else CONT, bytes(n), fin=i == len(fragments) - 1, mask=mask)
                for i, n in enumerate(fragments)
            )
            await peer.send_all(data)
            with pytest.raises(LinkClosed) as info:
                await link.receive()
            assert info.value.code == 1009
            sent = parse_frames(await read_to_eof(peer))
            assert [f.close_code_and_reason()[0] for f in sent] == [1009]


async def test_close_frame_from_peer_is_echoed(kind: str, our_role: str) -> None:
    mask = our_role == "server"
    async with open_raw(kind, our_role) as (link, peer):
        await peer.send_all(
            frame(CLOSE, struct.pack("!H", 1001) + "au revoir é".encode(), mask=mask)
        )
        with pytest.raises(LinkClosed) as info:
            await link.receive()
        assert (info.value.code, info.value.reason) == (1001, "au revoir é")
        sent = parse_frames(await read_to_eof(peer))
        assert len(sent) == 1
        assert sent[0].masked == (our_role == "client")
        assert sent[0].close_code_and_reason()[0] == 1001


async def test_empty_close_frame_means_1005_and_is_echoed_empty(kind: str, our_role: str) -> None:
    mask = our_role == "server"
    async with open_raw(kind, our_role) as (link, peer):
        await peer.send_all(frame(CLOSE, b"", mask=mask))
        with pytest.raises(LinkClosed) as info:
            await link.receive()
        assert info.value.code == 1005
        sent = parse_frames(await read_to_eof(peer))
        assert [(f.opcode, f.payload) for f in sent] == [(CLOSE, b"")]


@pytest.mark.parametrize("bad_code", [0, 999, 1005, 1006, 1015, 5000])
async def test_invalid_close_code_from_peer_is_a_protocol_error(
    kind: str, our_role: str, bad_code: int
) -> None:
    mask = our_role == "server"
    async with open_raw(kind, our_role) as (link, peer):
        await peer.send_all(frame(CLOSE, struct.pack("!H", bad_code), mask=mask))
        with pytest.raises(LinkClosed) as info:
            await link.receive()
        assert info.value.code == 1002


async def test_long_non_ascii_close_reason_stays_valid_utf8(kind: str, our_role: str) -> None:
    reason = "é" * 100  # 200 bytes in UTF-8
    async with open_raw(kind, our_role) as (link, peer):
        await link.aclose(1000, reason)
        sent = parse_frames(await read_to_eof(peer))
        assert len(sent) == 1
        assert len(sent[0].payload) <= 125
        code, text = sent[0].close_code_and_reason()  # UnicodeDecodeError today
        assert code == 1000
        assert reason.startswith(text)


@pytest.mark.parametrize("cut", [1, 3, 7, 12, 20], ids=lambda c: f"cut-at-{c}")
async def test_eof_in_the_middle_of_a_frame_is_1006(kind: str, our_role: str, cut: int) -> None:
    mask = our_role == "server"
    # 300 bytes: a 16-bit length, so cuts fall in the header, the length, the key, the payload.
    whole = frame(BINARY, bytes(300), mask=mask)
    async with open_raw(kind, our_role) as (link, peer):
        await peer.send_all(whole[:cut])
        await peer.aclose()
        with pytest.raises(LinkClosed) as info:
            await link.receive()
        assert info.value.code == 1006
        assert link.close_code == 1006
        with pytest.raises(LinkClosed) as info:
            await link.send(b"x")
        assert info.value.code == 1006


async def test_eof_between_frames_is_1006(kind: str, our_role: str) -> None:
    mask = our_role == "server"
    async with open_raw(kind, our_role) as (link, peer):
        await peer.send_all(frame(BINARY, b"last words", mask=mask))
        await peer.aclose()
        assert await link.receive() == b"last words"
        with pytest.raises(LinkClosed) as info:
            await link.receive()
        assert info.value.code == 1006


# -- closing -----------------------------------------------------------------


async def test_aclose_is_idempotent_and_send_after_it_fails(kind: str, our_role: str) -> None:
    async with open_raw(kind, our_role) as (link, peer):
        await link.aclose(1000, "done")
        await link.aclose(1001, "again")
        await link.aclose()
        assert (link.close_code, link.close_reason) == (1000, "done")
        with pytest.raises(LinkClosed) as info:
            await link.send(b"too late")
        assert (info.value.code, info.value.reason) == (1000, "done")
        with pytest.raises(LinkClosed) as info:
            await link.receive()
        assert info.value.code == 1000
        sent = parse_frames(await read_to_eof(peer))
        assert len(sent) == 1, "exactly one close frame"
        assert sent[0].masked == (our_role == "client")
        assert sent[0].close_code_and_reason() == (1000, "done")


async def test_aclose_wakes_a_task_blocked_in_receive(kind: str, our_role: str) -> None:
    async with open_raw(kind, our_role) as (link, peer):
        outcome: list[int] = []

        async def receiver() -> None:
            with pytest.raises(LinkClosed) as info:
                await link.receive()
            outcome.append(info.value.code)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            await link.aclose(1001, "shutting down")
        assert outcome == [1001]
        sent = parse_frames(await read_to_eof(peer))
        assert [f.close_code_and_reason() for f in sent] == [(1001, "shutting down")]


async def test_peer_vanishing_makes_send_fail_with_1006(our_role: str) -> None:
    async with open_raw("socket", our_role) as (link, peer):
        await peer.aclose()
        with pytest.raises(LinkClosed) as info:
            # The kernel may accept a first write; a message bigger than any
            # socket buffer cannot be accepted whole.
            for _ in range(3):
                await link.send(bytes(8 << 20))
        assert info.value.code == 1006
        assert link.close_code == 1006


async def test_cancelled_half_written_send_closes_the_link(our_role: str) -> None:
    async with open_raw("socket", our_role) as (link, _peer):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.send, bytes(16 << 20))
            # Nobody reads, so the send fills the socket buffers and blocks.
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert link.close_code == 1006
        with pytest.raises(LinkClosed) as info:
            await link.send(b"x")
        assert info.value.code == 1006


async def test_send_cancelled_before_writing_leaves_the_link_open(our_role: str) -> None:
    async with open_raw("socket", our_role) as (link, peer):
        with trio.CancelScope() as scope:
            scope.cancel()
            await link.send(b"never sent")
        assert scope.cancelled_caught
        assert link.close_code is None
        await link.send(b"sent")
        await link.aclose()
        sent = parse_frames(await read_to_eof(peer))
        assert [f.payload for f in sent if f.opcode == BINARY] == [b"sent"]


async def test_nothing_is_written_after_a_half_written_frame(our_role: str) -> None:
    size = 16 << 20
    async with open_raw("socket", our_role) as (link, peer):
        received: list[bytes] = []

        async def drain() -> None:
            received.append(await read_to_eof(peer))

        async def keep_receiving() -> None:
            with pytest.raises(LinkClosed):
                while True:
                    await link.receive()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_receiving)
            async with trio.open_nursery() as senders:
                senders.start_soon(link.send, bytes(size))
                await trio.testing.wait_all_tasks_blocked()
                senders.cancel_scope.cancel()
            assert link.close_code == 1006
            await peer.send_all(frame(PING, b"\xff" * 8, mask=our_role == "server"))
            nursery.start_soon(drain)
            await trio.testing.wait_all_tasks_blocked()
            await link.aclose()
        data = received[0]
        header = 14 if our_role == "client" else 10
        assert data[1] & 0x7F == 127
        assert struct.unpack_from("!Q", data, 2)[0] == size
        body = data[header:]
        if our_role == "client":
            body = xor_mask(body, data[10:14])
        assert 0 < len(body) < size
        assert body.count(0) == len(body), "only the zero payload of the cut frame was sent"


# -- concurrency and properties ----------------------------------------------


SENDERS = 20
PER_SENDER = 50
TAG = struct.Struct("!III")


def tagged(task: int, seq: int) -> bytes:
    size = 70_000 if seq % 10 == 3 else (task * 37 + seq * 11) % 300
    return TAG.pack(task, seq, size) + pattern(size, task * 1000 + seq)


@pytest.mark.parametrize("sender_role", ["client", "server"])
async def test_concurrent_senders_never_interleave_frames(kind: str, sender_role: str) -> None:
    async with open_pair(kind) as (a, b):
        links: dict[str, Link] = {}

        async def connect() -> None:
            links["client"] = await connect_link(a)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(connect)
            links["server"], _ = await accept_link(b)
        sender = links[sender_role]
        receiver = links["server" if sender_role == "client" else "client"]

        async def send_all_of(task: int) -> None:
            for seq in range(PER_SENDER):
                await sender.send(tagged(task, seq))

        next_seq = [0] * SENDERS
        async with trio.open_nursery() as nursery:
            for task in range(SENDERS):
                nursery.start_soon(send_all_of, task)
            for _ in range(SENDERS * PER_SENDER):
                message = await receiver.receive()
                task, seq, size = TAG.unpack_from(message)
                assert seq == next_seq[task], "one task's messages arrive in order"
                next_seq[task] += 1
                assert message == tagged(task, seq), "the message arrives whole"
                assert len(message) == TAG.size + size
        assert next_seq == [PER_SENDER] * SENDERS
        assert sender.messages_sent == receiver.messages_received == SENDERS * PER_SENDER
        await sender.aclose()
        with pytest.raises(LinkClosed) as info:
            await receiver.receive()
        assert info.value.code == 1000
        await receiver.aclose()


payloads = st.lists(
    st.one_of(
        st.binary(max_size=300),
        st.builds(pattern, st.integers(min_value=0, max_value=70_000), st.integers(0, 2**16)),
    ),
    max_size=10,
)


@settings(max_examples=50, deadline=None, database=None)
@given(up=payloads, down=payloads)
def test_random_payloads_arrive_intact_and_in_order(up: list[bytes], down: list[bytes]) -> None:
    async def main() -> None:
        a, b = trio.testing.memory_stream_pair()
        links: dict[str, Link] = {}

        async def connect() -> None:
            links["client"] = await connect_link(a)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(connect)
            links["server"], _ = await accept_link(b)
        client, server = links["client"], links["server"]

        async def send(link: Link, messages: list[bytes]) -> None:
            for message in messages:
                await link.send(message)

        async def receive(link: Link, count: int, into: list[bytes]) -> None:
            for _ in range(count):
                into.append(await link.receive())

        got_up: list[bytes] = []
        got_down: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, client, up)
            nursery.start_soon(send, server, down)
            nursery.start_soon(receive, server, len(up), got_up)
            nursery.start_soon(receive, client, len(down), got_down)
        assert digest(got_up) == digest(up)
        assert digest(got_down) == digest(down)
        await client.aclose(1000, "end")
        with pytest.raises(LinkClosed) as info:
            await server.receive()
        assert (info.value.code, info.value.reason) == (1000, "end")
        await server.aclose()

    trio.run(main)
