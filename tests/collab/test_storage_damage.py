"""Damaged document storage, with real Yjs edits on real files, opened the way a document
child opens it (:func:`examples.collab.document.run_document`'s loading path).

Each case damages one part of a document with three generations of edits, opens it, and
checks exactly which edits survive (every valid one), that the damaged original is in
quarantine byte for byte, and that an ERROR names the document. Edits are made by
independent clients, so none depends on another and the set of surviving edits is exact;
``test_lost_predecessor_heals_when_its_author_returns`` covers edits that do depend on a
lost one.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from pycrdt import Doc, Text, create_sync_message

from examples.collab.connections import run_document
from examples.collab.document import (
    CLOSE_DOCUMENT_UNAVAILABLE,
    REASON_UNAVAILABLE,
    DocumentKernel,
    load_kernel,
    open_journal,
    storage_statistics,
)
from examples.collab.journal import Journal, StorageStatistics
from examples.collab.storage_format import JOURNAL_HEADER, SNAPSHOT_MAGIC, encode_record

from .handoff import Master, handoff_options
from .test_document import Hub, append
from .yclient import tokens

NAME = "notes"
A = [f"<a:{i}>" for i in range(5)]  # in snapshot.prev (and the snapshot)
B = [f"<b:{i}>" for i in range(5)]  # in journal.prev (and the snapshot)
C = [f"<c:{i}>" for i in range(5)]  # in the journal only
EVERYTHING = set(A + B + C)


def independent_edit(token: str) -> bytes:
    """The update of a client that types *token* into an empty document."""
    doc: Doc[Text] = Doc()
    doc.get("text", type=Text).insert(0, token)
    return doc.get_update()


def state_of(*updates: bytes) -> bytes:
    doc: Doc[Text] = Doc()
    doc.get("text", type=Text)
    for update in updates:
        doc.apply_update(update)
    return doc.get_update()


EDITS = {token: independent_edit(token) for token in sorted(EVERYTHING)}


def build(data_dir: Path) -> None:
    """notes.snapshot.prev = A, notes.journal.prev = B, notes.snapshot = A+B,
    notes.journal = C; one batch (one fsync) per edit, as a child writes them."""
    with Journal.open(data_dir, NAME) as journal:
        for token in A:
            journal.append([EDITS[token]])
        journal.compact(state_of(*(EDITS[t] for t in A)))
        for token in B:
            journal.append([EDITS[token]])
        journal.compact(state_of(*(EDITS[t] for t in A + B)))
        for token in C:
            journal.append([EDITS[token]])


def record_offset(index: int) -> int:
    """Where record *index* of the journal (edit C[index]) starts."""
    return len(JOURNAL_HEADER) + sum(len(encode_record(EDITS[t])) for t in C[:index])


def flip(path: Path, offset: int) -> None:
    image = bytearray(path.read_bytes())
    image[offset] ^= 0x20
    path.write_bytes(bytes(image))


def append_to(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def v1_record(update: bytes) -> bytes:
    return struct.pack(">II", len(update), zlib.crc32(update)) + update


def write_old_format(data_dir: Path) -> None:
    """The files as the previous version wrote them: a bare snapshot and an old journal."""
    (data_dir / f"{NAME}.snapshot").write_bytes(state_of(*(EDITS[t] for t in A + B)))
    (data_dir / f"{NAME}.journal").write_bytes(b"".join(v1_record(EDITS[t]) for t in C))


# Each case: (how to damage, which edits are lost, which file holds the damage).
Damager = Callable[[Path], None]
CASES: dict[str, tuple[Damager, set[str], str]] = {
    "journal-first-record": (
        lambda d: flip(d / "notes.journal", record_offset(0) + 30),
        {C[0]},
        "journal",
    ),
    "journal-middle-record": (
        lambda d: flip(d / "notes.journal", record_offset(2) + 30),
        {C[2]},
        "journal",
    ),
    "journal-last-record": (
        lambda d: flip(d / "notes.journal", record_offset(4) + 30),
        {C[4]},
        "journal",
    ),
    "journal-length-field": (
        lambda d: flip(d / "notes.journal", record_offset(2) + 5),
        {C[2]},
        "journal",
    ),
    "journal-truncated-tail": (
        lambda d: os.truncate(d / "notes.journal", os.path.getsize(d / "notes.journal") - 7),
        {C[4]},
        "journal",
    ),
    "journal-garbage-appended": (
        lambda d: append_to(d / "notes.journal", os.urandom(300).replace(b"\x1eYJR", b"")),
        set(),
        "journal",
    ),
    "snapshot-truncated": (
        lambda d: os.truncate(d / "notes.snapshot", os.path.getsize(d / "notes.snapshot") // 2),
        set(),
        "snapshot",
    ),
    "snapshot-random-bytes": (
        lambda d: (d / "notes.snapshot").write_bytes(os.urandom(200)),
        set(),
        "snapshot",
    ),
    "snapshot-one-flipped-byte": (
        lambda d: flip(d / "notes.snapshot", len(SNAPSHOT_MAGIC) + 12 + 20),
        set(),
        "snapshot",
    ),
    "snapshot-and-previous-journal": (
        lambda d: (
            (d / "notes.snapshot").write_bytes(b""),
            flip(
                d / "notes.journal.prev",
                len(JOURNAL_HEADER) + sum(len(encode_record(EDITS[t])) for t in B[:1]) + 30,
            ),
        ),
        {B[1]},
        "journal.prev",
    ),
}


def damaged_files(data_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in data_dir.glob(f"{NAME}.*")}


def quarantine(data_dir: Path) -> dict[str, bytes]:
    folder = data_dir / "quarantine" / NAME
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


async def open_like_a_child(data_dir: Path) -> tuple[set[str], StorageStatistics]:
    """Open the document as run_document does (repairing it); its edits and statistics."""
    journal = await open_journal(NAME, data_dir)
    assert journal is not None
    try:
        kernel = await load_kernel(NAME, journal)
        assert kernel is not None
        return tokens(kernel.text()), journal.statistics
    finally:
        journal.close()


def errors_naming_the_document(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and repr(NAME) in r.getMessage()
    ]


@pytest.mark.parametrize("case", sorted(CASES))
async def test_damage_loses_only_what_is_damaged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    damage, lost, damaged_kind = CASES[case]
    build(tmp_path)
    damage(tmp_path)
    damaged_original = (tmp_path / f"{NAME}.{damaged_kind}").read_bytes()

    with caplog.at_level(logging.WARNING):
        survived, stats = await open_like_a_child(tmp_path)
    assert survived == EVERYTHING - lost
    assert errors_naming_the_document(caplog)
    assert damaged_original in quarantine(tmp_path).values()
    assert stats.files_quarantined == len(quarantine(tmp_path)) >= 1
    if damaged_kind.startswith("snapshot"):
        assert stats.snapshots_rejected == 1
    else:
        assert stats.damaged_stretches >= 1

    # Repaired: the next opening finds clean files holding the same edits, and says
    # nothing.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        survived_again, stats_again = await open_like_a_child(tmp_path)
    assert survived_again == survived
    assert stats_again == StorageStatistics()
    assert not caplog.records


@pytest.mark.parametrize("tail", ["intact", "torn"])
async def test_old_format_files_are_converted_losing_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tail: str
) -> None:
    write_old_format(tmp_path)
    if tail == "torn":
        with (tmp_path / f"{NAME}.journal").open("ab") as f:
            f.write(v1_record(independent_edit("<torn:0>"))[:-4])
    originals = damaged_files(tmp_path)

    with caplog.at_level(logging.WARNING):
        survived, stats = await open_like_a_child(tmp_path)
    assert survived == EVERYTHING
    assert stats.old_format_files == 2
    # Both originals are kept, byte for byte.
    assert sorted(quarantine(tmp_path).values()) == sorted(originals.values())
    assert any(
        r.levelno == logging.WARNING
        and "old format" in r.getMessage()
        and repr(NAME) in r.getMessage()
        for r in caplog.records
    )
    if tail == "torn":
        assert errors_naming_the_document(caplog)
    assert (tmp_path / f"{NAME}.journal").read_bytes().startswith(JOURNAL_HEADER)
    assert (tmp_path / f"{NAME}.snapshot").read_bytes().startswith(SNAPSHOT_MAGIC)
    survived_again, stats_again = await open_like_a_child(tmp_path)
    assert (survived_again, stats_again) == (EVERYTHING, StorageStatistics())


async def test_lost_predecessor_heals_when_its_author_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # One author types ten edits in a row: each depends on the one before. The record
    # of the fourth is damaged; the six after it are valid but wait, as Yjs pending
    # updates, for the lost one. They must survive the repair until the author's page,
    # which still has everything, reconnects and supplies it.
    hub = Hub(tmp_path, NAME)
    author = hub.connect(1)
    typed = [f"<w:{i}>" for i in range(10)]
    for token in typed:
        hub.send(1, author.edit(append(token)))
    hub.close()
    offset = len(JOURNAL_HEADER)
    with Journal.open(tmp_path, NAME) as journal:
        sizes = [len(encode_record(update)) for update in journal.recovered]
    flip(tmp_path / f"{NAME}.journal", offset + sum(sizes[:3]) + 20)

    with caplog.at_level(logging.ERROR):
        survived, _ = await open_like_a_child(tmp_path)  # repairs and compacts
    assert survived == set(typed[:3])
    assert errors_naming_the_document(caplog)
    survived, _ = await open_like_a_child(tmp_path)  # the waiting edits were kept
    assert survived == set(typed[:3])

    hub = Hub(tmp_path, NAME)
    try:
        assert hub.kernel.waiting > 0
        hub.clients[1] = author
        hub.pump(hub.kernel.join(1))
        hub.send(1, create_sync_message(author.doc))
        assert hub.kernel.text() == "".join(typed)
        newcomer = hub.connect(2)
        assert str(newcomer.text) == "".join(typed)
    finally:
        hub.close()
    survived, _ = await open_like_a_child(tmp_path)
    assert survived == set(typed)


async def test_update_that_cannot_be_applied_is_skipped_and_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    build(tmp_path)
    with Journal.open(tmp_path, NAME) as journal:
        journal.append([b"\x05not a yjs update"])  # passes its checksum, but is not Yjs
    with_bad_record = (tmp_path / f"{NAME}.journal").read_bytes()
    with caplog.at_level(logging.ERROR):
        survived, stats = await open_like_a_child(tmp_path)
    assert survived == EVERYTHING
    assert stats.updates_rejected == 1
    assert with_bad_record in quarantine(tmp_path).values()
    assert any(name.endswith(".rejected") for name in quarantine(tmp_path))
    assert errors_naming_the_document(caplog)


# -- a document that cannot be opened ---------------------------------------------------------


def destroy_everything(data_dir: Path) -> dict[str, bytes]:
    build(data_dir)
    for path in data_dir.glob(f"{NAME}.*"):
        if not path.name.endswith(".lock"):
            path.write_bytes(os.urandom(path.stat().st_size).replace(b"\x1eYJR", b""))
    return {k: v for k, v in damaged_files(data_dir).items() if not k.endswith(".lock")}


async def test_unopenable_document_closes_each_client_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    originals = destroy_everything(tmp_path)
    master = Master()
    with trio.fail_after(10), caplog.at_level(logging.ERROR):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_document, master, NAME, tmp_path, handoff_options(tmp_path))
            await master.connect()
            one = await master.hand_over(1)
            two = await master.hand_over(2)
            assert await one.close_frame() == (CLOSE_DOCUMENT_UNAVAILABLE, REASON_UNAVAILABLE)
            assert await two.close_frame() == (CLOSE_DOCUMENT_UNAVAILABLE, REASON_UNAVAILABLE)
            for client in (one, two):
                await client.send_close(CLOSE_DOCUMENT_UNAVAILABLE)
            reports = sorted([await master.report(), await master.report()])  # type: ignore[type-var]
            assert [report[:3] for report in reports] == [
                ["left", 1, CLOSE_DOCUMENT_UNAVAILABLE],
                ["left", 2, CLOSE_DOCUMENT_UNAVAILABLE],
            ]
            master.close()
    with pytest.raises(trio.WouldBlock):
        master.from_child_receive.receive_nowait()  # nothing else was sent
    # Nothing changed on disk but the quarantine copies.
    assert {
        k: v for k, v in damaged_files(tmp_path).items() if not k.endswith(".lock")
    } == originals
    assert sorted(quarantine(tmp_path).values()) == sorted(originals.values())
    stats = storage_statistics()
    assert stats is not None and stats.files_quarantined == len(originals)
    assert errors_naming_the_document(caplog)


async def test_document_whose_updates_all_fail_is_refused(tmp_path: Path) -> None:
    with Journal.open(tmp_path, NAME) as journal:
        journal.append([b"\x05not yjs", b"\x07nor this"])
    master = Master()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_document, master, NAME, tmp_path, handoff_options(tmp_path))
            await master.connect()
            client = await master.hand_over(7)
            assert (await client.close_frame())[0] == CLOSE_DOCUMENT_UNAVAILABLE
            master.close()
    # Still there for the operator.
    with Journal.open(tmp_path, NAME) as journal:
        assert journal.recovered == (b"\x05not yjs", b"\x07nor this")


def test_kernel_keeps_waiting_updates_in_its_full_state(tmp_path: Path) -> None:
    doc: Doc[Text] = Doc()
    text = doc.get("text", type=Text)
    before = doc.get_state()
    text += "one"
    first = doc.get_update(before)
    before = doc.get_state()
    text += "two"
    second = doc.get_update(before)
    with Journal.open(tmp_path, NAME) as journal:
        journal.append([second])
    append_to(tmp_path / f"{NAME}.journal", b"garbage")
    with Journal.open(tmp_path, NAME) as journal:
        assert journal.damaged
        kernel = DocumentKernel(NAME, journal)
        assert kernel.text() == "" and kernel.waiting == 1
        restored: Doc[Text] = Doc()
        restored_text = restored.get("text", type=Text)
        restored.apply_update(kernel.full_state())
        restored.apply_update(first)
        assert str(restored_text) == "onetwo"
