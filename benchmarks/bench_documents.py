"""Many open documents: the collaborative server's memory, and how fast a document opens.

Run: ``python benchmarks/bench_documents.py`` (``--quick``: 20 documents;
``--docs N``: N documents; ``--server-arg=--no-isolation`` (repeatable)
passes options to the server; ``NURSERY_PROCS_START_METHOD=exec`` in the
environment starts every child as a fresh interpreter instead).

The real server (``python -m examples.collab``) runs in its own process with a
fresh data folder. One small y-websocket client per document connects, sends
its sync step 1 and waits for the document's answer (sync step 2): that is a
document opening, timed from the connection's start. Once every document is
open, the memory of the server's whole process tree (the master, the fork
server if any, every document child) is summed from ``/proc/<pid>/smaps_rollup``:
PSS (each shared page split between its sharers) and USS (private pages).
Documents are opened one after another, so each opening is timed alone.

``--merge-pages`` measures a second server, started with ``--merge-pages``, in
the same run: ``ksmd`` is started for it (root only; the previous settings are
put back) at 1,000 pages per 20 ms (``--pages-to-scan``), the figures are taken
once it has made three full scans with every document open, and the share of a
CPU that ``ksmd`` then uses over ten seconds is reported with them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _ksm
import pycrdt
import trio
import trio_websocket

ROOT = Path(__file__).resolve().parent.parent
#: lib0 message types (y-protocols): a sync message whose sub-type is step 2.
SYNC, SYNC_STEP2 = 0, 1


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _memory(pid: int) -> dict[str, float]:
    pss = uss = 0
    pids = _tree(pid)
    for each in pids:
        try:
            with open(f"/proc/{each}/smaps_rollup") as rollup:
                fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", rollup.read(), re.M))
        except OSError:
            continue
        pss += int(fields.get("Pss", 0))
        uss += int(fields.get("Private_Clean", 0)) + int(fields.get("Private_Dirty", 0))
    return {"processes": len(pids), "pss_mib": pss / 1024, "uss_mib": uss / 1024}


async def _open_document(port: int, name: str) -> tuple[float, trio_websocket.WebSocketConnection]:
    doc = pycrdt.Doc()
    start = time.perf_counter()
    ws = await trio_websocket.connect_websocket_url(_nursery, f"ws://127.0.0.1:{port}/doc/{name}")
    await ws.send_message(pycrdt.create_sync_message(doc))
    while True:
        message = await ws.get_message()
        if isinstance(message, bytes) and message[:2] == bytes((SYNC, SYNC_STEP2)):
            return time.perf_counter() - start, ws


_nursery: trio.Nursery


async def _wait_listening(process: trio.Process) -> int:
    assert process.stderr is not None
    seen = b""
    with trio.fail_after(60):
        while True:
            chunk = await process.stderr.receive_some()
            if not chunk:
                raise RuntimeError(f"the server exited: {seen.decode(errors='replace')}")
            seen += chunk
            match = re.search(rb"http://127\.0\.0\.1:(\d+)", seen)
            if match:
                return int(match.group(1))


async def main(
    docs: int, server_args: list[str], merge_pages: bool = False, pages_to_scan: int = 1000
) -> dict[str, Any]:
    figures = await measure(docs, server_args)
    if merge_pages:
        why_not = _ksm.available()
        if why_not is not None:
            print(f"with --merge-pages: not measured ({why_not})", flush=True)
        else:
            with _ksm.running(pages_to_scan):
                figures["merged"] = await measure(docs, [*server_args, "--merge-pages"], True)
    return figures


async def measure(docs: int, server_args: list[str], merging: bool = False) -> dict[str, Any]:
    global _nursery
    with tempfile.TemporaryDirectory() as data:
        process = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "examples.collab",
                "--port",
                "0",
                "--data-dir",
                data,
                "--max-docs",
                str(docs + 10),
                *server_args,
            ],
            cwd=ROOT,
            stderr=subprocess.PIPE,
        )
        try:
            port = await _wait_listening(process)
            async with trio.open_nursery() as nursery:
                _nursery = nursery
                assert process.stderr is not None
                nursery.start_soon(_drain, process.stderr)
                opened: list[float] = []
                sockets = []
                for number in range(docs):
                    took, ws = await _open_document(port, f"doc-{number}")
                    opened.append(took * 1e3)
                    sockets.append(ws)
                merge: dict[str, float] = {}
                if merging:
                    merge["settle_s"] = await _ksm.settle()
                    merge["ksmd_cpu"] = await _ksm.cpu_share(10.0)
                memory = _memory(process.pid)
                for ws in sockets:
                    await ws.aclose()
                nursery.cancel_scope.cancel()
        finally:
            process.terminate()
            with trio.move_on_after(30):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
    figures = {
        "documents": docs,
        "server_args": server_args,
        "open_median_ms": statistics.median(opened),
        "open_max_ms": max(opened),
        **memory,
        **merge,
    }
    print(
        f"{docs} documents ({' '.join(server_args) or 'defaults'}): open median "
        f"{figures['open_median_ms']:.1f} ms, max {figures['open_max_ms']:.1f} ms; tree of "
        f"{memory['processes']} processes: PSS {memory['pss_mib']:.0f} MiB, "
        f"USS {memory['uss_mib']:.0f} MiB",
        flush=True,
    )
    if merge:
        print(
            f"  (ksmd: settled in {merge['settle_s']:.0f} s, then used "
            f"{merge['ksmd_cpu']:.1%} of a CPU)",
            flush=True,
        )
    return figures


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some():
        pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="20 documents")
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--server-arg", action="append", default=[], dest="server_args")
    parser.add_argument(
        "--merge-pages",
        action="store_true",
        help="also measure a server started with --merge-pages, with ksmd running (root)",
    )
    parser.add_argument(
        "--pages-to-scan",
        type=int,
        default=_ksm.PAGES_TO_SCAN,
        help="ksmd's pages per 20 ms with --merge-pages (the kernel's default: 100)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    options = parser.parse_args()
    figures = trio.run(
        main,
        20 if options.quick else options.docs,
        options.server_args,
        options.merge_pages,
        options.pages_to_scan,
    )
    if options.json:
        options.json.write_text(json.dumps(figures, indent=2))
