"""What a compromised document child might send its master: run inside a document
child with ``ctx.call`` (calls into an untrusted child may carry pickles; what comes
back may not)."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import Any

import nursery_procs
from examples.collab.protocol import KICK, TO, kick_payload
from nursery_procs._router import current_router
from nursery_procs._wire import Handle, Message


class Canary:
    """Unpickling this creates a file: proof that someone unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


async def send_crafted_pickles(canary: str) -> str:
    """Send the master pickles that would create *canary* if unpickled: as a channel
    message (what the fan-out reads), as a request, and as a log record."""
    router = current_router()
    master = nursery_procs.parent().id
    for handle in (Handle.CHANNEL, Handle.REQUEST, Handle.LOG):
        await router.send(Message(master, router.id, handle, 0, pickle.dumps(Canary(canary))))
    return "sent"


#: Stands for the id of a connected client in :data:`MALFORMED`.
CLIENT = 2**40


def _record(kind: int, client_id: int, payload: bytes, *, length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return struct.pack("!BQI", kind, client_id, size) + payload


#: Messages that are not well-formed batches: other types, unknown kinds, lengths
#: that do not fit, client 0, bad close codes and reasons. Each one carries a valid
#: record for the client first, which must not be acted on either.
MALFORMED: list[object] = [
    ["to", CLIENT, b"x"],
    {"to": CLIENT},
    "to",
    12,
    b"\x00",
    _record(TO, CLIENT, b"x") + b"\x63" * 5,  # a truncated header
    _record(TO, CLIENT, b"x") + _record(99, CLIENT, b"x"),
    _record(TO, CLIENT, b"x") + _record(TO, CLIENT, b"x", length=1000),
    _record(TO, CLIENT, b"x") + _record(TO, 0, b"x"),
    _record(TO, CLIENT, b"x") + _record(KICK, CLIENT, kick_payload(1005, "reserved")),
    _record(TO, CLIENT, b"x") + _record(KICK, CLIENT, kick_payload(99, "no such code")),
    _record(TO, CLIENT, b"x") + _record(KICK, CLIENT, b"\x03\xeb\xff\xfe"),  # not UTF-8
    _record(TO, CLIENT, b"x") + _record(KICK, CLIENT, b"\x03\xeb" + b"r" * 124),
    _record(TO, CLIENT, b"x") + _record(KICK, CLIENT, b"\x03"),
]


def _aimed(message: object, client_id: int) -> object:
    if isinstance(message, bytes):
        return message.replace(CLIENT.to_bytes(8, "big"), client_id.to_bytes(8, "big"))
    if isinstance(message, list):
        return [client_id if part == CLIENT else part for part in message]
    return message


async def send_malformed(client_id: int) -> int:
    """Send the master every message in :data:`MALFORMED`, aimed at *client_id*."""
    parent = nursery_procs.parent()
    for message in MALFORMED:
        await parent.send(_aimed(message, client_id))
    return len(MALFORMED)
