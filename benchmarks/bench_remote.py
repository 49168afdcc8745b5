"""Contexts on another host over OpenSSH, against local children, in one run.

Run: ``python benchmarks/bench_remote.py`` (``--quick`` for a short run,
``--json FILE`` to save the figures). It starts its own OpenSSH server on
127.0.0.1, as the tests do (Debian's ``openssh-server``), and the "remote"
Python is this interpreter with ``-I -S``: it has neither nursery_procs nor
trio, so everything it runs is shipped to it.

* ``start``: start to ready, medians, rounds interleaved: a local child started
  with ``start_method="exec"``, and a child on the other host over a warm
  connection (the supervisor's connection to that host is already up; each
  remote child still gets the runtime sent to it). Target: remote <= 3x exec.
* ``first_start``: a new supervisor's first child on the other host (connecting,
  authenticating, building and sending the runtime bundle), median.
* ``round_trip``: a 100-byte request answered by a sync handler, and a 100-byte
  ``call``, to a local exec child and to a child on the other host (over ssh on
  loopback). Target: remote <= 3x local.
* ``shipped``: the bytes sent to the first child on the host before it was ready
  (the bootstrap's second stage, the runtime bundle, the modules sent with its
  bootstrap), the bundle's content by package (uncompressed), and trio's part
  compressed on its own.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import nursery_procs
from nursery_procs import _importer
from nursery_procs._module_server import server_for

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from _runner import run
from remote.sshd import SSHServer, available, running_sshd

PAYLOAD = b"x" * 100


def echo(obj: Any) -> Any:
    return obj


async def serve_echo() -> None:
    await nursery_procs.parent().serve_requests(echo)


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


async def start_to_ready(sshd: SSHServer, rounds: int) -> dict[str, Any]:
    samples: dict[str, list[float]] = {"exec": [], "remote": []}
    via = sshd.via()
    async with nursery_procs.open_supervisor(start_method="exec") as sup:
        await (await sup.start_child(None, via=via)).aclose()  # connect once
        for _ in range(rounds):
            for kind, where in (("exec", None), ("remote", via)):
                t = time.perf_counter()
                ctx = await sup.start_child(None, via=where)
                samples[kind].append(time.perf_counter() - t)
                await ctx.aclose()
    exec_ms, remote_ms = (_median_ms(samples[k]) for k in ("exec", "remote"))
    return {
        "rounds": rounds,
        "exec_median_ms": exec_ms,
        "remote_warm_median_ms": remote_ms,
        "remote_min_ms": min(samples["remote"]) * 1e3,
        "remote_max_ms": max(samples["remote"]) * 1e3,
        "remote_over_exec": remote_ms / exec_ms,
    }


async def first_start(sshd: SSHServer, rounds: int) -> dict[str, float]:
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        async with nursery_procs.open_supervisor() as sup:
            await sup.start_child(None, via=sshd.via())
            samples.append(time.perf_counter() - t)
    return {"rounds": rounds, "median_ms": _median_ms(samples)}


async def _median_us(fn: Any, rounds: int, batch: int) -> float:
    per_call = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(batch):
            await fn()
        per_call.append((time.perf_counter() - t) / batch)
    return statistics.median(per_call) * 1e6


async def round_trips(sshd: SSHServer, rounds: int, batch: int) -> dict[str, float]:
    figures: dict[str, list[float]] = {}
    async with nursery_procs.open_supervisor(start_method="exec") as sup:
        local = await sup.start_child(serve_echo, name="local")
        remote = await sup.start_child(serve_echo, name="remote", via=sshd.via())
        for ctx in (local, remote):  # warm up (and ship what a call refers to)
            await ctx.request(PAYLOAD)
            await ctx.call(echo, PAYLOAD)
        for _ in range(rounds):
            for ctx in (local, remote):
                request = await _median_us(lambda c=ctx: c.request(PAYLOAD), 1, batch)
                call = await _median_us(lambda c=ctx: c.call(echo, PAYLOAD), 1, batch)
                figures.setdefault(f"{ctx.name}_request_us", []).append(request)
                figures.setdefault(f"{ctx.name}_call_us", []).append(call)
    medians = {key: statistics.median(values) for key, values in figures.items()}
    return {
        **medians,
        "request_remote_over_local": medians["remote_request_us"] / medians["local_request_us"],
        "call_remote_over_local": medians["remote_call_us"] / medians["local_call_us"],
    }


async def shipped(sshd: SSHServer) -> dict[str, Any]:
    """What the first child on a host costs in bytes (a fresh bundle and server)."""
    server = server_for(nursery_procs.current_router())
    before = server.bytes_sent
    async with nursery_procs.open_supervisor() as sup:
        await sup.start_child(None, via=sshd.via())
        sent = server.bytes_sent - before
    _, bundle = server.runtime_bundle(code=True)
    records = _importer.decode_records(bundle)
    by_package: Counter[str] = Counter()
    for record in records:
        by_package[record.name.partition(".")[0]] += len(record.payload)
    trio_records = [r for r in records if r.name.partition(".")[0] == "trio"]
    stage2 = _importer.stage2_source()
    _, source_bundle = server.runtime_bundle(code=False)
    return {
        "first_child_bytes": sent,
        "stage2_bytes": len(stage2),
        "bundle_bytes_code": len(bundle),
        "bundle_bytes_source": len(source_bundle),
        "bundle_modules": len(records),
        "uncompressed_by_package": dict(by_package.most_common()),
        "trio_compressed_bytes": len(_importer.encode_records(trio_records)),
    }


async def main(quick: bool) -> dict[str, Any]:
    if not available():
        print(
            "skipped: OpenSSH (server and client) is not installed (apt-get install openssh-server)"
        )
        return {}
    with running_sshd() as sshd:
        figures = {
            "shipped": await shipped(sshd),
            "start": await start_to_ready(sshd, 5 if quick else 20),
            "first_start": await first_start(sshd, 2 if quick else 5),
            "round_trip_100B": await round_trips(sshd, 3 if quick else 10, 100 if quick else 300),
        }
    start, rt, sent = figures["start"], figures["round_trip_100B"], figures["shipped"]
    print(f"start to ready, median of {start['rounds']} (same run):")
    print(f"  local exec              {start['exec_median_ms']:8.1f} ms")
    print(
        f"  remote, warm connection {start['remote_warm_median_ms']:8.1f} ms "
        f"(min {start['remote_min_ms']:.1f}, max {start['remote_max_ms']:.1f}); "
        f"remote / exec {start['remote_over_exec']:.2f}x (target <= 3x)"
    )
    print(f"  remote, first child of a new supervisor {figures['first_start']['median_ms']:.1f} ms")
    print("round trip, 100 B, median:")
    for what in ("request", "call"):
        print(
            f"  {what:<8} local {rt[f'local_{what}_us']:7.1f} us   remote "
            f"{rt[f'remote_{what}_us']:7.1f} us   remote / local "
            f"{rt[f'{what}_remote_over_local']:.2f}x (target <= 3x)"
        )
    print("shipped to the first child on a host:")
    print(
        f"  {sent['first_child_bytes']} bytes in all: second stage {sent['stage2_bytes']}, "
        f"runtime bundle {sent['bundle_bytes_code']} as code objects "
        f"({sent['bundle_bytes_source']} as source, for another Python), "
        f"{sent['bundle_modules']} modules; trio alone {sent['trio_compressed_bytes']}"
    )
    packages = ", ".join(f"{k} {v}" for k, v in sent["uncompressed_by_package"].items())
    print(f"  uncompressed by package: {packages}")
    return figures


if __name__ == "__main__":
    run(main, __doc__.split("\n\n")[0])
