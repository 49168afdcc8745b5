"""Soak: many start/close cycles and pool take/close cycles leave the master flat.

Run: ``python benchmarks/bench_soak.py`` (``--quick`` for fewer cycles).

* ``start_close``: ``start_child`` → one call → ``aclose``, over and over;
* ``pool_take_close``: ``pool.take()`` → one call → leave the block (the child
  is shut down and the pool starts a replacement), over and over;

For each, the master's open descriptors, threads and resident memory are read
after a warm-up and again after the cycles (memory after a garbage collection),
and the cycles' rate is reported. Flat means: no more descriptors or threads
than after the warm-up, and memory within a few MiB of it.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nursery_procs

sys.path.insert(0, str(Path(__file__).parent))
from _runner import run
from _targets import echo


def _resources() -> dict[str, float]:
    gc.collect()
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": threading.active_count(),
        "os_threads": int(fields["Threads"]),
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
    }


async def _soak(cycle: Callable[[], Awaitable[Any]], warmup: int, cycles: int) -> dict[str, Any]:
    for _ in range(warmup):
        await cycle()
    before = _resources()
    start = time.perf_counter()
    for _ in range(cycles):
        await cycle()
    took = time.perf_counter() - start
    after = _resources()
    return {
        "cycles": cycles,
        "seconds": took,
        "per_second": cycles / took,
        "before": before,
        "after": after,
        "growth": {key: after[key] - before[key] for key in before},
    }


async def start_close(sup: nursery_procs.Supervisor, warmup: int, cycles: int) -> dict[str, Any]:
    async def cycle() -> None:
        ctx = await sup.start_child(None, name="soak")
        assert await ctx.call(echo, b"ping") == b"ping"
        await ctx.aclose()

    return await _soak(cycle, warmup, cycles)


async def pool_take_close(
    sup: nursery_procs.Supervisor, warmup: int, cycles: int
) -> dict[str, Any]:
    async with nursery_procs.open_pool(sup, None, spare=4, max=50, name="soak") as pool:
        await pool.wait_idle(4)

        async def cycle() -> None:
            async with pool.take() as ctx:
                assert await ctx.call(echo, b"ping") == b"ping"

        return await _soak(cycle, warmup, cycles)


async def main(quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with nursery_procs.open_supervisor() as sup:
        results["start_close"] = await start_close(sup, 20, 100 if quick else 1000)
        print("start/close:", _summary(results["start_close"]), flush=True)
        results["pool_take_close"] = await pool_take_close(sup, 20, 200 if quick else 2000)
        print("pool take/close:", _summary(results["pool_take_close"]), flush=True)
    return results


def _summary(figures: dict[str, Any]) -> str:
    growth = figures["growth"]
    return (
        f"{figures['cycles']} cycles in {figures['seconds']:.1f} s "
        f"({figures['per_second']:.1f}/s); growth: {growth['fds']:+.0f} fds, "
        f"{growth['os_threads']:+.0f} threads, {growth['rss_mib']:+.1f} MiB RSS "
        f"(now {figures['after']['fds']:.0f} fds, {figures['after']['os_threads']:.0f} "
        f"threads, {figures['after']['rss_mib']:.1f} MiB)"
    )


if __name__ == "__main__":
    run(main, __doc__)
