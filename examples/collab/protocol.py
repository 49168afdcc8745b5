"""What a document child's connections and its document kernel say to each other, and
what the master and a document child say over their channel.

Inside a document child, the messages of its clients go to the document as *records*,
``(kind, client id, payload)``, and the document answers with records
(:func:`examples.collab.document.process_batch`):

=============  ==================================================================
``JOIN``       a client joined (no payload)
``MSG``        a message from the client: its y-websocket bytes, undecoded
``LEAVE``      the client left (no payload)
``RESYNC``     the client fell behind: answer with everything (``RESYNCED``)
``TO``         a message for one client
``ALL``        a message for every client but the one named (client id 0: all)
``KICK``       close the client: a u16 close code, then the UTF-8 reason
``RESYNCED``   the answer to ``RESYNC``: one message with everything
=============  ==================================================================

Between the master and a document child (plain data, never pickles: the child is
untrusted; see :mod:`examples.collab.connections`): ``("open", name, data_dir,
handoff)`` first from the master, then ``["close", id, code, reason]``; from the child
``["listening", path]`` once, then ``["left", id, code, reason, resyncs]`` for each
client it has closed.
"""

from __future__ import annotations

import struct

__all__ = [
    "ALL",
    "JOIN",
    "KICK",
    "LEAVE",
    "MSG",
    "RESYNC",
    "RESYNCED",
    "TO",
    "Record",
    "decode_kick",
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

_CODE = struct.Struct("!H")
#: A WebSocket close reason is at most 123 bytes of UTF-8.
MAX_REASON_BYTES = 123

#: One record: ``(kind, client id, payload)``.
Record = tuple[int, int, bytes]


def valid_close_code(code: int) -> bool:
    """Whether *code* is one a peer may send in a close frame (RFC 6455 section 7.4)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def kick_payload(code: int, reason: str) -> bytes:
    """A ``KICK`` record's payload: *reason* is cut to what a close frame carries."""
    encoded = reason.encode("utf-8")[:MAX_REASON_BYTES].decode("utf-8", "ignore")
    return _CODE.pack(code) + encoded.encode("utf-8")


def decode_kick(payload: bytes) -> tuple[int, str]:
    """The close code and reason of a ``KICK`` record (made by :func:`kick_payload`)."""
    (code,) = _CODE.unpack_from(payload)
    return code, payload[2:].decode("utf-8")
