"""Starting children: exec against the fork server, and trio-parallel's workers.

Run: ``python benchmarks/bench_spawn.py`` (``--quick`` for a short run,
``--json FILE`` to save the figures).

* ``spawn``: spawn to ready, medians over rounds taken alternately in one run:
  ``start_child`` with ``start_method="exec"`` and ``"forkserver"`` (each child
  closed before the next round), and, for reference, a call that starts a new
  trio-parallel worker (``retire`` after every call, so each call pays a worker
  start) of type FORK and of type SPAWN. Target: fork server <= 5 ms.
* ``first_child``: opening a supervisor and starting its first child (the fork
  server's own start included), for each start method.
* ``memory``: USS and PSS (``/proc/<pid>/smaps_rollup``) of idle children of each
  start method (ready, one call answered), of the fork server and its spare, and
  of an idle trio-parallel FORK worker. Target: forked child <= 4 MB USS.
  Then the same forked children with ``Policy(merge_pages=True)`` and ``ksmd``
  running (root only: started for the measurement at 1,000 pages per 20 ms, the
  previous settings put back), once ``ksmd`` has made three full scans; and the
  share of a CPU ``ksmd`` used over the next five seconds.
* ``isolation``: what isolation costs, for each start method: spawn to ready and
  the round trip of a 100-byte call, with no isolation, with a network namespace
  and a memory limit (the collaborative server's document children), and with
  every option (limits, ``no_new_privs``, user, PID, mount and network
  namespaces, a read-only file system); rounds interleaved.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
import trio_parallel

import nursery_procs

sys.path.insert(0, str(Path(__file__).parent))
import _ksm
from _runner import run

METHODS = ("exec", "forkserver")


def _always(*_args: object) -> bool:
    return True


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


async def _timed(action: Callable[[], Any]) -> float:
    t = time.perf_counter()
    await action()
    return time.perf_counter() - t


async def spawn_to_ready(rounds: int) -> dict[str, Any]:
    """Median spawn-to-ready of each start method, rounds interleaved."""
    samples: dict[str, list[float]] = {name: [] for name in (*METHODS, "tp_fork", "tp_spawn")}
    async with (
        nursery_procs.open_supervisor() as sup,
        trio_parallel.open_worker_context(
            retire=_always, worker_type=trio_parallel.WorkerType.FORK
        ) as tp_fork,
        trio_parallel.open_worker_context(
            retire=_always, worker_type=trio_parallel.WorkerType.SPAWN
        ) as tp_spawn,
    ):
        # Start each kind once before measuring (the fork server, the workers' caches).
        await (await sup.start_child(None, start_method="forkserver")).aclose()
        for _ in range(rounds):
            for method in METHODS:
                t = time.perf_counter()
                ctx = await sup.start_child(None, start_method=method)
                samples[method].append(time.perf_counter() - t)
                await ctx.aclose()
            samples["tp_fork"].append(await _timed(lambda: tp_fork.run_sync(int)))
            samples["tp_spawn"].append(await _timed(lambda: tp_spawn.run_sync(int)))
    medians = {f"{name}_median_ms": _median_ms(values) for name, values in samples.items()}
    fork = statistics.median(samples["forkserver"])
    return {
        "rounds": rounds,
        **medians,
        "forkserver_min_ms": min(samples["forkserver"]) * 1e3,
        "forkserver_max_ms": max(samples["forkserver"]) * 1e3,
        "exec_over_forkserver": statistics.median(samples["exec"]) / fork,
        "forkserver_over_tp_fork": fork / statistics.median(samples["tp_fork"]),
    }


async def first_child(rounds: int) -> dict[str, float]:
    """Median time to open a supervisor and have its first child ready."""
    samples: dict[str, list[float]] = {method: [] for method in METHODS}
    for _ in range(rounds):
        for method in METHODS:
            t = time.perf_counter()
            async with nursery_procs.open_supervisor(start_method=method) as sup:
                await sup.start_child(None)
                samples[method].append(time.perf_counter() - t)
    return {f"{method}_median_ms": _median_ms(values) for method, values in samples.items()}


def smaps(pid: int) -> dict[str, float]:
    """USS (private pages) and PSS of a process, in MiB."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value)
    uss = fields["Private_Clean"] + fields["Private_Dirty"] + fields.get("Private_Hugetlb", 0)
    return {"uss_mib": uss / 1024, "pss_mib": fields["Pss"] / 1024}


def _children_of(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _medians(readings: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in readings) for key in readings[0]}


async def memory(count: int) -> dict[str, Any]:
    """Idle memory of children of each start method, in the same run."""
    figures: dict[str, Any] = {}
    async with nursery_procs.open_supervisor() as sup:
        children: dict[str, list[nursery_procs.Context]] = {}
        for method in METHODS:
            children[method] = [
                await sup.start_child(None, start_method=method) for _ in range(count)
            ]
            for ctx in children[method]:
                await ctx.call(int)  # ready, and one call answered
        await trio.sleep(0.5)  # idle
        for method, contexts in children.items():
            figures[method] = _medians([smaps(ctx.pid or 0) for ctx in contexts])
        server = await children["forkserver"][0].call(os.getppid)
        (spare,) = set(_children_of(server)) - {ctx.pid for ctx in children["forkserver"]}
        figures["fork_server"] = smaps(server)
        figures["spare"] = smaps(spare)
    async with trio_parallel.open_worker_context(worker_type=trio_parallel.WorkerType.FORK) as tp:
        worker = await tp.run_sync(os.getpid)
        await trio.sleep(0.5)
        figures["tp_fork_worker"] = smaps(worker)
    figures["uss_exec_over_forkserver"] = (
        figures["exec"]["uss_mib"] / figures["forkserver"]["uss_mib"]
    )
    return figures


async def merged_memory(count: int) -> dict[str, Any]:
    """Idle memory of forked children whose pages ``ksmd`` may merge."""
    why_not = _ksm.available()
    if why_not is not None:
        return {"skipped": why_not}
    policy = nursery_procs.Policy(merge_pages=True)
    with _ksm.running():
        async with nursery_procs.open_supervisor(policy=policy) as sup:
            children = [
                await sup.start_child(None, start_method="forkserver") for _ in range(count)
            ]
            for ctx in children:
                await ctx.call(int)
            settle_s = await _ksm.settle()
            ksmd_cpu = await _ksm.cpu_share(5.0)
            figures = _medians([smaps(ctx.pid or 0) for ctx in children])
    return {**figures, "settle_s": settle_s, "ksmd_cpu": ksmd_cpu}


ISOLATIONS = {
    "none": nursery_procs.Isolation(),
    "network_and_memory": nursery_procs.Isolation(network=True, address_space=1 << 30),
    "everything": nursery_procs.Isolation(
        address_space=1 << 30,
        open_files=1024,
        cpu_time=3600,
        processes=4096,
        no_new_privs=True,
        user=True,
        pid=True,
        mount=True,
        network=True,
        read_only=True,
        writable_paths=["/tmp"],
    ),
}
_PAYLOAD = b"x" * 100


async def isolation_cost(rounds: int, calls: int) -> dict[str, Any]:
    """Spawn to ready and call round trip, per start method and isolation."""
    spawns: dict[str, list[float]] = {}
    trips: dict[str, list[float]] = {}
    async with nursery_procs.open_supervisor() as sup:
        await (await sup.start_child(None, start_method="forkserver")).aclose()
        for _ in range(rounds):
            for method in METHODS:
                for name, isolation in ISOLATIONS.items():
                    key = f"{method}_{name}"
                    t = time.perf_counter()
                    ctx = await sup.start_child(None, start_method=method, isolation=isolation)
                    spawns.setdefault(key, []).append(time.perf_counter() - t)
                    for _ in range(calls):
                        t = time.perf_counter()
                        await ctx.call(bytes, _PAYLOAD)
                        trips.setdefault(key, []).append(time.perf_counter() - t)
                    await ctx.aclose()
    figures: dict[str, Any] = {}
    for key in spawns:
        figures[key] = {
            "spawn_median_ms": _median_ms(spawns[key]),
            "call_median_us": statistics.median(trips[key]) * 1e6,
        }
    return figures


async def main(quick: bool) -> dict[str, Any]:
    figures = {
        "spawn": await spawn_to_ready(10 if quick else 40),
        "first_child": await first_child(2 if quick else 5),
        "memory": await memory(3 if quick else 5),
        "merged_memory": await merged_memory(3 if quick else 5),
        "isolation": await isolation_cost(3 if quick else 10, 50 if quick else 200),
    }
    spawn, first, mem = figures["spawn"], figures["first_child"], figures["memory"]
    print(f"spawn to ready, median of {spawn['rounds']} (same run):")
    for name in ("exec", "forkserver", "tp_fork", "tp_spawn"):
        print(f"  {name:<12} {spawn[f'{name}_median_ms']:8.2f} ms")
    print(
        f"  fork server: min {spawn['forkserver_min_ms']:.2f} ms, max "
        f"{spawn['forkserver_max_ms']:.2f} ms; exec / fork server "
        f"{spawn['exec_over_forkserver']:.0f}x; fork server / trio-parallel FORK "
        f"{spawn['forkserver_over_tp_fork']:.2f}x"
    )
    print("open a supervisor and its first child, median:")
    for method in METHODS:
        print(f"  {method:<12} {first[f'{method}_median_ms']:8.2f} ms")
    print("idle memory (MiB):")
    for name in ("exec", "forkserver", "fork_server", "spare", "tp_fork_worker"):
        print(f"  {name:<16} USS {mem[name]['uss_mib']:6.2f}  PSS {mem[name]['pss_mib']:6.2f}")
    print(f"  exec child / forked child USS: {mem['uss_exec_over_forkserver']:.1f}x")
    merged = figures["merged_memory"]
    if "skipped" in merged:
        print(f"  forked, merge_pages: not measured ({merged['skipped']})")
    else:
        print(
            f"  forked, merge_pages USS {merged['uss_mib']:6.2f}  PSS {merged['pss_mib']:6.2f}"
            f"  (ksmd settled in {merged['settle_s']:.1f} s, then used "
            f"{merged['ksmd_cpu']:.1%} of a CPU)"
        )
    print("isolation: spawn to ready (ms) and 100 B call round trip (us), medians:")
    for key, row in figures["isolation"].items():
        print(f"  {key:<32} {row['spawn_median_ms']:8.2f} ms  {row['call_median_us']:8.1f} us")
    return figures


if __name__ == "__main__":
    run(main, __doc__.split("\n\n")[0])
