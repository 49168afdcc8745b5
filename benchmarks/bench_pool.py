"""Pool benchmarks, each against cold starts measured in the same run.

Run: ``python benchmarks/bench_pool.py`` (``--quick`` for a short run,
``--json FILE`` to save the figures).

* ``take``: the latency of ``pool.take()`` with a spare child ready, against
  ``supervisor.start_child()`` (a cold start), alternately in one process.
  Targets: median take <= 1 ms and <= 1/50 of the cold start.
* ``burst``: 50 concurrent ``take()`` calls, each holding its child until all
  50 have one, on a pool with ``spare=4, max=50``; against 50 concurrent cold
  starts.
* ``run``: the round trip of ``WorkerPool.run`` calling an identity function
  with 100 bytes in a warm worker, against ``trio_parallel.run_sync`` doing the
  same, alternately in one process. Target: no slower than trio-parallel.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import trio
import trio_parallel

import nursery_procs

sys.path.insert(0, str(Path(__file__).parent))
from _runner import run


async def take_latency(rounds: int) -> dict[str, float]:
    """Median take (spare ready) and cold start, measured alternately."""
    takes: list[float] = []
    colds: list[float] = []
    async with (
        nursery_procs.open_supervisor() as sup,
        nursery_procs.open_pool(sup, None, name="bench", spare=2, max=8) as pool,
    ):
        with trio.fail_after(120):
            await pool.wait_idle()
        for _ in range(rounds):
            t = time.perf_counter()
            ctx = await sup.start_child(None, name="cold")
            colds.append(time.perf_counter() - t)
            await ctx.aclose()
            with trio.fail_after(120):
                await pool.wait_idle()  # a spare is ready: measure only the hand-over
            t = time.perf_counter()
            async with pool.take():
                takes.append(time.perf_counter() - t)
    take_median = statistics.median(takes)
    cold_median = statistics.median(colds)
    return {
        "rounds": rounds,
        "take_median_ms": take_median * 1e3,
        "take_max_ms": max(takes) * 1e3,
        "cold_start_median_ms": cold_median * 1e3,
        "ratio": take_median / cold_median,
        "pool_reported_median_ms": pool.statistics().take_latency_median * 1e3,
    }


async def _hold_all(count: int, enter: Any) -> float:
    """Enter *count* blocks concurrently; each holds until all have entered."""
    entered = 0
    all_in = trio.Event()

    async def one() -> None:
        nonlocal entered
        async with enter() as ctx:
            assert ctx.state is nursery_procs.State.READY
            entered += 1
            if entered == count:
                all_in.set()
            await all_in.wait()

    t = time.perf_counter()
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
            await all_in.wait()
            elapsed = time.perf_counter() - t
    return elapsed


async def burst(count: int, rounds: int) -> dict[str, float]:
    """Serve *count* concurrent takes from a pool (spare=4), against cold starts."""
    pooled: list[float] = []
    cold: list[float] = []
    async with nursery_procs.open_supervisor() as sup:
        for _ in range(rounds):
            cold.append(await _hold_all(count, lambda: sup.open_child(None, name="cold")))
            async with nursery_procs.open_pool(sup, None, name="burst", spare=4, max=count) as pool:
                with trio.fail_after(120):
                    await pool.wait_idle()
                pooled.append(await _hold_all(count, pool.take))
    pooled_median = statistics.median(pooled)
    cold_median = statistics.median(cold)
    return {
        "children": count,
        "rounds": rounds,
        "pool_ms": pooled_median * 1e3,
        "cold_ms": cold_median * 1e3,
        "ratio": pooled_median / cold_median,
    }


def identity(data: bytes) -> bytes:
    return data


async def run_round_trip(rounds: int) -> dict[str, float]:
    """Median ``WorkerPool.run`` and ``trio_parallel.run_sync`` of a 100-byte
    identity call, each with a warm worker, measured alternately."""
    payload = b"x" * 100
    ours: list[float] = []
    theirs: list[float] = []
    async with (
        nursery_procs.open_supervisor() as sup,
        nursery_procs.open_worker_pool(sup, limit=1, name="bench-run") as workers,
        trio_parallel.open_worker_context() as context,
    ):
        with trio.fail_after(120):
            assert await workers.run(identity, payload) == payload  # start the workers
            assert await context.run_sync(identity, payload) == payload
        for _ in range(rounds):
            t = time.perf_counter()
            await workers.run(identity, payload)
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            await context.run_sync(identity, payload)
            theirs.append(time.perf_counter() - t)
        assert workers.statistics().total_spawned == 1
    ours_median = statistics.median(ours)
    theirs_median = statistics.median(theirs)
    return {
        "rounds": rounds,
        "run_median_us": ours_median * 1e6,
        "trio_parallel_median_us": theirs_median * 1e6,
        "ratio": ours_median / theirs_median,
    }


async def main(quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    results["take_with_spare_ready"] = await take_latency(rounds=10 if quick else 40)
    print("take() with a spare ready:", results["take_with_spare_ready"], flush=True)
    results["burst_50"] = await burst(50, rounds=1 if quick else 3)
    print("burst of 50 takes (spare=4, max=50):", results["burst_50"], flush=True)
    results["run_100_bytes"] = await run_round_trip(rounds=500 if quick else 5000)
    print("run() of a 100-byte identity vs trio-parallel:", results["run_100_bytes"], flush=True)
    return results


if __name__ == "__main__":
    run(main, __doc__)
