"""A master process for tests: starts children, says which, then waits.

Usage: python master.py MARKER_DIR COUNT
Prints ``ready PID PID ...`` once every child is ready; on Ctrl-C (SIGINT) it
shuts the children down through the supervisor and exits with status 130.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

import nursery_procs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import targets


async def main(marker_dir: str, count: int) -> None:
    async with nursery_procs.open_supervisor() as sup:
        children = [
            await sup.start_child(
                targets.record_cleanup, str(Path(marker_dir) / f"child-{i}"), name=f"kid-{i}"
            )
            for i in range(count)
        ]
        print("ready", *[c.pid for c in children], flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    try:
        trio.run(main, sys.argv[1], int(sys.argv[2]))
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
