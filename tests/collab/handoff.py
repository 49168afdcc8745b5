"""The master's side of a document child's hand-off, for tests of
:func:`examples.collab.connections.run_document` in this process: a channel of memory
channels, the real hand-off socket, and clients on real socket pairs that speak
WebSocket frames (masked, as browsers send them)."""

from __future__ import annotations

import array
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from examples.collab.connections import CLIENT_HEADER, HandOff, run_document

_U16 = struct.Struct("!H")


def handoff_options(folder: Path, **overrides: object) -> HandOff:
    options: dict[str, object] = {
        "folder": str(folder),
        "master_pid": os.getpid(),
        "max_message_size": 1 << 20,
        "client_queue": 1024,
        "max_messages_per_second": 0.0,
        "message_burst": 1,
        "close_timeout": 2.0,
    }
    options.update(overrides)
    return HandOff(**options)  # type: ignore[arg-type]


def masked_frame(opcode: int, payload: bytes) -> bytes:
    key = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = bytes((0x80 | opcode, 0x80 | length))
    elif length < 1 << 16:
        header = bytes((0x80 | opcode, 0x80 | 126)) + _U16.pack(length)
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + struct.pack("!Q", length)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return header + key + masked


class HandedClient:
    """The browser's end of a handed connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._buf = bytearray()

    async def send(self, message: bytes) -> None:
        await self.stream.send_all(masked_frame(0x2, message))

    async def send_close(self, code: int = 1000) -> None:
        await self.stream.send_all(masked_frame(0x8, _U16.pack(code)))

    async def _fill(self, size: int) -> bool:
        while len(self._buf) < size:
            chunk = await self.stream.receive_some()
            if not chunk:
                return False
            self._buf += chunk
        return True

    async def frame(self) -> tuple[int, bytes] | None:
        """The next frame from the server (unmasked), or ``None`` at the end."""
        if not await self._fill(2):
            return None
        opcode, length = self._buf[0] & 0x0F, self._buf[1] & 0x7F
        offset = 2
        if length == 126:
            await self._fill(4)
            length, offset = _U16.unpack_from(self._buf, 2)[0], 4
        elif length == 127:
            await self._fill(10)
            length, offset = struct.unpack_from("!Q", self._buf, 2)[0], 10
        await self._fill(offset + length)
        payload = bytes(self._buf[offset : offset + length])
        del self._buf[: offset + length]
        return opcode, payload

    async def message(self) -> bytes:
        frame = await self.frame()
        assert frame is not None and frame[0] == 0x2, frame
        return frame[1]

    async def close_frame(self) -> tuple[int, str]:
        """Skip messages until the server's close frame; its code and reason."""
        while True:
            frame = await self.frame()
            assert frame is not None, "the connection ended without a close frame"
            if frame[0] == 0x8:
                return _U16.unpack_from(frame[1])[0], frame[1][2:].decode()

    async def end(self) -> bytes:
        """Everything the server sends until it shuts the connection down."""
        data = bytes(self._buf)
        while chunk := await self.stream.receive_some():
            data += chunk
        return data


class Master:
    """Plays the master: the channel (``send``/``receive`` as the child sees it) and
    the hand-off socket."""

    def __init__(self) -> None:
        self.to_child_send, self.to_child = trio.open_memory_channel[object](100)
        self.from_child, self.from_child_receive = trio.open_memory_channel[object](100)
        self.side: trio.socket.SocketType | None = None
        self.clients: list[HandedClient] = []

    # -- the child's end of the channel
    async def send(self, obj: object, /) -> None:
        await self.from_child.send(obj)

    async def receive(self) -> object:
        return await self.to_child.receive()

    # -- the master's
    async def connect(self) -> None:
        message = await self.from_child_receive.receive()
        assert isinstance(message, list) and message[0] == "listening", message
        self.side = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        await self.side.connect(message[1])

    async def hand_over(self, client_id: int, initial: bytes = b"") -> HandedClient:
        assert self.side is not None
        ours, theirs = socket.socketpair()
        with theirs:
            fds = array.array("i", [theirs.fileno()])
            await self.side.sendmsg(
                [CLIENT_HEADER.pack(client_id) + initial],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)],
            )
        client = HandedClient(ours)
        self.clients.append(client)
        return client

    async def report(self) -> object:
        return await self.from_child_receive.receive()

    def close(self) -> None:
        """End the channel (the child saves its document and returns) and close
        every socket of this side."""
        self.to_child_send.close()
        if self.side is not None:
            self.side.close()
        for client in self.clients:
            client.stream.socket.close()


@asynccontextmanager
async def document_child(
    folder: Path, options: HandOff | None = None, *, seconds: float = 10
) -> AsyncIterator[Master]:
    """The document ``notes`` of *folder* served in this process as its child serves
    it, its hand-off socket connected; the test plays the master, and ends the
    document with :meth:`Master.close`. All of it within *seconds*."""
    master = Master()
    with trio.fail_after(seconds):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                run_document, master, "notes", folder, options or handoff_options(folder)
            )
            await master.connect()
            yield master
