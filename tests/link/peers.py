"""Peers and helpers for the link tests: byte stream pairs, frames and handshakes
built by hand, and wsproto as an independent WebSocket endpoint."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    Event,
    Request,
)

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
