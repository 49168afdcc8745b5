"""Large documents and offline states sync with the stock y-websocket client (the
``y-websocket`` package on node, pinned in ``tests/collab/node``); a message over the
limit is refused once, with a code on which that client does not reconnect."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from examples.collab.websocket import CLOSE_MESSAGE_TOO_BIG

from .servers import TIMEOUT, check_works, running
from .yclient import connect

NODE_DIR = Path(__file__).resolve().parent / "node"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def node_client() -> Path:
    """The stock y-websocket client, installed from the lock file on first use."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed for the stock y-websocket client")
    if not (NODE_DIR / "node_modules" / "y-websocket").is_dir():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=NODE_DIR,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return NODE_DIR / "sync_client.mjs"


async def run_client(script: Path, port: int, room: str, offline: int, watch: float) -> Any:
    result = await trio.run_process(
        ["node", str(script), f"ws://127.0.0.1:{port}/doc", room, str(offline), str(watch)],
        capture_stdout=True,
        cwd=NODE_DIR,
    )
    return json.loads(result.stdout)


async def test_sixteen_mib_sync_both_ways_with_the_stock_client(
    tmp_path: Path, node_client: Path
) -> None:
    size = 16 * MiB
    async with running(tmp_path) as server:  # the default limits
        with trio.fail_after(TIMEOUT * 6):
            # An offline state of 16 MiB reaches the server...
            sent = await run_client(node_client, server.port, "big", size, 0.5)
            assert sent["synced"] and sent["closes"] == [] and sent["connects"] == 1
            async with connect(f"ws://127.0.0.1:{server.port}/doc/big") as reader:
                await reader.wait_until(lambda: len(reader.content()) == size)
            # ...and a document of 16 MiB reaches a fresh client.
            got = await run_client(node_client, server.port, "big", 0, 0.5)
            assert got["synced"] and got["closes"] == [] and got["length"] == size
            assert got["sha256"] == hashlib.sha256(b"o" * size).hexdigest()
        await check_works(server)


async def test_over_the_limit_the_client_is_told_once(tmp_path: Path, node_client: Path) -> None:
    async with running(tmp_path, max_message_size=MiB) as server:
        with trio.fail_after(TIMEOUT * 2):
            report = await run_client(node_client, server.port, "huge", 2 * MiB, 3)
        assert report["connects"] == 1, report  # no reconnecting, let alone a storm
        [(code, reason)] = report["closes"]
        assert code == CLOSE_MESSAGE_TOO_BIG
        assert str(MiB) in reason
        await check_works(server, "huge")
