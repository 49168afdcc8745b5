"""The collab server's WebSocket clients.

* :class:`Client`: one client, its socket (frames it could not take yet wait there),
  and how it closes;
* :class:`Clients`: every client, counted against the limits (in all, per document);
* :class:`Audience`: the clients of one document child, and the sink of the child's
  batches: it checks each batch and offers each frame to the clients it names.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator

import attrs
import trio

from .document import validate_name
from .protocol import (
    ALL,
    MSG,
    RESYNCED,
    TO,
    BatchError,
    Record,
    decode_from_child,
    decode_kick,
)
from .settings import Settings
from .websocket import REASON_TEXT, ClientSocket, WebSocketError, binary_frame

__all__ = [
    "CLOSE_DOCUMENT_DIED",
    "CLOSE_GOING_AWAY",
    "CLOSE_INVALID_NAME",
    "CLOSE_NORMAL",
    "CLOSE_POLICY_VIOLATION",
    "CLOSE_SERVICE_RESTART",
    "CLOSE_TRY_AGAIN",
    "CLOSE_UNSUPPORTED_DATA",
    "REASON_TEXT",
    "REASON_TOO_FAST",
    "REASON_TOO_SLOW",
    "Audience",
    "Client",
    "ClientSource",
    "Clients",
    "TokenBucket",
    "WebSocketError",
    "document_name",
]

log = logging.getLogger("collab")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY_VIOLATION = 1008
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
REASON_TOO_FAST = "too many messages: over the rate limit"


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


@attrs.define
class TokenBucket:
    """A rate limit: *rate* tokens a second, at most *burst* saved up."""

    rate: float
    burst: float
    tokens: float = attrs.field(init=False)
    updated: float = -math.inf

    def __attrs_post_init__(self) -> None:
        self.tokens = self.burst

    def take(self, now: float) -> bool:
        """Take one token at time *now*; whether there was one."""
        if self.updated > -math.inf:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@attrs.frozen
class ClientSource:
    """A client's socket as the source of a :func:`nursery_procs.forward`: its
    messages, until it closes (:class:`trio.EndOfChannel`)."""

    socket: ClientSocket

    async def receive(self) -> bytes:
        return await self.socket.receive()


@attrs.define(eq=False)
class Client:
    """One WebSocket client: its socket, and how it closes."""

    id: int
    socket: ClientSocket
    peer: str
    #: Frames waiting for a client before it counts as too slow.
    queue_size: int
    name: str | None = None
    #: Counted against its document's limit (see :class:`Clients`).
    admitted: bool = False
    close_code: int | None = None
    close_reason: str = ""
    #: The client closed first (or the connection broke): its close was answered.
    closed_by_peer: bool = False
    #: Covers waiting for the document and reading from the client; a close request
    #: cancels it.
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    #: How many messages it may send (``None``: no limit).
    rate: TokenBucket | None = None
    #: Asks its document for a message with everything (set once it has joined one).
    resync: Callable[[], None] | None = None
    #: Frames for it are dropped until its document's catch-up message arrives.
    behind: bool = False
    #: Where, in the bytes written to it, the last catch-up message ends.
    caught_up_at: float = 0
    #: How many times it fell behind and was caught up.
    resyncs: int = 0

    def offer(self, frame: bytes) -> None:
        """Send an encoded frame (the same bytes may go to many clients); never blocks.

        A client with more than ``queue_size`` frames waiting has fallen behind: what
        waits is dropped and the document is asked for one message with everything
        (see :meth:`fall_behind`); until that arrives, frames for it are dropped too,
        since that message covers them.
        """
        if self.close_code is not None or self.behind:
            return
        socket = self.socket
        socket.offer(frame)
        if socket.pending_frames > self.queue_size:
            self.fall_behind()

    def fall_behind(self) -> None:
        """Drop what waits for the client and ask its document to catch it up with one
        message. A client that falls behind again before it has read the last such
        message is not reading at all: it is closed as too slow (1013)."""
        socket = self.socket
        if self.resync is None or socket.bytes_written < self.caught_up_at:
            log.warning("client %d on %r: too slow; closing it", self.id, self.name)
            self.request_close(CLOSE_TRY_AGAIN, REASON_TOO_SLOW, discard=True)
            return
        log.info("client %d on %r: fell behind; catching it up", self.id, self.name)
        socket.discard_pending()
        self.behind = True
        self.caught_up_at = math.inf  # until the catch-up message is queued
        self.resyncs += 1
        self.resync()

    def caught_up(self, frame: bytes) -> None:
        """The document's answer to :meth:`fall_behind`: send it, and what follows."""
        self.behind = False
        socket = self.socket
        self.caught_up_at = socket.bytes_written + socket.pending_bytes + len(frame)
        self.offer(frame)

    def tag(self, message: bytes) -> Record:
        """What the document's child gets for a *message* from this client.

        Raises:
            WebSocketError: the client sends faster than its rate limit allows (1008).
        """
        rate = self.rate
        if rate is not None and not rate.take(trio.current_time()):
            raise WebSocketError(CLOSE_POLICY_VIOLATION, REASON_TOO_FAST)
        return (MSG, self.id, message)

    def request_close(self, code: int, reason: str, *, discard: bool = False) -> None:
        """Close the client with *code*: what is queued is still sent (unless *discard*),
        then the close frame. The first request wins."""
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_reason = fit_reason(reason)
        if discard:
            self.socket.discard_pending()
        self.scope.cancel()

    def peer_closed(self) -> None:
        """Note that the client closed first (or its connection broke)."""
        if self.close_code is None:
            code, reason = self.socket.peer_close or (1006, "")
            self.closed_by_peer = True
            self.request_close(code, reason)

    def queue_close_frame(self) -> None:
        """Queue the close frame after what is pending (the client's close was answered
        already if it closed first)."""
        if not self.closed_by_peer:
            self.socket.queue_close(self.close_code or CLOSE_NORMAL, self.close_reason)

    async def close_websocket(self, close_timeout: float) -> None:
        """Wait at most *close_timeout* seconds for the client to answer the close
        frame (unless it closed first), then close the connection."""
        with trio.move_on_after(close_timeout):
            await self.socket.wait_closed()
        await self.socket.aclose()

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
    #: Clients closed so far, by close code.
    closes: Counter[int] = attrs.Factory(Counter)
    #: Times a client fell behind and was caught up, over all clients so far.
    caught_up: int = 0
    _all: dict[int, Client] = attrs.Factory(dict)
    _per_document: Counter[str] = attrs.Factory(Counter)
    _ids: Iterator[int] = attrs.Factory(lambda: itertools.count(1))

    def __len__(self) -> int:
        return len(self._all)

    async def serve(self, segment: str, peer: str, socket: ClientSocket, *, edit: Editor) -> None:
        """Serve one client of ``/doc/<segment>``: admit it, send it what is queued for
        it, and run ``edit(client, name)`` while it stays; then close it."""
        with self._connected(socket, peer) as client:
            name = self._admit(client, segment)
            if await self._run(client, name, edit):
                await client.close_websocket(self.settings.close_timeout)

    async def _run(self, client: Client, name: str | None, edit: Editor) -> bool:
        """Whether the client's queue was flushed in time for a close frame (if not, it
        is dropped without one)."""
        async with trio.open_nursery() as tasks:
            tasks.start_soon(client.socket.write_pending)
            if name is not None:
                with client.scope:
                    await edit(client, name)
            client.request_close(CLOSE_NORMAL, "")
            client.queue_close_frame()  # the writer ends once it has written it
            tasks.cancel_scope.deadline = trio.current_time() + self.settings.close_timeout
        return not tasks.cancel_scope.cancelled_caught

    def stop(self) -> None:
        """Close every client with 1001, and refuse new ones."""
        self.stopping = True
        log.info("closing %d clients", len(self._all))
        for client in list(self._all.values()):
            client.request_close(CLOSE_GOING_AWAY, REASON_SHUTDOWN)

    @contextlib.contextmanager
    def _connected(self, socket: ClientSocket, peer: str) -> Iterator[Client]:
        settings = self.settings
        client = Client(next(self._ids), socket, peer, settings.client_queue)
        if settings.max_messages_per_second:
            client.rate = TokenBucket(settings.max_messages_per_second, settings.message_burst)
        self._all[client.id] = client
        self.on_change()
        try:
            yield client
        finally:
            del self._all[client.id]
            self.closes[client.close_code or 1006] += 1
            self.caught_up += client.resyncs
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


@attrs.define(eq=False)
class Audience:
    """The clients attached to one document child, and the sink of its batches.

    Each batch from the child (see :mod:`examples.collab.protocol`) is checked whole
    before anything in it is done: the child is untrusted. A broadcast is framed once
    and the same bytes are offered to every recipient.
    """

    name: str
    #: The largest payload of one record the child may send.
    max_payload: int
    _clients: dict[int, Client] = attrs.Factory(dict)

    def __len__(self) -> int:
        return len(self._clients)

    def add(self, client: Client) -> None:
        self._clients[client.id] = client

    def remove(self, client: Client) -> bool:
        """Forget *client*; whether it was here."""
        return self._clients.pop(client.id, None) is not None

    async def send(self, batch: object) -> None:
        """Deliver one batch from the child (a :func:`nursery_procs.forward` sink)."""
        try:
            records = decode_from_child(batch, max_payload=self.max_payload)
        except BatchError as exc:
            log.warning(
                "document %r sent an unexpected message (%s): %.200r", self.name, exc, batch
            )
            return
        clients = self._clients
        for kind, client_id, payload in records:
            if kind == ALL:
                frame = binary_frame(payload)
                for recipient in list(clients.values()):
                    if recipient.id != client_id:
                        recipient.offer(frame)
                continue
            client = clients.get(client_id)
            if client is None:
                continue  # gone meanwhile
            if kind == TO:
                client.offer(binary_frame(payload))
            elif kind == RESYNCED:
                client.caught_up(binary_frame(payload))
            else:
                code, reason = decode_kick(payload)
                log.info("client %d closed by %r: %d %s", client_id, self.name, code, reason)
                client.request_close(code, reason)

    def close_all(self, code: int, reason: str) -> None:
        for client in list(self._clients.values()):
            client.request_close(code, reason)
