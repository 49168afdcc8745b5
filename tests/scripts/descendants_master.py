"""A master whose children have descendants, for tests that SIGKILL it.

Usage: python descendants_master.py START_METHOD
Prints ``ready PID PID DESCENDANT...`` once both children have started their
descendants: the first child waits on its link; the second has blocked its
Trio thread (only its watchdog can notice the master's death).
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

import nursery_procs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import process_targets


async def main(start_method: str) -> None:
    async with nursery_procs.open_supervisor(start_method=start_method) as sup:
        waiting = await sup.start_child(process_targets.descendants_then_wait)
        blocked = await sup.start_child(process_targets.descendants_then_block)
        pids = [*await waiting.receive(), *await blocked.receive()]
        print("ready", waiting.pid, blocked.pid, *pids, flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
