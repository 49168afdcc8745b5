"""The server side of a browser's WebSocket, past the opening handshake, made for
fan-out: one encoded frame goes to many clients as the same bytes.

Every broadcast of a document reaches each of its other clients. Frames from a server
are not masked (RFC 6455 section 5.1), so :func:`binary_frame` encodes a message once
and :meth:`ClientSocket.offer` writes those bytes to each client's socket straight
away, with a direct non-blocking ``write``; only what a socket does not take at once
waits, in order, for the client's writer task (:meth:`ClientSocket.write_pending`).
Reading, too, is direct: frames are parsed out of ``read`` calls on the socket, with
no task per connection but the one that reads it.

This replaces trio-websocket (and wsproto beneath it) on the collab server's data
path, where profiles showed them as the largest cost of the master (see
``docs/collab.rst``, "Where the time goes"). It speaks only what y-websocket needs:
binary messages (a text message is refused with 1003), ping and pong, and the close
handshake; no extensions.
"""

from __future__ import annotations

import collections
import errno
import os
import socket
import struct
from typing import Final

import trio

__all__ = [
    "CLOSE_MESSAGE_TOO_BIG",
    "MAX_IOV",
    "ClientSocket",
    "WebSocketError",
    "binary_frame",
    "close_frame",
]

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
_OPCODES: Final = frozenset((OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG))

CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_UNSUPPORTED_DATA: Final = 1003
CLOSE_NO_STATUS: Final = 1005
CLOSE_ABNORMAL: Final = 1006
#: For a message over the size limit: not 1009, on which y-websocket clients reconnect
#: and send the same message again, for ever; in 4400-4499 they stop.
CLOSE_MESSAGE_TOO_BIG: Final = 4413

REASON_TEXT: Final = "text frames are not supported: send binary y-websocket messages"

_U16: Final = struct.Struct("!H")
_U64: Final = struct.Struct("!Q")
_READ_SIZE: Final = 256 * 1024
#: The most buffers handed to one ``writev``.
MAX_IOV: Final = 512
#: Messages read without waiting before the reader yields to other tasks anyway.
_YIELD_EVERY: Final = 16
#: Errors that mean the connection is gone.
_GONE: Final = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class WebSocketError(Exception):
    """The client broke the protocol; close it with :attr:`code` and :attr:`reason`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _header(opcode: int, length: int) -> bytes:
    if length < 126:
        return bytes((0x80 | opcode, length))
    if length < 65536:
        return bytes((0x80 | opcode, 126)) + _U16.pack(length)
    return bytes((0x80 | opcode, 127)) + _U64.pack(length)


def binary_frame(payload: bytes) -> bytes:
    """*payload* as one unmasked binary frame, ready for any client's socket."""
    return _header(OP_BINARY, len(payload)) + payload


def close_frame(code: int | None, reason: str = "") -> bytes:
    """A close frame with *code* (``None``: no status) and *reason* (cut to 123
    bytes, on a character boundary)."""
    if code is None:
        return _header(OP_CLOSE, 0)
    encoded = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    return _header(OP_CLOSE, 2 + len(encoded)) + _U16.pack(code) + encoded


def _unmask_small(data: bytes | bytearray | memoryview, key: bytes | bytearray) -> bytes:
    n = len(data)
    if n == 0:
        return b""
    repeated = int.from_bytes(key * (n // 4 + 1), "little") & ((1 << (8 * n)) - 1)
    return (int.from_bytes(data, "little") ^ repeated).to_bytes(n, "little")


try:  # the C routine websockets ships: 100x faster than Python integers on 1 MiB
    from websockets.speedups import apply_mask as _unmask_large
except ImportError:  # pragma: no cover - then large messages are unmasked in Python
    _unmask_large = _unmask_small  # type: ignore[assignment]  # same call, other names


def _unmask(data: bytes | bytearray | memoryview, key: bytes) -> bytes:
    if len(data) < 4096:
        return _unmask_small(data, key)
    return _unmask_large(data, key)


def _valid_close_code(code: int) -> bool:
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class ClientSocket:
    """One browser's WebSocket connection over a Trio socket stream, past the
    handshake.

    One task reads (:meth:`receive`); any code may :meth:`offer` frames, which are
    written at once if the socket takes them, else kept in order for the task that
    runs :meth:`write_pending`. :attr:`pending_frames` and :attr:`pending_bytes` say how
    much is waiting, so that the owner can decide when a client is too slow.

    Args:
        stream: the connection, past the opening handshake.
        max_message_size: the largest message accepted (a bigger one is a
            :class:`WebSocketError` with :data:`CLOSE_MESSAGE_TOO_BIG`, found from
            the frame's header before its payload is read).
        initial: bytes already read from *stream* past the handshake.
    """

    def __init__(
        self, stream: trio.SocketStream, *, max_message_size: int, initial: bytes = b""
    ) -> None:
        self.stream = stream
        self._fd = stream.socket.fileno()
        self.max_message_size = max_message_size
        self._buf = bytearray(initial)
        self._fragments: list[bytes] = []
        self._fragment_size = 0
        self._pending: collections.deque[bytes | memoryview] = collections.deque()
        self.pending_bytes = 0
        #: Bytes written to the socket so far.
        self.bytes_written = 0
        self._writer = trio.lowlevel.ParkingLot()
        self._unyielded = 0
        #: The peer's close code and reason once its close frame (or the end of the
        #: stream: 1006) arrived.
        self.peer_close: tuple[int, str] | None = None
        #: A close frame has been queued (ours, or the echo of the peer's).
        self.close_queued = False
        #: The connection broke (a write failed); nothing more is written.
        self.broken = False
        self.closed = False

    @property
    def pending_frames(self) -> int:
        return len(self._pending)

    # -- writing ---------------------------------------------------------------------------------

    def offer(self, frame: bytes) -> None:
        """Write *frame* now if the socket takes it, else queue it (in order, after
        what is queued). Never blocks; does nothing once a close frame was queued."""
        if self.close_queued or self.broken:
            return
        self._offer(frame)

    def _offer(self, frame: bytes) -> None:
        if not self._pending:
            try:
                written = os.write(self._fd, frame)
            except BlockingIOError:
                written = 0
            except OSError:
                self._break()
                return
            self.bytes_written += written
            if written == len(frame):
                return
            if written:
                frame = memoryview(frame)[written:]  # type: ignore[assignment]
            self._pending.append(frame)
            self.pending_bytes += len(frame)
            self._writer.unpark_all()
            return
        self._pending.append(frame)
        self.pending_bytes += len(frame)

    def discard_pending(self) -> None:
        """Drop what waits to be written, except a frame already partly written (the
        stream would be out of step without its end)."""
        head = self._pending[0] if self._pending else None
        self._pending.clear()
        self.pending_bytes = 0
        if isinstance(head, memoryview):
            self._pending.append(head)
            self.pending_bytes = len(head)

    def queue_close(self, code: int | None, reason: str = "") -> None:
        """Queue a close frame after what is pending; nothing is queued after it."""
        if self.close_queued or self.broken:
            return
        self._offer(close_frame(code, reason))
        self.close_queued = True
        self._writer.unpark_all()

    def _break(self) -> None:
        self.broken = True
        self._pending.clear()
        self.pending_bytes = 0
        self._writer.unpark_all()

    async def write_pending(self) -> None:
        """Write what :meth:`offer` could not, as the socket takes it, until a close
        frame has been written or the connection broke; then return.

        **Cancellation:** safe: what is not written stays queued.
        """
        while True:
            if self.broken or (self.close_queued and not self._pending):
                return
            if not self._pending:
                await self._writer.park()
                continue
            await trio.lowlevel.wait_writable(self._fd)
            self._write_some()

    async def flush(self) -> None:
        """Wait until nothing is pending (or the connection broke)."""
        while self._pending and not self.broken:
            await trio.lowlevel.wait_writable(self._fd)
            self._write_some()

    def _write_some(self) -> None:
        pending = self._pending
        chunks = list(pending) if len(pending) <= MAX_IOV else [pending[i] for i in range(MAX_IOV)]
        try:
            written = os.writev(self._fd, chunks)
        except BlockingIOError:
            return
        except OSError:
            self._break()
            return
        self.pending_bytes -= written
        self.bytes_written += written
        while written:
            head = pending[0]
            if written >= len(head):
                written -= len(head)
                pending.popleft()
            else:
                pending[0] = memoryview(head)[written:]
                written = 0

    # -- reading ---------------------------------------------------------------------------------

    async def receive(self) -> bytes:
        """The next binary message from the client.

        Pings are answered (after what is pending), pongs ignored. A close frame from
        the client is answered with the same code.

        Raises:
            trio.EndOfChannel: the client closed the connection (:attr:`peer_close`
                says how: its code, or 1006 if the stream ended without a close frame).
            WebSocketError: the client broke the protocol, sent a text message (1003)
                or one over ``max_message_size`` (4413); close it with that code.

        **Cancellation:** safe: a partly received message stays buffered.
        """
        if self.peer_close is not None:
            raise trio.EndOfChannel
        self._unyielded += 1
        if self._unyielded >= _YIELD_EVERY:
            self._unyielded = 0
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            frame = self._parse()
            if frame is None:
                await self._fill()
                continue
            message = self._message(*frame)
            if message is not None:
                return message

    def receive_buffered(self) -> bytes | None:
        """The next binary message if it has arrived whole already, else ``None``;
        never waits (control frames on the way are handled as :meth:`receive` does).

        Raises:
            trio.EndOfChannel, WebSocketError: as :meth:`receive`.
        """
        if self.peer_close is not None:
            raise trio.EndOfChannel
        while (frame := self._parse()) is not None:
            message = self._message(*frame)
            if message is not None:
                return message
        return None

    def _message(self, opcode: int, fin: bool, payload: bytes) -> bytes | None:
        if opcode == OP_BINARY or (opcode == OP_CONTINUATION and self._fragments):
            if opcode == OP_BINARY and self._fragments:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
            if fin and not self._fragments:
                return payload
            self._fragments.append(payload)
            self._fragment_size += len(payload)
            if not fin:
                return None
            message = b"".join(self._fragments)
            self._fragments.clear()
            self._fragment_size = 0
            return message
        if opcode in (OP_TEXT, OP_CONTINUATION):
            if opcode == OP_CONTINUATION:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "continuation frame with no message")
            raise WebSocketError(CLOSE_UNSUPPORTED_DATA, REASON_TEXT)
        if opcode == OP_PING:
            self.offer(_header(OP_PONG, len(payload)) + payload)
        elif opcode == OP_CLOSE:
            self._on_close(payload)
        return None  # a pong, or a ping answered

    def _on_close(self, payload: bytes) -> None:
        if len(payload) == 1:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
        if not payload:
            code, reason = CLOSE_NO_STATUS, ""
        else:
            code = _U16.unpack_from(payload)[0]
            if not _valid_close_code(code):
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "close reason is not UTF-8") from None
        self.peer_close = (code, reason)
        # The answer echoes the code (none for "no status").
        self.queue_close(None if code == CLOSE_NO_STATUS else code)
        raise trio.EndOfChannel

    async def _fill(self) -> None:
        while True:
            try:
                data = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                self._unyielded = 0
                await trio.lowlevel.wait_readable(self._fd)
                continue
            except OSError as exc:
                if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT):
                    raise
                data = b""
            if not data:
                self.peer_close = (CLOSE_ABNORMAL, "")
                raise trio.EndOfChannel
            self._buf += data
            return

    def _parse(self) -> tuple[int, bool, bytes] | None:  # noqa: C901 - RFC 6455 header checks
        """The next whole frame in the buffer (removed from it), or ``None``."""
        buf = self._buf
        if len(buf) < 2:
            return None
        b0, b1 = buf[0], buf[1]
        fin = bool(b0 & 0x80)
        opcode = b0 & 0x0F
        if b0 & 0x70:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension)")
        if opcode not in _OPCODES:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, f"unknown opcode 0x{opcode:x}")
        if not b1 & 0x80:
            raise WebSocketError(CLOSE_PROTOCOL_ERROR, "frame from the client must be masked")
        length = b1 & 0x7F
        offset = 2
        if length == 126:
            if len(buf) < 4:
                return None
            length = _U16.unpack_from(buf, 2)[0]
            offset = 4
        elif length == 127:
            if len(buf) < 10:
                return None
            length = _U64.unpack_from(buf, 2)[0]
            offset = 10
        if opcode >= OP_CLOSE:
            if length > 125 or not fin:
                raise WebSocketError(CLOSE_PROTOCOL_ERROR, "control frame too long or fragmented")
        elif self._fragment_size + length > self.max_message_size:
            raise WebSocketError(
                CLOSE_MESSAGE_TOO_BIG,
                f"message too big: the limit is {self.max_message_size} bytes",
            )
        end = offset + 4 + length
        if len(buf) < end:
            return None
        key = bytes(buf[offset : offset + 4])
        with memoryview(buf) as view:
            payload = _unmask(view[offset + 4 : end], key)
        del buf[:end]
        return opcode, fin, payload

    async def wait_closed(self) -> None:
        """Read and drop what the client still sends until its close frame or the end
        of the stream (after our close frame)."""
        if self.peer_close is not None or self.broken:
            return
        while True:
            try:
                frame = self._parse()
            except WebSocketError:
                return
            if frame is None:
                try:
                    await self._fill()
                except (trio.EndOfChannel, OSError):
                    return
                continue
            if frame[0] == OP_CLOSE:
                self.peer_close = (CLOSE_NO_STATUS, "")
                return

    def take_buffered(self) -> bytes:
        """The bytes read from the socket but not parsed yet (given to whoever reads
        the connection next); this object keeps none of them."""
        buffered = bytes(self._buf)
        self._buf.clear()
        return buffered

    def shut_down(self) -> None:
        """End the connection for every process that holds its socket, not only this
        one (``shutdown(2)``); then :meth:`aclose` this object."""
        try:
            self.stream.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected any more
        self._break()

    async def aclose(self) -> None:
        """Close the socket (idempotent, shielded)."""
        if self.closed:
            return
        self.closed = True
        self._break()
        await trio.aclose_forcefully(self.stream)
