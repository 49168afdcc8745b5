"""A document child's own client connections: the master hands each client's socket
over once it has routed it, and from then on this process reads the client's frames,
applies them, makes them durable and writes every answer, framed once, to the clients
it is for. The master is out of the per-edit path (see ``docs/collab.rst``).

How a socket gets here: when its document is open, the child listens on a Unix socket
in a folder only the server's user can enter (the master made it and named it in the
``open`` message), says where over its channel (``["listening", path]``), accepts one
connection, which must come from the master's process (``SO_PEERCRED``), and removes
the path. Each handed client then arrives as one datagram on that connection: its id
(8 bytes, big-endian), then whatever the master read past the opening handshake, with
the socket itself as ``SCM_RIGHTS``.

What the master hears from here, over the channel, all plain data: ``["left", id,
code, reason, resyncs]`` once a client is closed (the close handshake done, the
connection shut down for every process that holds it). What it asks: ``["close", id,
code, reason]`` (a stop of the server: 1001).

If this process dies, the master still holds each client's socket and closes it with
1011; if it is stopped while clients are connected, with 1012. So this process writes
no close frame when it is cancelled: it only lets go of its copies.
"""

from __future__ import annotations

import array
import contextlib
import logging
import math
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import attrs
import trio

from .document import (
    CLOSE_DOCUMENT_UNAVAILABLE,
    COMPACT_AFTER_BYTES,
    REASON_UNAVAILABLE,
    DocumentKernel,
    ParentChannel,
    load_kernel,
    open_journal,
    process_batch,
)
from .journal import Journal, JournalError
from .protocol import ALL, JOIN, KICK, LEAVE, MSG, RESYNCED, TO, Record, decode_kick
from .websocket import ClientSocket, WebSocketError, binary_frame

__all__ = [
    "CLIENT_HEADER",
    "HandOff",
    "TokenBucket",
    "run_document",
]

logger = logging.getLogger("examples.collab.document")

CLOSE_NORMAL: Final = 1000
CLOSE_POLICY_VIOLATION: Final = 1008
CLOSE_TRY_AGAIN: Final = 1013
REASON_TOO_FAST: Final = "too many messages: over the rate limit"
REASON_TOO_SLOW: Final = "client too slow: too many messages queued"
#: A handed client's datagram starts with its id.
CLIENT_HEADER: Final = struct.Struct("!Q")
#: The largest datagram of a handed client: its id and the bytes read past the handshake.
MAX_HANDOFF_MESSAGE: Final = 1 << 20
#: The most messages of one client applied, journaled and answered as one batch.
MAX_BATCH: Final = 256
#: The most close requests kept for clients whose sockets have not arrived yet.
MAX_EARLY_CLOSES: Final = 4096
#: How long the master has to connect once told where.
CONNECT_TIMEOUT: Final = 30.0
_UCRED: Final = struct.Struct("3i")


@attrs.frozen
class HandOff:
    """What the master tells a document child about its clients (in ``open``)."""

    #: The folder to listen in (the master's, mode 0700).
    folder: str
    #: The master's pid: the only process whose connection is accepted.
    master_pid: int
    max_message_size: int
    #: Frames waiting for a client before it counts as fallen behind.
    client_queue: int
    #: Messages a second a client may send on average (0: no limit), and at once.
    max_messages_per_second: float
    message_burst: int
    close_timeout: float

    def to_data(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> HandOff:
        return cls(**data)


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


@attrs.define(eq=False)
class Connection:
    """One handed client, in its document's child."""

    id: int
    socket: ClientSocket
    queue_size: int
    #: Makes the frame that brings it up to date (the whole document).
    catch_up: Callable[[], bytes]
    rate: TokenBucket | None = None
    close_code: int | None = None
    close_reason: str = ""
    #: The client closed first (or its connection broke): its close was answered.
    closed_by_peer: bool = False
    #: Covers reading from the client; a close request cancels it.
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    #: Where, in the bytes written to it, the last catch-up message ends.
    caught_up_at: float = 0
    #: How many times it fell behind and was caught up.
    resyncs: int = 0

    def offer(self, frame: bytes) -> None:
        """Send an encoded frame (the same bytes may go to many clients); never blocks.

        A client with more than ``queue_size`` frames waiting has fallen behind: what
        waits is dropped and replaced by one message with the whole document. One that
        falls behind again before it has read that message is closed as too slow (1013).
        """
        if self.close_code is not None:
            return
        socket = self.socket
        socket.offer(frame)
        if socket.pending_frames > self.queue_size:
            self._fall_behind()

    def _fall_behind(self) -> None:
        socket = self.socket
        if socket.bytes_written < self.caught_up_at:
            logger.warning("client %d: too slow; closing it", self.id)
            self.request_close(CLOSE_TRY_AGAIN, REASON_TOO_SLOW, discard=True)
            return
        logger.info("client %d: fell behind; catching it up", self.id)
        socket.discard_pending()
        frame = binary_frame(self.catch_up())
        self.caught_up_at = socket.bytes_written + socket.pending_bytes + len(frame)
        self.resyncs += 1
        socket.offer(frame)

    def check_rate(self) -> None:
        """Count one message from the client.

        Raises:
            WebSocketError: it sends faster than its rate limit allows (1008).
        """
        rate = self.rate
        if rate is not None and not rate.take(trio.current_time()):
            raise WebSocketError(CLOSE_POLICY_VIOLATION, REASON_TOO_FAST)

    def request_close(self, code: int, reason: str, *, discard: bool = False) -> None:
        """Close the client with *code*: what is queued is still sent (unless *discard*),
        then the close frame. The first request wins."""
        if self.close_code is not None:
            return
        self.close_code = code
        self.close_reason = reason
        if discard:
            self.socket.discard_pending()
        self.scope.cancel()

    def peer_closed(self) -> None:
        if self.close_code is None:
            code, reason = self.socket.peer_close or (1006, "")
            self.closed_by_peer = True
            self.request_close(code, reason)


@attrs.define(eq=False)
class _Room:
    """The document's kernel and journal, and the connections of its clients; with
    no kernel (the document cannot be opened), every client is closed with 4422."""

    name: str
    kernel: DocumentKernel | None
    journal: Journal | None
    handoff: HandOff
    parent: ParentChannel
    connections: dict[int, Connection] = attrs.Factory(dict)
    #: Closes the master asked for before the client's socket arrived (the two come
    #: over different sockets, in either order).
    early_closes: dict[int, tuple[int, str]] = attrs.Factory(dict)
    #: False while the document may be out of step with the journal (between applying
    #: an update and its fsync) or after an unexpected error; then it is not saved.
    consistent: bool = True

    def step(self, records: list[Record]) -> None:
        """Apply *records*, make their updates durable, then deliver the answers."""
        kernel, journal = self.kernel, self.journal
        assert kernel is not None and journal is not None
        self.consistent = False
        durable, outgoing = process_batch(kernel, records)
        if durable:
            journal.append(durable)
        if journal.size >= COMPACT_AFTER_BYTES:
            journal.compact(kernel.full_state())
        self.consistent = True
        self._deliver(outgoing)

    def _deliver(self, records: list[Record]) -> None:
        connections = self.connections
        for kind, client_id, payload in records:
            if kind == ALL:
                frame = binary_frame(payload)
                for other in list(connections.values()):
                    if other.id != client_id:
                        other.offer(frame)
                continue
            connection = connections.get(client_id)
            if connection is None:
                continue
            if kind in (TO, RESYNCED):
                connection.offer(binary_frame(payload))
            elif kind == KICK:
                code, reason = decode_kick(payload)
                logger.info("%s: closing client %d: %d %s", self.name, client_id, code, reason)
                connection.request_close(code, reason)

    def connection(self, client_id: int, sock: socket.socket, initial: bytes) -> Connection:
        handoff = self.handoff
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        client = ClientSocket(stream, max_message_size=handoff.max_message_size, initial=initial)
        catch_up = self.kernel.catch_up if self.kernel is not None else bytes
        connection = Connection(client_id, client, handoff.client_queue, catch_up)
        if handoff.max_messages_per_second:
            connection.rate = TokenBucket(handoff.max_messages_per_second, handoff.message_burst)
        return connection

    async def serve(self, connection: Connection) -> None:
        """Serve one client until it or this document closes it; report it gone."""
        if connection.id in self.connections:
            logger.warning("%s: client %d handed over twice", self.name, connection.id)
            await connection.socket.aclose()
            return
        self.connections[connection.id] = connection
        early = self.early_closes.pop(connection.id, None)
        if early is not None:
            connection.request_close(*early)
        try:
            if self.kernel is None:
                connection.request_close(CLOSE_DOCUMENT_UNAVAILABLE, REASON_UNAVAILABLE)
            else:
                self.step([(JOIN, connection.id, b"")])
            await self._converse(connection)
        finally:
            if self.connections.pop(connection.id, None) is not None and self.kernel is not None:
                self.step([(LEAVE, connection.id, b"")])
            with trio.CancelScope(shield=True):
                await connection.socket.aclose()
        code = connection.close_code or 1006
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.parent.send(
                ["left", connection.id, code, connection.close_reason, connection.resyncs]
            )

    async def _converse(self, connection: Connection) -> None:
        socket = connection.socket
        async with trio.open_nursery() as tasks:
            tasks.start_soon(socket.write_pending)
            with connection.scope:
                try:
                    while True:
                        message = await socket.receive()
                        connection.check_rate()
                        self._take_batch(connection, message)
                except WebSocketError as exc:  # a text frame (1003), too big (4413)...
                    connection.request_close(exc.code, exc.reason)
                except trio.EndOfChannel:
                    connection.peer_closed()
            connection.request_close(CLOSE_NORMAL, "")
            if not connection.closed_by_peer:
                socket.queue_close(connection.close_code, connection.close_reason)
            tasks.cancel_scope.deadline = trio.current_time() + self.handoff.close_timeout
        if not tasks.cancel_scope.cancelled_caught:  # the close frame went out
            with trio.move_on_after(self.handoff.close_timeout):
                await socket.wait_closed()
        socket.shut_down()

    def _take_batch(self, connection: Connection, first: bytes) -> None:
        """Apply *first* and every message of *connection* that has arrived whole
        already, as one batch: one fsync, and the sender's updates merged into one
        broadcast. What came before a bad frame is applied before it counts."""
        records: list[Record] = [(MSG, connection.id, first)]
        try:
            while len(records) < MAX_BATCH:
                message = connection.socket.receive_buffered()
                if message is None:
                    break
                connection.check_rate()
                records.append((MSG, connection.id, message))
        finally:
            self.step(records)

    def on_request(self, message: object) -> None:
        """A request from the master: ``["close", id, code, reason]``."""
        match message:
            case ["close", int() as client_id, int() as code, str() as reason]:
                connection = self.connections.get(client_id)
                if connection is not None:
                    connection.request_close(code, reason)
                elif len(self.early_closes) < MAX_EARLY_CLOSES:
                    self.early_closes[client_id] = (code, reason)
            case _:
                logger.warning("%s: unexpected message from the master: %.200r", self.name, message)


async def _accept_master(handoff: HandOff, parent: ParentChannel) -> trio.socket.SocketType:
    """Listen in the hand-off folder, say where, and accept the master's connection."""
    path = Path(handoff.folder) / f"{os.getpid()}.sock"
    # Bound here, not with Trio's bind, which runs a worker thread for a path (a
    # thread would cost this process memory of its own, for one system call).
    plain = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener = trio.socket.from_stdlib_socket(plain)
    try:
        plain.bind(str(path))
        listener.listen(1)
        await parent.send(["listening", str(path)])
        with trio.fail_after(CONNECT_TIMEOUT):
            while True:
                side, _address = await listener.accept()
                credentials = side.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
                pid, _uid, _gid = _UCRED.unpack(credentials)
                if pid == handoff.master_pid:
                    return side
                logger.warning("hand-off socket: refused a connection from pid %d", pid)
                side.close()
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            path.unlink()


def _handed_client(
    data: bytes, ancillary: list[tuple[int, int, bytes]]
) -> tuple[int, socket.socket] | None:
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    sockets = [socket.socket(fileno=fd) for fd in fds]
    if len(sockets) != 1 or len(data) < CLIENT_HEADER.size:
        for each in sockets:
            each.close()
        return None
    sockets[0].setblocking(False)
    return CLIENT_HEADER.unpack_from(data)[0], sockets[0]


async def _receive_clients(
    room: _Room, side: trio.socket.SocketType, nursery: trio.Nursery
) -> None:
    while True:
        data, ancillary, flags, _address = await side.recvmsg(
            MAX_HANDOFF_MESSAGE, socket.CMSG_SPACE(4 * 4)
        )
        if not data and not ancillary:
            return  # the master closed it
        handed = _handed_client(data, ancillary)
        if handed is None or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            logger.warning("%s: a malformed hand-off was dropped", room.name)
            if handed is not None:
                handed[1].close()
            continue
        client_id, sock = handed
        connection = room.connection(client_id, sock, data[CLIENT_HEADER.size :])
        nursery.start_soon(room.serve, connection)


async def run_document(
    parent: ParentChannel, name: str, data_dir: str | Path, handoff: HandOff
) -> None:
    """Serve document *name* to the clients the master hands over, until the channel
    ends or this is cancelled; then save the document (compacting its journal).

    A document whose storage cannot be opened, or of whose stored updates none can be
    applied, is not served: each of its clients is closed with
    :data:`~examples.collab.document.CLOSE_DOCUMENT_UNAVAILABLE` (logged once).
    """
    journal = await open_journal(name, Path(data_dir))
    kernel = None
    if journal is not None:
        try:
            kernel = await load_kernel(name, journal)
        except BaseException:
            journal.close()
            raise
        if kernel is None:
            journal.close()
            journal = None
    if kernel is None:
        logger.error(
            "document %r cannot be opened; its clients are closed with %d",
            name,
            CLOSE_DOCUMENT_UNAVAILABLE,
        )
    await _serve_clients(_Room(name, kernel, journal, handoff, parent))


async def _serve_clients(room: _Room) -> None:
    try:
        side = await _accept_master(room.handoff, room.parent)
        with side:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_receive_clients, room, side, nursery)
                while True:
                    try:
                        message = await room.parent.receive()
                    except trio.EndOfChannel:
                        break
                    room.on_request(message)
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await _save(room)


async def _save(room: _Room) -> None:
    journal, kernel = room.journal, room.kernel
    if journal is None or kernel is None:
        return
    try:
        if (
            room.consistent
            and not journal.failed
            and (journal.record_count > 0 or journal.needs_compaction)
        ):
            # On the loop: nothing else is left to do in this process, and no thread
            # is started for it.
            journal.compact(kernel.full_state())
    except (OSError, JournalError):
        # Everything is still in the log; the next start replays it.
        logger.exception("%s: compaction on shutdown failed", room.name)
    finally:
        journal.close()


# -- rehearsal ------------------------------------------------------------------------------


def rehearse() -> None:
    """Serve a document once in this process as a document child does, then a whole
    hand-off session: two clients handed over on socket pairs, a sync, an edit, their
    closes, and the save. The folder is removed; no thread is started.

    The server's fork server calls this before it forks any document child (the preload
    entry ``"examples.collab.connections:rehearse"``), so that the code every document
    child runs is set up, and specialised by Python, in pages the children share.
    Storage that cannot be used here only skips the rehearsal (logged).
    """
    import tempfile

    from .document import rehearse as rehearse_document

    rehearse_document()
    try:
        with tempfile.TemporaryDirectory(prefix="collab-rehearsal-") as folder:
            trio.run(_rehearse_handoff, Path(folder))
    except (OSError, JournalError) as exc:
        logger.warning("hand-off rehearsal skipped: %s", exc)


class _RehearsalChannel:
    """The child's channel to a master, within one process."""

    def __init__(self) -> None:
        self.to_child, self._from_master = trio.open_memory_channel[object](16)
        self._to_master, self.from_child = trio.open_memory_channel[object](16)

    async def send(self, obj: object, /) -> None:
        await self._to_master.send(obj)

    async def receive(self) -> object:
        return await self._from_master.receive()


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """A small frame as a client sends it (masked, with a key of zeros)."""
    return bytes((0x80 | opcode, 0x80 | len(payload))) + bytes(4) + payload


async def _rehearse_handoff(folder: Path) -> None:
    channel = _RehearsalChannel()
    handoff = HandOff(str(folder), os.getpid(), 1 << 20, 64, 0.0, 1, 1.0)
    clients: list[socket.socket] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_document, channel, "rehearsal", folder, handoff)
            listening: Any = await channel.from_child.receive()
            with trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as side:
                await side.connect(listening[1])
                for client_id in (1, 2):
                    ours, theirs = socket.socketpair()
                    clients.append(ours)
                    with theirs:
                        fds = array.array("i", [theirs.fileno()])
                        header = CLIENT_HEADER.pack(client_id)
                        await side.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                    step1 = bytes((0, 0, 1, 0))  # sync step 1, empty state vector
                    ours.sendall(_client_frame(0x2, step1) + _client_frame(0x8, b"\x03\xe8"))
                for _ in clients:
                    await channel.from_child.receive()  # ["left", ...]
                await channel.to_child.aclose()
    finally:
        for each in clients:
            each.close()
