"""What a compromised document child might send its master: run inside a document
child with ``ctx.call`` (calls into an untrusted child may carry pickles; what comes
back may not)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import nursery_procs
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
CLIENT = "<client id>"

#: Messages of the wrong shape: unknown tags, wrong types, ids, close codes.
MALFORMED: list[object] = [
    ["to", "1", b"x"],
    ["to", True, b"x"],
    ["to", "-1", b"x"],
    ["to", 2**63, b"x"],
    ["to", CLIENT, "text, not bytes"],
    ["all", "nobody", b"x"],
    ["all", None],
    ["kick", CLIENT, 1005, "reserved code"],
    ["kick", CLIENT, 99999, "no such code"],
    ["kick", CLIENT, 1003, b"bytes reason"],
    ["kick", CLIENT, 1003, "reason", "extra"],
    ["open", "x", "y"],
    {"to": 1},
    "to",
    12,
    None,
    b"\x00\x01",
]


async def send_malformed(client_id: int) -> int:
    """Send the master every message in :data:`MALFORMED`, each aimed at *client_id*
    where it names one."""
    parent = nursery_procs.parent()
    for message in MALFORMED:
        if isinstance(message, list):
            message = [client_id if part == CLIENT else part for part in message]
        await parent.send(message)
    return len(MALFORMED)
