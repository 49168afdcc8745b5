"""A master whose children have descendants, for tests that SIGKILL it.

Usage: python descendants_master.py START_METHOD [pid]
Prints ``ready PID PID DESCENDANT...`` once both children have started their
descendants: the first child waits on its link; the second has blocked its
Trio thread (only its watchdog can notice the master's death). With ``pid``,
each child has a PID namespace of its own, and the descendants printed are every
process below the children as seen from here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

import nursery_procs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import process_targets


def _below(pid: int) -> list[int]:
    """Every process below *pid* (children of any of its threads)."""
    found: list[int] = []
    frontier = [pid]
    while frontier:
        frontier = [
            int(child)
            for parent in frontier
            for task in Path(f"/proc/{parent}/task").iterdir()
            for child in (task / "children").read_text().split()
        ]
        found.extend(frontier)
    return found


async def main(start_method: str, namespaces: list[str]) -> None:
    isolation = nursery_procs.Isolation(pid="pid" in namespaces)
    async with nursery_procs.open_supervisor(start_method=start_method, isolation=isolation) as sup:
        waiting = await sup.start_child(process_targets.descendants_then_wait)
        blocked = await sup.start_child(process_targets.descendants_then_block)
        pids = [*await waiting.receive(), *await blocked.receive()]
        if isolation.pid:  # those pids mean something only inside
            pids = [*_below(waiting.pid or 0), *_below(blocked.pid or 0)]
        print("ready", waiting.pid, blocked.pid, *pids, flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2:])
