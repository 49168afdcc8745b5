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
CLIENT = 2**40


#: Messages the master does not expect from a document child: other types and shapes,
#: reports of clients leaving with a close code no peer may send, a reason that is not
#: text, a negative count, an unknown client, and a second hand-off address. None may
#: release or close the client named.
MALFORMED: list[object] = [
    ["left", CLIENT],
    ["left", CLIENT, 99, "no such code", 0],
    ["left", CLIENT, 1000, b"not text", 0],
    ["left", CLIENT, 1000, "", -1],
    ["left", str(CLIENT), 1000, "", 0],
    ["left", CLIENT, 1000, "", 0, "extra"],
    {"left": CLIENT},
    "left",
    12,
    b"\x00",
    ["listening", "/nonexistent/elsewhere.sock"],
    ["close", CLIENT, 1000, ""],
]


def _aimed(message: object, client_id: int) -> object:
    if isinstance(message, list):
        return [client_id if part == CLIENT else part for part in message]
    return message


async def send_malformed(client_id: int) -> int:
    """Send the master every message in :data:`MALFORMED`, aimed at *client_id*."""
    parent = nursery_procs.parent()
    for message in MALFORMED:
        await parent.send(_aimed(message, client_id))
    return len(MALFORMED)
