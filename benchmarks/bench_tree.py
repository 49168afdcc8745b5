"""Context tree benchmarks, against baselines measured in the same run.

Run: ``python benchmarks/bench_tree.py`` (``--quick`` for a short run).

* routed request round trip (root -> grandchild through one intermediary),
  against the direct round trip (root -> child) in the same run;
* graceful shutdown of a depth-3 tree of 15 contexts (the root, 2 children,
  4 grandchildren, 8 great-grandchildren): from cancelling the supervisor's
  scope until every process is reaped.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import trio

import nursery_procs

sys.path.insert(0, str(Path(__file__).parent))
from _runner import run


def echo(obj: Any) -> Any:
    return obj


async def node(depth: int, fanout: int) -> None:
    """A subtree: report its size once every node below is ready, then echo requests."""
    me = nursery_procs.current_router().name
    async with nursery_procs.open_supervisor() as sup:
        kids = []
        for i in range(fanout if depth > 0 else 0):
            kids.append(await sup.start_child(node, depth - 1, fanout, name=f"{me}.{i}"))
        size = 1
        for kid in kids:
            size += await kid.receive()
        await nursery_procs.parent().send(size)
        await nursery_procs.serve_requests(echo)


async def routed_round_trip(rounds: int, batch: int) -> dict[str, float]:
    payload = b"x" * 100
    direct_times: list[float] = []
    routed_times: list[float] = []
    async with nursery_procs.open_supervisor() as sup:
        top = await sup.start_child(node, 1, 1, name="top")
        assert await top.receive() == 2
        grandchild = sup.context_by_name("top.0")
        assert grandchild is not None
        for _ in range(200):
            await top.request(payload)
            await grandchild.request(payload)
        for _ in range(rounds):
            for _ in range(batch):
                t = time.perf_counter()
                await top.request(payload)
                direct_times.append(time.perf_counter() - t)
            for _ in range(batch):
                t = time.perf_counter()
                await grandchild.request(payload)
                routed_times.append(time.perf_counter() - t)
    direct = statistics.median(direct_times)
    routed = statistics.median(routed_times)
    return {"direct_us": direct * 1e6, "routed_us": routed * 1e6, "ratio": routed / direct}


async def tree_shutdown(rounds: int) -> dict[str, float]:
    times: list[float] = []
    for _ in range(rounds):
        with trio.CancelScope() as scope:
            async with nursery_procs.open_supervisor() as sup:
                tops = [await sup.start_child(node, 2, 2, name=f"t{i}") for i in range(2)]
                sizes = [await top.receive() for top in tops]
                assert sum(sizes) + 1 == 15, sizes
                t = time.perf_counter()
                scope.cancel()
                await trio.lowlevel.checkpoint()
        times.append(time.perf_counter() - t)
    return {"contexts": 15, "shutdown_ms": statistics.median(times) * 1e3}


async def main(quick: bool) -> dict[str, Any]:
    scale = 1 if quick else 4
    results: dict[str, Any] = {}
    results["routed_round_trip_100B"] = await routed_round_trip(rounds=5 * scale, batch=200)
    print("routed round trip, 100 B:", results["routed_round_trip_100B"], flush=True)
    results["tree_shutdown"] = await tree_shutdown(rounds=2 if quick else 5)
    print("graceful shutdown, depth-3 tree:", results["tree_shutdown"], flush=True)
    return results


if __name__ == "__main__":
    run(main, __doc__)
