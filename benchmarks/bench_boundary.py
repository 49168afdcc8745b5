"""The process boundary: call round trips, and how fast a cancellation crosses it.

Run: ``python benchmarks/bench_boundary.py`` (``--quick`` for a short run).

* ``call`` round trip with a 100 B argument, for a sync function and an async
  one, against a request answered by a sync handler in the child's pump (the
  fastest path, measured in the same run as the baseline);
* from cancelling a caller to the child's acknowledgement that the async
  function was cancelled (the caller's scope exits then);
* ``kill_on_cancel``: from the cancel until the caller has returned.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

import nursery_procs

sys.path.insert(0, str(Path(__file__).parent))
from _runner import run

PAYLOAD = b"x" * 100


def echo(obj: Any) -> Any:
    return obj


async def async_echo(obj: Any) -> Any:
    return obj


async def serve_echo() -> None:
    await nursery_procs.parent().serve_requests(echo)


async def wait_forever(_: Any) -> None:
    await nursery_procs.parent().send("started")
    await trio.sleep_forever()


def block_the_loop(address: str) -> None:
    """Runs on the child's event loop (``kill_on_cancel``): say so, then block."""
    import socket
    import threading

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"started", address)
    threading.Event().wait()


async def _median_us(fn: Any, rounds: int, batch: int) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(batch):
            await fn()
        samples.append((time.perf_counter() - start) / batch * 1e6)
    return statistics.median(samples)


async def round_trips(rounds: int, batch: int) -> dict[str, float]:
    async with nursery_procs.open_supervisor() as sup:
        server = await sup.start_child(serve_echo)
        worker = await sup.start_child(None)
        kinds = {
            "request_sync_handler_us": lambda: server.request(PAYLOAD),
            "call_sync_fn_us": lambda: worker.call(echo, PAYLOAD),
            "call_sync_fn_kill_on_cancel_us": lambda: worker.call(
                echo, PAYLOAD, kill_on_cancel=True
            ),
            "call_async_fn_us": lambda: worker.call(async_echo, PAYLOAD),
        }
        samples: dict[str, list[float]] = {kind: [] for kind in kinds}
        for _ in range(rounds):  # interleaved, so that noise hits every kind alike
            for kind, fn in kinds.items():
                samples[kind].append(await _median_us(fn, 1, batch))
    figures = {kind: statistics.median(values) for kind, values in samples.items()}
    baseline = figures["request_sync_handler_us"]
    figures.update(
        {f"ratio_{kind[:-3]}": value / baseline for kind, value in list(figures.items())[1:]}
    )
    return figures


async def cancel_latency(rounds: int, folder: str) -> dict[str, float]:
    acknowledged: list[float] = []
    killed: list[float] = []
    async with nursery_procs.open_supervisor() as sup:
        worker = await sup.start_child(None)
        for _ in range(rounds):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(worker.call, wait_forever, None)
                assert await worker.receive() == "started"
                start = time.perf_counter()
                nursery.cancel_scope.cancel()
            acknowledged.append((time.perf_counter() - start) * 1e3)
        address = str(Path(folder, "started.sock"))
        with trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM) as started:
            await started.bind(address)
            for _ in range(max(3, rounds // 5)):
                victim = await sup.start_child(None)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        lambda v=victim: v.call(block_the_loop, address, kill_on_cancel=True)
                    )
                    assert await started.recv(16) == b"started"
                    start = time.perf_counter()
                    nursery.cancel_scope.cancel()
                killed.append((time.perf_counter() - start) * 1e3)
                await victim.wait_exited()
    return {
        "cancel_acknowledged_median_ms": statistics.median(acknowledged),
        "cancel_acknowledged_max_ms": max(acknowledged),
        "kill_on_cancel_median_ms": statistics.median(killed),
        "kill_on_cancel_max_ms": max(killed),
    }


async def main(quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    results["round_trips_100B"] = await round_trips(rounds=5 if quick else 15, batch=200)
    print("call round trips, 100 B:", results["round_trips_100B"], flush=True)
    with tempfile.TemporaryDirectory() as folder:
        results["cancellation"] = await cancel_latency(rounds=10 if quick else 50, folder=folder)
    print("cancellation:", results["cancellation"], flush=True)
    return results


if __name__ == "__main__":
    run(main, __doc__)
