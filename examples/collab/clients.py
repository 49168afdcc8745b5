"""The collab server's WebSocket clients.

* :class:`Client`: one client, its bounded queue of messages to send, and how it closes;
* :class:`Clients`: every client, counted against the limits (in all, per document);
* :class:`Audience`: the clients of one document child, and which of them each of the
  child's messages goes to (the ``fan_out`` of :func:`nursery_procs.forward`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import attrs
import trio
import trio_websocket

import nursery_procs

from .document import validate_name
from .settings import Settings

__all__ = [
    "CLOSE_DOCUMENT_DIED",
    "CLOSE_GOING_AWAY",
    "CLOSE_INVALID_NAME",
    "CLOSE_NORMAL",
    "CLOSE_SERVICE_RESTART",
    "CLOSE_TRY_AGAIN",
    "CLOSE_UNSUPPORTED_DATA",
    "Audience",
    "Broadcast",
    "Client",
    "Clients",
    "Close",
    "Direct",
    "Kick",
    "TextFrame",
    "WebSocketEnd",
    "document_name",
    "parse_child_message",
    "valid_close_code",
]

log = logging.getLogger("collab")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_DOCUMENT_DIED = 1011
CLOSE_SERVICE_RESTART = 1012
CLOSE_TRY_AGAIN = 1013
#: In 4400-4499, so that the page does not reconnect.
CLOSE_INVALID_NAME = 4400

REASON_SHUTDOWN = "server shutting down"
REASON_DIED = "document process died; reconnecting"
REASON_STOPPED = "document process stopped; reconnecting"
REASON_BUSY = "document server busy, try again"
REASON_TOO_MANY = "too many clients"
REASON_TOO_MANY_HERE = "too many clients on this document"
REASON_TOO_SLOW = "client too slow: too many messages queued"
REASON_TEXT = "text frames are not supported: send binary y-websocket messages"

#: A WebSocket close reason is at most 123 bytes of UTF-8.
MAX_REASON_BYTES = 123


def fit_reason(text: str) -> str:
    """*text* cut to what a WebSocket close frame can carry, on a character boundary."""
    return text.encode("utf-8")[:MAX_REASON_BYTES].decode("utf-8", errors="ignore")


def document_name(segment: str) -> str:
    """The document name in the path segment after ``/doc/`` (query already removed).

    Raises:
        ValueError: the segment is not valid percent-encoded UTF-8, or the name is not
            acceptable (see :func:`~examples.collab.document.validate_name`).
    """
    try:
        name = urllib.parse.unquote(segment, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise ValueError("document name is not UTF-8") from None
    return validate_name(name)


class TextFrame(Exception):
    """A client sent a text frame: y-websocket messages are binary."""


@attrs.frozen
class Close:
    """A document child's order to close one of its clients (it broke the protocol)."""

    code: int
    reason: str


@attrs.frozen
class WebSocketEnd:
    """A trio-websocket connection as a source and a sink for :func:`nursery_procs.forward`."""

    ws: trio_websocket.WebSocketConnection

    async def receive(self) -> bytes | str:
        return await self.ws.get_message()

    async def send(self, message: bytes) -> None:
        await self.ws.send_message(message)


@attrs.define(eq=False)
class Client:
    """One WebSocket client and its queue of messages to send."""

    id: int
    ws: trio_websocket.WebSocketConnection
    peer: str
    queue_size: int
    name: str | None = None
    #: Counted against its document's limit (see :class:`Clients`).
    admitted: bool = False
    close_code: int | None = None
    close_reason: str = ""
    #: The client closed first (or the connection broke): no close frame to send.
    closed_by_peer: bool = False
    #: Covers waiting for the document and reading from the client; a close request
    #: cancels it.
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    _outbox: trio.MemorySendChannel[bytes] = attrs.field(init=False)
    _queued: trio.MemoryReceiveChannel[bytes] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._outbox, self._queued = trio.open_memory_channel[bytes](self.queue_size)

    async def send(self, item: bytes | Close) -> None:
        """Queue *item* for the client, or close it on a :class:`Close`; never blocks.

        A client is a sink of its document's fan-out: a client whose queue is full is
        closed as too slow, so that one slow reader never holds the others back.

        Raises:
            trio.ClosedResourceError: the client is closing.
            trio.BrokenResourceError: its queue was full (it is being closed).
        """
        if isinstance(item, Close):
            log.info("client %d closed by %r: %d %s", self.id, self.name, item.code, item.reason)
            self.request_close(item.code, item.reason)
            return
        try:
            self._outbox.send_nowait(item)
        except trio.WouldBlock:
            log.warning("client %d on %r: queue full; closing it", self.id, self.name)
            self.request_close(CLOSE_TRY_AGAIN, REASON_TOO_SLOW, discard=True)
            raise trio.BrokenResourceError(REASON_TOO_SLOW) from None

    def tag(self, message: bytes | str) -> tuple[str, int, bytes]:
        """What the document's child gets for a *message* from this client."""
        if isinstance(message, str):
            raise TextFrame(REASON_TEXT)
        return ("msg", self.id, message)

    def request_close(self, code: int, reason: str, *, discard: bool = False) -> None:
        """Close the client with *code*: what is queued is still sent (unless *discard*),
        then the close frame. The first request wins."""
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_reason = fit_reason(reason)
        self._outbox.close()
        if discard:
            with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                while True:
                    self._queued.receive_nowait()
        self.scope.cancel()

    def peer_closed(self) -> None:
        """Note that the client closed first (or its connection broke)."""
        if self.close_code is None:
            reason = self.ws.closed
            self.closed_by_peer = True
            self.request_close(reason.code if reason else 1006, (reason and reason.reason) or "")

    async def write(self) -> None:
        """Send what is queued, in order, until the queue is closed and empty or the
        client has gone."""
        await nursery_procs.forward(self._queued, WebSocketEnd(self.ws))

    async def close_websocket(self, close_timeout: float) -> None:
        """Send the close frame (unless the client closed first) and wait at most
        *close_timeout* seconds for the client's answer."""
        with trio.move_on_after(close_timeout):
            if self.closed_by_peer:  # trio-websocket has answered the client's close
                await self.ws.aclose()
            else:
                await self.ws.aclose(self.close_code or CLOSE_NORMAL, self.close_reason or None)

    def log_disconnect(self) -> None:
        if self.admitted:
            reason = f" {self.close_reason}" if self.close_reason else ""
            log.info(
                "client %d disconnected from %r: %s%s", self.id, self.name, self.close_code, reason
            )


#: What moves a client's messages while it stays: ``edit(client, document_name)``.
Editor = Callable[[Client, str], Awaitable[None]]


@attrs.define(eq=False)
class Clients:
    """Every WebSocket client of the server, counted against the limits."""

    settings: Settings
    #: Called whenever a client comes or goes.
    on_change: Callable[[], None]
    #: Set by :meth:`stop`: new clients are refused.
    stopping: bool = False
    _all: dict[int, Client] = attrs.Factory(dict)
    _per_document: Counter[str] = attrs.Factory(Counter)
    _ids: Iterator[int] = attrs.Factory(lambda: itertools.count(1))

    def __len__(self) -> int:
        return len(self._all)

    async def serve(
        self, segment: str, peer: str, ws: trio_websocket.WebSocketConnection, *, edit: Editor
    ) -> None:
        """Serve one client of ``/doc/<segment>``: admit it, send it what is queued for
        it, and run ``edit(client, name)`` while it stays; then close it."""
        with self._connected(ws, peer) as client:
            name = self._admit(client, segment)
            if await self._run(client, name, edit):
                await client.close_websocket(self.settings.close_timeout)

    async def _run(self, client: Client, name: str | None, edit: Editor) -> bool:
        """Whether the client's queue was flushed in time for a close frame (if not, it
        is dropped without one)."""
        async with trio.open_nursery() as tasks:
            tasks.start_soon(client.write)
            if name is not None:
                with client.scope:
                    await edit(client, name)
            client.request_close(CLOSE_NORMAL, "")  # the writer ends once it has flushed
            tasks.cancel_scope.deadline = trio.current_time() + self.settings.close_timeout
        return not tasks.cancel_scope.cancelled_caught

    def stop(self) -> None:
        """Close every client with 1001, and refuse new ones."""
        self.stopping = True
        log.info("closing %d clients", len(self._all))
        for client in list(self._all.values()):
            client.request_close(CLOSE_GOING_AWAY, REASON_SHUTDOWN)

    @contextlib.contextmanager
    def _connected(self, ws: trio_websocket.WebSocketConnection, peer: str) -> Iterator[Client]:
        client = Client(next(self._ids), ws, peer, self.settings.client_queue)
        self._all[client.id] = client
        self.on_change()
        try:
            yield client
        finally:
            del self._all[client.id]
            if client.admitted and client.name is not None:
                self._per_document[client.name] -= 1
                if not self._per_document[client.name]:
                    del self._per_document[client.name]
            self.on_change()
            client.log_disconnect()

    def _admit(self, client: Client, segment: str) -> str | None:
        """The name of the document *client* asked for, if it may have it; otherwise
        ``None``, and the client has been asked to close with the reason."""
        try:
            name = document_name(segment)
        except ValueError as exc:
            log.info("client %d from %s: invalid document name: %s", client.id, client.peer, exc)
            client.request_close(CLOSE_INVALID_NAME, f"invalid document name: {exc}")
            return None
        client.name = name
        if self.stopping:
            client.request_close(CLOSE_GOING_AWAY, REASON_SHUTDOWN)
            return None
        if len(self._all) > self.settings.max_clients:
            refusal = REASON_TOO_MANY
        elif self._per_document[name] >= self.settings.max_clients_per_doc:
            refusal = REASON_TOO_MANY_HERE
        else:
            self._per_document[name] += 1
            client.admitted = True
            log.info("client %d connected to %r from %s", client.id, name, client.peer)
            return name
        log.warning("client %d from %s refused: %s", client.id, client.peer, refusal)
        client.request_close(CLOSE_TRY_AGAIN, refusal)
        return None


# -- what a document child may send -------------------------------------------------------------
#
# Document children are untrusted (``open_pool(..., trusted=False)``): what they send
# arrives as plain data (msgpack: tuples as lists) and is checked here, shape and
# sizes, before the master acts on it.


@attrs.frozen
class Direct:
    """``("to", client_id, payload)``: a message for one client."""

    client_id: int
    payload: bytes


@attrs.frozen
class Broadcast:
    """``("all", except_id or None, payload)``: a message for every other client."""

    exclude: int | None
    payload: bytes


@attrs.frozen
class Kick:
    """``("kick", client_id, code, reason)``: close one client."""

    client_id: int
    code: int
    reason: str


def _client_id(value: object) -> bool:
    return type(value) is int and 0 < value < 2**63


def valid_close_code(code: object) -> bool:
    """Whether a document child may close a client with *code* (one a peer may send,
    RFC 6455 section 7.4)."""
    if type(code) is not int:
        return False
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def parse_child_message(message: object) -> Direct | Broadcast | Kick | None:
    """What a document child's *message* asks for, or ``None`` if it is not one of
    the three shapes (wrong tags, types, ids or close codes)."""
    match message:
        case ["to" | "all" as tag, recipient, bytes() as payload]:
            if tag == "to" and _client_id(recipient):
                return Direct(recipient, payload)  # type: ignore[arg-type]
            if tag == "all" and (recipient is None or _client_id(recipient)):
                return Broadcast(recipient, payload)  # type: ignore[arg-type]
        case ["kick", client_id, code, str() as reason]:
            if _client_id(client_id) and valid_close_code(code):
                return Kick(client_id, code, fit_reason(reason))  # type: ignore[arg-type]
    return None


@attrs.define(eq=False)
class Audience:
    """The clients attached to one document child.

    The child's messages are ``("to", client_id, payload)`` for one client,
    ``("all", except_id, payload)`` for all the others, and ``("kick", client_id,
    code, reason)`` to close one. :meth:`recipients` and :meth:`item` are the
    ``fan_out`` and ``transform`` of the :func:`nursery_procs.forward` from the child
    to its clients: the payload is taken out once and queued for each recipient.
    """

    name: str
    _clients: dict[int, Client] = attrs.Factory(dict)

    def __len__(self) -> int:
        return len(self._clients)

    def add(self, client: Client) -> None:
        self._clients[client.id] = client

    def remove(self, client: Client) -> bool:
        """Forget *client*; whether it was here."""
        return self._clients.pop(client.id, None) is not None

    def recipients(self, message: Any) -> list[Client]:
        order = parse_child_message(message)
        if isinstance(order, Broadcast):
            exclude = order.exclude
            return [c for client_id, c in self._clients.items() if client_id != exclude]
        if order is not None and order.client_id in self._clients:
            return [self._clients[order.client_id]]
        return []

    def item(self, message: Any) -> bytes | Close | None:
        order = parse_child_message(message)
        if order is None:
            log.warning("document %r sent an unexpected message %.200r", self.name, message)
            return None
        if isinstance(order, Kick):
            return Close(order.code, order.reason)
        return order.payload

    def close_all(self, code: int, reason: str) -> None:
        for client in list(self._clients.values()):
            client.request_close(code, reason)
