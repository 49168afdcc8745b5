"""The document side of the collaborative editing example.

The master process accepts browser WebSockets at ``/doc/<name>`` and hands each
client's connection to the document's own child process. This module is what runs
there:

* :class:`DocumentKernel` — pure, transport-free protocol logic: one pycrdt ``Doc`` plus
  an ``Awareness``, speaking the y-websocket protocol with any number of clients;
* :func:`process_batch` — records from clients in, the durable updates and the
  messages for clients out, which :mod:`examples.collab.connections` (the child's own
  client connections) journals and delivers;
* :func:`validate_name` — the master's check of document names taken from URLs.

A document whose storage cannot be opened (see
:class:`~examples.collab.journal.JournalUnavailableError`) is not served: its child stays
up and closes every client handed to it with :data:`CLOSE_DOCUMENT_UNAVAILABLE`, once,
which the page does not reconnect on.

The wire format (lib0 encoding) of a y-websocket message::

    varuint message type
      0 sync:             varuint sub-type, then varUint8Array payload
                              0 step 1 (payload: state vector)
                              1 step 2 (payload: update)
                              2 update (payload: update)
      1 awareness:        varUint8Array awareness update
      3 query-awareness:  (nothing)

An awareness update is ``varuint count`` followed by ``count`` entries of
``varuint client id, varuint clock, varString JSON state`` (``null`` = removed).
"""

from __future__ import annotations

import json
import logging
import math
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple, NoReturn, Protocol

import attrs
import trio
from pycrdt import Awareness, Doc, Text, TransactionEvent, get_update, merge_updates

from .journal import Journal, JournalError, JournalUnavailableError, StorageStatistics
from .protocol import (
    ALL,
    JOIN,
    KICK,
    LEAVE,
    MSG,
    RESYNC,
    RESYNCED,
    TO,
    Record,
    kick_payload,
)

__all__ = [
    "CLOSE_DOCUMENT_UNAVAILABLE",
    "CLOSE_POLICY_VIOLATION",
    "CLOSE_UNSUPPORTED_DATA",
    "MAX_AWARENESS_PER_CLIENT",
    "MAX_NAME_BYTES",
    "MAX_NAME_CHARS",
    "REASON_TOO_MANY_AWARENESS",
    "REASON_UNAVAILABLE",
    "DocumentKernel",
    "Outgoing",
    "ParentChannel",
    "ProtocolError",
    "Reply",
    "UnknownClientError",
    "check_old_snapshot",
    "fetch_storage_statistics",
    "load_kernel",
    "open_journal",
    "process_batch",
    "rehearse",
    "storage_report",
    "storage_statistics",
    "validate_name",
]

logger = logging.getLogger(__name__)

# y-websocket message types.
MESSAGE_SYNC = 0
MESSAGE_AWARENESS = 1
MESSAGE_AUTH = 2
MESSAGE_QUERY_AWARENESS = 3
# y-protocols sync sub-types.
SYNC_STEP1 = 0
SYNC_STEP2 = 1
SYNC_UPDATE = 2

#: An update that changes nothing (no structs, empty delete set); Yjs sends it often.
EMPTY_UPDATE = b"\x00\x00"

#: WebSocket close code for a client that sent something other than y-websocket messages.
CLOSE_UNSUPPORTED_DATA = 1003
#: WebSocket close code for a client over one of its limits (awareness states, rate).
CLOSE_POLICY_VIOLATION = 1008
#: The most awareness states one connection may publish at once (a y-websocket
#: client publishes one: its own).
MAX_AWARENESS_PER_CLIENT = 16
REASON_TOO_MANY_AWARENESS = (
    f"too many awareness states: at most {MAX_AWARENESS_PER_CLIENT} a client"
)
#: WebSocket close code for every client of a document whose storage cannot be opened
#: (unreadable, or damaged with nothing valid left). In 4400-4499, so that the page shows
#: it and does not reconnect.
CLOSE_DOCUMENT_UNAVAILABLE = 4422
REASON_UNAVAILABLE = "document cannot be opened: its storage is damaged or unreadable"
#: A WebSocket close reason is at most 123 bytes of UTF-8.
MAX_CLOSE_REASON_BYTES = 123

#: lib0 decodes integers up to 53 bits (JavaScript's safe integers); so do we.
MAX_VAR_UINT = 2**53 - 1
_MAX_VAR_UINT_BYTES = 8

MAX_NAME_CHARS = 100
#: File names are limited to 255 bytes; leave room for the ``.snapshot.tmp`` suffix.
MAX_NAME_BYTES = 200


# -- document names ---------------------------------------------------------------------------


def validate_name(name: str) -> str:
    """Check a document name taken from a URL (already percent-decoded).

    A valid name is 1 to :data:`MAX_NAME_CHARS` characters and at most
    :data:`MAX_NAME_BYTES` bytes of UTF-8, printable (``str.isprintable``: no control,
    format, surrogate, unassigned or separator characters other than the plain space),
    without ``/`` or ``\\``, and does not start with ``.`` (which also excludes ``.`` and
    ``..``).

    Returns:
        The name in Unicode normalization form C, so that the composed and decomposed
        spellings of the same text (``"Café"``) name the same document. Use the returned
        value.

    Raises:
        ValueError: the name is not acceptable; the message says why.
    """
    if not isinstance(name, str):
        raise ValueError(f"document name must be a string, not {type(name).__name__}")
    if not name:
        raise ValueError("document name is empty")
    if "\x00" in name:
        raise ValueError("document name contains a NUL character")
    if "/" in name or "\\" in name:
        raise ValueError("document name contains '/' or '\\'")
    if name in (".", ".."):
        raise ValueError(f"document name {name!r} is reserved")
    if name.startswith("."):
        raise ValueError("document name starts with '.'")
    if not name.isprintable():
        raise ValueError("document name contains a non-printable character")
    name = unicodedata.normalize("NFC", name)
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"document name is longer than {MAX_NAME_CHARS} characters")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ValueError(f"document name is longer than {MAX_NAME_BYTES} bytes of UTF-8")
    return name


# -- results ----------------------------------------------------------------------------------


class Outgoing(NamedTuple):
    """One message for the master to deliver.

    ``to`` is a client id, or ``None`` for every client of the document except
    ``exclude`` (which may be ``None`` too).
    """

    to: int | None
    exclude: int | None
    payload: bytes


class Reply(NamedTuple):
    """What to do after :meth:`DocumentKernel.receive`.

    Append every update in ``durable`` to the journal and fsync it *before* sending
    any of ``outgoing``, in order.
    """

    durable: list[bytes]
    outgoing: list[Outgoing]


def _empty_reply() -> Reply:
    return Reply(durable=[], outgoing=[])


def _reply_to(client_id: int, payload: bytes) -> Reply:
    return Reply(durable=[], outgoing=[Outgoing(client_id, None, payload)])


class ProtocolError(Exception):
    """The bytes a client sent are not a valid y-websocket message.

    Attributes:
        reason: a short text fit for a WebSocket close frame.
        close_code: the WebSocket close code to use (1003, unsupported data).
        reply: what must still be done although the message was rejected. It is empty
            unless pycrdt had already integrated part of an update when it refused the
            rest; that part is then in the document and has to be journaled and
            broadcast like any other change.
    """

    def __init__(
        self,
        reason: str,
        *,
        close_code: int = CLOSE_UNSUPPORTED_DATA,
        reply: Reply | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.close_code = close_code
        self.reply = reply if reply is not None else _empty_reply()


class UnknownClientError(LookupError):
    """A client id that has not joined (or has already left) the document."""


# -- lib0 encoding ------------------------------------------------------------------------------


def _var_uint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def _var_bytes(data: bytes) -> bytes:
    return _var_uint(len(data)) + data


def _sync_message(sub_type: int, data: bytes) -> bytes:
    return _var_uint(MESSAGE_SYNC) + _var_uint(sub_type) + _var_bytes(data)


def _awareness_message(update: bytes) -> bytes:
    return _var_uint(MESSAGE_AWARENESS) + _var_bytes(update)


class _Reader:
    """A strict lib0 decoder: every problem is a :class:`ProtocolError`."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def var_uint(self, what: str) -> int:
        data = self._data
        value = 0
        shift = 0
        for _ in range(_MAX_VAR_UINT_BYTES):
            if self._pos >= len(data):
                raise ProtocolError(f"truncated {what}")
            byte = data[self._pos]
            self._pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                if value > MAX_VAR_UINT:
                    break
                return value
            shift += 7
        raise ProtocolError(f"{what} is out of range")

    def var_bytes(self, what: str) -> bytes:
        length = self.var_uint(f"{what} length")
        end = self._pos + length
        if end > len(self._data):
            raise ProtocolError(f"truncated {what}")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def var_string(self, what: str) -> str:
        raw = self.var_bytes(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"{what} is not UTF-8") from None

    def expect_end(self, what: str) -> None:
        extra = len(self._data) - self._pos
        if extra:
            raise ProtocolError(f"{extra} unexpected bytes after the {what}")


def _check_state_vector(data: bytes) -> None:
    reader = _Reader(data)
    count = reader.var_uint("state vector length")
    for _ in range(count):
        reader.var_uint("state vector client id")
        reader.var_uint("state vector clock")
    reader.expect_end("state vector")


def _reject_constant(token: str) -> NoReturn:
    raise ValueError(f"{token} is not JSON")


def _parse_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _parse_awareness_state(raw: str) -> dict[str, Any] | None:
    """Parse one awareness state as browsers will: strict JSON, an object or ``null``.

    Python's ``json`` would otherwise accept ``NaN`` and ``Infinity`` and write them back
    out, which ``JSON.parse`` in the other clients rejects.
    """
    try:
        state = json.loads(raw, parse_constant=_reject_constant, parse_float=_parse_float)
    except (ValueError, RecursionError):
        raise ProtocolError("awareness state is not valid JSON") from None
    if state is not None and not isinstance(state, dict):
        raise ProtocolError("awareness state is not a JSON object or null")
    return state


def _check_awareness_update(update: bytes) -> set[int]:
    """Check an awareness update; return the ids it sets a state for (not ``null``)."""
    reader = _Reader(update)
    count = reader.var_uint("awareness entry count")
    present: set[int] = set()
    for _ in range(count):
        awareness_id = reader.var_uint("awareness client id")
        reader.var_uint("awareness clock")
        if _parse_awareness_state(reader.var_string("awareness state")) is not None:
            present.add(awareness_id)
        else:
            present.discard(awareness_id)
    reader.expect_end("awareness update")
    return present


# -- the kernel -------------------------------------------------------------------------------


class DocumentKernel:
    """One document and its connected clients, as a pure state machine.

    Every method is synchronous and does no I/O: the caller moves bytes between the
    kernel, the clients and the journal. Messages from a client must be passed in the
    order that client sent them; the kernel's replies must be delivered in the order
    given.

    Invariants kept for the caller:

    * everything the document contains was either recovered from the journal or
      returned in some :attr:`Reply.durable`, so appending those keeps the journal
      equal to the document;
    * an invalid message raises :class:`ProtocolError` and leaves the document and the
      awareness states as they were (see :attr:`ProtocolError.reply` for the one
      exception pycrdt can cause).

    Awareness entries belong to the connection that last set them; when a connection
    leaves, the entries it owns are removed and the removal is broadcast.
    """

    def __init__(self, name: str, journal: Journal) -> None:
        self._name = name
        self._doc: Doc[Text] = Doc()
        self._text = self._doc.get("text", type=Text)
        self._rejected: list[tuple[int, str]] = []
        for index, update in enumerate(journal.recovered):
            try:
                self._doc.apply_update(update)
            except Exception as exc:
                self._rejected.append((index, str(exc) or type(exc).__name__))
        # After damage, some stored updates may wait for a lost predecessor (Yjs keeps
        # them pending, and a client that still has it can supply it). pycrdt leaves
        # pending updates out of get_update(), so they are kept here for full_state().
        # (Finding them costs a fraction of applying the updates.)
        self._waiting = _unintegrated(journal.recovered, self._doc.get_state())
        self._awareness = Awareness(self._doc)
        # The server is not a participant: it publishes no awareness state of its own.
        self._awareness.set_local_state(None)
        self._clients: set[int] = set()
        self._owned: dict[int, set[int]] = {}  # connection -> awareness ids it owns
        self._owner: dict[int, int] = {}  # awareness id -> owning connection
        self._captured_updates: list[bytes] | None = None
        self._captured_awareness: list[dict[str, list[int]]] | None = None
        self._doc.observe(self._on_transaction)
        self._awareness.observe(self._on_awareness_change)

    # -- observers ---------------------------------------------------------------------------

    def _on_transaction(self, event: TransactionEvent) -> None:
        # The update must be read while the event is alive (inside the callback).
        if self._captured_updates is not None:
            self._captured_updates.append(event.update)

    def _on_awareness_change(self, topic: str, change: tuple[dict[str, Any], Any]) -> None:
        if topic == "update" and self._captured_awareness is not None:
            changes, _origin = change
            self._captured_awareness.append(changes)

    # -- introspection -----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def clients(self) -> frozenset[int]:
        """The ids of the connected clients."""
        return frozenset(self._clients)

    def is_joined(self, client_id: int) -> bool:
        return client_id in self._clients

    def awareness_owner(self, awareness_id: int) -> int | None:
        """The connection whose leaving will remove this awareness entry, if any."""
        return self._owner.get(awareness_id)

    def awareness_states(self) -> dict[int, dict[str, Any]]:
        """A copy of the current awareness states, by awareness client id."""
        return dict(self._awareness.states)

    @property
    def rejected(self) -> tuple[tuple[int, str], ...]:
        """The stored updates that could not be applied when the kernel was built, as
        (index in :attr:`Journal.recovered`, error) pairs."""
        return tuple(self._rejected)

    @property
    def waiting(self) -> int:
        """How many stored updates wait for a predecessor that was lost (as of the last
        :meth:`full_state`)."""
        return len(self._waiting)

    def full_state(self) -> bytes:
        """The whole document as one update (for :meth:`Journal.compact`), including
        stored updates still waiting for a lost predecessor."""
        update = self._doc.get_update()
        if self._waiting:
            self._waiting = _unintegrated(self._waiting, self._doc.get_state())
            if self._waiting:
                update = merge_updates(update, *self._waiting)
        return update

    def text(self) -> str:
        """The shared text's current content."""
        return str(self._text)

    def catch_up(self) -> bytes:
        """One message that brings a client that missed messages up to date: the whole
        document as one update (sync step 2; what the client has already is harmless)."""
        return _sync_message(SYNC_STEP2, self._doc.get_update())

    # -- connections -------------------------------------------------------------------------

    def join(self, client_id: int) -> list[Outgoing]:
        """Register a new connection; return the server's greeting to it.

        The greeting is sync step 1 (the server's state vector, so the client answers
        with whatever the server lacks) and, if anyone is present, their awareness states.

        Raises:
            ValueError: *client_id* is already connected.
        """
        if client_id in self._clients:
            raise ValueError(f"client {client_id} has already joined")
        self._clients.add(client_id)
        self._owned[client_id] = set()
        greeting = [Outgoing(client_id, None, _sync_message(SYNC_STEP1, self._doc.get_state()))]
        present = list(self._awareness.states)
        if present:
            update = self._awareness.encode_awareness_update(present)
            greeting.append(Outgoing(client_id, None, _awareness_message(update)))
        return greeting

    def leave(self, client_id: int) -> list[Outgoing]:
        """Forget a connection; broadcast the removal of its awareness entries.

        Leaving twice, or without having joined, does nothing.
        """
        if client_id not in self._clients:
            return []
        self._clients.discard(client_id)
        owned = self._owned.pop(client_id, set())
        for awareness_id in owned:
            self._owner.pop(awareness_id, None)
        if not owned:
            return []
        changes = self._capture_awareness(
            lambda: self._awareness.remove_awareness_states(sorted(owned), None)
        )
        removed = [awareness_id for change in changes for awareness_id in change["removed"]]
        if not removed:
            return []
        update = self._awareness.encode_awareness_update(removed)
        return [Outgoing(None, client_id, _awareness_message(update))]

    # -- messages ----------------------------------------------------------------------------

    def receive(self, client_id: int, payload: bytes) -> Reply:
        """Handle one message from a client.

        Raises:
            ProtocolError: *payload* is not a valid y-websocket message (nothing changed).
            UnknownClientError: *client_id* has not joined.

        A panic inside pycrdt's Rust code (``pyo3_runtime.PanicException``, which derives
        from ``BaseException``) is deliberately not caught: the document's state is then
        unknown, and the process should end without saving it and start again from the
        journal.
        """
        if client_id not in self._clients:
            raise UnknownClientError(client_id)
        if not payload:
            raise ProtocolError("empty message")
        reader = _Reader(bytes(payload))
        message_type = reader.var_uint("message type")
        if message_type == MESSAGE_SYNC:
            sync_type = reader.var_uint("sync message type")
            if sync_type not in (SYNC_STEP1, SYNC_STEP2, SYNC_UPDATE):
                raise ProtocolError(f"unknown sync message type {sync_type}")
            body = reader.var_bytes("sync payload")
            reader.expect_end("sync message")
            if sync_type == SYNC_STEP1:
                return self._on_sync_step1(client_id, body)
            return self._on_update(client_id, body)
        if message_type == MESSAGE_AWARENESS:
            body = reader.var_bytes("awareness payload")
            reader.expect_end("awareness message")
            return self._on_awareness(client_id, body)
        if message_type == MESSAGE_QUERY_AWARENESS:
            reader.expect_end("query-awareness message")
            update = self._awareness.encode_awareness_update(list(self._awareness.states))
            return _reply_to(client_id, _awareness_message(update))
        if message_type == MESSAGE_AUTH:
            raise ProtocolError("clients may not send auth messages")
        raise ProtocolError(f"unknown message type {message_type}")

    def _on_sync_step1(self, client_id: int, state_vector: bytes) -> Reply:
        _check_state_vector(state_vector)
        try:
            missing = self._doc.get_update(state_vector)
        except Exception as exc:
            raise ProtocolError("invalid state vector") from exc
        # The server's own step 1 went out in the greeting (join), so step 2 is all
        # that is needed here.
        return _reply_to(client_id, _sync_message(SYNC_STEP2, missing))

    def _on_update(self, client_id: int, update: bytes) -> Reply:
        if update == EMPTY_UPDATE:
            return _empty_reply()
        captured: list[bytes] = []
        self._captured_updates = captured
        try:
            self._doc.apply_update(update)
        except Exception as exc:
            # pycrdt decodes the whole update before touching the document, so normally
            # nothing was captured; if it failed half-way, report what did change.
            raise ProtocolError(
                "invalid document update", reply=self._broadcast_updates(client_id, captured)
            ) from exc
        finally:
            self._captured_updates = None
        # Only what the document actually integrated is captured: an update the server
        # already had produces nothing, and one waiting for missing dependencies is
        # captured later, when a message supplies them.
        return self._broadcast_updates(client_id, captured)

    @staticmethod
    def _broadcast_updates(client_id: int, updates: list[bytes]) -> Reply:
        return Reply(
            durable=list(updates),
            outgoing=[
                Outgoing(None, client_id, _sync_message(SYNC_UPDATE, update)) for update in updates
            ],
        )

    def _on_awareness(self, client_id: int, update: bytes) -> Reply:
        present = _check_awareness_update(update)
        if len(self._owned[client_id] | present) > MAX_AWARENESS_PER_CLIENT:
            raise ProtocolError(REASON_TOO_MANY_AWARENESS, close_code=CLOSE_POLICY_VIOLATION)
        changes = self._capture_awareness(
            lambda: self._awareness.apply_awareness_update(update, client_id)
        )
        changed: list[int] = []
        for change in changes:
            for awareness_id in (*change["added"], *change["updated"]):
                self._claim(client_id, awareness_id)
            for awareness_id in change["removed"]:
                self._release(awareness_id)
            changed.extend((*change["added"], *change["updated"], *change["removed"]))
        if not changed:
            return _empty_reply()
        encoded = self._awareness.encode_awareness_update(_unique(changed))
        # Echoed to the sender too, as y-websocket's reference server does: its
        # client treats 30 s without any message as a dead connection.
        return Reply(durable=[], outgoing=[Outgoing(None, None, _awareness_message(encoded))])

    # -- awareness bookkeeping ---------------------------------------------------------------

    def _capture_awareness(self, action: Callable[[], None]) -> list[dict[str, list[int]]]:
        captured: list[dict[str, list[int]]] = []
        self._captured_awareness = captured
        try:
            action()
        finally:
            self._captured_awareness = None
        return captured

    def _claim(self, client_id: int, awareness_id: int) -> None:
        previous = self._owner.get(awareness_id)
        if previous == client_id:
            return
        if previous is not None:
            self._owned[previous].discard(awareness_id)
        self._owner[awareness_id] = client_id
        self._owned[client_id].add(awareness_id)

    def _release(self, awareness_id: int) -> None:
        previous = self._owner.pop(awareness_id, None)
        if previous is not None:
            self._owned[previous].discard(awareness_id)


def _unique(values: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(values))


def _unintegrated(updates: Iterable[bytes], state_vector: bytes) -> list[bytes]:
    """The updates with items that a document at *state_vector* does not have."""
    waiting = []
    for update in updates:
        try:
            missing = get_update(update, state_vector)
        except Exception:
            continue  # not a valid update (rejected when applied)
        # An update starts with the number of clients it has items of.
        if missing[:1] != b"\x00":
            waiting.append(update)
    return waiting


# -- the child process ------------------------------------------------------------------------

#: Compact while running once the log holds this many bytes.
COMPACT_AFTER_BYTES = 8 * 2**20


class CallableContext(Protocol):
    """What :func:`fetch_storage_statistics` needs of a document child's context."""

    async def call(self, fn: Callable[[], object], /) -> Any: ...


class ParentChannel(Protocol):
    """What a document child needs from its channel to the master."""

    async def send(self, obj: object, /) -> None: ...

    async def receive(self) -> object: ...


def _close_reason(text: str) -> str:
    encoded = text.encode("utf-8")[:MAX_CLOSE_REASON_BYTES]
    return encoded.decode("utf-8", errors="ignore")


def _to_master(message: Outgoing) -> Record:
    if message.to is not None:
        return (TO, message.to, message.payload)
    return (ALL, message.exclude or 0, message.payload)


_UPDATE_PREFIX = bytes((MESSAGE_SYNC, SYNC_UPDATE))


def _is_update_from(message: Outgoing, client_id: int) -> bool:
    return (
        message.to is None
        and message.exclude == client_id
        and message.payload[:2] == _UPDATE_PREFIX
    )


class _Batch:
    """What one batch of records makes: durable updates and messages for the master.

    The document updates of each sender are merged into one broadcast per batch
    (pycrdt's ``merge_updates``): a client that sends many small updates at once
    costs its peers one message, not one each.
    """

    def __init__(self) -> None:
        self.durable: list[bytes] = []
        self.outgoing: list[Record] = []
        self._updates: dict[int, list[bytes]] = {}

    def add(self, client_id: int, reply: Reply) -> None:
        self.durable.extend(reply.durable)
        if reply.durable:
            self._updates.setdefault(client_id, []).extend(reply.durable)
        self.emit(m for m in reply.outgoing if not _is_update_from(m, client_id))

    def emit(self, messages: Iterable[Outgoing]) -> None:
        self.outgoing.extend(_to_master(message) for message in messages)

    def finish(self) -> tuple[list[bytes], list[Record]]:
        for client_id, updates in self._updates.items():
            merged = updates[0] if len(updates) == 1 else merge_updates(*updates)
            self.outgoing.append((ALL, client_id, _sync_message(SYNC_UPDATE, merged)))
        return self.durable, self.outgoing


def process_batch(
    kernel: DocumentKernel, records: list[Record]
) -> tuple[list[bytes], list[Record]]:
    batch = _Batch()
    for kind, client_id, payload in records:
        if kind == MSG:
            if not kernel.is_joined(client_id):
                continue  # kicked earlier in this batch, or already gone
            try:
                reply = kernel.receive(client_id, payload)
            except ProtocolError as exc:
                logger.info("%s: kicking client %d: %s", kernel.name, client_id, exc.reason)
                batch.add(client_id, exc.reply)
                kick = kick_payload(exc.close_code, exc.reason)
                batch.outgoing.append((KICK, client_id, kick))
                batch.emit(kernel.leave(client_id))
            else:
                batch.add(client_id, reply)
        elif kind == JOIN:
            if kernel.is_joined(client_id):
                logger.warning("%s: client %d joined twice", kernel.name, client_id)
                continue
            batch.emit(kernel.join(client_id))
        elif kind == RESYNC:
            if kernel.is_joined(client_id):
                batch.outgoing.append((RESYNCED, client_id, kernel.catch_up()))
        else:  # LEAVE
            batch.emit(kernel.leave(client_id))
    return batch.finish()


@attrs.define
class _Served:
    """The storage of the document this process serves (one per document child)."""

    journal: Journal | None = None
    statistics: StorageStatistics | None = None


_served = _Served()


def storage_statistics() -> StorageStatistics | None:
    """What the storage of the document served by this process found damaged, skipped
    and quarantined; ``None`` before a document was opened.

    Meant to be run in a document child by the master or an operator:
    ``await ctx.call(storage_statistics)``.
    """
    if _served.journal is not None:
        return _served.journal.statistics
    return _served.statistics


def storage_report() -> dict[str, int] | None:
    """:func:`storage_statistics` as plain data, for a call from the master: document
    children are untrusted, so what they return must be plain data (see
    :func:`fetch_storage_statistics`)."""
    stats = storage_statistics()
    return None if stats is None else attrs.asdict(stats)


async def fetch_storage_statistics(ctx: CallableContext) -> StorageStatistics | None:
    """The :func:`storage_statistics` of the document child *ctx*, checked on arrival
    (the child is untrusted: its answer is data, and only whole counts are accepted).

    Raises:
        ValueError: the child's answer is not a report of counts.
    """
    report = await ctx.call(storage_report)
    if report is None:
        return None
    fields = {field.name for field in attrs.fields(StorageStatistics)}
    if (
        not isinstance(report, dict)
        or set(report) != fields
        or not all(type(v) is int and v >= 0 for v in report.values())
    ):
        raise ValueError(f"not a storage report: {report!r:.200}")
    return StorageStatistics(**report)


def check_old_snapshot(update: bytes) -> None:
    Doc().apply_update(update)


async def open_journal(name: str, data_dir: Path) -> Journal | None:
    """The document's journal, or ``None`` if its storage cannot be opened (logged)."""
    # On the loop, not in a worker thread: this process serves this one document and
    # has nothing else to do until it is open, and a worker thread cost each document
    # child about 0.3 MB of private memory (its stack and malloc arena) and 0.5 ms.
    try:
        journal = Journal.open(data_dir, name, check_old=check_old_snapshot)
    except JournalUnavailableError as exc:
        _served.journal, _served.statistics = None, exc.statistics
        return None
    _served.journal = journal
    return journal


async def load_kernel(name: str, journal: Journal) -> DocumentKernel | None:
    """Build the kernel from the journal and repair the storage if it needs it; ``None``
    if nothing stored can be applied although something is stored (logged)."""
    kernel = DocumentKernel(name, journal)
    try:
        for index, reason in kernel.rejected:
            await trio.to_thread.run_sync(journal.reject, index, reason)
    except OSError:
        # The rejected update's file could not be kept: do not let compaction rotate it away.
        logger.exception("document %r: keeping a copy of a rejected update failed", name)
        return None
    if kernel.rejected and len(kernel.rejected) == len(journal.recovered):
        logger.error(
            "document %r: none of its %d stored updates can be applied", name, len(kernel.rejected)
        )
        return None
    if journal.needs_compaction:
        try:
            await trio.to_thread.run_sync(journal.compact, kernel.full_state())
        except (OSError, JournalError):
            # The files are clean already; shutdown tries again.
            logger.exception("document %r: writing a repaired snapshot failed", name)
    return kernel


# -- rehearsal ------------------------------------------------------------------------------


def rehearse() -> None:
    """Serve a document once in this process, in a temporary folder: open it, let two
    clients join, sync, publish their awareness and edit, let them leave, compact it
    and close it. The folder is removed; no thread is started.

    The server's fork server calls this (through
    :func:`examples.collab.connections.rehearse`) before it forks any document child, so
    that the code every document child runs is set up, and specialised by Python, in
    pages the children share rather than in pages each copies. Storage that cannot be
    used here only skips the rehearsal (logged): it is an optimisation.
    """
    import tempfile

    try:
        with tempfile.TemporaryDirectory(prefix="collab-rehearsal-") as folder:
            _rehearse_in(Path(folder))
    except (OSError, JournalError) as exc:
        logger.warning("document rehearsal skipped: %s", exc)


def _rehearse_in(folder: Path) -> None:
    journal = Journal.open(folder, "rehearsal", check_old=check_old_snapshot)
    try:
        kernel = DocumentKernel("rehearsal", journal)
        records: list[Record] = [(JOIN, 1, b""), (JOIN, 2, b"")]
        for client_id in (1, 2):
            doc: Doc[Text] = Doc()
            awareness = Awareness(doc)
            awareness.set_local_state({"user": {"name": f"client {client_id}"}})
            update = awareness.encode_awareness_update([awareness.client_id])
            records.append((MSG, client_id, _sync_message(SYNC_STEP1, doc.get_state())))
            records.append((MSG, client_id, _awareness_message(update)))
            text = doc.get("text", type=Text)
            for edit in range(4):
                before = doc.get_state()
                text += f"edit {edit} "
                payload = _sync_message(SYNC_UPDATE, doc.get_update(before))
                records.append((MSG, client_id, payload))
        records += [(LEAVE, 1, b""), (LEAVE, 2, b"")]
        for record in records:
            durable, _outgoing = process_batch(kernel, [record])
            journal.append(durable)
        journal.compact(kernel.full_state())
    finally:
        journal.close()
