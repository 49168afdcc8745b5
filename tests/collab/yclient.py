"""A small y-websocket client for Trio: trio-websocket for the socket, pycrdt for the
document and awareness. It speaks what the browser page speaks (sync step 1 and 2,
updates, awareness), and records what tests need to check: the close code and
reason, and the edits it saw arrive as broadcasts from other clients.

Edits are made of *tokens* such as ``<a:17>`` appended at the end of the text, so
that any text can be split back into the edits it contains.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio_websocket
from pycrdt import (
    Awareness,
    Doc,
    Text,
    create_awareness_message,
    create_sync_message,
    create_update_message,
    handle_sync_message,
    read_message,
)

from nursery_procs._groups import unwrap_sole_exception

MESSAGE_SYNC = 0
MESSAGE_AWARENESS = 1
SYNC_STEP2 = 1
SYNC_UPDATE = 2

TOKEN = re.compile(r"<[a-z0-9]+:\d+>")


def tokens(text: str) -> set[str]:
    """The edit tokens in *text*."""
    return set(TOKEN.findall(text))


class YClient:
    """One connection of a y-websocket client; get one from :func:`connect`.

    The :class:`pycrdt.Doc` may be passed in and outlive the connection, as a browser
    tab's document outlives a dropped socket: reconnecting with it syncs both ways.
    """

    def __init__(self, ws: trio_websocket.WebSocketConnection, doc: Doc[Any]) -> None:
        self.ws = ws
        self.doc = doc
        self.text = doc.get("text", type=Text)
        self.awareness = Awareness(doc)
        #: Set when the server's sync step 2 has arrived (the text is the server's).
        self.synced = trio.Event()
        #: Set when the connection has closed; then :attr:`close_code` is known.
        self.closed = trio.Event()
        self.close_code: int | None = None
        self.close_reason: str | None = None
        #: Tokens that appeared in the text because of an update another client made.
        self.seen_broadcast: set[str] = set()
        #: Every message received, in order.
        self.received: list[bytes] = []
        self._changed = trio.Event()

    # -- state -----------------------------------------------------------------------------

    def peers(self) -> list[str]:
        """The user names other clients publish in their awareness state, sorted."""
        names = []
        for client_id, state in self.awareness.states.items():
            if client_id == self.awareness.client_id or not isinstance(state, dict):
                continue
            user = state.get("user")
            if isinstance(user, dict) and isinstance(user.get("name"), str):
                names.append(user["name"])
        return sorted(names)

    def content(self) -> str:
        return str(self.text)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until *predicate()* is true; it is checked after every message and when the
        connection closes. Bound the wait with :func:`trio.fail_after`."""
        while not predicate():
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- sending ---------------------------------------------------------------------------

    async def send(self, payload: bytes | str) -> None:
        """Send raw bytes (or a text frame): for tests of bad input."""
        await self.ws.send_message(payload)

    async def append(self, token: str) -> None:
        """Append *token* to the shared text and send the update."""
        before = self.doc.get_state()
        self.text += token
        await self.ws.send_message(create_update_message(self.doc.get_update(before)))

    async def insert(self, index: int, value: str) -> None:
        before = self.doc.get_state()
        self.text.insert(index, value)
        await self.ws.send_message(create_update_message(self.doc.get_update(before)))

    async def set_user(self, name: str) -> None:
        """Publish ``{"user": {"name": name}}`` as this client's awareness state."""
        self.awareness.set_local_state({"user": {"name": name, "color": "#1c7ed6"}})
        update = self.awareness.encode_awareness_update([self.awareness.client_id])
        await self.ws.send_message(create_awareness_message(update))

    # -- receiving -------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                message = await self.ws.get_message()
                if isinstance(message, str):
                    raise AssertionError(f"the server sent a text frame: {message!r}")
                self.received.append(message)
                await self._handle(message)
                self._notify()
        except trio_websocket.ConnectionClosed as exc:
            reason = exc.reason
            self.close_code = reason.code if reason is not None else None
            self.close_reason = reason.reason if reason is not None else None
        finally:
            self.closed.set()
            self._notify()

    async def _handle(self, message: bytes) -> None:
        if message[0] == MESSAGE_SYNC:
            sub_type = message[1]
            before = tokens(str(self.text)) if sub_type == SYNC_UPDATE else set()
            reply = handle_sync_message(message[1:], self.doc)
            if sub_type == SYNC_UPDATE:
                self.seen_broadcast |= tokens(str(self.text)) - before
            elif sub_type == SYNC_STEP2:
                self.synced.set()
            if reply is not None:
                await self.ws.send_message(reply)
        elif message[0] == MESSAGE_AWARENESS:
            self.awareness.apply_awareness_update(read_message(message[1:]), "remote")


@asynccontextmanager
async def open_socket(
    url: str, *, max_message_size: int = 64 * 1024 * 1024, message_queue_size: int = 1
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A plain WebSocket client connection to a ``ws://`` URL.

    Unlike ``trio_websocket.open_websocket_url``, this closes the TCP connection
    whoever closed the WebSocket first (trio-websocket leaves it open when the server
    did).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "ws" or parts.hostname is None or parts.port is None:
        raise ValueError(f"expected ws://host:port/..., not {url!r}")
    resource = parts.path + (f"?{parts.query}" if parts.query else "")
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    try:
        with unwrap_sole_exception():
            async with trio.open_nursery() as nursery:
                with trio.fail_after(10):
                    ws = await trio_websocket.wrap_client_stream(
                        nursery,
                        stream,
                        f"{parts.hostname}:{parts.port}",
                        resource,
                        max_message_size=max_message_size,
                        message_queue_size=message_queue_size,
                    )
                try:
                    yield ws
                finally:
                    with trio.move_on_after(2, shield=True):
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


@asynccontextmanager
async def connect(
    url: str,
    *,
    doc: Doc[Any] | None = None,
    user: str | None = None,
    sync: bool = True,
    max_message_size: int = 64 * 1024 * 1024,
) -> AsyncIterator[YClient]:
    """Connect to a ``ws://`` URL and start the y-websocket handshake.

    With *sync* (the default), sync step 1 is sent at once (and the awareness state, if
    *user* is given); wait on :attr:`YClient.synced` to know the text is the server's.
    Without it nothing is sent, for tests that send bad input first.

    Leaving the block closes the connection (normally, code 1000) if it is still open.
    """
    async with open_socket(url, max_message_size=max_message_size) as ws:
        client = YClient(ws, doc if doc is not None else Doc())
        with unwrap_sole_exception():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._run)
                try:
                    if sync:
                        await ws.send_message(create_sync_message(client.doc))
                        if user is not None:
                            await client.set_user(user)
                except trio_websocket.ConnectionClosed:
                    pass  # the server closed at once: the reader records why
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
