"""Durable storage for one collaborative document.

Two files per document live in the data directory:

``<name>.snapshot``
    The whole document state, encoded as one Yjs update. Written atomically by
    :meth:`Journal.compact` (temporary file, fsync, rename, fsync of the directory).

``<name>.journal``
    An append-only log of the updates applied since the snapshot. Each record is::

        length  4 bytes, big-endian, > 0
        crc32   4 bytes, big-endian, CRC-32 of the update bytes
        update  ``length`` bytes

Opening a journal replays both: the snapshot first, then every record in order.
Yjs updates are idempotent and commutative, so a crash between the rename of a new
snapshot and the truncation of the journal only means some updates are applied twice.

A crash in the middle of :meth:`Journal.append` can leave a torn record at the end of the
log (a header or body cut short, or bytes that never reached the disk). The first record
that is incomplete or fails its checksum ends the log: it and everything after it are
dropped, the file is truncated to the last good record, and a warning is logged.
After a crash, the bytes past that point belong to the unfinished group commit whose
``fsync`` never returned, so no client was ever told they were stored. (Damage in the
middle of the log, such as a flipped bit on the disk, cannot be told apart from a torn
tail; the warning says how many bytes were dropped.)

All methods are blocking; call them from a worker thread (``trio.to_thread.run_sync``)
when running inside an event loop. A journal is not thread-safe: make one call at a time.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

__all__ = [
    "Journal",
    "JournalBusyError",
    "JournalError",
    "JournalFailedError",
    "check_storage_name",
]

logger = logging.getLogger(__name__)

SNAPSHOT_SUFFIX = ".snapshot"
JOURNAL_SUFFIX = ".journal"
TMP_SUFFIX = ".tmp"

_HEADER = struct.Struct(">II")
#: The largest update one record can hold (the length field is 32 bits).
MAX_RECORD_SIZE = 2**32 - 1


class JournalError(Exception):
    """Base class of the journal's own errors."""


class JournalBusyError(JournalError):
    """Another open :class:`Journal` (in this or another process) holds the document."""


class JournalFailedError(JournalError):
    """An earlier write or fsync failed; the journal refuses further writes.

    After a failed ``fsync`` the kernel may have dropped the dirty pages, so what is on
    disk is unknown. Close the journal and open it again to recover from the files.
    """


def check_storage_name(name: str) -> str:
    """Refuse a document name that cannot safely be used as a file name prefix.

    This is a last line of defence; the master applies a stricter check to names
    that come from URLs.

    Raises:
        ValueError: *name* is empty, contains ``/`` or NUL, is ``.`` or ``..``, or starts
            with ``.``.
    """
    if not name:
        raise ValueError("document name is empty")
    if "/" in name or "\x00" in name:
        raise ValueError(f"document name {name!r} contains '/' or NUL")
    if name in (".", "..") or name.startswith("."):
        raise ValueError(f"document name {name!r} starts with '.'")
    return name


def _encode_record(update: bytes) -> bytes:
    if not update:
        raise ValueError("cannot journal an empty update")
    if len(update) > MAX_RECORD_SIZE:
        raise ValueError(f"update of {len(update)} bytes is too large for one record")
    return _HEADER.pack(len(update), zlib.crc32(update)) + update


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks: list[bytes] = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(size - offset, 1 << 20), offset)
        if not chunk:  # the file shrank under us; take what is there
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse_records(data: bytes) -> tuple[list[bytes], int, str | None]:
    """Split a journal image into records.

    Returns:
        The good records, the offset where they end, and why parsing stopped early
        (``None`` if the whole image was good).
    """
    records: list[bytes] = []
    offset = 0
    end = len(data)
    while offset < end:
        if end - offset < _HEADER.size:
            return records, offset, "torn record header"
        length, crc = _HEADER.unpack_from(data, offset)
        if length == 0:
            return records, offset, "record with length 0"
        body_start = offset + _HEADER.size
        if length > end - body_start:
            return records, offset, f"torn record (needs {length} bytes, {end - body_start} left)"
        body = data[body_start : body_start + length]
        if zlib.crc32(body) != crc:
            return records, offset, "record checksum mismatch"
        records.append(body)
        offset = body_start + length
    return records, offset, None


class Journal:
    """The snapshot and append-only log of one document.

    Use :meth:`open`; the constructor is internal. The journal holds an exclusive
    ``flock`` on the log file while open, so a second process (for example a new child
    started while the previous one is still compacting) cannot write to it at the same time.
    """

    def __init__(
        self,
        *,
        data_dir: Path,
        name: str,
        fd: int,
        recovered: tuple[bytes, ...],
        size: int,
        record_count: int,
    ) -> None:
        self._data_dir = data_dir
        self._name = name
        self._fd: int | None = fd
        self._recovered = recovered
        self._size = size
        self._record_count = record_count
        self._failed = False

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, data_dir: Path, name: str) -> Journal:
        """Open (creating if needed) the storage of document *name* in *data_dir*.

        Loads the snapshot, reads the log, and truncates a torn or corrupt tail.
        The recovered updates are available as :attr:`recovered`.

        Raises:
            ValueError: *name* is not a safe file name prefix.
            JournalBusyError: the document is already open elsewhere.
            OSError: the files cannot be read or created.
        """
        check_storage_name(name)
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            data_dir.mkdir(parents=True, exist_ok=True)
            _fsync_dir(data_dir.parent)
        journal_path = data_dir / (name + JOURNAL_SUFFIX)
        snapshot_path = data_dir / (name + SNAPSHOT_SUFFIX)
        tmp_path = data_dir / (name + SNAPSHOT_SUFFIX + TMP_SUFFIX)

        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        created = False
        try:
            fd = os.open(journal_path, flags | os.O_CREAT | os.O_EXCL, 0o644)
            created = True
        except FileExistsError:
            fd = os.open(journal_path, flags)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise JournalBusyError(f"document {name!r} is already open in {data_dir}") from None
            if created:
                _fsync_dir(data_dir)
            # A leftover from a compaction that crashed before its rename.
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()

            recovered: list[bytes] = []
            try:
                snapshot = snapshot_path.read_bytes()
            except FileNotFoundError:
                snapshot = b""
            if snapshot:
                recovered.append(snapshot)

            image = _read_all(fd)
            records, good_end, problem = _parse_records(image)
            if problem is not None:
                logger.warning(
                    "journal %s: %s at offset %d; dropping the last %d bytes",
                    journal_path,
                    problem,
                    good_end,
                    len(image) - good_end,
                )
                os.ftruncate(fd, good_end)
                os.fsync(fd)
            recovered.extend(records)
        except BaseException:
            os.close(fd)
            raise
        return cls(
            data_dir=data_dir,
            name=name,
            fd=fd,
            recovered=tuple(recovered),
            size=good_end,
            record_count=len(records),
        )

    # -- properties ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The document name."""
        return self._name

    @property
    def data_dir(self) -> Path:
        """The directory holding the files."""
        return self._data_dir

    @property
    def snapshot_path(self) -> Path:
        return self._data_dir / (self._name + SNAPSHOT_SUFFIX)

    @property
    def journal_path(self) -> Path:
        return self._data_dir / (self._name + JOURNAL_SUFFIX)

    @property
    def recovered(self) -> tuple[bytes, ...]:
        """The updates found when the journal was opened: the snapshot (if any) first,
        then every good log record, in order. Applying them all restores the document."""
        return self._recovered

    @property
    def size(self) -> int:
        """Bytes in the log (records appended since the last compaction, headers included)."""
        return self._size

    @property
    def record_count(self) -> int:
        """Records in the log."""
        return self._record_count

    @property
    def failed(self) -> bool:
        """Whether a write or fsync failed (see :class:`JournalFailedError`)."""
        return self._failed

    @property
    def closed(self) -> bool:
        return self._fd is None

    def _writable_fd(self) -> int:
        if self._fd is None:
            raise ValueError("journal is closed")
        if self._failed:
            raise JournalFailedError(f"journal {self.journal_path} failed earlier")
        return self._fd

    # -- writing ---------------------------------------------------------------------------

    def append(self, updates: Iterable[bytes]) -> None:
        """Append *updates* as records and fsync once (a group commit).

        When this returns, every update is on stable storage. Empty updates are skipped;
        an empty batch does nothing (no fsync).

        Raises:
            ValueError: an update is too large, or the journal is closed.
            JournalFailedError: an earlier append failed.
            OSError: the write or fsync failed. The journal tries to cut the log back to
                its previous end and then refuses further writes.
        """
        fd = self._writable_fd()
        records = [_encode_record(update) for update in updates if update]
        if not records:
            return
        data = b"".join(records)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            self._failed = True
            # Keep later readers from stumbling on half a batch; best effort.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._size)
            raise
        self._size += len(data)
        self._record_count += len(records)

    def compact(self, full_state: bytes) -> None:
        """Replace the snapshot with *full_state* and empty the log.

        *full_state* must contain every update in the log (the state of a document that
        has applied all of them), or those updates are lost.

        The snapshot is written to a temporary file, fsynced, renamed over the old one and
        the directory fsynced; only then is the log truncated (and fsynced).

        Raises:
            ValueError: *full_state* is empty, or the journal is closed.
            JournalFailedError: an earlier append failed.
            OSError: writing failed; the old snapshot and the log are left as they were
                (a failed truncation after the rename marks the journal failed).
        """
        fd = self._writable_fd()
        if not full_state:
            raise ValueError("refusing to write an empty snapshot")
        tmp_path = self._data_dir / (self._name + SNAPSHOT_SUFFIX + TMP_SUFFIX)
        tmp_fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            try:
                _write_all(tmp_fd, full_state)
                os.fsync(tmp_fd)
            finally:
                os.close(tmp_fd)
            os.replace(tmp_path, self.snapshot_path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp_path.unlink()
            raise
        _fsync_dir(self._data_dir)
        try:
            os.ftruncate(fd, 0)
            os.fsync(fd)
        except BaseException:
            # The snapshot already covers the log, so replaying it is harmless; but the
            # file's end is no longer known.
            self._failed = True
            raise
        self._size = 0
        self._record_count = 0

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release the lock and close the log file. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd is None else ("failed" if self._failed else "open")
        return f"<Journal {self._name!r} in {str(self._data_dir)!r} {state}>"
