"""The HTTP front of the collab server: it accepts connections, answers page
requests, accepts ``/doc/<name>`` WebSocket upgrades, and drains on stop.

The master reads each request head itself (with h11) to tell a page request from a
WebSocket upgrade; for an upgrade it answers 101 and hands the socket, with any bytes
read past the head, to a :class:`~examples.collab.websocket.ClientSocket`.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import logging
import math
from collections.abc import Awaitable, Callable

import attrs
import h11
import trio

from .settings import Settings
from .static_files import StaticFiles
from .websocket import ClientSocket

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_HEAD_BYTES",
    "Front",
    "Upgrade",
    "accept_token",
    "peer_name",
    "serve_http",
    "serve_websocket",
]

#: The largest request line and headers accepted.
MAX_HEAD_BYTES = 16 * 1024
#: The largest request body read (and discarded) on a GET.
MAX_BODY_BYTES = 64 * 1024
RECEIVE_SIZE = 64 * 1024

Headers = list[tuple[bytes, bytes]]

log = logging.getLogger("collab")

#: What serves a WebSocket client: ``handler(segment, peer, socket)``, where *segment*
#: is the path after ``/doc/``, still percent-encoded.
ClientHandler = Callable[[str, str, ClientSocket], Awaitable[None]]


class Front:
    """Accepts connections and serves each: page requests, then, if it asks for one, a
    WebSocket, until :meth:`stop`.

    On stop it drains as hypercorn's trio worker does: it stops accepting, ends page
    requests at once, lets the WebSocket clients finish until a deadline
    (``shutdown_timeout``), and only then cancels what is left.
    """

    def __init__(self, settings: Settings, files: StaticFiles) -> None:
        self.settings = settings
        self.files = files
        self._accepting = trio.CancelScope()
        #: When what is left of the connections is dropped, once a stop has begun.
        self.drain_deadline = math.inf
        #: Connections still in their page-request phase.
        self._page_requests: set[trio.CancelScope] = set()

    @property
    def stopping(self) -> bool:
        return self._accepting.cancel_called

    def stop(self) -> None:
        self._accepting.cancel()

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        handler: ClientHandler,
        *,
        on_stop: Callable[[], None],
    ) -> None:
        """Serve until :meth:`stop`, then drain; *on_stop* is called as the drain
        begins, to tell the WebSocket clients."""
        async with trio.open_nursery() as connections:
            serve_one = functools.partial(self._serve_connection, handler)
            with self._accepting:
                await trio.serve_listeners(serve_one, listeners, handler_nursery=connections)
            deadline = trio.current_time() + self.settings.shutdown_timeout
            connections.cancel_scope.deadline = self.drain_deadline = deadline
            for page_requests in list(self._page_requests):
                page_requests.cancel()
            on_stop()
        if connections.cancel_scope.cancelled_caught:
            log.warning("connections still open at the deadline were dropped")

    async def _serve_connection(self, handler: ClientHandler, stream: trio.SocketStream) -> None:
        peer = peer_name(stream)
        try:
            upgrade = await self._serve_pages(stream)
            if upgrade is not None:
                client = functools.partial(handler, upgrade.segment, peer)
                await serve_websocket(stream, upgrade, client, self.settings)
        except Exception:  # a fault in one connection must not take the server down
            log.exception("connection from %s failed", peer)

    async def _serve_pages(self, stream: trio.SocketStream) -> Upgrade | None:
        """Page requests, until the connection closes or asks for a WebSocket; a stop
        ends them at once."""
        with trio.CancelScope() as page_requests:
            self._page_requests.add(page_requests)
            if self.stopping:
                page_requests.cancel()
            try:
                return await serve_http(
                    stream,
                    self.files,
                    http_timeout=self.settings.http_timeout,
                    close_timeout=self.settings.close_timeout,
                )
            finally:
                self._page_requests.discard(page_requests)
        return None


@attrs.frozen
class Upgrade:
    """A WebSocket request for ``/doc/<segment>``: its key, and the bytes read past
    its head."""

    key: bytes
    trailing: bytes
    segment: str


def peer_name(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return str(address)


# -- page requests ------------------------------------------------------------------------------


async def serve_http(
    stream: trio.SocketStream, files: StaticFiles, *, http_timeout: float, close_timeout: float
) -> Upgrade | None:
    """Answer page requests on *stream* until it closes or asks for a WebSocket.

    Returns the upgrade request (the stream is then the caller's), or ``None`` once
    the stream is closed: by the client, after a bad request, after *http_timeout*
    seconds without a complete request, or by cancellation.
    """
    upgrade: Upgrade | None = None
    try:
        upgrade = await _answer_requests(stream, files, http_timeout)
        if upgrade is None:
            await _close_gracefully(stream, close_timeout)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        if upgrade is None:
            await trio.aclose_forcefully(stream)
    return upgrade


async def _answer_requests(
    stream: trio.SocketStream, files: StaticFiles, http_timeout: float
) -> Upgrade | None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    while True:
        request: h11.Request | None = None
        with trio.move_on_after(http_timeout):
            request = await _read_request(stream, conn)
        if request is None:
            return None  # closed, refused, or timed out
        upgrade = await _respond(stream, conn, files, request)
        if upgrade is not None:
            return upgrade
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return None
        conn.start_next_cycle()


async def _next_event(conn: h11.Connection, stream: trio.SocketStream, fed: list[int]) -> object:
    """The next h11 event, reading as needed; *fed* counts the bytes given to h11."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await stream.receive_some(RECEIVE_SIZE)
        fed[0] += len(data)
        conn.receive_data(data)


async def _read_head(stream: trio.SocketStream, conn: h11.Connection) -> object:
    """The next request's head, checked against :data:`MAX_HEAD_BYTES` however its
    bytes arrived.

    h11's own limit (``max_incomplete_event_size``) applies only while a head is
    incomplete, so a head that arrives whole in one read would pass it: the size is
    measured here too, as the bytes h11 consumed to produce the request.

    Raises:
        h11.RemoteProtocolError: the head is too large (431).
    """
    fed = [len(conn.trailing_data[0])]  # what the previous request left unread
    event = await _next_event(conn, stream, fed)
    if isinstance(event, h11.Request):
        head = fed[0] - len(conn.trailing_data[0])
        if head > MAX_HEAD_BYTES:
            raise h11.RemoteProtocolError(
                f"request head of {head} bytes is over {MAX_HEAD_BYTES}", error_status_hint=431
            )
    return event


async def _read_request(stream: trio.SocketStream, conn: h11.Connection) -> h11.Request | None:
    """The next complete request (its body read and dropped), or ``None`` if the
    connection closed or the request was refused (and answered)."""
    try:
        request = await _read_head(stream, conn)
        if not isinstance(request, h11.Request):
            return None  # closed between requests
        body = 0
        fed = [0]
        while True:
            event = await _next_event(conn, stream, fed)
            if isinstance(event, h11.EndOfMessage):
                return request
            if isinstance(event, h11.ConnectionClosed):
                return None
            if isinstance(event, h11.Data):
                body += len(event.data)
                if body > MAX_BODY_BYTES:
                    await _send_simple(stream, conn, 413, "request body too large")
                    return None
    except h11.RemoteProtocolError as exc:
        status = exc.error_status_hint
        text = "request head too large" if status == 431 else "bad request"
        with contextlib.suppress(h11.LocalProtocolError):
            await _send_simple(stream, conn, status, text, close=True)
        return None


async def _respond(
    stream: trio.SocketStream,
    conn: h11.Connection,
    files: StaticFiles,
    request: h11.Request,
) -> Upgrade | None:
    path = request.target.decode("latin-1").partition("?")[0]
    headers = {name.lower(): value for name, value in request.headers}
    wants_websocket = b"websocket" in headers.get(b"upgrade", b"").lower()
    if path.startswith("/doc/"):
        if await _check_upgrade(stream, conn, request, headers, wants_websocket):
            trailing = bytes(conn.trailing_data[0])
            return Upgrade(headers[b"sec-websocket-key"], trailing, path[len("/doc/") :])
        return None
    if request.method not in (b"GET", b"HEAD"):
        allow = [(b"allow", b"GET, HEAD")]
        await _send_simple(stream, conn, 405, "method not allowed", extra=allow)
        return None
    file = await files.read(path)
    if file is None:
        await _send_simple(stream, conn, 404, "not found", close=wants_websocket)
        return None
    content_type = file.content_type.encode()
    head = request.method == b"HEAD"
    await _send_response(stream, conn, 200, file.content, content_type, head=head)
    return None


async def _check_upgrade(
    stream: trio.SocketStream,
    conn: h11.Connection,
    request: h11.Request,
    headers: dict[bytes, bytes],
    wants_websocket: bool,
) -> bool:
    """Whether a request for ``/doc/...`` is a WebSocket upgrade (if not, it is answered)."""
    if not wants_websocket:
        upgrade = [(b"upgrade", b"websocket")]
        await _send_simple(stream, conn, 426, "this is a WebSocket endpoint", extra=upgrade)
        return False
    if (
        request.method != b"GET"
        or b"sec-websocket-key" not in headers
        or headers.get(b"sec-websocket-version") != b"13"
        or b"upgrade" not in headers.get(b"connection", b"").lower()
    ):
        await _send_simple(stream, conn, 400, "bad WebSocket handshake", close=True)
        return False
    return True


async def _send_response(
    stream: trio.SocketStream,
    conn: h11.Connection,
    status: int,
    body: bytes,
    content_type: bytes,
    *,
    head: bool = False,
    close: bool = False,
    extra: Headers | None = None,
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-cache"),
        (b"x-content-type-options", b"nosniff"),
        *(extra or []),
    ]
    if close:
        headers.append((b"connection", b"close"))
    data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    if body and not head:
        data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


async def _send_simple(
    stream: trio.SocketStream,
    conn: h11.Connection,
    status: int,
    text: str,
    *,
    close: bool = False,
    extra: Headers | None = None,
) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    body = f"{status} {text}\n".encode()
    content_type = b"text/plain; charset=utf-8"
    await _send_response(stream, conn, status, body, content_type, close=close, extra=extra)


async def _close_gracefully(stream: trio.abc.HalfCloseableStream, linger: float) -> None:
    """Send FIN, read (and drop) what the client still sends until it closes too, then
    close: closing with unread input would reset the connection, and the client could
    lose what was sent last. Gives up after *linger* seconds, or when cancelled."""
    try:
        with trio.move_on_after(linger):
            await stream.send_eof()
            while await stream.receive_some(RECEIVE_SIZE):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


# -- WebSocket connections ----------------------------------------------------------------------


_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_token(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` value for a ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.strip() + _GUID).digest())


async def serve_websocket(
    stream: trio.SocketStream,
    upgrade: Upgrade,
    handler: Callable[[ClientSocket], Awaitable[None]],
    settings: Settings,
) -> None:
    """Answer *upgrade* with 101 (within ``handshake_timeout``), run
    ``handler(socket)``, then close the connection (the handler has normally
    closed it already, with its close code).

    Cancelled (a stop's deadline has passed), the connection is dropped at once.
    """
    response = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_token(upgrade.key) + b"\r\n\r\n"
    )
    socket = ClientSocket(
        stream, max_message_size=settings.max_message_size, initial=upgrade.trailing
    )
    try:
        with trio.move_on_after(settings.handshake_timeout) as handshake:
            await stream.send_all(response)
        if not handshake.cancelled_caught:
            await handler(socket)
    finally:
        await socket.aclose()
