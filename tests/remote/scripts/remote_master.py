"""A master with a context on another host, which has a child of its own there.

Run as ``python remote_master.py VIA_JSON``: prints ``ready PID...`` (the remote
context's and its child's pids, and those of a remote context whose event loop
is stuck) once they are up, then waits to be killed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from remote import targets

import nursery_procs


async def main(settings: dict[str, object]) -> None:
    destination = str(settings.pop("destination"))
    via = nursery_procs.ssh(destination, **settings)  # type: ignore[arg-type]
    async with nursery_procs.open_supervisor() as sup:
        middle = await sup.start_child(targets.nest, name="middle", via=via)
        grandchild = nursery_procs.context_by_id(await middle.receive())
        pids = [(await ctx.call(targets.where))["pid"] for ctx in (middle, grandchild)]
        stuck = await sup.start_child(targets.block_the_loop, name="stuck", via=via)
        pids.append(stuck._owned().life.process.remote_pid)  # type: ignore[union-attr]
        print("ready", *pids, flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, json.loads(sys.argv[1]))
