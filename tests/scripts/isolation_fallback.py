"""Start a child with a network namespace where the kernel refuses one.

Usage: python isolation_fallback.py START_METHOD yes|no
Run it where network namespaces cannot be made (the test sets the user
namespace's quota of them to 0). Prints one line of JSON: how the start went,
and which isolation is in force.
"""

from __future__ import annotations

import json
import sys

import trio

import nursery_procs
from nursery_procs import ChildStartError, Isolation


async def main(start_method: str, fallback: bool) -> None:
    isolation = Isolation(network=True, no_new_privs=True, allow_fallback=fallback)
    async with nursery_procs.open_supervisor(start_method=start_method) as sup:
        try:
            ctx = await sup.start_child(None, isolation=isolation)
        except ChildStartError as exc:
            print(json.dumps({"error": str(exc)}), flush=True)
            return
        in_force = ctx.statistics().isolation
        assert in_force is not None
        answer = await ctx.call(sum, [1, 2, 3])
        print(
            json.dumps(
                {"answer": answer, "network": in_force.network, "nnp": in_force.no_new_privs}
            ),
            flush=True,
        )


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2] == "yes")
