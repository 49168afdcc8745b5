"""The document journal on real files: records, replay, damage, quarantine, compaction,
the old format, and the operator's commands. Updates here are opaque bytes; the damage
matrix with real Yjs edits is in test_storage_damage.py."""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.collab.journal import (
    Journal,
    JournalBusyError,
    JournalFailedError,
    JournalUnavailableError,
    StorageStatistics,
    check_storage_name,
    main,
)
from examples.collab.storage_format import (
    JOURNAL_HEADER,
    RECORD_MAGIC,
    SNAPSHOT_MAGIC,
    encode_record,
    encode_snapshot,
    parse_journal,
    parse_snapshot,
)

REPO = Path(__file__).resolve().parents[2]
UPDATES = [b"first update", b"\x01\x02\x03", b"x" * 1000]


def v1_record(update: bytes) -> bytes:
    """A record as the old format (format 1) wrote it."""
    return struct.pack(">II", len(update), zlib.crc32(update)) + update


def write_journal(tmp_path: Path, updates: list[bytes]) -> Path:
    with Journal.open(tmp_path, "doc") as journal:
        journal.append(updates)
    return tmp_path / "doc.journal"


def quarantined(tmp_path: Path, name: str = "doc") -> dict[str, bytes]:
    folder = tmp_path / "quarantine" / name
    if not folder.exists():
        return {}
    return {entry.name: entry.read_bytes() for entry in sorted(folder.iterdir())}


def errors_naming(caplog: pytest.LogCaptureFixture, name: str = "doc") -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno >= logging.ERROR and repr(name) in record.getMessage()
    ]


def offsets(updates: list[bytes]) -> list[int]:
    """Where each record starts in a journal holding *updates*."""
    starts = [len(JOURNAL_HEADER)]
    for update in updates[:-1]:
        starts.append(starts[-1] + len(encode_record(update)))
    return starts


# -- the format ---------------------------------------------------------------------------------


def test_append_and_reopen(tmp_path: Path) -> None:
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == ()
        journal.append(UPDATES[:2])
        journal.append(UPDATES[2:])
        assert journal.record_count == 3
        assert journal.size == sum(len(encode_record(u)) for u in UPDATES)
    image = (tmp_path / "doc.journal").read_bytes()
    assert image == JOURNAL_HEADER + b"".join(encode_record(u) for u in UPDATES)
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == tuple(UPDATES)
        assert journal.record_count == 3
        assert not journal.damaged and not journal.needs_compaction
        assert journal.statistics == StorageStatistics()
    assert not (tmp_path / "quarantine").exists()


def test_record_layout() -> None:
    record = encode_record(b"abc")
    magic, length, update_crc, header_crc = struct.unpack(">4sIII", record[:16])
    assert (magic, length, update_crc) == (RECORD_MAGIC, 3, zlib.crc32(b"abc"))
    assert header_crc == zlib.crc32(record[:12])
    assert record[16:] == b"abc"
    snapshot = encode_snapshot(b"state")
    assert snapshot == SNAPSHOT_MAGIC + struct.pack(">QI", 5, zlib.crc32(b"state")) + b"state"


def test_append_is_one_fsync_per_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_fsync = os.fdatasync

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)

    with Journal.open(tmp_path, "doc") as journal:
        monkeypatch.setattr(os, "fdatasync", counting_fsync)
        journal.append(UPDATES)
        assert len(calls) == 1
        journal.append([])
        journal.append([b""])
        assert len(calls) == 1  # nothing to write, nothing to sync


def test_creates_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "a" / "b"
    with Journal.open(data_dir, "doc") as journal:
        journal.append([b"u"])
    assert (data_dir / "doc.journal").exists()


# -- damaged journals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tail", "torn"),
    [
        pytest.param(RECORD_MAGIC[:2], True, id="torn-magic"),
        pytest.param(encode_record(b"abcdef")[:10], True, id="torn-header"),
        pytest.param(encode_record(b"abcdef")[:-2], True, id="torn-body"),
        pytest.param(b"\x00" * 64, True, id="zeros"),
        pytest.param(os.urandom(100).replace(RECORD_MAGIC, b""), False, id="garbage"),
        pytest.param(b"\x00\x00\x00\x40\x12\x34", False, id="old-format-header"),
    ],
)
def test_damaged_tail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tail: bytes, torn: bool
) -> None:
    path = write_journal(tmp_path, UPDATES)
    with path.open("ab") as f:
        f.write(tail)
    damaged = path.read_bytes()

    with caplog.at_level(logging.WARNING), Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == tuple(UPDATES)
        assert journal.damaged and journal.needs_compaction
        stats = journal.statistics
        assert (stats.damaged_stretches, stats.torn_tails) == (1, int(torn))
        assert (stats.bytes_skipped, stats.files_quarantined) == (len(tail), 1)
        # The damaged file was kept whole, then rewritten clean; appends land after.
        journal.append([b"after repair"])
    [(kept_name, kept)] = quarantined(tmp_path).items()
    assert kept == damaged
    assert kept_name.startswith("journal.")
    assert kept_name.endswith(".torn-tail" if torn else ".damaged")
    assert errors_naming(caplog)
    assert path.read_bytes() == JOURNAL_HEADER + b"".join(
        encode_record(u) for u in [*UPDATES, b"after repair"]
    )
    caplog.clear()
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == (*UPDATES, b"after repair")
        assert not journal.damaged
    assert not errors_naming(caplog)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["first", "middle", "last"])
@pytest.mark.parametrize("where", ["magic", "length", "update-crc", "header-crc", "update"])
def test_flipped_byte_in_a_record_loses_that_record_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, which: int, where: str
) -> None:
    path = write_journal(tmp_path, UPDATES)
    image = bytearray(path.read_bytes())
    field = {"magic": 1, "length": 6, "update-crc": 9, "header-crc": 13, "update": 17}[where]
    image[offsets(UPDATES)[which] + field] ^= 0x40
    path.write_bytes(bytes(image))

    with caplog.at_level(logging.ERROR), Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == tuple(u for i, u in enumerate(UPDATES) if i != which)
        assert journal.statistics.damaged_stretches == 1
        assert journal.statistics.torn_tails == 0
    assert list(quarantined(tmp_path).values()) == [bytes(image)]
    assert errors_naming(caplog)


def test_flipped_length_does_not_swallow_the_rest(tmp_path: Path) -> None:
    # A length made huge would, if trusted, cover every later record.
    updates = [b"u%d" % i for i in range(20)]
    path = write_journal(tmp_path, updates)
    image = bytearray(path.read_bytes())
    image[offsets(updates)[3] + 4] = 0x7F
    path.write_bytes(bytes(image))
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == tuple(updates[:3] + updates[4:])


def test_damaged_file_header_loses_nothing(tmp_path: Path) -> None:
    path = write_journal(tmp_path, UPDATES)
    image = bytearray(path.read_bytes())
    image[3] ^= 0xFF
    path.write_bytes(bytes(image))
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == tuple(UPDATES)
        assert journal.statistics.damaged_stretches == 1
    assert path.read_bytes().startswith(JOURNAL_HEADER)


def test_update_containing_the_record_magic(tmp_path: Path) -> None:
    # A record whose update holds something that looks like records: when the real
    # record is damaged, whatever is found inside it must still pass every checksum.
    inner = encode_record(b"smuggled")
    updates = [b"before", b"x" + inner + RECORD_MAGIC + b"y", b"after"]
    path = write_journal(tmp_path, updates)
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == tuple(updates)
    image = bytearray(path.read_bytes())
    image[offsets(updates)[1] + 16] ^= 1  # the damaged record's update
    path.write_bytes(bytes(image))
    with Journal.open(tmp_path, "doc") as journal:
        # The embedded record is well formed, so it is found; nothing valid is lost.
        assert journal.recovered == (b"before", b"smuggled", b"after")


@settings(max_examples=80, deadline=None)
@given(
    updates=st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=6),
    data=st.data(),
)
def test_any_flipped_byte_loses_at_most_the_record_it_hits(
    updates: list[bytes], data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        tmp_path = Path(directory)
        path = write_journal(tmp_path, updates)
        image = bytearray(path.read_bytes())
        position = data.draw(st.integers(0, len(image) - 1), label="position")
        image[position] ^= data.draw(st.integers(1, 255), label="xor")
        path.write_bytes(bytes(image))

        starts = [*offsets(updates), len(image)]
        hit = [starts[i] <= position < starts[i + 1] for i in range(len(updates))]
        expected = [u for u, was_hit in zip(updates, hit, strict=True) if not was_hit]
        if any(hit) and not expected:
            # The only record was hit: nothing valid is left, so it cannot be opened.
            with pytest.raises(JournalUnavailableError):
                Journal.open(tmp_path, "doc")
            assert path.read_bytes() == image
        else:
            with Journal.open(tmp_path, "doc") as journal:
                # Every record that was not hit survives, in order. (A hit record that
                # stays valid cannot happen: CRC-32 catches every one-byte change.)
                assert list(journal.recovered) == expected
        assert list(quarantined(tmp_path).values()) == [bytes(image)]


@settings(max_examples=60, deadline=None)
@given(
    updates=st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=6),
    data=st.data(),
)
def test_any_truncation_recovers_every_complete_record(
    updates: list[bytes], data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        tmp_path = Path(directory)
        path = write_journal(tmp_path, updates)
        image = path.read_bytes()
        cut = data.draw(st.integers(min_value=len(JOURNAL_HEADER), max_value=len(image)))
        path.write_bytes(image[:cut])

        ends = [len(JOURNAL_HEADER)]
        for update in updates:
            ends.append(ends[-1] + len(encode_record(update)))
        complete = max(i for i, end in enumerate(ends) if end <= cut)

        with Journal.open(tmp_path, "doc") as journal:
            assert journal.recovered == tuple(updates[:complete])
            assert journal.statistics.torn_tails == (0 if cut in ends else 1)
        if cut not in ends:
            assert list(quarantined(tmp_path).values()) == [image[:cut]]
        assert path.read_bytes() == image[: ends[complete]]


# -- compaction and generations ------------------------------------------------------------------


def test_compact_rotates_generations(tmp_path: Path) -> None:
    with Journal.open(tmp_path, "doc") as journal:
        journal.append(UPDATES)
        journal.compact(b"state 1")
        assert (journal.size, journal.record_count) == (0, 0)
        journal.append([b"later"])
    assert (tmp_path / "doc.snapshot").read_bytes() == encode_snapshot(b"state 1")
    assert not (tmp_path / "doc.snapshot.prev").exists()
    assert parse_journal((tmp_path / "doc.journal.prev").read_bytes()).records == tuple(UPDATES)
    assert not (tmp_path / "doc.snapshot.tmp").exists()
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == (b"state 1", b"later")
        journal.compact(b"state 2")
    assert (tmp_path / "doc.snapshot").read_bytes() == encode_snapshot(b"state 2")
    assert (tmp_path / "doc.snapshot.prev").read_bytes() == encode_snapshot(b"state 1")
    assert parse_journal((tmp_path / "doc.journal.prev").read_bytes()).records == (b"later",)
    assert (tmp_path / "doc.journal").read_bytes() == JOURNAL_HEADER
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == (b"state 2",)


def two_generations(tmp_path: Path) -> None:
    """doc.snapshot.prev = S1, doc.journal.prev = [b, c], doc.snapshot = S2, doc.journal = [d]."""
    with Journal.open(tmp_path, "doc") as journal:
        journal.append([b"a"])
        journal.compact(b"S1")
        journal.append([b"b", b"c"])
        journal.compact(b"S2")
        journal.append([b"d"])


@pytest.mark.parametrize(
    "damage",
    ["truncated", "truncated-header", "random", "flipped-state", "flipped-length", "empty"],
)
def test_damaged_snapshot_opens_from_the_previous_generation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    two_generations(tmp_path)
    path = tmp_path / "doc.snapshot"
    image = bytearray(path.read_bytes())
    if damage == "truncated":
        del image[-1:]
    elif damage == "truncated-header":
        del image[10:]
    elif damage == "random":
        image[:] = os.urandom(len(image))
    elif damage == "flipped-state":
        image[-1] ^= 0x01
    elif damage == "flipped-length":
        image[len(SNAPSHOT_MAGIC) + 7] ^= 0x01
    else:
        image.clear()
    path.write_bytes(bytes(image))

    with caplog.at_level(logging.WARNING), Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == (b"S1", b"b", b"c", b"d")
        stats = journal.statistics
        assert (stats.snapshots_rejected, stats.previous_generation_used) == (1, 1)
        assert journal.needs_compaction
        journal.compact(b"S3")
    assert list(quarantined(tmp_path).values()) == [bytes(image)]
    assert [name.rsplit(".", 1)[-1] for name in quarantined(tmp_path)] == ["damaged"]
    assert errors_naming(caplog)
    # After the repair the previous generation is a good copy again.
    path.write_bytes(b"damaged again")
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == (b"S3", b"d")


def test_crash_between_snapshot_renames(tmp_path: Path) -> None:
    # compact() renamed the snapshot to .prev and died before renaming the new one
    # into place: opening uses the previous generation and the journal.
    two_generations(tmp_path)
    os.replace(tmp_path / "doc.snapshot", tmp_path / "doc.snapshot.prev")
    (tmp_path / "doc.snapshot.tmp").write_bytes(encode_snapshot(b"S3"))
    with Journal.open(tmp_path, "doc") as journal:
        assert set(journal.recovered) == {b"S2", b"b", b"c", b"d"}
        assert journal.statistics.snapshots_rejected == 0
    assert not (tmp_path / "doc.snapshot.tmp").exists()


def test_crash_before_the_new_journal_is_created(tmp_path: Path) -> None:
    two_generations(tmp_path)
    os.replace(tmp_path / "doc.journal", tmp_path / "doc.journal.prev")
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == (b"S2",)
    assert (tmp_path / "doc.journal").read_bytes() == JOURNAL_HEADER


def test_compact_refuses_empty_state(tmp_path: Path) -> None:
    with Journal.open(tmp_path, "doc") as journal, pytest.raises(ValueError):
        journal.compact(b"")


# -- the old format ------------------------------------------------------------------------------


def test_old_format_files_are_read_and_converted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old_journal = b"".join(v1_record(u) for u in UPDATES)
    (tmp_path / "doc.journal").write_bytes(old_journal)
    (tmp_path / "doc.snapshot").write_bytes(b"bare old snapshot")

    with caplog.at_level(logging.INFO), Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == (b"bare old snapshot", *UPDATES)
        assert journal.statistics.old_format_files == 2
        assert not journal.damaged and journal.needs_compaction
    kept = quarantined(tmp_path)
    assert sorted(kept.values()) == sorted([old_journal, b"bare old snapshot"])
    assert all(name.endswith(".old-format") for name in kept)
    # Converted in place to format 2.
    assert (tmp_path / "doc.snapshot").read_bytes() == encode_snapshot(b"bare old snapshot")
    assert (tmp_path / "doc.journal").read_bytes().startswith(JOURNAL_HEADER)
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == (b"bare old snapshot", *UPDATES)
        assert journal.statistics == StorageStatistics()


def test_old_format_empty_journal_after_compaction(tmp_path: Path) -> None:
    (tmp_path / "doc.journal").write_bytes(b"")
    (tmp_path / "doc.snapshot").write_bytes(b"state")
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == (b"state",)
    assert (tmp_path / "doc.journal").read_bytes() == JOURNAL_HEADER


def test_old_format_snapshot_that_fails_its_check_is_damaged(tmp_path: Path) -> None:
    (tmp_path / "doc.journal").write_bytes(v1_record(b"kept"))
    (tmp_path / "doc.snapshot").write_bytes(b"garbage")

    def check(update: bytes) -> None:
        if update == b"garbage":
            raise ValueError("not an update")

    with Journal.open(tmp_path, "doc", check_old=check) as journal:
        assert journal.recovered == (b"kept",)
        assert journal.statistics.snapshots_rejected == 1
    assert b"garbage" in quarantined(tmp_path).values()
    assert not (tmp_path / "doc.snapshot").exists()


@pytest.mark.parametrize(
    ("tail", "torn"),
    [
        (b"\x00\x00", True),
        (struct.pack(">II", 10, 0) + b"abc", True),
        (struct.pack(">II", 2, 0) + b"ab", False),
    ],
)
def test_old_format_damaged_tail(tmp_path: Path, tail: bytes, torn: bool) -> None:
    old = b"".join(v1_record(u) for u in UPDATES) + tail
    (tmp_path / "doc.journal").write_bytes(old)
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == tuple(UPDATES)
        assert journal.statistics.torn_tails == int(torn)
    assert list(quarantined(tmp_path).values()) == [old]


def test_old_format_damage_in_the_middle_loses_that_record_only(tmp_path: Path) -> None:
    # Format 1 has no magic: after the damaged record the reader tries every offset.
    old = bytearray(b"".join(v1_record(u) for u in UPDATES))
    old[len(v1_record(UPDATES[0])) + 9] ^= 0x10
    (tmp_path / "doc.journal").write_bytes(bytes(old))
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == (UPDATES[0], UPDATES[2])
        assert journal.statistics.damaged_stretches == 1
    assert list(quarantined(tmp_path).values()) == [bytes(old)]


@settings(max_examples=60, deadline=None)
@given(
    updates=st.lists(st.binary(min_size=1, max_size=40), min_size=2, max_size=6),
    data=st.data(),
)
def test_old_format_any_flipped_byte_loses_at_most_the_record_it_hits(
    updates: list[bytes], data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        tmp_path = Path(directory)
        image = bytearray(b"".join(v1_record(u) for u in updates))
        position = data.draw(st.integers(0, len(image) - 1), label="position")
        image[position] ^= data.draw(st.integers(1, 255), label="xor")
        (tmp_path / "doc.journal").write_bytes(bytes(image))
        starts = [0]
        for update in updates:
            starts.append(starts[-1] + len(v1_record(update)))
        expected = [u for i, u in enumerate(updates) if not starts[i] <= position < starts[i + 1]]
        with Journal.open(tmp_path, "doc") as journal:
            assert list(journal.recovered) == expected
        assert list(quarantined(tmp_path).values()) == [bytes(image)]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_old_format_flipped_length(tmp_path: Path, which: int) -> None:
    old = bytearray(b"".join(v1_record(u) for u in UPDATES))
    old[sum(len(v1_record(u)) for u in UPDATES[:which]) + 1] ^= 0x04
    (tmp_path / "doc.journal").write_bytes(bytes(old))
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == tuple(u for i, u in enumerate(UPDATES) if i != which)


# -- what cannot be opened ----------------------------------------------------------------------


def refuse_old_snapshots(update: bytes) -> None:
    raise ValueError("not an update")


def test_nothing_valid_cannot_be_opened(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    two_generations(tmp_path)
    originals = {}
    for path in sorted(tmp_path.glob("doc.*")):
        if path.suffix != ".lock":
            path.write_bytes(os.urandom(path.stat().st_size + 20).replace(RECORD_MAGIC, b""))
            originals[path.name] = path.read_bytes()
    for attempt in range(2):
        with caplog.at_level(logging.ERROR), pytest.raises(JournalUnavailableError) as raised:
            Journal.open(tmp_path, "doc", check_old=refuse_old_snapshots)
        assert raised.value.statistics.files_quarantined == (4 if attempt == 0 else 0)
        assert "doc" in str(raised.value)
        # Nothing changed in place; each damaged file is in quarantine once.
        assert {name: (tmp_path / name).read_bytes() for name in originals} == originals
        assert sorted(quarantined(tmp_path).values()) == sorted(originals.values())
    assert errors_naming(caplog)
    # The lock was released.
    (tmp_path / "quarantine" / "doc").rename(tmp_path / "kept")
    for name in originals:
        (tmp_path / name).unlink()
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == ()


def test_only_a_torn_first_write_opens_empty(tmp_path: Path) -> None:
    (tmp_path / "doc.journal").write_bytes(JOURNAL_HEADER + encode_record(b"never acked")[:-3])
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == ()
        assert journal.statistics.torn_tails == 1


@pytest.mark.parametrize("how", ["data-dir-is-a-file", "journal-is-a-folder"])
def test_unreadable_storage_cannot_be_opened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    if how == "data-dir-is-a-file":
        data_dir = tmp_path / "data"
        data_dir.write_bytes(b"")
    else:
        data_dir = tmp_path
        (tmp_path / "doc.journal").mkdir()
    with caplog.at_level(logging.ERROR), pytest.raises(JournalUnavailableError):
        Journal.open(data_dir, "doc")
    assert errors_naming(caplog)


def test_second_open_is_refused(tmp_path: Path) -> None:
    with Journal.open(tmp_path, "doc"):
        with pytest.raises(JournalBusyError):
            Journal.open(tmp_path, "doc")
        with Journal.open(tmp_path, "other"):
            pass
    with Journal.open(tmp_path, "doc"):
        pass


def test_lock_survives_compaction(tmp_path: Path) -> None:
    with Journal.open(tmp_path, "doc") as journal:
        journal.append([b"x"])
        journal.compact(b"state")
        with pytest.raises(JournalBusyError):
            Journal.open(tmp_path, "doc")


def test_leftover_temporary_files_are_removed(tmp_path: Path) -> None:
    for kind in ("snapshot", "journal", "snapshot.prev"):
        (tmp_path / f"doc.{kind}.tmp").write_bytes(b"half written")
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == ()
    assert not list(tmp_path.glob("*.tmp"))


# -- write failures ------------------------------------------------------------------------------


def test_failed_fsync_poisons_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(5, "simulated I/O error")

    with Journal.open(tmp_path, "doc") as journal:
        journal.append([b"kept"])
        with monkeypatch.context() as patch:
            patch.setattr(os, "fdatasync", failing_fsync)
            with pytest.raises(OSError, match="simulated"):
                journal.append([b"lost"])
        assert journal.failed
        with pytest.raises(JournalFailedError):
            journal.append([b"more"])
        with pytest.raises(JournalFailedError):
            journal.compact(b"state")
    # The half-written batch was cut off again.
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == (b"kept",)
        assert not journal.damaged


def test_failed_snapshot_write_keeps_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_replace = os.replace

    def failing_replace(src: object, dst: object) -> None:
        if str(src).endswith(".snapshot.tmp"):
            raise OSError(28, "simulated disk full")
        real_replace(src, dst)  # type: ignore[arg-type]

    two_generations(tmp_path)
    with Journal.open(tmp_path, "doc") as journal:
        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", failing_replace)
            with pytest.raises(OSError, match="simulated"):
                journal.compact(b"S3")
        journal.append([b"e"])
    with Journal.open(tmp_path, "doc") as journal:
        assert set(journal.recovered) >= {b"S2", b"d", b"e"}
    assert not list(tmp_path.glob("*.tmp"))


def test_closed_journal_refuses_writes(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path, "doc")
    journal.close()
    journal.close()
    assert journal.closed
    with pytest.raises(ValueError):
        journal.append([b"x"])


# -- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "../x", "/etc/passwd", "a\x00b"])
def test_unsafe_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        check_storage_name(name)
    with pytest.raises(ValueError):
        Journal.open(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["notes", "Café 2", "a.b", "x..y", "quarantine"])
def test_safe_names_are_accepted(tmp_path: Path, name: str) -> None:
    with Journal.open(tmp_path, name) as journal:
        journal.append([b"u"])
    assert (tmp_path / f"{name}.journal").exists()


def test_parse_snapshot_without_magic() -> None:
    assert parse_snapshot(b"raw", old_format=True).state == b"raw"
    assert parse_snapshot(b"raw", old_format=False).state is None
    # A damaged format-2 snapshot is never taken for an old one.
    assert parse_snapshot(SNAPSHOT_MAGIC[:9], old_format=True).state is None


# -- the operator's commands ---------------------------------------------------------------------


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "examples.collab.journal", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def yjs_edit(token: str) -> bytes:
    from pycrdt import Doc, Text

    doc: Doc[Text] = Doc()
    doc.get("text", type=Text).insert(0, token)
    return doc.get_update()


def test_inspect_and_restore_a_quarantined_journal(tmp_path: Path) -> None:
    edits = [yjs_edit(f"<e:{i}>") for i in range(3)]
    path = write_journal(tmp_path, edits)
    image = bytearray(path.read_bytes())
    image[offsets(edits)[1] + 20] ^= 0xFF
    path.write_bytes(bytes(image))
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == (edits[0], edits[2])
    [kept] = (tmp_path / "quarantine" / "doc").iterdir()

    result = run_tool("inspect", str(kept))
    assert result.returncode == 1, result.stderr
    assert "journal (format 2)" in result.stdout
    assert "valid updates: 2" in result.stdout
    assert "corrupt" in result.stdout

    # Restoring puts back what is valid in it (already there: harmless) and nothing else.
    result = run_tool("restore", "--data-dir", str(tmp_path), "doc", str(kept))
    assert result.returncode == 0, result.stderr + result.stdout
    assert "2 updates" in result.stdout
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == (edits[0], edits[2], edits[0], edits[2])


def test_restore_a_damaged_snapshot_only_when_asked(tmp_path: Path) -> None:
    state = yjs_edit("<s:0>")
    damaged = tmp_path / "snapshot.damaged"
    image = bytearray(encode_snapshot(state))
    image[len(SNAPSHOT_MAGIC) + 11] ^= 0x01  # the checksum: the state itself is intact
    damaged.write_bytes(bytes(image))
    data_dir = tmp_path / "data"

    assert main(["inspect", str(damaged)]) == 1
    assert main(["restore", "--data-dir", str(data_dir), "doc", str(damaged)]) == 1
    assert not (data_dir / "doc.journal").exists()
    assert (
        main(["restore", "--data-dir", str(data_dir), "--accept-damaged", "doc", str(damaged)]) == 0
    )
    with Journal.open(data_dir, "doc") as journal:
        assert journal.recovered == (state,)


def test_restore_refuses_while_the_document_is_open(tmp_path: Path) -> None:
    source = tmp_path / "journal.old"
    source.write_bytes(JOURNAL_HEADER + encode_record(yjs_edit("<x:0>")))
    with Journal.open(tmp_path / "data", "doc"):
        assert main(["restore", "--data-dir", str(tmp_path / "data"), "doc", str(source)]) == 2
