"""The document journal: records, replay, torn tails, compaction."""

from __future__ import annotations

import logging
import os
import struct
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
    check_storage_name,
)


def record(update: bytes) -> bytes:
    return struct.pack(">II", len(update), zlib.crc32(update)) + update


UPDATES = [b"first update", b"\x01\x02\x03", b"x" * 1000]


def write_journal(tmp_path: Path, updates: list[bytes]) -> None:
    with Journal.open(tmp_path, "doc") as journal:
        journal.append(updates)


def test_append_and_reopen(tmp_path: Path) -> None:
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == ()
        journal.append(UPDATES[:2])
        journal.append(UPDATES[2:])
        assert journal.record_count == 3
        assert journal.size == sum(len(record(u)) for u in UPDATES)
    assert (tmp_path / "doc.journal").read_bytes() == b"".join(record(u) for u in UPDATES)
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == tuple(UPDATES)
        assert journal.record_count == 3


def test_append_is_one_fsync_per_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)

    with Journal.open(tmp_path, "doc") as journal:
        monkeypatch.setattr(os, "fsync", counting_fsync)
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


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(b"\x00\x00", id="torn-header"),
        pytest.param(struct.pack(">II", 10, 0) + b"abc", id="torn-body"),
        pytest.param(struct.pack(">II", 3, zlib.crc32(b"abc") ^ 1) + b"abc", id="bad-crc"),
        pytest.param(b"\x00" * 64, id="zeros"),
        pytest.param(struct.pack(">II", 2**32 - 1, 0), id="huge-length"),
    ],
)
def test_torn_tail_is_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tail: bytes
) -> None:
    write_journal(tmp_path, UPDATES)
    path = tmp_path / "doc.journal"
    good_size = path.stat().st_size
    with path.open("ab") as f:
        f.write(tail)

    with caplog.at_level(logging.WARNING), Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == tuple(UPDATES)
        assert journal.size == good_size
        # Appending after the repair lands right after the last good record.
        journal.append([b"after repair"])
    assert any("dropping the last" in r.getMessage() for r in caplog.records)
    assert path.stat().st_size == good_size + len(record(b"after repair"))
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == (*UPDATES, b"after repair")


def test_corrupt_last_record_is_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_journal(tmp_path, UPDATES)
    path = tmp_path / "doc.journal"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING), Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == tuple(UPDATES[:2])
    assert "checksum" in caplog.text
    assert path.stat().st_size == sum(len(record(u)) for u in UPDATES[:2])


@settings(max_examples=60, deadline=None)
@given(
    updates=st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=6),
    data=st.data(),
)
def test_any_truncation_recovers_a_prefix(updates: list[bytes], data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as directory:
        tmp_path = Path(directory)
        write_journal(tmp_path, updates)
        path = tmp_path / "doc.journal"
        image = path.read_bytes()
        cut = data.draw(st.integers(min_value=0, max_value=len(image)), label="cut")
        path.write_bytes(image[:cut])

        ends = [0]
        for update in updates:
            ends.append(ends[-1] + len(record(update)))
        complete = max(i for i, end in enumerate(ends) if end <= cut)

        with Journal.open(tmp_path, "doc") as journal:
            assert journal.recovered == tuple(updates[:complete])
        assert path.stat().st_size == ends[complete]


def test_compact_replaces_snapshot_and_empties_log(tmp_path: Path) -> None:
    with Journal.open(tmp_path, "doc") as journal:
        journal.append(UPDATES)
        journal.compact(b"full state")
        assert journal.size == 0
        assert journal.record_count == 0
        journal.append([b"later"])
    assert (tmp_path / "doc.snapshot").read_bytes() == b"full state"
    assert not (tmp_path / "doc.snapshot.tmp").exists()
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == (b"full state", b"later")
        journal.compact(b"newer state")
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == (b"newer state",)


def test_leftover_temporary_snapshot_is_removed(tmp_path: Path) -> None:
    (tmp_path / "doc.snapshot.tmp").write_bytes(b"half written")
    with Journal.open(tmp_path, "doc") as journal:
        assert journal.recovered == ()
    assert not (tmp_path / "doc.snapshot.tmp").exists()


def test_compact_refuses_empty_state(tmp_path: Path) -> None:
    with Journal.open(tmp_path, "doc") as journal, pytest.raises(ValueError):
        journal.compact(b"")


def test_second_open_is_refused(tmp_path: Path) -> None:
    with Journal.open(tmp_path, "doc"):
        with pytest.raises(JournalBusyError):
            Journal.open(tmp_path, "doc")
        with Journal.open(tmp_path, "other"):
            pass
    with Journal.open(tmp_path, "doc"):
        pass


def test_failed_fsync_poisons_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(5, "simulated I/O error")

    with Journal.open(tmp_path, "doc") as journal:
        journal.append([b"kept"])
        with monkeypatch.context() as patch:
            patch.setattr(os, "fsync", failing_fsync)
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


def test_closed_journal_refuses_writes(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path, "doc")
    journal.close()
    journal.close()
    assert journal.closed
    with pytest.raises(ValueError):
        journal.append([b"x"])


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "../x", "/etc/passwd", "a\x00b"])
def test_unsafe_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        check_storage_name(name)
    with pytest.raises(ValueError):
        Journal.open(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["notes", "Café 2", "a.b", "x..y"])
def test_safe_names_are_accepted(tmp_path: Path, name: str) -> None:
    with Journal.open(tmp_path, name) as journal:
        journal.append([b"u"])
    assert (tmp_path / f"{name}.journal").exists()
