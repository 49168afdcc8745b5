"""The control socket's HTTP/1.1 server: h11 parses, ``trio.serve_listeners`` accepts.

It knows nothing of supervisors: each complete request goes to an *app*, an
async function from :class:`Request` to :class:`Reply`. What it owns is the
protocol and its limits: a whole request within ``read_timeout``, bodies up to
``max_body``, headers up to 16 KiB, ``max_connections`` at once, malformed input
answered and the connection closed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs
import h11
import trio

from ._control_schema import to_json
from ._peercred import peer_credentials, user_name

log = logging.getLogger("nursery_procs.control")

#: The largest request line plus headers accepted (bigger ones get 431).
MAX_HEADER_SIZE: Final = 16 * 1024
#: Seconds spent draining a client's unread input before closing after an error.
_LINGER: Final = 1.0
_RECEIVE_SIZE: Final = 16 * 1024

_REASONS: Final = {
    100: b"Continue",
    200: b"OK",
    202: b"Accepted",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


@attrs.frozen
class Request:
    """One complete request."""

    method: str
    target: bytes
    body: bytes


@attrs.frozen
class Reply:
    """One answer; ``close`` ends the connection after it."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False


def json_reply(status: int, data: Any, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status, to_json(data), headers=headers)


def error_reply(
    status: int, message: str, headers: tuple[tuple[str, str], ...] = (), *, close: bool = False
) -> Reply:
    return Reply(status, to_json({"error": message}), headers=headers, close=close)


App = Callable[[Request], Awaitable[Reply]]


@attrs.frozen
class Limits:
    """What one client may take of the server."""

    #: Seconds to send each whole request, and to take each of our writes.
    read_timeout: float
    #: The largest request body, in bytes.
    max_body: int
    #: Connections served at once.
    max_connections: int


class _Closed(Exception):
    """The client went away, or stayed silent past the read timeout."""


@attrs.define(eq=False)
class HTTPServer:
    """Serves *app* on every connection handed to :meth:`handle` from a peer whose
    user id is in *allowed_uids* (checked with ``SO_PEERCRED``); others get 403."""

    app: App
    limits: Limits
    allowed_uids: frozenset[int]
    _slots: trio.CapacityLimiter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._slots = trio.CapacityLimiter(self.limits.max_connections)

    async def serve(self, listener: trio.abc.Listener[trio.SocketStream]) -> None:
        """Accept on *listener* until cancelled; closes it on the way out."""
        await trio.serve_listeners(self.handle, [listener])

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one connection until it closes; never raises for the client's sake."""
        try:
            async with stream:
                connection = _Connection(stream, self.app, self.limits)
                refusal = self._check_peer(stream)
                if refusal is not None:
                    await connection.refuse(refusal)
                    return
                try:
                    self._slots.acquire_nowait()
                except trio.WouldBlock:
                    await connection.refuse(error_reply(503, "too many control connections"))
                    return
                try:
                    await connection.serve()
                finally:
                    self._slots.release()
        except Exception:
            log.exception("control connection failed")

    def _check_peer(self, stream: trio.SocketStream) -> Reply | None:
        """403 for a peer of a user not allowed, else None."""
        peer = peer_credentials(stream.socket)
        if peer.uid in self.allowed_uids:
            return None
        who = user_name(peer.uid)
        log.warning("control socket: refused %s (pid %d): not an allowed user", who, peer.pid)
        return error_reply(
            403, f"{who} may not use this control socket (its server can allow it: allow_uids)"
        )


def _both_done(conn: h11.Connection) -> bool:
    """Whether the request and its response are complete, so the connection can be reused."""
    return conn.states == {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE}


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)  # h11 has checked that it is a number
    return None


@attrs.define(eq=False)
class _Connection:
    stream: trio.SocketStream
    app: App
    limits: Limits
    conn: h11.Connection = attrs.field(
        factory=lambda: h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_SIZE)
    )

    async def serve(self) -> None:
        while True:
            reply: Reply | None
            try:
                reply = await self._one_request()
            except _Closed:
                return
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint if exc.error_status_hint in _REASONS else 400
                reply = error_reply(status, f"malformed HTTP request: {exc}", close=True)
            if reply is None:
                return  # the client closed the connection between requests
            if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                return
            try:
                await self._send_reply(reply)
            except _Closed:
                return
            if reply.close or not _both_done(self.conn):
                await self._linger()
                return
            self.conn.start_next_cycle()

    async def refuse(self, reply: Reply) -> None:
        """Answer *reply* without reading a request, then close."""
        try:
            await self._send_reply(attrs.evolve(reply, close=True))
        except _Closed:
            return
        await self._linger()

    async def _receive(self, deadline: float) -> Any:
        """The next h11 event, reading from the client as needed, until *deadline*."""
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = b""
            with trio.move_on_at(deadline) as scope:
                try:
                    data = await self.stream.receive_some(_RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    raise _Closed from None
            if scope.cancelled_caught:
                raise _Closed
            self.conn.receive_data(data)

    async def _one_request(self) -> Reply | None:
        # The whole request must arrive in time: a client sending a byte now and
        # then cannot hold its task for ever either.
        deadline = trio.current_time() + self.limits.read_timeout
        event = await self._receive(deadline)
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):  # pragma: no cover - h11 guarantees a Request
            raise h11.RemoteProtocolError("expected a request")
        length = _content_length(event)
        if length is not None and length > self.limits.max_body:
            return self._too_large()
        if self.conn.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        body = bytearray()
        while True:
            part = await self._receive(deadline)
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > self.limits.max_body:
                    return self._too_large()
            elif isinstance(part, h11.EndOfMessage):
                break
            else:  # pragma: no cover - h11 ends a body with EndOfMessage or an error
                raise _Closed
        method = event.method.decode("ascii", "replace")
        reply = await self.app(Request(method, event.target, bytes(body)))
        log.debug("control %s %r -> %d", method, event.target, reply.status)
        return reply

    def _too_large(self) -> Reply:
        message = f"the request body is over the limit of {self.limits.max_body} bytes"
        return error_reply(413, message, close=True)

    async def _send(self, event: Any) -> None:
        data = self.conn.send(event)
        if not data:
            return
        with trio.move_on_after(self.limits.read_timeout) as scope:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _Closed from None
        if scope.cancelled_caught:
            raise _Closed

    async def _send_reply(self, reply: Reply) -> None:
        headers = [
            ("Content-Type", reply.content_type),
            ("Content-Length", str(len(reply.body))),
            ("Server", "nursery_procs"),
            *reply.headers,
        ]
        if reply.close:
            headers.append(("Connection", "close"))
        response = h11.Response(
            status_code=reply.status, headers=headers, reason=_REASONS.get(reply.status, b"")
        )
        await self._send(response)
        await self._send(h11.Data(data=reply.body))
        await self._send(h11.EndOfMessage())

    async def _linger(self) -> None:
        """Half-close, then drain what the client still sends (briefly), so that
        closing with unread input does not reset the connection before the client
        has read our answer."""
        try:
            await self.stream.send_eof()
            with trio.move_on_after(_LINGER):
                drained = 0
                while drained < 16 * self.limits.max_body:
                    data = await self.stream.receive_some(_RECEIVE_SIZE)
                    if not data:
                        return
                    drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
