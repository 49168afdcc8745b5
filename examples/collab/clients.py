"""The collab server's WebSocket clients.

* :class:`Client`: one client, its socket, and how it closes;
* :class:`Clients`: every client, counted against the limits (in all, per document).

Once admitted and routed, a client's connection is handed to its document's child
(:mod:`examples.collab.connections`), which serves it from then on; the master keeps
its own copy of the socket only to close it if that child dies (1011) or is stopped
(1012).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator

import attrs
import trio

from .connections import REASON_TOO_FAST, REASON_TOO_SLOW
from .document import validate_name
from .settings import Settings
from .websocket import REASON_TEXT, ClientSocket, WebSocketError

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
    "Client",
    "Clients",
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


@attrs.define(eq=False)
class Client:
    """One WebSocket client: its socket, and how it closes."""

    id: int
    socket: ClientSocket
    peer: str
    name: str | None = None
    #: Counted against its document's limit (see :class:`Clients`).
    admitted: bool = False
    close_code: int | None = None
    close_reason: str = ""
    #: The client closed first (or the connection broke): its close was answered.
    closed_by_peer: bool = False
    #: Its connection is in its document's child's hands: nothing is written or read
    #: here (until the child gives it back by dying or being stopped).
    handed: bool = False
    #: Its document's child closed it (and shut the connection down): nothing more is
    #: written or read here.
    closed_in_child: bool = False
    #: Covers waiting for the document and the time the child serves it; a close
    #: request cancels it.
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    #: How many times it fell behind and was caught up (told by its child).
    resyncs: int = 0
    #: Set once its child has closed it, or its child has gone.
    released: trio.Event = attrs.Factory(trio.Event)

    def request_close(self, code: int, reason: str) -> None:
        """Close the client with *code* (a close frame from here, unless its child has
        the connection). The first request wins."""
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_reason = fit_reason(reason)
        self.scope.cancel()

    def closed_by_child(self, code: int, reason: str, resyncs: int) -> None:
        """Its document's child reports it closed with *code*."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, fit_reason(reason)
        self.closed_in_child = True
        self.handed = False
        self.resyncs = resyncs
        self.socket.shut_down()  # done already by the child; this ends the writer here
        self.released.set()

    def queue_close_frame(self) -> None:
        """Queue the close frame after what is pending (the client's close was answered
        already if it closed first, or by its child)."""
        if not (self.closed_by_peer or self.closed_in_child or self.handed):
            self.socket.queue_close(self.close_code or CLOSE_NORMAL, self.close_reason)

    async def close_websocket(self, close_timeout: float) -> None:
        """Wait at most *close_timeout* seconds for the client to answer the close
        frame (unless it closed first, or its child closed it), then close this
        process's copy of the connection."""
        if not (self.closed_in_child or self.handed):
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
        client = Client(next(self._ids), socket, peer)
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
