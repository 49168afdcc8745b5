"""The collab server under many editors, against pycrdt-websocket in one process and
the node reference y-websocket server.

Run from the repository root::

    python benchmarks/bench_collab.py                  # 200 clients, 20 documents, 10 s
    python benchmarks/bench_collab.py --quick          # 40 clients, 4 documents, 3 s
    python benchmarks/bench_collab.py --clients 200 --docs 20 --seconds 10 --rate 2 \\
        --json collab.json

N clients spread evenly over M documents; each appends a few characters to the shared
text ``rate`` times a second (open loop, each client on its own random phase) for a
fixed time. Every edit carries a token naming it, so a receiving client knows which
edit arrived. Reported: edits per second sent, edits per second *applied* (received
by every other client of the document), and the delay from an edit being sent until
each OTHER client of its document has applied it (p50, p99, max over all pairs).

The collab server journals to ``--data-dir`` (default: the system's temporary
directory), with an ``fsync`` per batch: on a slow or shared disk, its tail latency
is the disk's.

The same load runs, in the same invocation and one after the other, against:

``nursery_procs``
    ``python -m examples.collab``: the master routes bytes; each document is its own
    child process, which journals every update with ``fsync`` before broadcasting it.
``pycrdt-websocket``
    ``pycrdt.websocket.WebsocketServer`` (rooms kept in memory, no store), all rooms in
    ONE process: anyio on Trio's backend, behind ``trio_websocket.serve_websocket``,
    each connection handed to ``WebsocketServer.serve`` through a small channel
    adapter (``path``, ``send``, ``recv``, async iteration) over the trio-websocket
    connection. Each room is created under a lock before the connection joins it (two
    first clients of one room at once hang in ``WebsocketServer.get_room`` otherwise).
    It is started by this script (``--serve-baseline``).
``node``
    The reference y-websocket server, ``@y/websocket-server`` 0.1.1 with yjs 13 (rooms
    in memory, no persistence), pinned in ``benchmarks/node/package.json`` and its lock
    file and installed by this script with ``npm ci`` into ``benchmarks/node/node_modules``
    the first time (``--servers`` without ``node`` skips it).

``handoff-prototype`` (only when named in ``--servers``)
    ``benchmarks/handoff_prototype.py``: an experiment that hands each client's
    connection to its document's process and lacks most of the collab server's
    guarantees (see that file); it measures what such a hand-off would save.

``merge-pages`` (only when named in ``--servers``)
    the collab server with ``--merge-pages``, and ``ksmd`` started for its run at
    the kernel's default rate (root only; the settings are put back after): what
    merging document children's pages costs on the data path.

``--variant NAME=TREE`` adds a run of the collab server from another checkout (for
example ``git worktree add /tmp/before main``), so that a change is measured against
what it replaces in the same invocation. ``--repeat N`` runs the whole set N times,
interleaved, and reports the median of each figure.

Each server is a separate process; the clients run in ``--workers`` other processes
(every document's clients in the same worker, so send and receive times come from one
clock). Only loopback addresses are used. The server's CPU time (its process and all
its children) is reported too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import _ksm
import trio
import trio_websocket
from pycrdt import Doc, Text, TextEvent, create_sync_message, create_update_message

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parent.parent
NODE_DIR = SCRIPT.parent / "node"
NODE_SERVER = NODE_DIR / "node_modules" / "@y" / "websocket-server" / "src" / "server.js"
NODE_SERVING = re.compile(rb"running at '127\.0\.0\.1' on port (\d+)")
SERVERS = ("nursery_procs", "pycrdt-websocket", "node")
#: Run only when named in ``--servers``: an experiment, not a server (see its file).
EXPERIMENTS = ("handoff-prototype", "merge-pages")
HANDOFF = SCRIPT.parent / "handoff_prototype.py"
HOST = "127.0.0.1"
SERVING = re.compile(rb"serving on http://127\.0\.0\.1:(\d+)/")
TOKEN = re.compile(r"<([0-9a-z]+)>")

MESSAGE_SYNC = 0
SYNC_STEP1 = 0
SYNC_STEP2 = 1
SYNC_UPDATE = 2


def base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if not number:
            return out


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


# -- the client worker --------------------------------------------------------------------------


class Edits:
    """What one worker sent and what its clients received."""

    def __init__(self) -> None:
        self.counter = 0
        #: edit id -> (sender, send time, receivers expected)
        self.sent: dict[int, tuple[int, float, int]] = {}
        self.received: dict[int, int] = {}
        self.latencies: list[float] = []
        #: Latencies seen by the clients of documents other than ``bench-0``.
        self.latencies_elsewhere: list[float] = []
        self.measuring = False
        self.pending = 0
        self.all_delivered = trio.Event()

    def new(self, sender: int, receivers: int) -> str:
        edit = self.counter
        self.counter += 1
        if self.measuring:
            self.sent[edit] = (sender, time.perf_counter(), receivers)
            self.received[edit] = 0
            self.pending += 1
        return f"<{base36(edit)}>"

    def arrived(self, receiver: int, token_id: str, now: float, *, elsewhere: bool) -> None:
        edit = int(token_id, 36)
        entry = self.sent.get(edit)
        if entry is None or entry[0] == receiver:
            return
        self.latencies.append(now - entry[1])
        if elsewhere:
            self.latencies_elsewhere.append(now - entry[1])
        self.received[edit] += 1
        if self.received[edit] == entry[2]:
            self.pending -= 1
            if self.pending == 0 and not self.measuring:
                self.all_delivered.set()


class BenchClient:
    def __init__(self, index: int, url: str, peers: int, edits: Edits) -> None:
        self.index = index
        self.url = url
        self.peers = peers
        self.edits = edits
        self.doc: Doc[Any] = Doc()
        self.text = self.doc.get("text", type=Text)
        self.text.observe(self._on_change)
        self.synced = trio.Event()
        self.ws: trio_websocket.WebSocketConnection | None = None
        self.close_code: int | None = None
        #: A client of a document other than the flooded one (``bench-0``).
        self.elsewhere = not url.endswith("/bench-0")

    def _on_change(self, event: TextEvent) -> None:
        now = time.perf_counter()
        for op in event.delta:
            inserted = op.get("insert")
            if isinstance(inserted, str):
                for token_id in TOKEN.findall(inserted):
                    self.edits.arrived(self.index, token_id, now, elsewhere=self.elsewhere)

    async def run(self, stop: trio.Event) -> None:
        """Connect (retrying while the server says 1013), sync, serve until *stop*."""
        parts = urllib.parse.urlsplit(self.url)
        assert parts.hostname is not None and parts.port is not None
        for attempt in range(50):
            stream = await trio.open_tcp_stream(parts.hostname, parts.port)
            try:
                async with trio.open_nursery() as nursery:
                    ws = await trio_websocket.wrap_client_stream(
                        nursery,
                        stream,
                        f"{parts.hostname}:{parts.port}",
                        parts.path,
                        max_message_size=64 * 1024 * 1024,
                    )
                    self.ws = ws
                    nursery.start_soon(self._read, ws, nursery.cancel_scope)
                    with contextlib.suppress(trio_websocket.ConnectionClosed):
                        await ws.send_message(create_sync_message(self.doc))
                    await stop.wait()
                    with trio.move_on_after(2):
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
            finally:
                await trio.aclose_forcefully(stream)
            if stop.is_set() or self.synced.is_set():
                return
            await trio.sleep(0.05 * (attempt + 1))  # told to try again later
        raise RuntimeError(f"client {self.index}: could not connect (close {self.close_code})")

    async def _read(self, ws: trio_websocket.WebSocketConnection, scope: trio.CancelScope) -> None:
        try:
            while True:
                message = await ws.get_message()
                assert isinstance(message, bytes)
                if message[0] != MESSAGE_SYNC:
                    continue  # awareness: not used here
                if message[1] == SYNC_STEP1:
                    state = _read_var_bytes(message, 2)
                    missing = self.doc.get_update(state)
                    await ws.send_message(bytes([MESSAGE_SYNC, SYNC_STEP2]) + _var_bytes(missing))
                else:
                    update = _read_var_bytes(message, 2)
                    if update != b"\x00\x00":
                        self.doc.apply_update(update)
                    if message[1] == SYNC_STEP2:
                        self.synced.set()
        except trio_websocket.ConnectionClosed as exc:
            self.close_code = exc.reason.code if exc.reason else None
            scope.cancel()  # closed by the server (or by us, at the end)

    async def flood(self, messages: list[bytes]) -> dict[str, Any]:
        """Send *messages* as fast as the server takes them (they carry no edit token:
        they are not measured, only what they do to the others)."""
        ws = self.ws
        assert ws is not None
        sent = 0
        code = None
        started = time.perf_counter()
        try:
            for message in messages:
                await ws.send_message(message)
                sent += 1
        except trio_websocket.ConnectionClosed as exc:
            code = exc.reason.code if exc.reason else None
        return {
            "flood_sent": sent,
            "flood_seconds": time.perf_counter() - started,
            "flood_close_code": code,
        }

    async def edit_until(self, deadline: float, rate: float) -> None:
        ws = self.ws
        assert ws is not None
        period = 1.0 / rate
        next_at = trio.current_time() + random.uniform(0, period)
        while next_at < deadline:
            await trio.sleep_until(next_at)
            if self.close_code is not None:
                return  # disconnected by the server: counted, not fatal
            before = self.doc.get_state()
            self.text += self.edits.new(self.index, self.peers)
            with contextlib.suppress(trio_websocket.ConnectionClosed):
                await ws.send_message(create_update_message(self.doc.get_update(before)))
            next_at += period


def _var_uint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def _var_bytes(data: bytes) -> bytes:
    return _var_uint(len(data)) + data


def _read_var_bytes(message: bytes, pos: int) -> bytes:
    length = shift = 0
    while True:
        byte = message[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
    return message[pos : pos + length]


def tiny_updates(count: int) -> list[bytes]:
    """*count* one-character edits, each as a y-websocket update message."""
    doc: Doc[Any] = Doc()
    text = doc.get("text", type=Text)
    messages = []
    for i in range(count):
        before = doc.get_state()
        text += "abcdefghij"[i % 10]
        messages.append(create_update_message(doc.get_update(before)))
    return messages


async def worker(config: dict[str, Any]) -> None:
    """One client process: connect every client, say ``ready``, wait for ``go`` on stdin,
    edit for the run's length, drain, and print the results as one JSON line."""
    edits = Edits()
    clients: list[BenchClient] = []
    index = 0
    for name, count in config["docs"]:
        url = f"ws://{HOST}:{config['port']}/doc/{urllib.parse.quote(name, safe='')}"
        for _ in range(count):
            clients.append(BenchClient(index, url, count - 1, edits))
            index += 1
    flooder = None
    if config.get("flood"):  # a worker of its own, so that its work delays no one's clock
        url = f"ws://{HOST}:{config['port']}/doc/bench-0"
        flooder = BenchClient(-1, url, 0, Edits())  # its own Edits: never measured
        flood_messages = tiny_updates(config["flood"])
    stop = trio.Event()
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    flood_report: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        for client in [*clients, *([flooder] if flooder else [])]:
            nursery.start_soon(client.run, stop)
        with trio.fail_after(config["connect_timeout"]):
            for client in [*clients, *([flooder] if flooder else [])]:
                await client.synced.wait()
        print("ready", flush=True)
        await stdin.receive_some()  # "go"
        started = trio.current_time()
        deadline = started + config["seconds"]
        edits.measuring = True
        async with trio.open_nursery() as editors:
            if flooder is not None:

                async def flood() -> None:
                    flood_report.update(await flooder.flood(flood_messages))

                editors.start_soon(flood)
            for client in clients:
                editors.start_soon(client.edit_until, deadline, config["rate"])
        await trio.sleep_until(deadline)
        edits.measuring = False
        if edits.pending == 0:
            edits.all_delivered.set()
        with trio.move_on_after(config["drain"]):
            await edits.all_delivered.wait()
        disconnected = sum(1 for client in clients if client.close_code is not None)
        stop.set()
    await stdin.aclose()
    delivered = sum(
        1 for edit, (_, _, wanted) in edits.sent.items() if edits.received[edit] >= wanted
    )
    result = {
        "clients": len(clients),
        "sent": len(edits.sent),
        "delivered": delivered,
        "deliveries": len(edits.latencies),
        "latencies_ms": [round(value * 1e3, 3) for value in edits.latencies],
        "latencies_elsewhere_ms": [round(v * 1e3, 3) for v in edits.latencies_elsewhere],
        "disconnected": disconnected,
        **flood_report,
    }
    print(json.dumps(result), flush=True)


# -- the baseline server: pycrdt-websocket in one process -----------------------------------------


class TrioWebsocketChannel:
    """pycrdt's ``Channel`` over a trio-websocket connection (anyio runs on Trio)."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, path: str) -> None:
        self._ws = ws
        self._path = path

    @property
    def path(self) -> str:
        return self._path

    def __aiter__(self) -> TrioWebsocketChannel:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.recv()
        except trio_websocket.ConnectionClosed:
            raise StopAsyncIteration from None

    async def send(self, message: bytes) -> None:
        try:
            await self._ws.send_message(message)
        except trio_websocket.ConnectionClosed:
            pass

    async def recv(self) -> bytes:
        message = await self._ws.get_message()
        return message if isinstance(message, bytes) else message.encode()


async def serve_baseline(port: int) -> None:
    import logging

    from pycrdt.websocket import WebsocketServer, exception_logger

    quiet = logging.getLogger("baseline")
    quiet.setLevel(logging.CRITICAL)
    rooms = WebsocketServer(
        rooms_ready=True, auto_clean_rooms=True, log=quiet, exception_handler=exception_logger
    )

    # WebsocketServer.get_room() starts a new room without a lock, and a second client
    # arriving while the first one's room is starting waits for ever (the room holds its
    # start lock for its whole life). So rooms are created one at a time, here.
    creating = trio.Lock()

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        async with creating:
            await rooms.get_room(request.path)
        await rooms.serve(TrioWebsocketChannel(ws, request.path))

    async with rooms, trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: trio_websocket.serve_websocket(
                handler,
                HOST,
                port,
                None,
                max_message_size=1024 * 1024,
                task_status=task_status,
            )
        )
        bound = server.port
        print(f"serving on http://{HOST}:{bound}/", file=sys.stderr, flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()


# -- the orchestrator ---------------------------------------------------------------------------


def _cpu_seconds(root: int) -> float:
    """User + system CPU seconds of *root* and its descendants (live, or reaped by it)."""
    own, descendants = _cpu_split(root)
    return own + descendants


def _cpu_split(root: int) -> tuple[float, float]:
    """CPU seconds of *root* itself, and of its descendants (live, or reaped by it)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    reaped = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as file:
                fields = file.read().rpartition(")")[2].split()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        times[pid] = (int(fields[11]) + int(fields[12])) / tick
        if pid == root:
            reaped = (int(fields[13]) + int(fields[14])) / tick
    descendants = reaped
    for pid, seconds in times.items():
        current = parents.get(pid, 0)
        while current not in (0, 1) and current != root:
            current = parents.get(current, 0)
        if current == root:
            descendants += seconds
    return times.get(root, 0.0), descendants


async def _settle(server_pid: int, *, busy: float = 0.2, limit: float = 60.0) -> None:
    """Wait until the server uses less than *busy* of a CPU (children it started ahead
    of time have finished starting), so that the measurement starts in a steady state."""
    with trio.move_on_after(limit):
        last = _cpu_seconds(server_pid)
        while True:
            await trio.sleep(0.5)
            now = _cpu_seconds(server_pid)
            if now - last < busy * 0.5:
                return
            last = now


@contextmanager
def _temporary_directory(parent: Path | None) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bench-collab-", dir=parent) as path:
        yield Path(path)


async def _start(
    argv: list[str], *, cwd: Path = REPO, env: dict[str, str] | None = None
) -> tuple[trio.Process, int, list[bytes]]:
    """Start a server; wait for the line that says where it listens (the collab
    server and the baseline write it to stderr, node to stdout)."""
    process = await trio.lowlevel.open_process(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    buffer = b""
    with trio.fail_after(60):
        while not (match := SERVING.search(buffer) or NODE_SERVING.search(buffer)):
            chunk = await process.stdout.receive_some()
            if not chunk:
                raise RuntimeError(f"server exited: {buffer.decode(errors='replace')}")
            buffer += chunk
    return process, int(match.group(1)), [buffer]


def ensure_node_server() -> None:
    """Install the pinned node reference server (``npm ci``) unless it is there."""
    if NODE_SERVER.exists():
        return
    print("installing the node reference server (npm ci in benchmarks/node)", flush=True)
    subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--include=optional", "--ignore-scripts"],
        cwd=NODE_DIR,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def server_command(
    kind: str, options: argparse.Namespace, data_dir: Path
) -> tuple[list[str], Path, dict[str, str] | None]:
    """The command line, folder and environment that start server *kind*."""
    if kind == "pycrdt-websocket":
        return [sys.executable, str(SCRIPT), "--serve-baseline"], REPO, None
    if kind == "node":
        env = {**os.environ, "HOST": HOST, "PORT": str(_free_port())}
        return ["node", str(NODE_SERVER)], NODE_DIR, env
    if kind == "handoff-prototype":
        return [sys.executable, str(HANDOFF), "--data-dir", str(data_dir)], REPO, None
    tree = REPO if kind in ("nursery_procs", "merge-pages") else options.variants[kind]
    argv = [
        sys.executable,
        "-m",
        "examples.collab",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        "--spare",
        "2",
        "--max-docs",
        str(options.docs + 16),
        "--linger",
        "2",
        "--start-timeout",
        "60",
        "--max-clients",
        str(options.clients + 100),
        "--max-clients-per-doc",
        str(options.clients),
        *(["--merge-pages"] if kind == "merge-pages" else []),
    ]
    # Run from the other tree, importing its examples and nursery_procs first.
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return argv, tree, env


async def _drain(stream: trio.abc.ReceiveStream, into: list[bytes]) -> None:
    while chunk := await stream.receive_some():
        into.append(chunk)
        del into[:-50]


async def run_load(kind: str, options: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    argv, cwd, env = server_command(kind, options, data_dir)
    server, port, log_tail = await _start(argv, cwd=cwd, env=env)
    try:
        async with trio.open_nursery() as nursery:
            assert server.stdout is not None
            nursery.start_soon(_drain, server.stdout, log_tail)
            result = await _drive(kind, options, port, server.pid)
            server.send_signal(signal.SIGTERM)
            with trio.fail_after(60):
                status = await server.wait()
            result["server_exit_status"] = status
            result["server"] = kind
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if server.returncode is None:
                server.kill()
            await server.wait()
            if server.stdout is not None:
                await server.stdout.aclose()
    return result


async def _drive(  # noqa: C901 - one load loop: connect, edit, measure, report
    kind: str, options: argparse.Namespace, port: int, server_pid: int
) -> dict[str, Any]:
    names = [f"bench-{i}" for i in range(options.docs)]
    per_doc = [
        options.clients // options.docs + (i < options.clients % options.docs)
        for i in range(options.docs)
    ]
    workers = max(1, min(options.workers, options.docs))
    plans: list[list[tuple[str, int]]] = [[] for _ in range(workers)]
    for i, (name, count) in enumerate(zip(names, per_doc, strict=True)):
        plans[i % workers].append((name, count))
    processes: list[trio.Process] = []
    floods = [0] * len(plans)
    if options.flood:  # the flooder runs in a worker of its own
        plans.append([])
        floods.append(options.flood)
    outputs: list[bytearray] = [bytearray() for _ in plans]
    try:
        for plan, flood_count in zip(plans, floods, strict=True):
            config = {
                "port": port,
                "docs": plan,
                "rate": options.rate,
                "seconds": options.seconds,
                "drain": 5.0,
                "connect_timeout": 120.0,
                "flood": flood_count,
            }
            processes.append(
                await trio.lowlevel.open_process(
                    [sys.executable, str(SCRIPT), "--worker", json.dumps(config)],
                    cwd=REPO,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
            )

        async def read_line(index: int) -> bytes:
            stdout = processes[index].stdout
            assert stdout is not None
            while b"\n" not in outputs[index]:
                chunk = await stdout.receive_some()
                if not chunk:
                    raise RuntimeError(f"{kind}: client worker {index} exited early")
                outputs[index] += chunk
            line, _, rest = bytes(outputs[index]).partition(b"\n")
            outputs[index][:] = rest
            return line

        with trio.fail_after(180):
            for index in range(len(processes)):
                assert await read_line(index) == b"ready"
        await _settle(server_pid)
        cpu_before = _cpu_split(server_pid)
        wall = time.perf_counter()
        for process in processes:
            assert process.stdin is not None
            await process.stdin.send_all(b"go\n")
        results = []
        with trio.fail_after(options.seconds + 120):
            for index in range(len(processes)):
                results.append(json.loads(await read_line(index)))
        wall = time.perf_counter() - wall
        cpu_after = _cpu_split(server_pid)
        master_cpu = cpu_after[0] - cpu_before[0]
        children_cpu = cpu_after[1] - cpu_before[1]
        for process in processes:
            await process.wait()
    finally:
        with trio.CancelScope(shield=True):
            for process in processes:
                if process.returncode is None:
                    process.kill()
                await process.wait()
                for pipe in (process.stdin, process.stdout):
                    if pipe is not None:
                        await pipe.aclose()
    latencies = sorted(value for result in results for value in result["latencies_ms"])
    elsewhere = sorted(v for result in results for v in result["latencies_elsewhere_ms"])
    flood: dict[str, Any] = next((r for r in results if "flood_sent" in r), {})
    sent = sum(result["sent"] for result in results)
    delivered = sum(result["delivered"] for result in results)
    return {
        "server": kind,
        "clients": sum(result["clients"] for result in results),
        "docs": options.docs,
        "rate": options.rate,
        "seconds": options.seconds,
        "edits_sent": sent,
        "edits_sent_per_s": sent / options.seconds,
        "edits_applied_per_s": delivered / options.seconds,
        "edits_not_applied_everywhere": sent - delivered,
        "deliveries": len(latencies),
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": latencies[-1] if latencies else math.nan,
        "mean_ms": statistics.fmean(latencies) if latencies else math.nan,
        "server_cpu_s": master_cpu + children_cpu,
        "server_cpu_share": (master_cpu + children_cpu) / wall,
        "server_main_process_cpu_share": master_cpu / wall,
        "server_children_cpu_share": children_cpu / wall,
        "p99_elsewhere_ms": percentile(elsewhere, 0.99),
        "clients_disconnected": sum(result["disconnected"] for result in results),
        "flood_sent": flood.get("flood_sent", 0),
        "flood_seconds": flood.get("flood_seconds", math.nan),
        "flood_close_code": flood.get("flood_close_code"),
    }


def print_table(rows: list[dict[str, Any]], *, flood: bool = False) -> None:
    columns = [
        ("server", "server", "{}"),
        ("clients", "clients", "{}"),
        ("docs", "docs", "{}"),
        ("sent/s", "edits_sent_per_s", "{:.1f}"),
        ("applied/s", "edits_applied_per_s", "{:.1f}"),
        ("missed", "edits_not_applied_everywhere", "{}"),
        ("p50 ms", "p50_ms", "{:.2f}"),
        ("p99 ms", "p99_ms", "{:.2f}"),
        ("max ms", "max_ms", "{:.1f}"),
        ("server CPU", "server_cpu_share", "{:.0%}"),
        ("(main process)", "server_main_process_cpu_share", "{:.0%}"),
    ]
    if flood:
        columns += [
            ("p99 elsewhere", "p99_elsewhere_ms", "{:.2f}"),
            ("disconnected", "clients_disconnected", "{}"),
            ("flood sent", "flood_sent", "{}"),
            ("flooder closed", "flood_close_code", "{}"),
        ]
    cells = [[title for title, _, _ in columns]]
    for row in rows:
        cells.append([fmt.format(row[key]) for _, key, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for n, line in enumerate(cells):
        print(
            "  ".join(
                cell.rjust(width) if i else cell.ljust(width)
                for i, (cell, width) in enumerate(zip(line, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * width for width in widths))


def median_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per server: the median of each figure over its runs."""
    rows = []
    for kind in dict.fromkeys(run["server"] for run in runs):
        mine = [run for run in runs if run["server"] == kind]
        row: dict[str, Any] = {"server": kind, "runs": len(mine)}
        for key, value in mine[0].items():
            values = [run.get(key) for run in mine]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                row[key] = statistics.median(values)  # type: ignore[type-var]
            else:
                row.setdefault(key, value)
        rows.append(row)
    return rows


async def main(options: argparse.Namespace) -> dict[str, Any]:
    print(
        f"{options.clients} clients on {options.docs} documents, {options.rate} edits/s each, "
        f"{options.seconds} s; {options.workers} client processes; {os.cpu_count()} CPUs",
        flush=True,
    )
    runs = []
    with _temporary_directory(options.data_dir) as data_dir:
        print(f"documents journaled (with fsync) under {data_dir}", flush=True)
        for repeat in range(options.repeat):
            for kind in options.servers:
                with _ksm.running(100) if kind == "merge-pages" else contextlib.nullcontext():
                    row = await run_load(kind, options, data_dir / f"{kind}-{repeat}")
                print(
                    f"  {kind}: p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, "
                    f"{row['edits_applied_per_s']:.1f} edits/s applied, "
                    f"CPU {row['server_cpu_share']:.0%} "
                    f"(main {row['server_main_process_cpu_share']:.0%})",
                    flush=True,
                )
                runs.append(row)
    rows = median_rows(runs)
    print()
    if options.repeat > 1:
        print(f"medians of {options.repeat} runs:")
    print_table(rows, flood=bool(options.flood))
    return {"runs": runs, "medians": rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="40 clients, 4 documents, 3 s")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=2.0, help="edits per second per client")
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where the collab server journals (a temporary directory is made in it; "
        "default: the system's temporary directory)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help=f"which servers to run, in order (default: {','.join(SERVERS)})",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=TREE",
        help="also run the collab server from another checkout TREE, reported as NAME",
    )
    parser.add_argument("--repeat", type=int, default=1, help="run the whole set N times")
    parser.add_argument(
        "--flood",
        type=int,
        default=0,
        metavar="N",
        help="one more client of bench-0 sends N tiny updates as fast as it can when the "
        "load starts; 'p99 elsewhere' is the delay seen on the other documents",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--serve-baseline", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        trio.run(worker, json.loads(options.worker))
    elif options.serve_baseline:
        trio.run(serve_baseline, 0)
    else:
        if options.quick:
            options.clients, options.docs, options.seconds = 40, 4, 3.0
        options.servers = [name for name in options.servers.split(",") if name]
        options.variants = {}
        for variant in options.variant:
            name, _, tree = variant.partition("=")
            options.variants[name] = Path(tree).resolve()
            options.servers.append(name)
        unknown = set(options.servers) - {*SERVERS, *EXPERIMENTS} - set(options.variants)
        if unknown:
            parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
        if "node" in options.servers:
            ensure_node_server()
        if "merge-pages" in options.servers and (why_not := _ksm.available()) is not None:
            parser.error(f"merge-pages: {why_not}")
        figures = trio.run(main, options)
        if options.json:
            options.json.write_text(json.dumps(figures, indent=2))
