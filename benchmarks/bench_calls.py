"""Call round trips across the process boundary, against the peers, in one run.

Run: ``python benchmarks/bench_calls.py`` (``--quick`` for a short run).

Every contender calls a function that returns its 100-byte argument, in a
worker process that is already running:

* ``raw_echo``: the baseline, a Trio length-prefixed echo over a socketpair
  (no framing but a 4-byte length, no envelope, no pickling);
* ``call_sync`` / ``call_async``: :meth:`nursery_procs.Context.call` with a sync
  function (run off the child's event loop) and an async one;
* ``call_on_loop``: the same with ``in_thread=False`` (on the child's event
  loop, no thread hop);
* ``request``: :meth:`~nursery_procs.Context.request`, answered by a sync
  handler in the child;
* ``worker_pool``: :meth:`nursery_procs.WorkerPool.run`, the worker pool for
  calls (what the next two do);
* ``trio_parallel``: ``trio_parallel.run_sync`` (its default worker type);
* ``anyio``: ``anyio.to_process.run_sync``.

Rounds are interleaved, so that the machine's noise hits every contender alike;
the figures are medians of the rounds' medians, and ratios to ``raw_echo``.
Once every worker is up, the benchmark process is pinned to one CPU and every
worker to another (on a machine with two or more), so that no contender gains
from where the scheduler happens to put it.
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

import nursery_procs

sys.path.insert(0, str(Path(__file__).parent))
from _raw_echo import Framed
from _runner import run
from _targets import async_echo, echo, serve_echo

PAYLOAD = b"x" * 100
RAW_ECHO = Path(__file__).parent / "_raw_echo.py"


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _pin() -> str:
    """This process on one CPU, every descendant (all the workers) on another."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return "not pinned: one CPU"
    for thread in _threads(os.getpid()):
        os.sched_setaffinity(thread, {cpus[0]})
    for pid in _descendants(os.getpid()):
        # Every thread: a worker may run calls on a thread of its own.
        for thread in _threads(pid):
            try:
                os.sched_setaffinity(thread, {cpus[1]})
            except OSError:
                pass
    return f"this process on CPU {cpus[0]}, workers (every thread) on CPU {cpus[1]}"


def _threads(pid: int) -> list[int]:
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


async def _median_us(fn: Callable[[], Awaitable[Any]], batch: int) -> float:
    start = time.perf_counter()
    for _ in range(batch):
        await fn()
    return (time.perf_counter() - start) / batch * 1e6


async def _open_raw_echo(nursery: trio.Nursery) -> Callable[[], Awaitable[Any]]:
    ours, theirs = socket.socketpair()
    process = await trio.lowlevel.open_process(
        [sys.executable, str(RAW_ECHO), str(theirs.fileno())], pass_fds=(theirs.fileno(),)
    )
    theirs.close()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    framed = Framed(stream)

    async def close() -> None:
        with trio.CancelScope(shield=True):
            await stream.aclose()
            await process.wait()

    async def stop_when_cancelled() -> None:
        try:
            await trio.sleep_forever()
        finally:
            await close()

    nursery.start_soon(stop_when_cancelled)

    async def round_trip() -> bytes | None:
        await framed.send(PAYLOAD)
        return await framed.receive()

    return round_trip


def _peers() -> dict[str, Callable[[], Awaitable[Any]]]:
    peers: dict[str, Callable[[], Awaitable[Any]]] = {}
    try:
        import trio_parallel

        peers["trio_parallel"] = lambda: trio_parallel.run_sync(echo, PAYLOAD)
    except ImportError:
        print("trio-parallel is not installed: skipped", file=sys.stderr)
    try:
        import anyio.to_process

        peers["anyio"] = lambda: anyio.to_process.run_sync(echo, PAYLOAD)
    except ImportError:
        print("anyio is not installed: skipped", file=sys.stderr)
    return peers


async def main(quick: bool) -> dict[str, Any]:
    rounds, batch = (5, 100) if quick else (15, 300)
    async with (
        nursery_procs.open_supervisor() as sup,
        nursery_procs.open_worker_pool(sup, limit=1) as workers,
        trio.open_nursery() as nursery,
    ):
        worker = await sup.start_child(None, name="worker")
        server = await sup.start_child(serve_echo, name="server")
        contenders: dict[str, Callable[[], Awaitable[Any]]] = {
            "raw_echo": await _open_raw_echo(nursery),
            "call_sync": lambda: worker.call(echo, PAYLOAD),
            "call_on_loop": lambda: worker.call(echo, PAYLOAD, in_thread=False),
            "call_async": lambda: worker.call(async_echo, PAYLOAD),
            "request": lambda: server.request(PAYLOAD),
            "worker_pool": lambda: workers.run(echo, PAYLOAD),
            **_peers(),
        }
        for fn in contenders.values():  # start the peers' workers, warm every path
            for _ in range(20):
                assert await fn() == PAYLOAD
        pinning = _pin()
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, fn in contenders.items():
                samples[name].append(await _median_us(fn, batch))
        nursery.cancel_scope.cancel()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    figures: dict[str, Any] = {f"{name}_us": value for name, value in medians.items()}
    figures.update(
        {f"ratio_{name}": value / medians["raw_echo"] for name, value in medians.items()}
    )
    figures["pinning"] = pinning
    width = max(map(len, medians))
    print(f"call round trips, 100 B ({pinning}):")
    for name, value in medians.items():
        print(f"  {name:<{width}}  {value:8.1f} us  {value / medians['raw_echo']:5.2f}x raw")
    return figures


if __name__ == "__main__":
    run(main, __doc__)
