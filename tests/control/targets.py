"""Targets run in children by the control tests (importable by the child)."""

from __future__ import annotations

import trio

import nursery_procs


async def nest(name: str) -> None:
    """Start a grandchild called *name*, tell the parent, then wait to be shut down.

    The route to the grandchild is announced upward before the message, on the
    same link, so once the parent has the message the grandchild is in its
    directory.
    """
    async with nursery_procs.open_supervisor() as sup:
        grandchild = await sup.start_child(None, name=name)
        await nursery_procs.parent().send(grandchild.id)
        await trio.sleep_forever()
