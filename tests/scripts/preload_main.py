"""A program whose fork server preloads this very script (``preload=["__main__"]``).

Usage: python preload_main.py START_METHOD
Every import of this file appends ``<module name> <pid>`` to the file named by
``PRELOAD_MAIN_LOG``; the program prints ``pids <master> <child> <child>``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import trio

import nursery_procs

with Path(os.environ["PRELOAD_MAIN_LOG"]).open("a") as log:
    log.write(f"{__name__} {os.getpid()}\n")


def whoami() -> tuple[int, int]:
    return os.getpid(), os.getppid()


async def main(start_method: str) -> None:
    async with nursery_procs.open_supervisor(
        start_method=start_method, preload=["__main__"]
    ) as sup:
        children = [await sup.start_child(None) for _ in range(2)]
        answers = [await child.call(whoami) for child in children]
    print("pids", os.getpid(), *[pid for pid, _ in answers], answers[0][1], flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
