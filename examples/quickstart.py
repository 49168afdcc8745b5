"""A first look at nursery_procs: start workers, call them, talk to them, close them.

Run it: ``python examples/quickstart.py``
"""

from __future__ import annotations

import logging
import math
import os

import trio

import nursery_procs


def slow_square_root(x: float) -> tuple[int, float]:
    """Runs in a child process; returns its pid and the answer."""
    return os.getpid(), math.sqrt(x)


async def shouter() -> None:
    """A long-lived child: answers every request, in capitals."""
    await nursery_procs.parent().serve_requests(lambda text: text.upper())


async def main() -> None:
    async with nursery_procs.open_supervisor() as sup:
        # Three workers, started concurrently; each is ready when start_child returns.
        workers: list[nursery_procs.Context] = []
        async with trio.open_nursery() as nursery:
            for i in range(3):

                async def start(i: int = i) -> None:
                    workers.append(await sup.start_child(None, name=f"worker-{i}"))

                nursery.start_soon(start)
        results = [await w.call(slow_square_root, 2.0 + i) for i, w in enumerate(workers)]
        for pid, root in results:
            print(f"child {pid} says {root:.3f}")

        # A child bound to a block: leaving the block shuts it down gracefully.
        async with sup.open_child(shouter, name="shouter") as loud:
            print(await loud.request("hello from the parent"))

        # An exception in a child is raised here as itself, its traceback attached.
        try:
            await workers[0].call(slow_square_root, -1)
        except ValueError as exc:
            print(f"the child raised {type(exc).__name__}: {exc}")
        print(f"{sup.statistics().running} workers still running")
    # Leaving the supervisor shut every child down and reaped it.
    print("all children reaped:", all(w.returncode == 0 for w in workers))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    trio.run(main)
