"""Core runtime benchmarks, each against a baseline measured in the same run.

Run: ``python benchmarks/bench_core.py`` (``--quick`` for a short run,
``--json FILE`` to save the figures). The machine is shared and noisy, so
every figure is reported as a ratio to its baseline, measured alternately with
it in the same process.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

import nursery_procs
from nursery_procs import Policy

sys.path.insert(0, str(Path(__file__).parent))
from _raw_echo import Framed
from _runner import run

HERE = Path(__file__).parent


# -- child targets ---------------------------------------------------------


def echo(obj: Any) -> Any:
    return obj


async def serve_echo() -> None:
    await nursery_procs.parent().serve_requests(echo)


async def sink() -> None:
    """Count messages until an empty one, then answer b"!"."""
    parent = nursery_procs.parent()
    while True:
        msg = await parent.receive()
        if msg == b"":
            await parent.send(b"!")


async def source(count: int, size: int, rounds: int) -> None:
    """Send *rounds* bursts of *count* messages of *size* bytes to the parent."""
    parent = nursery_procs.parent()
    payload = b"x" * size
    for _ in range(rounds):
        await parent.receive()  # go
        for _ in range(count):
            await parent.send(payload)
        await parent.send(b"")


# -- baseline plumbing -----------------------------------------------------


class RawChild:
    def __init__(self, process: trio.Process, framed: Framed) -> None:
        self.process = process
        self.framed = framed

    @classmethod
    async def start(cls, *, sink: bool = False) -> RawChild:
        ours, theirs = socket.socketpair()
        argv = [sys.executable, str(HERE / "_raw_echo.py"), str(theirs.fileno())]
        if sink:
            argv.append("--sink")
        process = await trio.lowlevel.open_process(argv, pass_fds=(theirs.fileno(),))
        theirs.close()
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        return cls(process, Framed(stream))

    async def aclose(self) -> None:
        await self.framed.stream.aclose()
        await self.process.wait()


# -- measurements ----------------------------------------------------------


async def round_trips(rounds: int, batch: int) -> dict[str, float]:
    payload = b"x" * 100
    raw = await RawChild.start()
    ours_times: list[float] = []
    raw_times: list[float] = []
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(serve_echo, name="echo")
        for _ in range(200):  # warm up both
            await ctx.request(payload)
            await raw.framed.send(payload)
            await raw.framed.receive()
        for _ in range(rounds):
            for _ in range(batch):
                t = time.perf_counter()
                await raw.framed.send(payload)
                await raw.framed.receive()
                raw_times.append(time.perf_counter() - t)
            for _ in range(batch):
                t = time.perf_counter()
                await ctx.request(payload)
                ours_times.append(time.perf_counter() - t)
    await raw.aclose()
    raw_median = statistics.median(raw_times)
    ours_median = statistics.median(ours_times)
    return {
        "raw_us": raw_median * 1e6,
        "ours_us": ours_median * 1e6,
        "ratio": ours_median / raw_median,
    }


async def _raw_throughput(raw: RawChild, size: int, count: int) -> float:
    payload = b"x" * size
    t = time.perf_counter()
    for _ in range(count):
        await raw.framed.send(payload)
    await raw.framed.send(b"")
    await raw.framed.receive()
    return size * count / (time.perf_counter() - t)


async def _our_throughput(ctx: nursery_procs.Context, size: int, count: int) -> float:
    payload = b"x" * size
    t = time.perf_counter()
    for _ in range(count):
        await ctx.send(payload)
    await ctx.send(b"")
    await ctx.receive()
    return size * count / (time.perf_counter() - t)


async def _our_upstream(ctx: nursery_procs.Context, size: int, count: int) -> float:
    t = time.perf_counter()
    await ctx.send(b"go")
    while await ctx.receive() != b"":
        pass
    return size * count / (time.perf_counter() - t)


async def throughput(size: int, count: int, rounds: int) -> dict[str, float]:
    raw = await RawChild.start(sink=True)
    raw_rates: list[float] = []
    down: list[float] = []
    up: list[float] = []
    policy = Policy(max_message_size=size + 1024 * 1024)
    async with nursery_procs.open_supervisor(policy=policy) as sup:
        down_ctx = await sup.start_child(sink, name="sink")
        up_ctx = await sup.start_child(source, count, size, rounds + 1, name="source")
        await _raw_throughput(raw, size, count)
        await _our_throughput(down_ctx, size, count)
        await _our_upstream(up_ctx, size, count)
        for _ in range(rounds):
            raw_rates.append(await _raw_throughput(raw, size, count))
            down.append(await _our_throughput(down_ctx, size, count))
            up.append(await _our_upstream(up_ctx, size, count))
    await raw.aclose()
    raw_median = statistics.median(raw_rates)
    return {
        "raw_MBps": raw_median / 1e6,
        "parent_to_child_MBps": statistics.median(down) / 1e6,
        "child_to_parent_MBps": statistics.median(up) / 1e6,
        "ratio_parent_to_child": statistics.median(down) / raw_median,
        "ratio_child_to_parent": statistics.median(up) / raw_median,
    }


async def spawn_to_ready(rounds: int) -> dict[str, float]:
    imports: list[float] = []
    spawns: list[float] = []
    env = dict(os.environ)
    async with nursery_procs.open_supervisor() as sup:
        for _ in range(rounds):
            t = time.perf_counter()
            await trio.run_process(
                [sys.executable, "-c", "import nursery_procs"], env=env, stdout=subprocess.DEVNULL
            )
            imports.append(time.perf_counter() - t)
            t = time.perf_counter()
            ctx = await sup.start_child(None, name="fresh")
            spawns.append(time.perf_counter() - t)
            await ctx.aclose()
    import_median = statistics.median(imports)
    spawn_median = statistics.median(spawns)
    return {
        "import_ms": import_median * 1e3,
        "spawn_to_ready_ms": spawn_median * 1e3,
        "ratio": spawn_median / import_median,
    }


def _zombies() -> int:
    me = str(os.getpid())
    out = subprocess.run(["ps", "-eo", "ppid=,stat="], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line.split()[0] == me and "Z" in line.split()[1])


async def teardown(children: int, rounds: int) -> dict[str, float]:
    times: list[float] = []
    zombies = 0
    for _ in range(rounds):
        with trio.CancelScope() as scope:
            async with nursery_procs.open_supervisor() as sup:
                for i in range(children):
                    await sup.start_child(None, name=f"idle-{i}")
                t = time.perf_counter()
                scope.cancel()
                await trio.lowlevel.checkpoint()
        times.append(time.perf_counter() - t)
        zombies += _zombies()
    return {"children": children, "teardown_ms": statistics.median(times) * 1e3, "zombies": zombies}


async def main(quick: bool) -> dict[str, Any]:
    scale = 1 if quick else 4
    results: dict[str, Any] = {}
    results["request_round_trip_100B"] = await round_trips(rounds=5 * scale, batch=200)
    print("request round trip, 100 B:", results["request_round_trip_100B"], flush=True)
    results["throughput_100B"] = await throughput(100, 5000, rounds=3 * scale)
    print("throughput, 100 B messages:", results["throughput_100B"], flush=True)
    results["throughput_1MiB"] = await throughput(1 << 20, 20, rounds=3 * scale)
    print("throughput, 1 MiB messages:", results["throughput_1MiB"], flush=True)
    results["spawn_to_ready"] = await spawn_to_ready(rounds=5 * scale)
    print("spawn to ready:", results["spawn_to_ready"], flush=True)
    results["teardown_20_idle"] = await teardown(20, rounds=2 * scale)
    print("teardown of 20 idle children:", results["teardown_20_idle"], flush=True)
    return results


if __name__ == "__main__":
    run(main, __doc__)
