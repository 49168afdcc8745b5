"""The bytes of a document's files: encoding, and decoding that survives damage.

This module does no I/O; :mod:`examples.collab.journal` reads and writes the files.
All integers are big-endian; every checksum is CRC-32 (``zlib.crc32``), which catches
every error burst of up to 32 bits and any other damage with probability
1 - 2\\ :sup:`-32`.

A **journal** (format 2) is a file header followed by records::

    header   18 bytes  b"\\x89collab journal 2\\n"
    record   ...
    record   ...

and each record is::

    magic        4 bytes  b"\\x1eYJR" (0x1E is ASCII "record separator")
    length       4 bytes  bytes in the update, 1 to 2**32 - 1
    update_crc   4 bytes  CRC-32 of the update
    header_crc   4 bytes  CRC-32 of the 12 bytes before it
    update       `length` bytes: one Yjs update (v1 encoding)

The header checksum means a damaged length is never trusted: a record is accepted only
if its magic, its header checksum and its update checksum all match. After a record
that fails, the reader looks for the next magic and tries again there, byte by byte,
so one damaged record (whatever byte of it is hit) costs that record only. Yjs updates
are idempotent and commutative, so replaying the records that survive is correct in
any case; an update whose causal predecessor was lost is kept by Yjs as *pending*
until some client supplies the missing part.

A **snapshot** (format 2) is one file holding the whole document as one update::

    magic    19 bytes  b"\\x89collab snapshot 2\\n"
    length    8 bytes  bytes in the state
    crc       4 bytes  CRC-32 of the state
    state    `length` bytes: one Yjs update (v1 encoding)

A snapshot is all or nothing: wrong magic, a size that does not match ``length`` (a
truncated file) or a checksum mismatch (a flipped byte) rejects the whole file.

**Format 1**, written by earlier versions, had no file header and no magic: a journal
was a sequence of ``length (4) | crc32 (4) | update`` records, and a snapshot was the
bare update. It is still read and converted to format 2 when the document is opened. After a damaged
format-1 record, having no magic to look for, the reader tries every following offset
for a record whose checksum matches.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

import attrs

__all__ = [
    "JOURNAL_HEADER",
    "MAX_RECORD_SIZE",
    "RECORD_MAGIC",
    "SNAPSHOT_MAGIC",
    "Damage",
    "JournalImage",
    "SnapshotImage",
    "encode_journal",
    "encode_record",
    "encode_snapshot",
    "parse_journal",
    "parse_snapshot",
]

JOURNAL_HEADER = b"\x89collab journal 2\n"
SNAPSHOT_MAGIC = b"\x89collab snapshot 2\n"
RECORD_MAGIC = b"\x1eYJR"

#: The largest update one record can hold (the length field is 32 bits).
MAX_RECORD_SIZE = 2**32 - 1

_RECORD = struct.Struct(">4sIII")  # magic, length, update crc, header crc
_RECORD_CHECKED = 12  # bytes covered by the header crc
_SNAPSHOT = struct.Struct(">QI")  # length, crc
_SNAPSHOT_HEADER_SIZE = len(SNAPSHOT_MAGIC) + _SNAPSHOT.size
_V1_RECORD = struct.Struct(">II")  # length, crc
# Bytes checksummed per byte of file while looking for format-1 records after damage.
_V1_SCAN_BUDGET = 64
# Enough of the magic to tell a damaged format-2 snapshot from a format-1 one.
_SNAPSHOT_FAMILY = SNAPSHOT_MAGIC[:7]


@attrs.frozen
class Damage:
    """A stretch of a journal that holds no valid record.

    Attributes:
        offset: where it starts in the file.
        length: how many bytes it spans.
        torn: whether it looks like a write cut short by a crash: it runs to the end
            of the file and is the beginning of a record (or only zero bytes). Such
            bytes belonged to a batch whose ``fsync`` never returned, so no client was
            told they were stored. Anything else is corruption.
    """

    offset: int
    length: int
    torn: bool


@attrs.frozen
class JournalImage:
    """What a journal file holds.

    Attributes:
        records: the valid updates, in file order.
        damage: the stretches that were skipped, in file order.
        version: 2, 1 (the old format), or 0 (an empty file, or nothing valid to tell).
    """

    records: tuple[bytes, ...]
    damage: tuple[Damage, ...]
    version: int

    @property
    def damaged_bytes(self) -> int:
        return sum(part.length for part in self.damage)

    @property
    def corrupt(self) -> bool:
        """Whether any damage is more than a torn tail."""
        return any(not part.torn for part in self.damage)


@attrs.frozen
class SnapshotImage:
    """What a snapshot file holds.

    Attributes:
        state: the document state, or ``None`` if the file is damaged.
        version: 2, or 1 for an old-format (bare) snapshot.
        problem: why the file was rejected (``None`` if it was not).
    """

    state: bytes | None
    version: int
    problem: str | None = None


# -- encoding ---------------------------------------------------------------------------------


def encode_record(update: bytes) -> bytes:
    """One journal record holding *update*.

    Raises:
        ValueError: *update* is empty or longer than :data:`MAX_RECORD_SIZE`.
    """
    if not update:
        raise ValueError("cannot journal an empty update")
    if len(update) > MAX_RECORD_SIZE:
        raise ValueError(f"update of {len(update)} bytes is too large for one record")
    head = struct.pack(">4sII", RECORD_MAGIC, len(update), zlib.crc32(update))
    return head + struct.pack(">I", zlib.crc32(head)) + update


def encode_journal(updates: tuple[bytes, ...] | list[bytes]) -> bytes:
    """A whole journal file holding *updates*."""
    return JOURNAL_HEADER + b"".join(encode_record(update) for update in updates)


def encode_snapshot(state: bytes) -> bytes:
    """A whole snapshot file holding *state*.

    Raises:
        ValueError: *state* is empty.
    """
    if not state:
        raise ValueError("refusing to write an empty snapshot")
    return SNAPSHOT_MAGIC + _SNAPSHOT.pack(len(state), zlib.crc32(state)) + state


# -- decoding journals --------------------------------------------------------------------------


def _record_at(image: bytes, offset: int) -> bytes | None:
    """The update of a fully valid format-2 record at *offset*, else ``None``."""
    if len(image) - offset < _RECORD.size:
        return None
    magic, length, update_crc, header_crc = _RECORD.unpack_from(image, offset)
    if magic != RECORD_MAGIC:
        return None
    if zlib.crc32(image[offset : offset + _RECORD_CHECKED]) != header_crc:
        return None
    start = offset + _RECORD.size
    if length == 0 or length > len(image) - start:
        return None
    update = image[start : start + length]
    if zlib.crc32(update) != update_crc:
        return None
    return update


def _is_torn_record(tail: bytes) -> bool:
    """Whether *tail* (the bytes from a damaged stretch to the end of the file) is a
    record cut short: a prefix of a record header, or a valid header whose update does
    not fit, or zeros (a file extended by a crash before its data was written)."""
    if not tail.strip(b"\x00"):
        return True
    if len(tail) < _RECORD.size:
        return RECORD_MAGIC.startswith(tail[: len(RECORD_MAGIC)])
    magic, length, _update_crc, header_crc = _RECORD.unpack_from(tail)
    return bool(
        magic == RECORD_MAGIC
        and zlib.crc32(tail[:_RECORD_CHECKED]) == header_crc
        and length > len(tail) - _RECORD.size
    )


def _scan_v2(image: bytes, start: int) -> tuple[list[bytes], list[Damage]]:
    records: list[bytes] = []
    damage: list[Damage] = []
    bad_start: int | None = None
    offset = start
    end = len(image)
    while offset < end:
        update = _record_at(image, offset)
        if update is not None:
            if bad_start is not None:
                damage.append(Damage(bad_start, offset - bad_start, torn=False))
                bad_start = None
            records.append(update)
            offset += _RECORD.size + len(update)
            continue
        if bad_start is None:
            bad_start = offset
        found = image.find(RECORD_MAGIC, offset + 1)
        offset = end if found < 0 else found
    if bad_start is not None:
        torn = _is_torn_record(image[bad_start:])
        damage.append(Damage(bad_start, end - bad_start, torn=torn))
    return records, damage


def _v1_record_at(image: bytes, offset: int) -> bytes | None:
    if len(image) - offset < _V1_RECORD.size:
        return None
    length, crc = _V1_RECORD.unpack_from(image, offset)
    start = offset + _V1_RECORD.size
    if length == 0 or length > len(image) - start:
        return None
    update = image[start : start + length]
    return update if zlib.crc32(update) == crc else None


def _next_v1_record(image: bytes, offset: int, budget: list[int]) -> int | None:
    """The first offset from *offset* on where a format-1 record passes its checksum.

    Format 1 has no magic to look for, so every offset is a candidate; *budget* bounds
    the bytes checksummed (a list, so that one budget serves a whole file)."""
    last = len(image) - _V1_RECORD.size
    while offset <= last:
        length, crc = _V1_RECORD.unpack_from(image, offset)
        start = offset + _V1_RECORD.size
        if 0 < length <= len(image) - start:
            budget[0] -= length
            if budget[0] < 0:
                return None
            if zlib.crc32(image[start : start + length]) == crc:
                return offset
        offset += 1
    return None


def _is_torn_v1(tail: bytes) -> bool:
    if len(tail) < _V1_RECORD.size or not tail.strip(b"\x00"):
        return True
    length, _crc = _V1_RECORD.unpack_from(tail)
    return bool(length > len(tail) - _V1_RECORD.size)


def _parse_v1(image: bytes) -> tuple[list[bytes], list[Damage]]:
    """The old format. It has no magic, so after a damaged record the reader tries every
    following offset for a record whose checksum matches (within a work budget)."""
    records: list[bytes] = []
    damage: list[Damage] = []
    budget = [_V1_SCAN_BUDGET * len(image)]
    offset = 0
    end = len(image)
    while offset < end:
        update = _v1_record_at(image, offset)
        if update is not None:
            records.append(update)
            offset += _V1_RECORD.size + len(update)
            continue
        following = _next_v1_record(image, offset + 1, budget)
        if following is None:
            damage.append(Damage(offset, end - offset, torn=_is_torn_v1(image[offset:])))
            break
        damage.append(Damage(offset, following - offset, torn=False))
        offset = following
    return records, damage


def parse_journal(image: bytes) -> JournalImage:
    """Split a journal file's bytes into its valid records and its damaged stretches.

    Format 2 is recognised by its file header, or, if the header itself is damaged, by
    valid format-2 records; otherwise the bytes are read as format 1.
    """
    if image.startswith(JOURNAL_HEADER):
        records, damage = _scan_v2(image, len(JOURNAL_HEADER))
        return JournalImage(tuple(records), tuple(damage), 2)
    if JOURNAL_HEADER.startswith(image):
        # Empty, or a header cut short when the file was created: nothing was stored.
        return JournalImage((), (), 0)
    records, damage = _scan_v2(image, 0)
    if records:
        return JournalImage(tuple(records), tuple(damage), 2)
    old_records, old_damage = _parse_v1(image)
    if old_records or not old_damage:
        return JournalImage(tuple(old_records), tuple(old_damage), 1)
    return JournalImage((), tuple(damage), 0)


# -- decoding snapshots -------------------------------------------------------------------------


def parse_snapshot(
    image: bytes,
    *,
    old_format: bool,
    check_old: Callable[[bytes], object] | None = None,
) -> SnapshotImage:
    """Check a snapshot file's bytes.

    Args:
        image: the whole file.
        old_format: whether a file without the format-2 magic may be an old-format
            (bare) snapshot. Pass ``False`` when the document's journal is in
            format 2: its snapshot is then written in format 2 too, and a file
            without the magic is damaged.
        check_old: called with an old-format snapshot's bytes; if it raises, the file
            is damaged (an old snapshot has no checksum; e.g. try to apply it to an
            empty document).
    """
    if image.startswith(SNAPSHOT_MAGIC):
        return _parse_v2_snapshot(image)
    if not old_format or image.startswith(_SNAPSHOT_FAMILY):
        return SnapshotImage(None, 2, "not a snapshot (wrong magic)")
    if not image:
        return SnapshotImage(None, 1, "empty file")
    if check_old is not None:
        try:
            check_old(image)
        except Exception as exc:
            return SnapshotImage(None, 1, f"old-format snapshot cannot be read ({exc})")
    return SnapshotImage(image, 1)


def _parse_v2_snapshot(image: bytes) -> SnapshotImage:
    if len(image) < _SNAPSHOT_HEADER_SIZE:
        return SnapshotImage(None, 2, f"truncated header ({len(image)} bytes)")
    length, crc = _SNAPSHOT.unpack_from(image, len(SNAPSHOT_MAGIC))
    state = image[_SNAPSHOT_HEADER_SIZE:]
    if len(state) != length:
        return SnapshotImage(
            None, 2, f"size mismatch ({length} bytes of state expected, {len(state)} found)"
        )
    if length == 0:
        return SnapshotImage(None, 2, "empty state")
    if zlib.crc32(state) != crc:
        return SnapshotImage(None, 2, "checksum mismatch")
    return SnapshotImage(state, 2)


def snapshot_payload(image: bytes) -> bytes:
    """The state bytes of a snapshot file, whether or not they are intact: for an
    operator who chooses to put a damaged snapshot back (format 1: the whole file)."""
    if image.startswith(SNAPSHOT_MAGIC):
        return image[_SNAPSHOT_HEADER_SIZE:]
    return image
