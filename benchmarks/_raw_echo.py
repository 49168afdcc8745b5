"""The baseline: a raw Trio length-prefixed echo between two processes.

The parent starts ``python benchmarks/_raw_echo.py FD`` with one end of a
socketpair; each message is a 4-byte big-endian length and the payload. The
child echoes every message, or with ``--sink`` only counts bytes and answers
one byte when a zero-length message arrives (for one-way throughput).
"""

from __future__ import annotations

import socket
import struct
import sys

import trio

_LEN = struct.Struct("!I")


class Framed:
    """Length-prefixed messages over a Trio stream (the leanest framing there is)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buf = bytearray()

    async def send(self, payload: bytes) -> None:
        if len(payload) < 65536:
            await self.stream.send_all(_LEN.pack(len(payload)) + payload)
        else:
            await self.stream.send_all(_LEN.pack(len(payload)))
            await self.stream.send_all(payload)

    async def receive(self) -> bytes | None:
        buf = self._buf
        while len(buf) < 4:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            buf += data
        (length,) = _LEN.unpack_from(buf)
        while len(buf) < 4 + length:
            data = await self.stream.receive_some(max(65536, 4 + length - len(buf)))
            if not data:
                return None
            buf += data
        payload = bytes(buf[4 : 4 + length])
        del buf[: 4 + length]
        return payload


async def _child(fd: int, sink: bool) -> None:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))
    framed = Framed(stream)
    while True:
        payload = await framed.receive()
        if payload is None:
            return
        if not sink:
            await framed.send(payload)
        elif not payload:
            await framed.send(b"!")


if __name__ == "__main__":
    trio.run(_child, int(sys.argv[1]), "--sink" in sys.argv)
