"""The target of the server's pooled document children.

A pool's children all run the same target with the same arguments, but each one
serves a different document, picked only when the child is handed out. So a
pooled child starts as a blank document server: it says it is ready, waits for
its first message, ``("open", name, data_dir, handoff)``, and from then on is the
server of that one document and of the clients the master hands over to it (see
:func:`examples.collab.connections.run_document`) until it is shut down.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

import nursery_procs

from .connections import HandOff, run_document
from .document import validate_name

__all__ = ["OPEN", "open_message", "serve_pooled_document"]

logger = logging.getLogger(__name__)

#: The tag of the first message a pooled document child gets.
OPEN = "open"


def open_message(name: str, data_dir: str, handoff: HandOff) -> tuple[str, str, str, object]:
    """The message that turns a blank pooled child into the server of *name*."""
    return (OPEN, name, data_dir, handoff.to_data())


def _set_title(name: str) -> None:
    try:
        import setproctitle  # optional: shows the document in ps and top
    except ImportError:
        return
    setproctitle.setproctitle(f"nursery_procs: collab document {name!r}"[:200])


async def serve_pooled_document() -> None:
    """Wait for ``("open", name, data_dir, handoff)``, then serve that document.

    Returns when the master closes the channel before naming a document; a first
    message of any other shape is an error (the child exits and the pool notes it).
    """
    parent = nursery_procs.parent()
    try:
        first: Any = await parent.receive()
    except (trio.EndOfChannel, nursery_procs.ContextDied):
        return
    match first:
        case (str() as tag, str() as name, str() as data_dir, dict() as handoff) if tag == OPEN:
            pass
        case _:
            raise ValueError(
                f"expected ('open', name, data_dir, handoff) first, got {first!r:.200}"
            )
    name = validate_name(name)  # the master checked it; this is a second line of defence
    _set_title(name)
    logger.debug("serving document %r from %s", name, data_dir)
    await run_document(parent, name, data_dir, HandOff.from_data(handoff))
