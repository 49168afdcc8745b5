"""Durable storage for one collaborative document, and what is done with damage.

The files of document ``<name>`` in the data directory (formats in
:mod:`examples.collab.storage_format`)::

    <name>.journal         updates since the snapshot, one fsync per batch (group commit)
    <name>.snapshot        the whole document as one update, with a checksum
    <name>.journal.prev    the previous generation: the updates between the previous
    <name>.snapshot.prev   snapshot and the current one, and that previous snapshot
    <name>.lock            held (flock) by the one process that has the document open
    quarantine/<name>/     copies of damaged and old-format files, never deleted

**Generations.** :meth:`Journal.compact` writes a new snapshot (temporary file,
fsync, rename, fsync of the folder) and starts an empty journal; the snapshot and
journal it replaces become ``.snapshot.prev`` and ``.journal.prev``. Those two
together hold everything the new snapshot holds, so if the snapshot is ever damaged or
missing the document opens from the previous generation plus the current journal and
loses nothing. (Keeping only one snapshot would make every bad snapshot lose the whole
document up to the last compaction; the cost of the second generation is one more
snapshot and at most one compaction's worth of journal on disk.)

**Opening.** :meth:`Journal.open` reads the journal and the snapshot (and the previous
generation when the snapshot is missing or damaged) and keeps every valid update
(:attr:`Journal.recovered`). What it finds damaged it logs at ERROR, with the
document's name, and counts (:attr:`Journal.statistics`). Before it changes any file
it copies the original, byte for byte, into ``quarantine/<name>/``. Then it leaves the
files clean: a damaged journal is rewritten holding its valid records, a damaged
snapshot is taken away (its copy is in quarantine), old-format files are converted.
Every rewrite is atomic (temporary file, fsync, rename, fsync of the folder).

If nothing valid is left although something was damaged, or a file cannot be read at
all, the document cannot be opened: :class:`JournalUnavailableError`, and nothing but
quarantine copies is written, so an operator finds the files as they were.

All methods are blocking; call them from a worker thread (``trio.to_thread.run_sync``)
when running inside an event loop. A journal is not thread-safe: make one call at a time.

Run ``python -m examples.collab.journal --help`` for the operator's commands
(``inspect`` a file, ``restore`` a quarantined one).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType

import attrs

from .storage_format import (
    JOURNAL_HEADER,
    MAX_RECORD_SIZE,
    SNAPSHOT_MAGIC,
    JournalImage,
    encode_journal,
    encode_record,
    encode_snapshot,
    parse_journal,
    parse_snapshot,
    snapshot_payload,
)

__all__ = [
    "MAX_RECORD_SIZE",
    "Journal",
    "JournalBusyError",
    "JournalError",
    "JournalFailedError",
    "JournalUnavailableError",
    "StorageStatistics",
    "check_storage_name",
    "main",
]

logger = logging.getLogger(__name__)

SNAPSHOT = "snapshot"
JOURNAL = "journal"
SNAPSHOT_PREV = "snapshot.prev"
JOURNAL_PREV = "journal.prev"
_KINDS = (SNAPSHOT, JOURNAL, SNAPSHOT_PREV, JOURNAL_PREV)
TMP_SUFFIX = ".tmp"
LOCK_SUFFIX = ".lock"
QUARANTINE_DIR = "quarantine"
_PARTIAL = ".partial"

#: Why a file was put in quarantine (the last part of its name there).
REASON_DAMAGED = "damaged"
REASON_TORN = "torn-tail"
REASON_OLD_FORMAT = "old-format"
REASON_REJECTED = "rejected"


class JournalError(Exception):
    """Base class of the journal's own errors."""


class JournalBusyError(JournalError):
    """Another open :class:`Journal` (in this or another process) holds the document."""


class JournalFailedError(JournalError):
    """An earlier write or fsync failed; the journal refuses further writes.

    After a failed ``fsync`` the kernel may have dropped the dirty pages, so what is on
    disk is unknown. Close the journal and open it again to recover from the files.
    """


class JournalUnavailableError(JournalError):
    """The document cannot be opened: its files cannot be read, or something is damaged
    and nothing valid is left. Nothing was changed but quarantine copies.

    Attributes:
        statistics: what was found (:class:`StorageStatistics`).
    """

    def __init__(self, message: str, statistics: StorageStatistics) -> None:
        super().__init__(message)
        self.statistics = statistics


@attrs.frozen
class StorageStatistics:
    """What opening (and running) one document's storage found and did.

    Attributes:
        damaged_stretches: stretches of a journal skipped as damaged (one or more
            records each), torn tails included.
        torn_tails: of those, the ones that look like a write cut short by a crash.
        bytes_skipped: bytes in those stretches.
        snapshots_rejected: snapshot files that were damaged (bad checksum, size or
            magic).
        updates_rejected: updates that passed their checksum but that the document
            could not apply (:meth:`Journal.reject`).
        files_quarantined: copies written into the quarantine folder.
        old_format_files: old-format files converted.
        previous_generation_used: 1 if the document was opened from the previous
            generation (the snapshot was missing or damaged), else 0.
    """

    damaged_stretches: int = 0
    torn_tails: int = 0
    bytes_skipped: int = 0
    snapshots_rejected: int = 0
    updates_rejected: int = 0
    files_quarantined: int = 0
    old_format_files: int = 0
    previous_generation_used: int = 0


@attrs.define
class _Counts:
    damaged_stretches: int = 0
    torn_tails: int = 0
    bytes_skipped: int = 0
    snapshots_rejected: int = 0
    updates_rejected: int = 0
    files_quarantined: int = 0
    old_format_files: int = 0
    previous_generation_used: int = 0

    def freeze(self) -> StorageStatistics:
        return StorageStatistics(**attrs.asdict(self))


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


# -- file helpers ---------------------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_file(path: Path) -> bytes | None:
    """The whole file, or ``None`` if it does not exist."""
    try:
        with path.open("rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dir(path: Path) -> None:
    """Create *path* (and its parents) durably, if it does not exist."""
    if path.is_dir():
        return
    _make_dir(path.parent)
    with contextlib.suppress(FileExistsError):
        path.mkdir()
    _fsync_dir(path.parent)


def _write_new(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write *data* to *path* and fsync it (not the folder)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_durably(path: Path, data: bytes) -> None:
    """Make *path* hold *data*, atomically: temporary file, fsync, rename, fsync folder."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        _write_new(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _create_journal(path: Path) -> int:
    """Create an empty journal (its header only), durably; return it open for appending."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, JOURNAL_HEADER)
        os.fsync(fd)
        _fsync_dir(path.parent)
    except BaseException:
        os.close(fd)
        raise
    return fd


@attrs.frozen
class _Paths:
    data_dir: Path
    name: str

    def file(self, kind: str) -> Path:
        return self.data_dir / f"{self.name}.{kind}"

    def tmp(self, kind: str) -> Path:
        return self.data_dir / f"{self.name}.{kind}{TMP_SUFFIX}"

    @property
    def lock(self) -> Path:
        return self.data_dir / (self.name + LOCK_SUFFIX)

    @property
    def quarantine(self) -> Path:
        return self.data_dir / QUARANTINE_DIR / self.name


def _same_content_kept(folder: Path, image: bytes) -> Path | None:
    """A file in *folder* with exactly *image* as its content, if there is one."""
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return None
    for entry in entries:
        if entry.name.startswith("."):
            continue  # a copy that never finished
        with contextlib.suppress(OSError):
            if entry.stat().st_size == len(image) and entry.read_bytes() == image:
                return entry
    return None


def _quarantine(paths: _Paths, kind: str, image: bytes, reason: str, counts: _Counts) -> Path:
    """Keep *image* (the bytes of file *kind*) in the document's quarantine folder,
    durably, unless an identical copy is already there. Returns the copy's path."""
    folder = paths.quarantine
    kept = _same_content_kept(folder, image)
    if kept is not None:
        return kept
    _make_dir(folder)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    for attempt in range(100):
        suffix = f"-{attempt}" if attempt else ""
        target = folder / f"{kind}.{stamp}{suffix}.{reason}"
        partial = folder / f".{target.name}{_PARTIAL}"
        if target.exists():
            continue
        try:
            _write_new(partial, image, exclusive=True)
        except FileExistsError:
            continue
        os.replace(partial, target)
        _fsync_dir(folder)
        counts.files_quarantined += 1
        return target
    raise FileExistsError(f"no free quarantine name for {kind} in {folder}")


# -- reading what is on disk --------------------------------------------------------------------


@attrs.define
class _Finding:
    """A file that must be put in quarantine (if *reason*) and then cleaned up."""

    kind: str
    image: bytes
    reason: str | None
    #: What the file becomes (``None``: it is removed).
    replacement: bytes | None


class _Recovery:
    """Reads one document's files and decides what to keep and what to repair."""

    def __init__(
        self, paths: _Paths, check_old: Callable[[bytes], object] | None, counts: _Counts
    ) -> None:
        self.paths = paths
        self.check_old = check_old
        self.counts = counts
        self.updates: list[bytes] = []
        self.sources: list[str] = []
        self.findings: list[_Finding] = []
        self.corrupt = False
        self.damaged = False
        self.current_records = 0

    @property
    def unopenable(self) -> bool:
        return self.corrupt and not self.updates

    def load(self) -> None:
        journal = self._read_journal(JOURNAL)
        # An old-format (bare) snapshot can only sit beside an old-format journal.
        old_format = journal is None or journal.version != 2
        snapshot = self._read_snapshot(SNAPSHOT, old_format=old_format)
        if snapshot is None:
            self._load_previous()
        else:
            self._add(SNAPSHOT, [snapshot])
        if journal is not None:
            self._add(JOURNAL, journal.records)
            self.current_records = len(journal.records)

    def _add(self, kind: str, updates: Iterable[bytes]) -> None:
        for update in updates:
            self.updates.append(update)
            self.sources.append(kind)

    def _load_previous(self) -> None:
        snapshot = self._read_snapshot(SNAPSHOT_PREV, old_format=False)
        journal = self._read_journal(JOURNAL_PREV)
        if snapshot is None and journal is None:
            return
        self.counts.previous_generation_used = 1
        logger.warning(
            "document %r: no valid snapshot; opening from the previous generation "
            "(%s) and the journal",
            self.paths.name,
            ", ".join(
                kind
                for kind, found in ((SNAPSHOT_PREV, snapshot), (JOURNAL_PREV, journal))
                if found is not None
            ),
        )
        if snapshot is not None:
            self._add(SNAPSHOT_PREV, [snapshot])
        if journal is not None:
            self._add(JOURNAL_PREV, journal.records)

    def _read_journal(self, kind: str) -> JournalImage | None:
        image = _read_file(self.paths.file(kind))
        if image is None:
            return None
        parsed = parse_journal(image)
        self._note_journal_damage(kind, parsed)
        reason: str | None = None
        if parsed.damage:
            reason = REASON_DAMAGED if parsed.corrupt else REASON_TORN
        elif parsed.version == 1:
            reason = REASON_OLD_FORMAT
        if parsed.version == 1:
            self.counts.old_format_files += 1
            logger.warning(
                "document %r: %s is in the old format (%d records); converting it, the "
                "original is kept in %s",
                self.paths.name,
                self.paths.file(kind).name,
                len(parsed.records),
                self.paths.quarantine,
            )
        if reason is not None or parsed.version != 2:
            replacement = encode_journal(parsed.records)
            self.findings.append(_Finding(kind, image, reason, replacement))
        return parsed

    def _note_journal_damage(self, kind: str, parsed: JournalImage) -> None:
        for part in parsed.damage:
            self.damaged = True
            self.counts.damaged_stretches += 1
            self.counts.bytes_skipped += part.length
            if part.torn:
                self.counts.torn_tails += 1
            else:
                self.corrupt = True
            logger.error(
                "document %r: %s: %d damaged bytes at offset %d skipped (%s); "
                "%d valid records kept, a copy of the file is kept in %s",
                self.paths.name,
                self.paths.file(kind).name,
                part.length,
                part.offset,
                "a write cut short, as by a crash" if part.torn else "corrupt",
                len(parsed.records),
                self.paths.quarantine,
            )

    def _read_snapshot(self, kind: str, *, old_format: bool) -> bytes | None:
        image = _read_file(self.paths.file(kind))
        if image is None:
            return None
        parsed = parse_snapshot(image, old_format=old_format, check_old=self.check_old)
        if parsed.state is None:
            self.damaged = self.corrupt = True
            self.counts.snapshots_rejected += 1
            logger.error(
                "document %r: %s is damaged (%s); a copy is kept in %s",
                self.paths.name,
                self.paths.file(kind).name,
                parsed.problem,
                self.paths.quarantine,
            )
            self.findings.append(_Finding(kind, image, REASON_DAMAGED, None))
            return None
        if parsed.version == 1:
            self.counts.old_format_files += 1
            logger.warning(
                "document %r: %s is in the old format; converting it, the original is kept in %s",
                self.paths.name,
                self.paths.file(kind).name,
                self.paths.quarantine,
            )
            replacement = encode_snapshot(parsed.state)
            self.findings.append(_Finding(kind, image, REASON_OLD_FORMAT, replacement))
        return parsed.state

    # -- acting on it ---------------------------------------------------------------------------

    def keep_copies(self) -> None:
        """Copy every damaged or old-format file into quarantine; change nothing else."""
        for finding in self.findings:
            if finding.reason is not None:
                _quarantine(self.paths, finding.kind, finding.image, finding.reason, self.counts)

    def repair(self) -> None:
        """Quarantine, then leave clean files. Snapshots go first: an old-format journal
        beside a format-2 snapshot is readable, the other way round it is not."""
        self.findings.sort(key=lambda finding: "journal" in finding.kind)
        for finding in self.findings:
            if finding.reason is not None:
                _quarantine(self.paths, finding.kind, finding.image, finding.reason, self.counts)
            path = self.paths.file(finding.kind)
            if finding.replacement is None:
                path.unlink()
                _fsync_dir(path.parent)
            else:
                _replace_durably(path, finding.replacement)


# -- the journal --------------------------------------------------------------------------------


class Journal:
    """The snapshot and append-only log of one document.

    Use :meth:`open`; the constructor is internal. The journal holds an exclusive
    ``flock`` on ``<name>.lock`` while open, so a second process (for example a new child
    started while the previous one is still compacting) cannot write to it at the same time.
    """

    def __init__(
        self,
        *,
        paths: _Paths,
        lock_fd: int,
        fd: int,
        recovery: _Recovery,
        size: int,
    ) -> None:
        self._paths = paths
        self._lock_fd: int | None = lock_fd
        self._fd: int | None = fd
        self._recovered = tuple(recovery.updates)
        self._sources = tuple(recovery.sources)
        self._counts = recovery.counts
        self._damaged = recovery.damaged
        self._needs_compaction = bool(
            any(finding.reason for finding in recovery.findings)
            or recovery.counts.previous_generation_used
        )
        self._size = size
        self._record_count = recovery.current_records
        self._failed = False

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        data_dir: Path | str,
        name: str,
        *,
        check_old: Callable[[bytes], object] | None = None,
    ) -> Journal:
        """Open (creating if needed) the storage of document *name* in *data_dir*.

        Recovers every valid update (:attr:`recovered`), quarantines and repairs what is
        damaged (see the module's description).

        Args:
            check_old: called with an old-format snapshot, which has no checksum; if it
                raises, the snapshot is treated as damaged.

        Raises:
            ValueError: *name* is not a safe file name prefix.
            JournalBusyError: the document is already open elsewhere.
            JournalUnavailableError: the files cannot be read or created, or something
                is damaged and nothing valid is left.
        """
        check_storage_name(name)
        paths = _Paths(Path(data_dir), name)
        counts = _Counts()
        try:
            _make_dir(paths.data_dir)
            lock_fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _unavailable(paths, exc, counts) from exc
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise JournalBusyError(
                    f"document {name!r} is already open in {paths.data_dir}"
                ) from None
            try:
                return cls._recover(paths, lock_fd, check_old, counts)
            except OSError as exc:
                raise _unavailable(paths, exc, counts) from exc
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _recover(
        cls,
        paths: _Paths,
        lock_fd: int,
        check_old: Callable[[bytes], object] | None,
        counts: _Counts,
    ) -> Journal:
        for kind in _KINDS:
            # Leftovers of a write that crashed before its rename.
            with contextlib.suppress(FileNotFoundError):
                paths.tmp(kind).unlink()
        recovery = _Recovery(paths, check_old, counts)
        recovery.load()
        if recovery.unopenable:
            recovery.keep_copies()
            message = (
                f"document {paths.name!r} cannot be opened: its storage in {paths.data_dir} "
                f"is damaged and holds nothing valid (copies kept in {paths.quarantine})"
            )
            logger.error("%s", message)
            raise JournalUnavailableError(message, counts.freeze())
        recovery.repair()
        try:
            fd = os.open(paths.file(JOURNAL), os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = _create_journal(paths.file(JOURNAL))
        try:
            size = os.fstat(fd).st_size - len(JOURNAL_HEADER)
        except BaseException:
            os.close(fd)
            raise
        return cls(paths=paths, lock_fd=lock_fd, fd=fd, recovery=recovery, size=size)

    # -- properties ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The document name."""
        return self._paths.name

    @property
    def data_dir(self) -> Path:
        """The directory holding the files."""
        return self._paths.data_dir

    @property
    def snapshot_path(self) -> Path:
        return self._paths.file(SNAPSHOT)

    @property
    def journal_path(self) -> Path:
        return self._paths.file(JOURNAL)

    @property
    def quarantine_dir(self) -> Path:
        """Where this document's damaged and old-format files are kept."""
        return self._paths.quarantine

    @property
    def recovered(self) -> tuple[bytes, ...]:
        """The updates found when the journal was opened: snapshots first, then journal
        records, in order. Applying them all restores the document."""
        return self._recovered

    @property
    def damaged(self) -> bool:
        """Whether anything was found damaged when opening (some update may be missing,
        so later ones may wait in the document for it as Yjs *pending* updates)."""
        return self._damaged

    @property
    def needs_compaction(self) -> bool:
        """Whether the storage was repaired or read from the previous generation when
        opening, so a fresh snapshot should be written (:meth:`compact`) soon."""
        return self._needs_compaction

    @property
    def statistics(self) -> StorageStatistics:
        """What was found damaged, skipped and quarantined."""
        return self._counts.freeze()

    @property
    def size(self) -> int:
        """Bytes of records in the log (appended since the last compaction)."""
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
        records = [encode_record(update) for update in updates if update]
        if not records:
            return
        data = b"".join(records)
        try:
            _write_all(fd, data)
            # fdatasync: the records and the file's new size, without the times an
            # fsync would also write (the journal was made durable by name when created).
            os.fdatasync(fd)
        except BaseException:
            self._failed = True
            # Keep later readers from stumbling on half a batch; best effort.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, len(JOURNAL_HEADER) + self._size)
            raise
        self._size += len(data)
        self._record_count += len(records)

    def compact(self, full_state: bytes) -> None:
        """Write *full_state* as the new snapshot and start an empty log; the snapshot and
        log it replaces become the previous generation.

        *full_state* must contain every update in the log (the state of a document that
        has applied all of them), or those updates are only in the previous generation.

        The snapshot is written to a temporary file and fsynced; the old snapshot is
        renamed to ``.snapshot.prev`` and the new one into place, and the folder fsynced;
        only then is the log renamed to ``.journal.prev`` and a new one created. A crash
        at any point leaves files from which opening restores everything.

        Raises:
            ValueError: *full_state* is empty, or the journal is closed.
            JournalFailedError: an earlier append failed.
            OSError: writing failed. If the log could not be replaced, the journal is
                marked failed (reopen it); the files still hold everything.
        """
        fd = self._writable_fd()
        data = encode_snapshot(full_state)
        self._install_snapshot(data)
        paths = self._paths
        try:
            os.replace(paths.file(JOURNAL), paths.file(JOURNAL_PREV))
            new_fd = _create_journal(paths.file(JOURNAL))
        except BaseException:
            # The snapshot covers the log, so nothing is lost; but which file the
            # descriptor writes to is no longer the journal.
            self._failed = True
            raise
        os.close(fd)
        self._fd = new_fd
        self._size = 0
        self._record_count = 0
        self._needs_compaction = False

    def _install_snapshot(self, data: bytes) -> None:
        paths = self._paths
        tmp = paths.tmp(SNAPSHOT)
        try:
            _write_new(tmp, data)
            if paths.file(SNAPSHOT).exists():
                os.replace(paths.file(SNAPSHOT), paths.file(SNAPSHOT_PREV))
            elif paths.file(SNAPSHOT_PREV).exists():
                # The previous generation is older than what this document holds (its
                # snapshot was damaged or lost): make it a second copy of the new one.
                _replace_durably(paths.file(SNAPSHOT_PREV), data)
            os.replace(tmp, paths.file(SNAPSHOT))
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(paths.data_dir)

    def reject(self, index: int, reason: str) -> None:
        """Note that update *index* of :attr:`recovered` could not be applied although
        it passed its checksum: log it at ERROR, count it, and keep a copy of the file
        it came from in quarantine.

        Raises:
            IndexError: no such update.
            OSError: the quarantine copy could not be written.
        """
        kind = self._sources[index]
        self._counts.updates_rejected += 1
        self._needs_compaction = True
        logger.error(
            "document %r: stored update #%d (from %s) cannot be applied: %s; "
            "a copy of the file is kept in %s",
            self.name,
            index,
            self._paths.file(kind).name,
            reason,
            self._paths.quarantine,
        )
        image = _read_file(self._paths.file(kind))
        if image is not None:
            _quarantine(self._paths, kind, image, REASON_REJECTED, self._counts)

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release the lock and close the files. Idempotent."""
        fd, self._fd = self._fd, None
        lock_fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)
        if lock_fd is not None:
            os.close(lock_fd)

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
        return f"<Journal {self.name!r} in {str(self.data_dir)!r} {state}>"


def _unavailable(paths: _Paths, exc: OSError, counts: _Counts) -> JournalUnavailableError:
    message = f"document {paths.name!r} cannot be opened: {exc}"
    logger.error("%s", message)
    return JournalUnavailableError(message, counts.freeze())


# -- the operator's commands --------------------------------------------------------------------


def _check_update(update: bytes) -> None:
    """Raise if pycrdt cannot apply *update* to an empty document."""
    from pycrdt import Doc

    Doc().apply_update(update)


def _describe(path: Path, image: bytes) -> tuple[str, list[bytes], list[str]]:
    """What a file is, its valid updates, and its problems."""
    if image.startswith(SNAPSHOT_MAGIC):
        snapshot = parse_snapshot(image, old_format=False)
        problems = [] if snapshot.problem is None else [snapshot.problem]
        return "snapshot (format 2)", [snapshot.state] if snapshot.state else [], problems
    parsed = parse_journal(image)
    if parsed.version == 2 or parsed.records:
        problems = [
            f"{part.length} bytes at offset {part.offset} skipped"
            f" ({'torn tail' if part.torn else 'corrupt'})"
            for part in parsed.damage
        ]
        return f"journal (format {parsed.version})", list(parsed.records), problems
    snapshot = parse_snapshot(image, old_format=True, check_old=_check_update)
    problems = [] if snapshot.problem is None else [snapshot.problem]
    if snapshot.state is None:
        return "unreadable (not a journal; a damaged snapshot?)", [], problems
    return "snapshot (old format)", [snapshot.state], problems


def _inspect(files: Sequence[Path], out: Callable[[str], None]) -> int:
    status = 0
    for path in files:
        image = path.read_bytes()
        what, updates, problems = _describe(path, image)
        out(f"{path}: {what}, {len(image)} bytes")
        out(f"  valid updates: {len(updates)} ({sum(len(u) for u in updates)} bytes)")
        for problem in problems:
            out(f"  damaged: {problem}")
        if problems:
            status = 1
    return status


def _updates_to_restore(
    path: Path, accept_damaged: bool, out: Callable[[str], None]
) -> list[bytes] | None:
    """The updates of one file to put back, or ``None`` to refuse."""
    image = path.read_bytes()
    what, found, problems = _describe(path, image)
    damaged_snapshot = not what.startswith("journal") and not found
    if damaged_snapshot:
        if not accept_damaged:
            out(f"{path}: {what}: {'; '.join(problems) or 'nothing valid'}")
            out("  not restored; --accept-damaged puts a damaged snapshot back as it is")
            return None
        found = [snapshot_payload(image)]
    updates: list[bytes] = []
    for update in found:
        try:
            _check_update(update)
        except Exception as exc:
            out(f"{path}: an update of {len(update)} bytes cannot be applied ({exc}); skipped")
            continue
        updates.append(update)
    out(f"{path}: {what}: {len(updates)} updates to restore")
    return updates


def _restore(
    data_dir: Path,
    name: str,
    files: Sequence[Path],
    accept_damaged: bool,
    out: Callable[[str], None],
) -> int:
    updates: list[bytes] = []
    for path in files:
        found = _updates_to_restore(path, accept_damaged, out)
        if found is None:
            return 1
        updates.extend(found)
    with Journal.open(data_dir, name, check_old=_check_update) as journal:
        journal.append(updates)
    out(
        f"appended {len(updates)} updates to the journal of {name!r}; "
        "they are merged into the document when it is next opened"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m examples.collab.journal inspect FILE...`` or ``restore``; see ``--help``."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.collab.journal",
        description="Inspect a document's files, or put a quarantined file back.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect", help="say what a journal or snapshot file holds and what in it is damaged"
    )
    inspect.add_argument("files", nargs="+", type=Path)
    restore = commands.add_parser(
        "restore",
        help="append the valid updates of FILE(s) to a document's journal (merged on next open)",
    )
    restore.add_argument("--data-dir", type=Path, required=True)
    restore.add_argument("name", help="the document name")
    restore.add_argument("files", nargs="+", type=Path)
    restore.add_argument(
        "--accept-damaged",
        action="store_true",
        help="put back a snapshot whose checksum fails, as it is",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            return _inspect(args.files, print)
        return _restore(args.data_dir, args.name, args.files, args.accept_damaged, print)
    except (OSError, JournalError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
