"""A lean RFC 6455 WebSocket connection over any Trio byte stream.

The parent's end of a child's socketpair is the WebSocket *server*; the child is
the *client* (as a Collabora kit connects to its master), so child-to-parent
frames are masked as the RFC requires. The opening handshake is HTTP/1.1 and is
done with :mod:`h11`; after it, frames are encoded here rather than through
wsproto because the internal link sits on every message's hot path (see
``docs/design.rst`` for the measurements).

Only binary messages are carried. A text message, a malformed frame or a
message above ``max_message_size`` closes the link with 1003, 1002 or 1009.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import struct
from collections.abc import Callable, Iterable
from typing import Final

import h11
import trio

from ._errors import (
    STREAM_ERRORS,
    HandshakeError,
    LinkClosed,
    LinkClosedHere,
    map_stream_errors,
)
from ._wire import DEFAULT_MAX_MESSAGE_SIZE

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

_OPCODES: Final = frozenset((OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG))

CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_UNSUPPORTED_DATA: Final = 1003
CLOSE_NO_STATUS: Final = 1005
CLOSE_ABNORMAL: Final = 1006
CLOSE_MESSAGE_TOO_BIG: Final = 1009
CLOSE_INTERNAL_ERROR: Final = 1011

_U16: Final = struct.Struct("!H")
_U64: Final = struct.Struct("!Q")
_READ_SIZE: Final = 65536
#: Messages a link sends or receives without waiting before it yields anyway...
_YIELD_EVERY: Final = 64
#: ...or bytes: a reader that yields only every 64 large messages lets them pile
#: up unread (64 MiB of 1 MiB messages), and fresh memory for each costs more
#: than the yields saved.
_YIELD_BYTES: Final = 1024 * 1024
# Below this, masking with Python integers is cheaper than importing the C helper.
_SMALL_MASK: Final = 2048

_apply_mask_c: Callable[[bytes, bytes], bytes] | None = None


def _mask_fallback(data: bytes, key: bytes) -> bytes:  # pragma: no cover - no C extension
    return _mask_small(data, key)


def _mask_small(data: bytes | bytearray | memoryview, key: bytes) -> bytes:
    n = len(data)
    if n == 0:
        return b""
    repeated = int.from_bytes(key * (n // 4 + 1), "little") & ((1 << (8 * n)) - 1)
    return (int.from_bytes(data, "little") ^ repeated).to_bytes(n, "little")


def apply_mask(data: bytes | bytearray | memoryview, key: bytes) -> bytes:
    """XOR *data* with the 4-byte masking *key* (RFC 6455 section 5.3)."""
    global _apply_mask_c
    if len(data) < _SMALL_MASK:
        return _mask_small(data, key)
    if _apply_mask_c is None:
        # websockets ships a C implementation: 100x faster than Python integers on
        # 1 MiB. Imported lazily so that a child's start-up does not pay for it.
        try:
            from websockets import speedups

            _apply_mask_c = speedups.apply_mask
        except ImportError:  # pragma: no cover - wheels ship the extension
            _apply_mask_c = _mask_fallback
    return _apply_mask_c(data, key)  # type: ignore[arg-type]  # any buffer will do


def accept_token(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value for a ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


def _header(opcode: int, length: int, masked: bool) -> bytes:
    b0 = 0x80 | opcode
    mask_bit = 0x80 if masked else 0
    if length < 126:
        return bytes((b0, mask_bit | length))
    if length < 65536:
        return bytes((b0, mask_bit | 126)) + _U16.pack(length)
    return bytes((b0, mask_bit | 127)) + _U64.pack(length)


def _first_two_bytes(b0: int, b1: int, *, client: bool) -> tuple[bool, int, bool, int]:
    """A frame's FIN bit, opcode, MASK bit and 7-bit length, checked (RFC 6455 5.2)."""
    opcode = b0 & 0x0F
    if b0 & 0x70:
        raise _ProtocolViolation(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension)")
    if opcode not in _OPCODES:
        raise _ProtocolViolation(CLOSE_PROTOCOL_ERROR, f"unknown opcode 0x{opcode:x}")
    masked = bool(b1 & 0x80)
    if masked == client:
        side = "server" if client else "client"
        raise _ProtocolViolation(
            CLOSE_PROTOCOL_ERROR,
            f"frame from the {side} must {'not ' if client else ''}be masked",
        )
    return bool(b0 & 0x80), opcode, masked, b1 & 0x7F


def _check_length(opcode: int, fin: bool, length: int, so_far: int, limit: int) -> None:
    """Refuse a frame whose length breaks the protocol or the message size limit."""
    if length >> 63:
        raise _ProtocolViolation(CLOSE_PROTOCOL_ERROR, "payload length has its top bit set")
    if opcode >= OP_CLOSE:
        if length > 125:
            raise _ProtocolViolation(CLOSE_PROTOCOL_ERROR, "control frame longer than 125")
        if not fin:
            raise _ProtocolViolation(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
    elif so_far + length > limit:
        raise _ProtocolViolation(CLOSE_MESSAGE_TOO_BIG, f"message over {limit} bytes")


def _close_payload(payload: bytes) -> tuple[int, str]:
    """The code and reason of a close frame's payload, checked (RFC 6455 5.5.1)."""
    if len(payload) == 1:
        raise _ProtocolViolation(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
    if not payload:
        return CLOSE_NO_STATUS, ""
    code = _U16.unpack_from(payload)[0]
    if not _valid_close_code(code):
        raise _ProtocolViolation(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        return code, payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise _ProtocolViolation(CLOSE_PROTOCOL_ERROR, "close reason is not UTF-8") from None


def _binary_frame(parts: tuple[bytes, ...], length: int, *, masked: bool) -> tuple[bytes, ...]:
    """A binary message of *parts* (*length* bytes in all) as the chunks to write."""
    if masked:
        key = os.urandom(4)
        payload = parts[0] if len(parts) == 1 else b"".join(parts)
        header = _header(OP_BINARY, length, True) + key
        if length < _READ_SIZE:
            return (header + apply_mask(payload, key),)
        return (header, apply_mask(payload, key))
    if length < _READ_SIZE:
        return (b"".join((_header(OP_BINARY, length, False), *parts)),)
    # Large payloads are written as they are, not copied into one buffer.
    return (_header(OP_BINARY, length, False), *parts)


def _remaining(chunks: tuple[bytes, ...], written: int) -> list[bytes | memoryview]:
    """What is left of *chunks* once *written* bytes of them have been sent."""
    left: list[bytes | memoryview] = []
    for chunk in chunks:
        if written >= len(chunk):
            written -= len(chunk)
            continue
        left.append(memoryview(chunk)[written:] if written else chunk)
        written = 0
    return left


def _descriptors(stream: trio.abc.Stream) -> tuple[int, int]:
    """The descriptors to read and write *stream* through directly, or -1s."""
    if isinstance(stream, trio.SocketStream):
        fd = stream.socket.fileno()
        return fd, fd
    if isinstance(stream, trio.StapledStream):
        receive, send = stream.receive_stream, stream.send_stream
        if isinstance(receive, trio.lowlevel.FdStream) and isinstance(send, trio.lowlevel.FdStream):
            return receive.fileno(), send.fileno()
    return -1, -1


def _valid_close_code(code: int) -> bool:
    """Whether a peer may send *code* in a close frame (RFC 6455 section 7.4)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class _SendGate:
    """Keeps frames whole when many tasks send at once.

    Unlike :class:`trio.Lock` it adds no checkpoint when free: ``send_all``
    already has one, and this path runs for every message.
    """

    def __init__(self) -> None:
        self.busy = False
        self._lot = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        while self.busy:
            await self._lot.park()
        self.busy = True

    async def __aexit__(self, *exc_info: object) -> None:
        self.busy = False
        if self._lot:
            self._lot.unpark()


class _ProtocolViolation(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Link(trio.abc.Channel[bytes]):
    """One WebSocket connection carrying binary messages: a
    :class:`trio.abc.Channel` of :class:`bytes`.

    Build one with :func:`connect_link` (client side) or :func:`accept_link`
    (server side) rather than directly.

    Sending is safe from many tasks at once (a lock keeps frames whole);
    receiving is for one task at a time. Once the peer closes the link or the
    stream breaks, :meth:`send` and :meth:`receive` raise :class:`LinkClosed`
    with the close code; once this side closed it, they raise
    :class:`trio.ClosedResourceError` (which is also a :class:`LinkClosed`).

    Args:
        stream: the byte stream, already past the opening handshake.
        client: ``True`` on the client side (frames are masked when sent and must
            be unmasked when received), ``False`` on the server side.
        max_message_size: the largest message accepted; a bigger one closes the
            link with 1009.
        initial: bytes already read from *stream* past the handshake.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        client: bool,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        initial: bytes = b"",
    ) -> None:
        self.stream = stream
        # Over a socket or a pair of pipes, direct non-blocking system calls on the
        # descriptors (see docs/design.rst); -1: another kind of stream, as it is.
        self._in_fd, self._out_fd = _descriptors(stream)
        # Messages moved without waiting since the last yield to other tasks, and
        # the bytes moved in all (sent and received) at that yield.
        self._unyielded = 0
        self._yielded_at = 0
        self.client = client
        self.max_message_size = max_message_size
        self._buf = bytearray(initial)
        self._send_lock = _SendGate()
        self._fragments: list[bytes] = []
        self._fragment_size = 0
        #: The close code once the link is closed, else ``None``.
        self.close_code: int | None = None
        #: The close reason once the link is closed.
        self.close_reason = ""
        self._close_sent = False
        self._closed_here = False
        self.messages_sent = 0
        self.messages_received = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def closed(self) -> bool:
        return self.close_code is not None

    def _closed_error(self) -> LinkClosed:
        """The error for using the link once it is closed."""
        code = self.close_code if self.close_code is not None else CLOSE_ABNORMAL
        if self._closed_here:
            return LinkClosedHere(code, self.close_reason)
        return LinkClosed(code, self.close_reason)

    def _broken(self, what: str) -> Callable[[Exception], LinkClosed]:
        """How a failed stream becomes a closed link (1006, unless already closed)."""

        def closed(exc: Exception) -> LinkClosed:
            self._mark_closed(CLOSE_ABNORMAL, f"{what}: {exc!r}")
            return self._closed_error()

        return closed

    # -- sending ---------------------------------------------------------

    async def send(self, value: bytes, *more: bytes) -> None:
        """Send one binary message: *value*, followed by *more* if given (the
        parts are framed as one message without being joined first).

        Raises:
            LinkClosed: the peer closed the link or the stream broke (the link is
                then closed with 1006).
            trio.ClosedResourceError: this side closed the link.

        **Cancellation:** if cancelled before any byte is written, nothing was sent
        and the link stays open. If cancelled after part of the frame was written,
        the link is closed (1006), since the byte stream is no longer in step.
        """
        if self.close_code is not None:
            raise self._closed_error()
        parts = (value, *more)
        length = len(value) if not more else sum(map(len, parts))
        await self._write(_binary_frame(parts, length, masked=self.client))
        self.messages_sent += 1
        self.bytes_sent += length

    async def _write(self, chunks: tuple[bytes, ...]) -> None:
        async with self._send_lock:
            if self.close_code is not None:
                raise self._closed_error()
            written = 0
            done = False
            try:
                if self._out_fd < 0:
                    for chunk in chunks:
                        await self.stream.send_all(chunk)
                        written += len(chunk)
                else:
                    await self._checkpoint()
                    # Written by hand so that we know whether a cancelled write left
                    # half a frame behind (then the link is lost) or nothing at all.
                    written = await self._write_fd(chunks)
                done = True
            except STREAM_ERRORS as exc:  # not map_stream_errors: this is the hot path
                raise self._broken("stream broke while sending")(exc) from None
            finally:
                if not done and written and self.close_code is None:
                    # The byte stream is out of step now; nothing more can be sent.
                    self._mark_closed(CLOSE_ABNORMAL, "cancelled in the middle of a frame")

    async def _checkpoint(self) -> None:
        """A cancellation point; and a schedule point now and then, so that a busy
        link never keeps other tasks waiting for long (Trio's socket methods yield
        on every call, which costs a trip through the scheduler each time)."""
        self._unyielded += 1
        moved = self.bytes_sent + self.bytes_received
        if self._unyielded < _YIELD_EVERY and moved - self._yielded_at < _YIELD_BYTES:
            await trio.lowlevel.checkpoint_if_cancelled()
        else:
            self._unyielded = 0
            self._yielded_at = moved
            await trio.lowlevel.checkpoint()

    async def _write_fd(self, chunks: tuple[bytes, ...]) -> int:
        """Write *chunks* to the socket; return how many bytes were written (all of
        them, unless cancelled while the socket was full: then the error says how
        many, in ``written``)."""
        fd = self._out_fd
        total = sum(map(len, chunks))
        written = 0
        pending: list[bytes | memoryview] = list(chunks)
        while True:
            try:
                written += os.writev(fd, pending)
            except BlockingIOError:
                pass
            if written == total:
                return written
            pending = _remaining(chunks, written)
            try:
                await trio.lowlevel.wait_writable(fd)
            except BaseException:
                if written and self.close_code is None:
                    self._mark_closed(CLOSE_ABNORMAL, "cancelled in the middle of a frame")
                raise

    async def _send_control(self, opcode: int, payload: bytes) -> None:
        """Send a control frame.

        Raises:
            LinkClosed: the stream broke, or it may hold half a frame.
        """
        if self.client:
            key = os.urandom(4)
            frame = _header(opcode, len(payload), True) + key + apply_mask(payload, key)
        else:
            frame = _header(opcode, len(payload), False) + payload
        async with self._send_lock:
            if self.close_code == CLOSE_ABNORMAL:
                # The stream may hold half a frame: writing more would corrupt it.
                raise LinkClosed(self.close_code, self.close_reason)
            with map_stream_errors(self._broken("stream broke while sending")):
                await self.stream.send_all(frame)

    # -- receiving -------------------------------------------------------

    async def receive(self) -> bytes:  # noqa: C901 - one branch per RFC 6455 frame case
        """Receive the next binary message.

        Pings are answered, pongs ignored. A close frame from the peer is answered
        and ends the link.

        Raises:
            LinkClosed: the link is closed; ``code`` tells why (1000 or the peer's
                code after a close frame, 1006 if the stream ended without one,
                1002/1003/1009 if the peer broke the protocol, in which case the
                link has sent that close code to the peer).
            trio.ClosedResourceError: this side closed the link.

        **Cancellation:** safe: bytes read so far stay buffered for the next call.
        """
        if self.close_code is not None:
            raise self._closed_error()
        if self._in_fd >= 0:
            await self._checkpoint()
        try:
            while True:
                opcode, fin, payload = await self._read_frame()
                if opcode in (OP_BINARY, OP_CONTINUATION):
                    if opcode == OP_BINARY and self._fragments:
                        raise _ProtocolViolation(
                            CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one"
                        )
                    if opcode == OP_CONTINUATION and not self._fragments:
                        raise _ProtocolViolation(
                            CLOSE_PROTOCOL_ERROR, "continuation frame with no message"
                        )
                    if fin and not self._fragments:
                        self.messages_received += 1
                        self.bytes_received += len(payload)
                        return payload
                    self._fragments.append(payload)
                    self._fragment_size += len(payload)
                    if fin:
                        message = b"".join(self._fragments)
                        self._fragments.clear()
                        self._fragment_size = 0
                        self.messages_received += 1
                        self.bytes_received += len(message)
                        return message
                elif opcode == OP_TEXT:
                    raise _ProtocolViolation(
                        CLOSE_UNSUPPORTED_DATA, "this link carries binary messages only"
                    )
                elif opcode == OP_PING:
                    await self._send_control(OP_PONG, payload)
                elif opcode == OP_CLOSE:
                    await self._on_close_frame(payload)
                # OP_PONG: nothing to do.
        except _ProtocolViolation as violation:
            await self._fail(violation.code, violation.reason)
            raise LinkClosed(violation.code, violation.reason) from None
        except STREAM_ERRORS as exc:  # not map_stream_errors: this is the hot path
            raise self._broken("stream broke")(exc) from None

    async def _fill(self, needed: int) -> None:
        buf = self._buf
        fd = self._in_fd
        while len(buf) < needed:
            if fd < 0:
                data = await self.stream.receive_some(max(_READ_SIZE, needed - len(buf)))
            else:
                try:
                    data = os.read(fd, max(_READ_SIZE, needed - len(buf)))
                except BlockingIOError:
                    self._unyielded = 0
                    await trio.lowlevel.wait_readable(fd)
                    continue
            if not data:
                self._mark_closed(CLOSE_ABNORMAL, "stream ended without a close frame")
                await self._close_stream()
                raise self._closed_error()
            buf += data

    async def _read_frame(self) -> tuple[int, bool, bytes]:
        buf = self._buf
        if len(buf) < 2:
            await self._fill(2)
        fin, opcode, masked, length = _first_two_bytes(buf[0], buf[1], client=self.client)
        offset = 2
        if length == 126:
            if len(buf) < 4:
                await self._fill(4)
            length = _U16.unpack_from(buf, 2)[0]
            offset = 4
        elif length == 127:
            if len(buf) < 10:
                await self._fill(10)
            length = _U64.unpack_from(buf, 2)[0]
            offset = 10
        _check_length(opcode, fin, length, self._fragment_size, self.max_message_size)
        key = b""
        if masked:
            if len(buf) < offset + 4:
                await self._fill(offset + 4)
            key = bytes(buf[offset : offset + 4])
            offset += 4
        end = offset + length
        if len(buf) < end:
            await self._fill(end)
        if masked:
            # Unmasked straight out of the buffer: one copy, not two.
            with memoryview(buf) as view:
                payload = apply_mask(view[offset:end], key)
        else:
            payload = bytes(buf[offset:end])
        del buf[:end]
        return opcode, fin, payload

    async def _on_close_frame(self, payload: bytes) -> None:
        code, reason = _close_payload(payload)
        if not self._close_sent:
            self._close_sent = True
            echo = b"" if code == CLOSE_NO_STATUS else _U16.pack(code)
            with contextlib.suppress(LinkClosed):
                await self._send_control(OP_CLOSE, echo)
        self._mark_closed(code, reason)
        await self._close_stream()
        raise LinkClosed(code, reason)

    async def _fail(self, code: int, reason: str) -> None:
        await self.aclose(code, reason)

    # -- closing ---------------------------------------------------------

    def _mark_closed(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason

    async def _close_stream(self) -> None:
        # Never touch the descriptors again: their numbers may be reused.
        self._in_fd = self._out_fd = -1
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)

    async def aclose(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Send a close frame (if none was sent) and close the stream.

        Idempotent. The peer's answering close frame is not awaited: the stream is
        closed at once, which the peer sees as the end of the connection.

        **Cancellation:** shielded; it always closes the stream.

        **Error handling:** never raises for the stream's sake: a broken stream is
        closed all the same.
        """
        # At most 123 bytes, cut on a character boundary so it stays valid UTF-8.
        encoded = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
        self._closed_here = True
        if not self._close_sent and self.close_code is None:
            self._close_sent = True
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + 1.0
                with contextlib.suppress(LinkClosed):
                    await self._send_control(OP_CLOSE, _U16.pack(code) + encoded)
        self._mark_closed(code, reason)
        await self._close_stream()


async def _read_h11_event(
    conn: h11.Connection, stream: trio.abc.Stream
) -> h11.Event | type[h11.PAUSED]:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = bytes(await stream.receive_some(_READ_SIZE))
            conn.receive_data(data)
            if not data and conn.their_state is not h11.SWITCHED_PROTOCOL:
                raise HandshakeError("the stream ended during the WebSocket handshake")
            continue
        return event  # type: ignore[return-value]


def _header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> str:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return ""


async def connect_link(
    stream: trio.abc.Stream,
    *,
    resource: str = "/",
    host: str = "localhost",
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> Link:
    """Open a WebSocket connection as the client over *stream*.

    Raises:
        HandshakeError: the server refused the upgrade, answered nonsense, or the
            stream broke.

    **Cancellation:** leaves *stream* in the middle of the handshake: close it.

    **Resource handling:** the link owns *stream* once this returns.
    """
    conn = h11.Connection(h11.CLIENT)
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    request = h11.Request(
        method="GET",
        target=resource,
        headers=[
            ("Host", host),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", key),
            ("Sec-WebSocket-Version", "13"),
        ],
    )
    try:
        with map_stream_errors(_handshake_broke):
            await stream.send_all(conn.send(request) or b"")
            conn.send(h11.EndOfMessage())
            event = await _read_h11_event(conn, stream)
    except h11.RemoteProtocolError as exc:
        raise HandshakeError(f"bad handshake response: {exc}") from None
    if not isinstance(event, h11.InformationalResponse) or event.status_code != 101:
        status = getattr(event, "status_code", event)
        raise HandshakeError(f"server refused the WebSocket upgrade (status {status})")
    if "websocket" not in _header_value(event.headers, b"upgrade").lower():
        raise HandshakeError("server's 101 response does not upgrade to websocket")
    if _header_value(event.headers, b"sec-websocket-accept") != accept_token(key):
        raise HandshakeError("server answered with a wrong Sec-WebSocket-Accept")
    trailing, _ = conn.trailing_data
    return Link(stream, client=True, max_message_size=max_message_size, initial=bytes(trailing))


async def accept_link(
    stream: trio.abc.Stream, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
) -> tuple[Link, str]:
    """Accept a WebSocket connection as the server over *stream*.

    Returns:
        The link and the resource (path) the client asked for.

    Raises:
        HandshakeError: the client's request was not a valid WebSocket upgrade
            (it has been answered with 400 and the stream closed), or the stream
            broke.

    **Cancellation:** leaves *stream* in the middle of the handshake: close it.

    **Resource handling:** the link owns *stream* once this returns.
    """
    conn = h11.Connection(h11.SERVER)
    try:
        with map_stream_errors(_handshake_broke):
            event = await _accept_request(conn, stream)
    except h11.RemoteProtocolError as exc:
        with trio.move_on_after(1.0), map_stream_errors(None):
            await stream.send_all(
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
        await trio.aclose_forcefully(stream)
        raise HandshakeError(f"bad handshake request: {exc}") from None
    trailing, _ = conn.trailing_data
    link = Link(stream, client=False, max_message_size=max_message_size, initial=bytes(trailing))
    return link, event.target.decode("latin-1")


def _handshake_broke(exc: Exception) -> HandshakeError:
    return HandshakeError(f"stream broke during the handshake: {exc!r}")


async def _accept_request(conn: h11.Connection, stream: trio.abc.Stream) -> h11.Request:
    """Read the upgrade request and answer 101, or 400 and close the stream."""
    event = await _read_h11_event(conn, stream)
    if not isinstance(event, h11.Request):
        raise HandshakeError(f"expected an HTTP request, got {event!r}")
    headers = event.headers
    key = _header_value(headers, b"sec-websocket-key")
    if (
        event.method != b"GET"
        or "websocket" not in _header_value(headers, b"upgrade").lower()
        or "upgrade" not in _header_value(headers, b"connection").lower()
        or _header_value(headers, b"sec-websocket-version") != "13"
        or not key
    ):
        reply = conn.send(h11.Response(status_code=400, headers=[("Content-Length", "0")]))
        await stream.send_all(reply or b"")
        await trio.aclose_forcefully(stream)
        raise HandshakeError("not a WebSocket version 13 upgrade request")
    response = h11.InformationalResponse(
        status_code=101,
        headers=[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", accept_token(key)),
        ],
    )
    await stream.send_all(conn.send(response) or b"")
    return event
