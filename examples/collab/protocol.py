"""What the master and a document child say to each other: batches of records.

Everything a document's clients send while its child is busy travels as ONE link
message, and everything the child answers to one batch comes back as one: a batch is
a ``bytes`` value (``Context.send`` carries ``bytes`` as they are, without pickling or
any other encoding), a run of records::

    kind (u8) | client id (u64) | length (u32) | payload (length bytes)

Master to child (:func:`encode_for_child`, :func:`decode_from_master`):

=========  ==================================================================
``JOIN``   a client joined (no payload)
``MSG``    a message from the client: its y-websocket bytes, undecoded
``LEAVE``  the client left (no payload)
``RESYNC`` the client fell behind and missed messages: send it the document
=========  ==================================================================

Child to master (:func:`encode_for_master`, :func:`decode_from_child`):

============  ===============================================================
``TO``        a message for one client
``ALL``       a message for every client but the one named (client id 0: all)
``KICK``      close the client: a u16 close code, then the UTF-8 reason
``RESYNCED``  the answer to ``RESYNC``: one message with everything the client
              missed (broadcasts before it are covered by it)
============  ===============================================================

Document children are untrusted, so :func:`decode_from_child` checks every record
(kind, lengths, ids, close codes, reasons) and refuses the whole batch if one is wrong;
the master acts on none of it then. The first message to a new child is not a batch
but ``("open", name, data_dir)`` (see :mod:`examples.collab.kit`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

__all__ = [
    "ALL",
    "JOIN",
    "KICK",
    "LEAVE",
    "MSG",
    "RESYNC",
    "RESYNCED",
    "TO",
    "BatchError",
    "Record",
    "decode_from_child",
    "decode_from_master",
    "decode_kick",
    "encode_batch",
    "encode_for_child",
    "encode_for_master",
    "kick_payload",
    "valid_close_code",
]

JOIN = 1
MSG = 2
LEAVE = 3
RESYNC = 4
TO = 11
ALL = 12
KICK = 13
RESYNCED = 14

_FROM_MASTER = frozenset((JOIN, MSG, LEAVE, RESYNC))
_FROM_CHILD = frozenset((TO, ALL, KICK, RESYNCED))

_HEAD = struct.Struct("!BQI")
_CODE = struct.Struct("!H")
#: A WebSocket close reason is at most 123 bytes of UTF-8.
MAX_REASON_BYTES = 123

#: One record: ``(kind, client id, payload)``.
Record = tuple[int, int, bytes]


class BatchError(ValueError):
    """A batch that is not a run of well-formed records."""


def valid_close_code(code: int) -> bool:
    """Whether *code* is one a peer may send in a close frame (RFC 6455 section 7.4)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def encode_batch(records: Iterable[Record]) -> bytes:
    """The records as one batch."""
    parts: list[bytes] = []
    for kind, client_id, payload in records:
        parts.append(_HEAD.pack(kind, client_id, len(payload)))
        parts.append(payload)
    return b"".join(parts)


def encode_for_child(records: Iterable[Record]) -> bytes:
    """A batch for a document child (``JOIN``, ``MSG``, ``LEAVE`` records)."""
    return encode_batch(records)


def encode_for_master(records: Iterable[Record]) -> bytes:
    """A batch for the master (``TO``, ``ALL``, ``KICK`` records)."""
    return encode_batch(records)


def _decode(batch: bytes, kinds: frozenset[int], max_payload: int) -> list[Record]:
    if not isinstance(batch, bytes):
        raise BatchError(f"a batch is bytes, not {type(batch).__name__}")
    records: list[Record] = []
    view = memoryview(batch)
    end = len(batch)
    offset = 0
    while offset < end:
        if end - offset < _HEAD.size:
            raise BatchError(f"truncated record header at byte {offset}")
        kind, client_id, length = _HEAD.unpack_from(batch, offset)
        offset += _HEAD.size
        if kind not in kinds:
            raise BatchError(f"unknown record kind {kind}")
        if length > max_payload or offset + length > end:
            raise BatchError(f"record of {length} bytes does not fit at byte {offset}")
        records.append((kind, client_id, bytes(view[offset : offset + length])))
        offset += length
    return records


def decode_from_master(batch: bytes, *, max_payload: int = 2**32 - 1) -> list[Record]:
    """The records of a batch from the master.

    Raises:
        BatchError: it is not a run of ``JOIN``, ``MSG`` and ``LEAVE`` records.
    """
    return _decode(batch, _FROM_MASTER, max_payload)


def decode_from_child(batch: object, *, max_payload: int = 2**32 - 1) -> list[Record]:
    """The records of a batch from a document child, every one checked: a known kind,
    a payload within *max_payload*, a client id (not 0) for ``TO`` and ``KICK``, and
    for ``KICK`` a valid close code and a UTF-8 reason of at most 123 bytes.

    Raises:
        BatchError: something is wrong; nothing of the batch may be acted on.
    """
    records = _decode(batch, _FROM_CHILD, max_payload)  # type: ignore[arg-type]
    for kind, client_id, payload in records:
        if kind != ALL and client_id == 0:
            raise BatchError("a record for client 0")
        if kind == KICK:
            decode_kick(payload)
    return records


def kick_payload(code: int, reason: str) -> bytes:
    """A ``KICK`` record's payload: *reason* is cut to what a close frame carries."""
    encoded = reason.encode("utf-8")[:MAX_REASON_BYTES].decode("utf-8", "ignore")
    return _CODE.pack(code) + encoded.encode("utf-8")


def decode_kick(payload: bytes) -> tuple[int, str]:
    """The close code and reason of a ``KICK`` record.

    Raises:
        BatchError: no code, an invalid code, or a reason that is not short UTF-8.
    """
    if len(payload) < 2 or len(payload) > 2 + MAX_REASON_BYTES:
        raise BatchError(f"a kick of {len(payload)} bytes")
    (code,) = _CODE.unpack_from(payload)
    if not valid_close_code(code):
        raise BatchError(f"close code {code} may not be sent")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise BatchError("a close reason that is not UTF-8") from None
    return code, reason
