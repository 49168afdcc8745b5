"""The collaborative editing server: one port, one child process per document.

Run it from the repository root::

    python -m examples.collab                  # http://127.0.0.1:8080/
    python examples/collab/server.py --port 9000 --data-dir /var/lib/collab

The master process serves the page (plain HTTP, ``GET`` only) and accepts
WebSockets at ``/doc/<name>``. It never decodes what clients send: each binary
frame goes, as it is, to the child process that owns the document, and what
that child answers goes back to the clients it names. A document's child is a
keyed session of a prespawned pool (:meth:`nursery_procs.Pool.session`): every
client of one document shares one child, which outlives its last client by
``--linger`` seconds and compacts its journal when it shuts down.

Close codes a client can see:

====  ===================================================================
1000  normal close
1001  the server is shutting down
1003  the client sent a text frame, or bytes that are not y-websocket
1009  a message over ``--max-message-size``
1011  the document's process died (reconnecting restores the document)
1012  the document's process was stopped while clients were connected
1013  try again later: too many clients, a client too slow to keep up, or
      no document process could be had within ``--start-timeout``
4400  invalid document name (the page does not reconnect)
====  ===================================================================
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import signal
import sys
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``examples`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import attrs
import h11
import trio
import trio_websocket

import nursery_procs
from examples.collab.document import validate_name
from examples.collab.kit import open_message, serve_pooled_document

__all__ = [
    "CLOSE_DOCUMENT_DIED",
    "CLOSE_GOING_AWAY",
    "CLOSE_INVALID_NAME",
    "CLOSE_TRY_AGAIN",
    "CollabServer",
    "Settings",
    "main",
    "serve",
]

log = logging.getLogger("collab")

STATIC_DIR = Path(__file__).resolve().parent / "static"

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
#: The largest request line and headers accepted.
MAX_HEAD_BYTES = 16 * 1024
#: The largest request body read (and discarded) on a GET.
MAX_BODY_BYTES = 64 * 1024
RECEIVE_SIZE = 64 * 1024

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}


@attrs.frozen
class Settings:
    """Everything the server can be told; the command line maps onto it one to one."""

    host: str = "127.0.0.1"
    #: 0 picks a free port (see :attr:`CollabServer.port`).
    port: int = 8080
    data_dir: Path = Path("data")
    #: WebSocket clients at once, in all.
    max_clients: int = 1000
    #: WebSocket clients at once on one document.
    max_clients_per_doc: int = 100
    #: Seconds a document's child outlives its last client.
    linger: float = 2.0
    #: Document children started ahead of time.
    spare: int = 2
    #: Document children at once in all: in use, spare, starting and stopping.
    max_docs: int = 100
    #: Seconds a new client may wait for its document's child.
    start_timeout: float = 10.0
    #: The largest WebSocket message accepted from a client.
    max_message_size: int = 1024 * 1024
    #: Messages queued for one client before it is disconnected as too slow.
    client_queue: int = 1024
    #: Messages from clients queued for one document's child.
    document_queue: int = 1024
    #: Seconds to read an HTTP request head (and between keep-alive requests).
    http_timeout: float = 10.0
    #: Seconds for the WebSocket opening handshake.
    handshake_timeout: float = 10.0
    #: Seconds for a WebSocket closing handshake (then the connection is dropped).
    close_timeout: float = 2.0
    #: Seconds clients get to be closed on shutdown before they are dropped.
    shutdown_timeout: float = 5.0
    #: A Unix socket path for the supervisor's control API, if wanted.
    control: Path | None = None
    static_dir: Path = STATIC_DIR

    def __attrs_post_init__(self) -> None:
        for name in ("max_clients", "max_clients_per_doc", "max_docs", "client_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.spare < 0 or self.spare > self.max_docs:
            raise ValueError("spare must be between 0 and max_docs")
        if self.max_message_size < 1024:
            raise ValueError("max_message_size must be >= 1024")
        for name in ("linger", "start_timeout", "http_timeout", "handshake_timeout"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0")


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


# -- connections -------------------------------------------------------------------------------


class ReplayStream(trio.abc.HalfCloseableStream):
    """A stream that first returns bytes already read from *stream*, then reads on.

    The master reads a request head itself to tell a page request from a WebSocket
    upgrade; trio-websocket then reads the same head again from here.
    """

    def __init__(self, stream: trio.SocketStream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix
        self.closed = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.closed:
            raise trio.ClosedResourceError("the stream is closed")
        if self._prefix:
            await trio.lowlevel.checkpoint()
            size = len(self._prefix) if max_bytes is None else max_bytes
            chunk, self._prefix = self._prefix[:size], self._prefix[size:]
            return chunk
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        self.closed = True
        await self._stream.aclose()


@attrs.frozen
class _Upgrade:
    """A WebSocket request for ``/doc/<segment>``, with the raw bytes read so far."""

    raw: bytes
    segment: str


@attrs.define(eq=False)
class _Client:
    """One WebSocket client and its queue of messages to send."""

    id: int
    ws: trio_websocket.WebSocketConnection
    peer: str
    queue_size: int
    name: str | None = None
    close_code: int | None = None
    close_reason: str = ""
    #: The client closed first (or the connection broke): nothing more to send.
    closed_by_peer: bool = False
    #: The writer did not finish in time: drop the connection without a close frame.
    aborted: bool = False
    #: Covers waiting for the document and reading from the client.
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    writer_done: trio.Event = attrs.Factory(trio.Event)
    _out_send: trio.MemorySendChannel[bytes] = attrs.field(init=False)
    out: trio.MemoryReceiveChannel[bytes] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._out_send, self.out = trio.open_memory_channel[bytes](self.queue_size)

    def deliver(self, payload: bytes) -> None:
        """Queue *payload*; never blocks. A client whose queue is full is closed."""
        if self.close_code is not None:
            return
        try:
            self._out_send.send_nowait(payload)
        except trio.WouldBlock:
            log.warning("client %d on %r: queue full; closing it", self.id, self.name)
            self.request_close(CLOSE_TRY_AGAIN, REASON_TOO_SLOW, discard=True)

    def request_close(self, code: int, reason: str, *, discard: bool = False) -> None:
        """Close the client with *code*: what is queued is still sent (unless *discard*),
        then the close frame. The first request wins."""
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_reason = fit_reason(reason)
        self._out_send.close()
        if discard:
            with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                while True:
                    self.out.receive_nowait()
        self.scope.cancel()

    def peer_closed(self, reason: trio_websocket.CloseReason | None) -> None:
        if self.close_code is None:
            self.closed_by_peer = True
            self.request_close(reason.code if reason else 1006, (reason and reason.reason) or "")


@attrs.define(eq=False)
class _Document:
    """A document's child (one pool session child) and the clients attached to it."""

    name: str
    ctx: nursery_procs.Context
    queue_size: int
    clients: dict[int, _Client] = attrs.Factory(dict)
    #: The child's channel ended (it exited or died): no new clients.
    ended: bool = False
    died: bool = False
    inbound: trio.MemorySendChannel[Any] = attrs.field(init=False)
    _inbound_out: trio.MemoryReceiveChannel[Any] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.inbound, self._inbound_out = trio.open_memory_channel[Any](self.queue_size)

    def post_nowait(self, message: Any, nursery: trio.Nursery) -> None:
        """Queue *message* for the child without waiting (later, if the queue is full)."""
        try:
            self.inbound.send_nowait(message)
        except trio.WouldBlock:
            nursery.start_soon(self._post_later, message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _post_later(self, message: Any) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.inbound.send(message)

    async def pump_to_child(self) -> None:
        """Send the queued messages to the child, in order, until it is gone.

        The only task that sends to the child: it is never cancelled in the middle of
        a message (which would close the link), it stops when the queue is closed.
        """
        with contextlib.suppress(trio.EndOfChannel, trio.ClosedResourceError):
            while True:
                message = await self._inbound_out.receive()
                try:
                    await self.ctx.send(message)
                except (nursery_procs.ContextDied, nursery_procs.MessageUndeliverable):
                    return
                except nursery_procs.WireError as exc:  # e.g. over the link's size limit
                    log.warning("document %r: message not sent: %s", self.name, exc)

    def close_queue(self) -> None:
        self._inbound_out.close()


# -- the server --------------------------------------------------------------------------------


class CollabServer:
    """The running server; :func:`serve` reports it once it accepts connections."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: The bound port (useful with ``port=0``).
        self.port = 0
        self.supervisor: nursery_procs.Supervisor | None = None
        self.pool: nursery_procs.Pool | None = None
        self._data_dir = str(Path(settings.data_dir).resolve())
        self._routes = _static_routes(settings.static_dir)
        self._ids = itertools.count(1)
        self._clients: dict[int, _Client] = {}
        self._per_document: Counter[str] = Counter()
        self._documents: dict[int, _Document] = {}
        self._http_scopes: set[trio.CancelScope] = set()
        self._connections = 0
        self._connections_gone = trio.Event()
        self._accept_scope = trio.CancelScope()
        self._stop = trio.Event()
        self._stopping = False
        self._docs_nursery: trio.Nursery | None = None
        self._changed = trio.Event()

    # -- introspection ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        host = self.settings.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def documents(self) -> dict[str, nursery_procs.Context]:
        """The open documents and their children."""
        return {doc.name: doc.ctx for doc in self._documents.values() if not doc.ended}

    def clients_of(self, name: str) -> int:
        return sum(len(d.clients) for d in self._documents.values() if d.name == name)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until *predicate()* is true; it is checked whenever a client comes or goes
        and whenever a document opens or closes."""
        while not predicate():
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def stop(self) -> None:
        """Begin a graceful stop: clients get 1001, documents are saved, children reaped."""
        self._stop.set()

    # -- life ------------------------------------------------------------------------------

    async def run(
        self,
        *,
        handle_signals: bool = False,
        task_status: trio.TaskStatus[CollabServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        signals = (
            trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM)
            if handle_signals
            else contextlib.nullcontext(None)
        )
        with signals as receiver:
            async with trio.open_nursery() as outer:
                if receiver is not None:
                    outer.start_soon(self._watch_signals, receiver)
                await self._run(task_status)
                outer.cancel_scope.cancel()

    async def _watch_signals(self, receiver: AsyncIterator[int]) -> None:
        async for signum in receiver:
            if not self._stop.is_set():
                log.info("%s: shutting down", signal.Signals(signum).name)
                self.stop()
            else:
                log.info("%s: already shutting down", signal.Signals(signum).name)

    async def _run(self, task_status: trio.TaskStatus[CollabServer]) -> None:
        settings = self.settings
        await trio.Path(self._data_dir).mkdir(parents=True, exist_ok=True)
        # The link to a document child must carry a client's largest message, wrapped.
        link_limit = max(64 * 1024 * 1024, 2 * settings.max_message_size + 64 * 1024)
        policy = nursery_procs.Policy(max_message_size=link_limit)
        async with nursery_procs.open_supervisor(policy=policy) as supervisor:
            self.supervisor = supervisor
            async with trio.open_nursery() as docs_nursery:
                self._docs_nursery = docs_nursery
                async with (
                    nursery_procs.open_pool(
                        supervisor,
                        serve_pooled_document,
                        name="collab",
                        spare=settings.spare,
                        max=settings.max_docs,
                        linger=settings.linger,
                    ) as pool,
                    AsyncExitStack() as extras,
                ):
                    self.pool = pool
                    if settings.control is not None:
                        await _open_control(extras, supervisor, settings.control)
                    await self._serve_connections(task_status)
                # The pool has shut every document child down (each saved its document).
            log.info("stopped")

    async def _serve_connections(self, task_status: trio.TaskStatus[CollabServer]) -> None:
        settings = self.settings
        listeners = await trio.open_tcp_listeners(settings.port, host=settings.host)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as connections:
            connections.start_soon(self._accept, listeners, connections)
            log.info(
                "serving on %s/ (documents in %s; pid %d)",
                self.url,
                self._data_dir,
                os.getpid(),
            )
            task_status.started(self)
            await self._stop.wait()
            await self._close_connections()
            connections.cancel_scope.cancel()

    async def _accept(self, listeners: list[trio.SocketListener], nursery: trio.Nursery) -> None:
        with self._accept_scope:
            await trio.serve_listeners(self._handle_connection, listeners, handler_nursery=nursery)

    async def _close_connections(self) -> None:
        """Stop accepting; close every client with 1001; wait (bounded) until all are gone."""
        self._stopping = True
        self._accept_scope.cancel()
        for scope in list(self._http_scopes):
            scope.cancel()
        clients = list(self._clients.values())
        log.info("closing %d clients", len(clients))
        for client in clients:
            client.request_close(CLOSE_GOING_AWAY, REASON_SHUTDOWN)
        with trio.move_on_after(self.settings.shutdown_timeout) as timer:
            if self._connections:
                await self._connections_gone.wait()
        if timer.cancelled_caught:
            log.warning(
                "%d connections still open at the deadline; dropping them", self._connections
            )

    # -- one TCP connection ------------------------------------------------------------------

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        self._connections += 1
        peer = _peer_name(stream)
        try:
            upgrade: _Upgrade | None = None
            with trio.CancelScope() as scope:
                self._http_scopes.add(scope)
                if self._stopping:
                    scope.cancel()
                try:
                    upgrade = await self._serve_http(stream)
                    if upgrade is None:
                        await _close_gracefully(stream, self.settings.close_timeout)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    upgrade = None
                finally:
                    self._http_scopes.discard(scope)
            if upgrade is None:
                await trio.aclose_forcefully(stream)
                return
            await self._serve_websocket(stream, upgrade, peer)
        except Exception:
            # A fault in one connection's handling must not take the server down.
            log.exception("connection from %s failed", peer)
            await trio.aclose_forcefully(stream)
        finally:
            self._connections -= 1
            if self._connections == 0 and self._stopping:
                self._connections_gone.set()

    async def _serve_http(self, stream: trio.SocketStream) -> _Upgrade | None:
        """Answer page requests until the connection closes or asks for a WebSocket."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        raw = bytearray()  # everything read since the current request began
        while True:
            request: h11.Request | None = None
            complete = False
            body = 0
            with trio.move_on_after(self.settings.http_timeout):
                try:
                    event = await _next_event(conn, stream, raw)
                    if not isinstance(event, h11.Request):
                        return None  # closed between requests
                    request = event
                    while not isinstance(event, h11.EndOfMessage):
                        event = await _next_event(conn, stream, raw)
                        if isinstance(event, h11.Data):
                            body += len(event.data)
                            if body > MAX_BODY_BYTES:
                                await _send_simple(stream, conn, 413, "request body too large")
                                return None
                        elif isinstance(event, h11.ConnectionClosed):
                            return None
                    complete = True
                except h11.RemoteProtocolError as exc:
                    with contextlib.suppress(h11.LocalProtocolError):
                        await _send_simple(stream, conn, exc.error_status_hint, "bad request")
                    return None
            if request is None or not complete:
                return None  # timed out
            upgrade = await self._route(stream, conn, request, bytes(raw))
            if upgrade is not None:
                return upgrade
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return None
            conn.start_next_cycle()
            raw = bytearray(conn.trailing_data[0])

    async def _route(
        self, stream: trio.SocketStream, conn: h11.Connection, request: h11.Request, raw: bytes
    ) -> _Upgrade | None:
        method = request.method
        target = request.target.decode("latin-1")
        path = target.partition("?")[0]
        headers = {name.lower(): value for name, value in request.headers}
        wants_websocket = b"websocket" in headers.get(b"upgrade", b"").lower()
        if path.startswith("/doc/"):
            if not wants_websocket:
                await _send_simple(
                    stream,
                    conn,
                    426,
                    "this is a WebSocket endpoint",
                    extra=[(b"upgrade", b"websocket")],
                )
                return None
            if (
                method != b"GET"
                or b"sec-websocket-key" not in headers
                or headers.get(b"sec-websocket-version") != b"13"
                or b"upgrade" not in headers.get(b"connection", b"").lower()
            ):
                await _send_simple(stream, conn, 400, "bad WebSocket handshake", close=True)
                return None
            return _Upgrade(raw, path[len("/doc/") :])
        if method not in (b"GET", b"HEAD"):
            await _send_simple(
                stream, conn, 405, "method not allowed", extra=[(b"allow", b"GET, HEAD")]
            )
            return None
        file = self._routes.get(path)
        if file is None and (path == "/" or (path.startswith("/d/") and len(path) > 3)):
            file = self._routes.get("/static/index.html")
        if file is None:
            await _send_simple(stream, conn, 404, "not found", close=wants_websocket)
            return None
        try:
            content = await trio.Path(file).read_bytes()
        except OSError:
            await _send_simple(stream, conn, 404, "not found")
            return None
        content_type = CONTENT_TYPES.get(file.suffix, "application/octet-stream")
        await _send_response(
            stream, conn, 200, content, content_type.encode(), head=method == b"HEAD"
        )
        return None

    # -- one WebSocket client ----------------------------------------------------------------

    async def _serve_websocket(
        self, stream: trio.SocketStream, upgrade: _Upgrade, peer: str
    ) -> None:
        settings = self.settings
        replay = ReplayStream(stream, upgrade.raw)
        try:
            async with trio.open_nursery() as ws_tasks:
                ws: trio_websocket.WebSocketConnection | None = None
                with trio.move_on_after(settings.handshake_timeout):
                    request = await trio_websocket.wrap_server_stream(
                        ws_tasks,
                        replay,
                        message_queue_size=4,
                        max_message_size=settings.max_message_size,
                        receive_buffer_size=RECEIVE_SIZE,
                    )
                    ws = await request.accept()
                if ws is not None:
                    await self._serve_client(ws, upgrade.segment, peer)
                ws_tasks.cancel_scope.cancel()
        finally:
            await self._finish_stream(replay)

    async def _finish_stream(self, replay: ReplayStream) -> None:
        """Close the TCP connection if trio-websocket left it open (after a 1009 close it
        does): send FIN, let the peer read our close frame, then close."""
        if replay.closed:
            return
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.settings.close_timeout
            try:
                await replay.send_eof()
                while await replay.receive_some(RECEIVE_SIZE):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        await trio.aclose_forcefully(replay)

    async def _serve_client(
        self, ws: trio_websocket.WebSocketConnection, segment: str, peer: str
    ) -> None:
        settings = self.settings
        client = _Client(next(self._ids), ws, peer, settings.client_queue)
        self._clients[client.id] = client
        self._notify()
        counted: str | None = None
        try:
            try:
                name = document_name(segment)
            except ValueError as exc:
                client.request_close(CLOSE_INVALID_NAME, f"invalid document name: {exc}")
                log.info("client %d from %s: invalid document name: %s", client.id, peer, exc)
                name = None
            if name is not None:
                client.name = name
                if self._stopping:
                    client.request_close(CLOSE_GOING_AWAY, REASON_SHUTDOWN)
                elif len(self._clients) > settings.max_clients:
                    client.request_close(CLOSE_TRY_AGAIN, REASON_TOO_MANY)
                    log.warning("client %d from %s refused: %s", client.id, peer, REASON_TOO_MANY)
                elif self._per_document[name] >= settings.max_clients_per_doc:
                    client.request_close(CLOSE_TRY_AGAIN, REASON_TOO_MANY_HERE)
                    log.warning(
                        "client %d from %s refused: %s", client.id, peer, REASON_TOO_MANY_HERE
                    )
                else:
                    self._per_document[name] += 1
                    counted = name
                    log.info("client %d connected to %r from %s", client.id, name, peer)
            await self._run_client(client)
        finally:
            if counted is not None:
                self._per_document[counted] -= 1
                if not self._per_document[counted]:
                    del self._per_document[counted]
            del self._clients[client.id]
            self._notify()
            await self._close_websocket(client)
            if counted is not None:
                log.info(
                    "client %d disconnected from %r: %s%s",
                    client.id,
                    counted,
                    client.close_code,
                    f" {client.close_reason}" if client.close_reason else "",
                )

    async def _run_client(self, client: _Client) -> None:
        """Attach the client to its document and move its messages until it closes."""
        async with AsyncExitStack() as stack, trio.open_nursery() as tasks:
            tasks.start_soon(self._write_to_client, client)
            with client.scope:
                doc = await self._attach(client, stack)
                if doc is not None:
                    await self._read_from_client(client, doc)
            client.request_close(CLOSE_NORMAL, "")  # ends the writer once it has flushed
            with trio.move_on_after(self.settings.close_timeout) as timer:
                await client.writer_done.wait()
            if timer.cancelled_caught:
                client.aborted = True
                tasks.cancel_scope.cancel()

    async def _attach(self, client: _Client, stack: AsyncExitStack) -> _Document | None:
        """Get the document's child (a pool session) and join it; ``None`` if not possible."""
        if client.close_code is not None or client.name is None:
            return None
        name = client.name
        assert self.pool is not None
        deadline = trio.current_time() + self.settings.start_timeout
        while True:
            attempt = AsyncExitStack()
            ctx: nursery_procs.Context | None = None
            with trio.move_on_at(deadline):
                try:
                    ctx = await attempt.enter_async_context(self.pool.session(name))
                except nursery_procs.PoolClosed:
                    client.request_close(CLOSE_GOING_AWAY, REASON_SHUTDOWN)
                    return None
            if ctx is None:
                log.warning("client %d: no child for %r within the start timeout", client.id, name)
                client.request_close(CLOSE_TRY_AGAIN, REASON_BUSY)
                return None
            doc = self._document_for(ctx, name)
            if not ctx.has_exited and not doc.ended:
                break
            # The child just died and the pool has not noticed yet: a fresh one is coming.
            await attempt.aclose()
            await trio.lowlevel.checkpoint()
        await stack.enter_async_context(attempt)
        try:
            await doc.inbound.send(("join", client.id))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            client.request_close(CLOSE_DOCUMENT_DIED, REASON_DIED)
            return None
        doc.clients[client.id] = client
        self._notify()
        stack.callback(self._detach, doc, client)
        return doc

    def _detach(self, doc: _Document, client: _Client) -> None:
        if doc.clients.pop(client.id, None) is not None:
            self._notify()
            assert self._docs_nursery is not None
            doc.post_nowait(("leave", client.id), self._docs_nursery)

    def _document_for(self, ctx: nursery_procs.Context, name: str) -> _Document:
        doc = self._documents.get(ctx.id)
        if doc is None:
            doc = _Document(name, ctx, self.settings.document_queue)
            self._documents[ctx.id] = doc
            doc.inbound.send_nowait(open_message(name, self._data_dir))  # first, before any join
            assert self._docs_nursery is not None
            self._docs_nursery.start_soon(self._run_document, doc, name=f"document {name!r}")
            log.info("document %r opened in %s (pid %s)", name, ctx.name, ctx.pid)
            self._notify()
        return doc

    async def _read_from_client(self, client: _Client, doc: _Document) -> None:
        ws = client.ws
        while True:
            try:
                message = await ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                client.peer_closed(exc.reason)
                return
            if isinstance(message, str):
                client.request_close(CLOSE_UNSUPPORTED_DATA, REASON_TEXT)
                return
            try:
                await doc.inbound.send(("msg", client.id, message))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                client.request_close(CLOSE_DOCUMENT_DIED, REASON_DIED)
                return

    async def _write_to_client(self, client: _Client) -> None:
        try:
            async for payload in client.out:
                await client.ws.send_message(payload)
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            client.writer_done.set()

    async def _close_websocket(self, client: _Client) -> None:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.settings.close_timeout
            if client.aborted:
                return
            if client.closed_by_peer or client.close_code is None:
                await client.ws.aclose()
            else:
                await client.ws.aclose(client.close_code, client.close_reason or None)

    # -- one document ----------------------------------------------------------------------

    async def _run_document(self, doc: _Document) -> None:
        ctx = doc.ctx
        async with trio.open_nursery() as tasks:
            tasks.start_soon(doc.pump_to_child)
            try:
                while True:
                    try:
                        message = await ctx.receive()
                    except nursery_procs.WireError as exc:
                        log.warning("document %r: undecodable message: %s", doc.name, exc)
                        continue
                    self._dispatch(doc, message)
            except trio.EndOfChannel:
                pass
            except nursery_procs.ContextDied:
                doc.died = True
            finally:
                doc.ended = True
                doc.close_queue()
                self._notify()
            if doc.died:
                code, reason = CLOSE_DOCUMENT_DIED, REASON_DIED
            else:
                code, reason = CLOSE_SERVICE_RESTART, REASON_STOPPED
            for client in list(doc.clients.values()):
                client.request_close(code, reason)
        status = await ctx.wait_exited()
        self._documents.pop(ctx.id, None)
        self._notify()
        if doc.died:
            log.warning(
                "document %r: its process %s (pid %s) died: %s",
                doc.name,
                ctx.name,
                ctx.pid,
                nursery_procs.describe_exit(status),
            )
        else:
            log.info(
                "document %r closed (pid %s, %s)",
                doc.name,
                ctx.pid,
                nursery_procs.describe_exit(status),
            )

    def _dispatch(self, doc: _Document, message: Any) -> None:
        match message:
            case ("all", exclude, bytes() as payload):
                for client_id, client in doc.clients.items():
                    if client_id != exclude:
                        client.deliver(payload)
            case ("to", int() as client_id, bytes() as payload):
                target = doc.clients.get(client_id)
                if target is not None:
                    target.deliver(payload)
            case ("kick", int() as client_id, int() as code, str() as reason):
                target = doc.clients.get(client_id)
                if target is not None:
                    log.info("client %d kicked from %r: %d %s", client_id, doc.name, code, reason)
                    target.request_close(code, reason)
            case _:
                log.warning("document %r sent an unexpected message %.200r", doc.name, message)


# -- HTTP helpers --------------------------------------------------------------------------------


async def _next_event(conn: h11.Connection, stream: trio.SocketStream, raw: bytearray) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await stream.receive_some(RECEIVE_SIZE)
        raw += data
        conn.receive_data(data)


async def _send_response(
    stream: trio.SocketStream,
    conn: h11.Connection,
    status: int,
    body: bytes,
    content_type: bytes,
    *,
    head: bool = False,
    close: bool = False,
    extra: list[tuple[bytes, bytes]] | None = None,
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
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    await _send_response(
        stream,
        conn,
        status,
        f"{status} {text}\n".encode(),
        b"text/plain; charset=utf-8",
        close=close,
        extra=extra,
    )


async def _close_gracefully(stream: trio.SocketStream, linger: float) -> None:
    """Send FIN, read (and drop) what the client still sends until it closes too, then
    close: closing with unread input would reset the connection, and the client could
    lose the response. Gives up after *linger* seconds."""
    with trio.move_on_after(linger):
        try:
            await stream.send_eof()
            while await stream.receive_some(RECEIVE_SIZE):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await trio.aclose_forcefully(stream)


def _static_routes(static_dir: Path) -> dict[str, Path]:
    """``/static/<file>`` for each servable file directly in *static_dir*: a fixed table,
    so no request path can reach anything else."""
    routes: dict[str, Path] = {}
    if static_dir.is_dir():
        for entry in sorted(static_dir.iterdir()):
            if entry.is_file() and not entry.name.startswith(".") and entry.suffix in CONTENT_TYPES:
                routes[f"/static/{urllib.parse.quote(entry.name)}"] = entry
    return routes


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return str(address)


async def _open_control(
    stack: AsyncExitStack, supervisor: nursery_procs.Supervisor, path: Path
) -> None:
    open_control = getattr(nursery_procs, "open_control", None)
    if open_control is None:
        try:
            from nursery_procs import _control
        except ImportError:
            log.warning("--control %s: this nursery_procs has no control socket; ignored", path)
            return
        open_control = _control.open_control
    bound = await stack.enter_async_context(open_control(supervisor, str(path)))
    log.info("control socket at %s", bound)


# -- entry points -------------------------------------------------------------------------------


async def serve(
    settings: Settings | None = None,
    *,
    handle_signals: bool = False,
    task_status: trio.TaskStatus[CollabServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server until :meth:`CollabServer.stop` (or SIGINT/SIGTERM if
    *handle_signals*); report the :class:`CollabServer` once it accepts connections.

    Use it as ``server = await nursery.start(serve, Settings(port=0))``.
    """
    server = CollabServer(settings or Settings())
    await server.run(handle_signals=handle_signals, task_status=task_status)


def parse_args(argv: list[str] | None = None) -> Settings:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m examples.collab",
        description="Collaborative text editing: one process per document.",
    )
    parser.add_argument("--host", default=defaults.host, help="address to listen on")
    parser.add_argument("--port", type=int, default=defaults.port, help="port (0: any free one)")
    parser.add_argument(
        "--data-dir", type=Path, default=Path("data"), help="where documents are stored"
    )
    parser.add_argument("--max-clients", type=int, default=defaults.max_clients)
    parser.add_argument("--max-clients-per-doc", type=int, default=defaults.max_clients_per_doc)
    parser.add_argument(
        "--linger",
        type=float,
        default=defaults.linger,
        help="seconds a document's process outlives its last client",
    )
    parser.add_argument(
        "--spare", type=int, default=defaults.spare, help="document processes started ahead"
    )
    parser.add_argument(
        "--max-docs",
        type=int,
        default=defaults.max_docs,
        help="document processes at once (in use, spare, starting, stopping)",
    )
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=defaults.start_timeout,
        help="seconds a client waits for its document's process",
    )
    parser.add_argument("--max-message-size", type=int, default=defaults.max_message_size)
    parser.add_argument(
        "--client-queue",
        type=int,
        default=defaults.client_queue,
        help="messages queued for a client before it is closed as too slow",
    )
    parser.add_argument(
        "--control", type=Path, default=None, help="serve the control API on this Unix socket"
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return Settings(
            host=args.host,
            port=args.port,
            data_dir=args.data_dir,
            max_clients=args.max_clients,
            max_clients_per_doc=args.max_clients_per_doc,
            linger=args.linger,
            spare=args.spare,
            max_docs=args.max_docs,
            start_timeout=args.start_timeout,
            max_message_size=args.max_message_size,
            client_queue=args.client_queue,
            control=args.control,
        )
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    trio.run(lambda: serve(settings, handle_signals=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
