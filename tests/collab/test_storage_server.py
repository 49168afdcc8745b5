"""Damaged storage through the real server: real document children, real files, and
y-websocket clients made of pycrdt documents."""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

import pytest
import trio
from pycrdt import Doc, Text

from examples.collab.document import (
    CLOSE_DOCUMENT_UNAVAILABLE,
    REASON_UNAVAILABLE,
    fetch_storage_statistics,
)
from examples.collab.server import CollabServer
from examples.collab.storage_format import SNAPSHOT_MAGIC

from .servers import TIMEOUT, check_works, closed_with, running, ws_url
from .yclient import connect, tokens


async def edit_and_close(server: CollabServer, name: str, edits: list[str]) -> None:
    """Make *edits* on *name*, seen by a second client (so journaled), then let the
    document's child shut down, which compacts its journal into a snapshot."""
    url = ws_url(server, name)
    async with connect(url) as writer, connect(url) as witness:
        await writer.synced.wait()
        await witness.synced.wait()
        for token in edits:
            await writer.append(token)
        await witness.wait_until(lambda: set(edits) <= tokens(witness.content()))
        ctx = server.documents()[name]
    assert await ctx.wait_exited() == 0
    await server.wait_until(lambda: name not in server.documents())


def child_errors_naming(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno >= logging.ERROR
        and record.name.startswith("nursery_procs.child.")
        and repr(name) in record.getMessage()
    ]


async def test_damaged_snapshot_opens_with_every_edit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    first = [f"<one:{i}>" for i in range(5)]
    second = [f"<two:{i}>" for i in range(5)]
    async with running(tmp_path, linger=0.05) as server:
        with trio.fail_after(TIMEOUT):
            await edit_and_close(server, "report", first)
            await edit_and_close(server, "report", second)
            snapshot = data / "report.snapshot"
            assert (data / "report.snapshot.prev").is_file()
            image = bytearray(snapshot.read_bytes())
            image[len(SNAPSHOT_MAGIC) + 12 + len(image) // 2] ^= 0x01
            snapshot.write_bytes(bytes(image))

            with caplog.at_level(logging.ERROR):
                async with connect(ws_url(server, "report")) as reader:
                    await reader.synced.wait()
                    assert tokens(reader.content()) == set(first + second)
                    ctx = server.documents()["report"]
                    stats = await fetch_storage_statistics(ctx)
                    assert stats is not None
                    assert (stats.snapshots_rejected, stats.previous_generation_used) == (1, 1)
                    assert stats.files_quarantined == 1
                    # The document keeps working.
                    await reader.append("<three:0>")
                    async with connect(ws_url(server, "report")) as other:
                        await other.wait_until(lambda: "<three:0>" in other.content())
            assert child_errors_naming(caplog, "report")
            [kept] = (data / "quarantine" / "report").iterdir()
            assert kept.read_bytes() == bytes(image)
            assert kept.name.startswith("snapshot.") and kept.name.endswith(".damaged")
            await check_works(server)


def v1_record(update: bytes) -> bytes:
    return struct.pack(">II", len(update), zlib.crc32(update)) + update


async def test_old_format_document_opens(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    doc: Doc[Text] = Doc()
    text = doc.get("text", type=Text)
    text += "<old:0>"
    snapshot = doc.get_update()
    before = doc.get_state()
    text += "<old:1>"
    record = doc.get_update(before)
    (data / "legacy.snapshot").write_bytes(snapshot)
    (data / "legacy.journal").write_bytes(v1_record(record))
    async with running(tmp_path) as server:
        with trio.fail_after(TIMEOUT):
            async with connect(ws_url(server, "legacy")) as reader:
                await reader.synced.wait()
                assert reader.content() == "<old:0><old:1>"
    kept = {p.read_bytes() for p in (data / "quarantine" / "legacy").iterdir()}
    assert kept == {snapshot, v1_record(record)}


def destroy(data: Path, name: str) -> dict[str, bytes]:
    data.mkdir(parents=True, exist_ok=True)
    files = {
        f"{name}.snapshot": SNAPSHOT_MAGIC + os.urandom(64),
        f"{name}.journal": os.urandom(200).replace(b"\x1eYJR", b""),
    }
    for file_name, content in files.items():
        (data / file_name).write_bytes(content)
    return files


async def test_unopenable_document_closes_its_clients_once_with_one_code(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    originals = destroy(data, "wreck")
    async with running(tmp_path, linger=60) as server:
        with trio.fail_after(TIMEOUT), caplog.at_level(logging.ERROR):
            pids = set()
            for _ in range(2):
                async with connect(ws_url(server, "wreck")) as client:
                    assert await closed_with(client) == (
                        CLOSE_DOCUMENT_UNAVAILABLE,
                        REASON_UNAVAILABLE,
                    )
                    # Closed before any document state was sent.
                    assert not client.synced.is_set()
                    assert client.received == []
                pids.add(server.documents()["wreck"].pid)
            # One child served both, refusing, rather than dying (no 1011, no restart).
            ctx = server.documents()["wreck"]
            assert pids == {ctx.pid}
            assert not ctx.has_exited
            stats = await fetch_storage_statistics(ctx)
            assert stats is not None and stats.files_quarantined == 2
            assert child_errors_naming(caplog, "wreck")
            await check_works(server)
    # Nothing was changed but the quarantine copies.
    for file_name, content in originals.items():
        assert (data / file_name).read_bytes() == content
    kept = {p.read_bytes() for p in (data / "quarantine" / "wreck").iterdir()}
    assert kept == set(originals.values())


async def test_unreadable_document_closes_its_clients_with_the_same_code(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "locked.journal").mkdir(parents=True)  # cannot be opened as a file
    async with running(tmp_path) as server:
        with trio.fail_after(TIMEOUT):
            async with connect(ws_url(server, "locked")) as client:
                assert await closed_with(client) == (
                    CLOSE_DOCUMENT_UNAVAILABLE,
                    REASON_UNAVAILABLE,
                )
            await check_works(server)
