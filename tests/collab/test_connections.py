"""A document child's own client connections (:mod:`examples.collab.connections`), run
in this process with the test playing the master: real hand-off socket, real sockets
for the clients."""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from examples.collab.connections import rehearse, run_document
from examples.collab.document import DocumentKernel
from examples.collab.journal import Journal
from examples.collab.storage_format import JOURNAL_HEADER

from .handoff import Master, document_child, handoff_options, masked_frame
from .test_document import Client, append

SYNC_STEP1 = bytes((0, 0, 1, 0))  # sync step 1 with an empty state vector


async def test_clients_edit_through_their_document_child(tmp_path: Path) -> None:
    a, b = Client(1), Client(2)
    async with document_child(tmp_path) as master:
        one = await master.hand_over(1)
        two = await master.hand_over(2, initial=b"")
        # Each is greeted with the server's sync step 1.
        assert (await one.message())[:2] == b"\x00\x00"
        assert (await two.message())[:2] == b"\x00\x00"
        await one.send(a.edit(append("hello")))
        # The other client gets the update, made durable first.
        b.handle(await two.message())
        assert str(b.text) == "hello"
        assert (tmp_path / "notes.journal").stat().st_size > len(JOURNAL_HEADER)
        # Bytes that are not y-websocket: that client is closed with 1003.
        await two.send(b"\x63")
        assert await two.close_frame() == (1003, "unknown message type 99")
        await two.send_close(1003)
        assert await master.report() == ["left", 2, 1003, "unknown message type 99", 0]
        # A client that closes gets its close echoed; the master is told.
        await one.send_close(1000)
        assert await one.close_frame() == (1000, "")
        assert await one.end() == b""  # shut down
        assert await master.report() == ["left", 1, 1000, "", 0]
        master.close()
    # Ending the channel saved the document: the journal compacted into a snapshot.
    assert (tmp_path / "notes.snapshot").exists()
    assert (tmp_path / "notes.journal").read_bytes() == JOURNAL_HEADER
    with Journal.open(tmp_path, "notes") as journal:
        assert DocumentKernel("notes", journal).text() == "hello"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".sock")]  # the listener is gone


async def test_bytes_read_by_the_master_past_the_handshake_are_not_lost(tmp_path: Path) -> None:
    a = Client(1)
    async with document_child(tmp_path) as master:
        edit = a.edit(append("early"))
        one = await master.hand_over(1, initial=masked_frame(0x2, edit))
        await one.message()  # the greeting
        await one.send_close()
        await one.close_frame()
        assert (await master.report())[:3] == ["left", 1, 1000]
        master.close()
    with Journal.open(tmp_path, "notes") as journal:
        assert DocumentKernel("notes", journal).text() == "early"


async def test_the_master_asks_for_a_close(tmp_path: Path) -> None:
    async with document_child(tmp_path) as master:
        one = await master.hand_over(7)
        await one.message()
        await master.to_child_send.send(["close", 7, 1001, "server shutting down"])
        await master.to_child_send.send(["close", 99, 1001, "nobody"])  # unknown: ignored
        await master.to_child_send.send(("bogus",))  # not a request: logged, ignored
        assert await one.close_frame() == (1001, "server shutting down")
        await one.send_close(1001)
        assert await master.report() == ["left", 7, 1001, "server shutting down", 0]
        master.close()


async def test_a_close_asked_for_before_the_socket_arrives_is_kept(tmp_path: Path) -> None:
    # The request comes over the channel and the socket over the hand-off socket: the
    # child may see them in either order.
    async with document_child(tmp_path) as master:
        await master.to_child_send.send(["close", 3, 1001, "server shutting down"])
        await trio.testing.wait_all_tasks_blocked()
        three = await master.hand_over(3)
        assert await three.close_frame() == (1001, "server shutting down")
        await three.send_close(1001)
        assert (await master.report())[:3] == ["left", 3, 1001]
        master.close()


async def test_a_rate_limit_closes_a_flooding_client_with_1008(tmp_path: Path) -> None:
    options = handoff_options(tmp_path, max_messages_per_second=1.0, message_burst=3)
    async with document_child(tmp_path, options) as master:
        one = await master.hand_over(1)
        await one.message()
        for _ in range(5):
            await one.send(SYNC_STEP1)
        code, reason = await one.close_frame()
        assert (code, reason) == (1008, "too many messages: over the rate limit")
        master.close()


async def test_a_client_that_reads_nothing_is_caught_up_then_closed(tmp_path: Path) -> None:
    options = handoff_options(tmp_path, client_queue=2)
    a = Client(1)
    async with document_child(tmp_path, options, seconds=20) as master:
        writer = await master.hand_over(1)
        reader = await master.hand_over(2)  # never reads
        reader.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await writer.message()
        big = "x" * 50_000
        report = None
        for _ in range(200):
            await writer.send(a.edit(append(big)))
            try:
                report = master.from_child_receive.receive_nowait()
                break
            except trio.WouldBlock:
                await trio.lowlevel.checkpoint()
        if report is None:
            report = await master.report()
        assert report[:4] == ["left", 2, 1013, "client too slow: too many messages queued"]
        assert report[4] >= 1  # caught up at least once before
        master.close()


async def test_an_unopenable_document_closes_each_client_with_4422(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "notes.journal").write_bytes(os.urandom(64))  # no header, nothing valid
    (tmp_path / "notes.snapshot").write_bytes(os.urandom(64))
    with caplog.at_level(logging.ERROR):
        async with document_child(tmp_path) as master:
            for client_id in (1, 2):
                client = await master.hand_over(client_id)
                code, _reason = await client.close_frame()
                assert code == 4422
                await client.send_close(4422)
                assert (await master.report())[:3] == ["left", client_id, 4422]
            master.close()
    assert sum("its clients are closed with 4422" in r.getMessage() for r in caplog.records) == 1


async def test_a_connection_from_another_process_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    master = Master()
    options = handoff_options(tmp_path, master_pid=os.getppid())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_document, master, "notes", tmp_path, options)
            await master.connect()  # this process is not the master it was told of
            assert master.side is not None
            assert await master.side.recv(1) == b""  # closed at once
            assert "refused a connection from pid" in caplog.text
            nursery.cancel_scope.cancel()  # as the pool's SHUTDOWN does
    master.close()


async def test_a_malformed_hand_off_is_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with document_child(tmp_path) as master:
        assert master.side is not None
        await master.side.send(b"\x00" * 8)  # no descriptor
        one = await master.hand_over(1)  # the next one is served
        assert (await one.message())[:2] == b"\x00\x00"
        assert "malformed hand-off" in caplog.text
        master.close()


def test_the_fork_servers_rehearsal_leaves_no_thread_and_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    threads = threading.active_count()
    rehearse()
    assert threading.active_count() == threads  # a fork server must stay single-threaded
    assert os.listdir(tmp_path) == []
    assert "skipped" not in caplog.text
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "missing"))
    rehearse()
    assert "rehearsal skipped" in caplog.text
