"""Merging identical memory pages (Linux's Kernel Samepage Merging, KSM).

A forked child shares its fork server's pages until one of them writes to a page;
then the writer gets a private copy. In CPython 3.11 even reading an object
writes to it (its reference count), so a child soon holds private copies of
pages whose contents are the same as the fork server's, or as every other
child's: about half of an idle child's private pages were such copies when
measured (see :doc:`start_methods`).

The kernel's ``ksmd`` can find such pages and map one read-only copy into every
process, but only in memory that a process marked with ``MADV_MERGEABLE``. The
fork server marks its private writable mappings, after it has imported and
frozen everything and before it forks: the marks are inherited by every child.
Memory a child maps later (new heap arenas, a document's data) is not marked,
so pages that hold only a child's own data are never merged.

Whether ``ksmd`` runs, and how fast it scans, is the system's setting
(``/sys/kernel/mm/ksm/run``, ``pages_to_scan``, ``sleep_millisecs``), made by
root; nothing here changes it.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Final

#: ``madvise`` advice: let ``ksmd`` merge this range's identical pages.
MADV_MERGEABLE: Final = 12
#: Where the kernel shows and takes the settings of ``ksmd``.
KSM_SYSFS: Final = Path("/sys/kernel/mm/ksm")

#: Mappings never marked: the kernel's own, and ones ``madvise`` refuses.
_SPECIAL: Final = frozenset({"[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]"})


def mergeable_ranges(maps: str) -> list[tuple[int, int]]:
    """The ranges of a ``/proc/PID/maps`` text worth marking: private and
    writable (the heap, ``pymalloc``'s arenas, the stack, writable data of
    libraries), where a fork's copied pages can be."""
    ranges = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5 or fields[1][:2] != "rw" or fields[1][3] != "p":
            continue
        if len(fields) == 6 and fields[5].strip() in _SPECIAL:
            continue
        start, end = (int(part, 16) for part in fields[0].split("-"))
        ranges.append((start, end))
    return ranges


def mark_mergeable() -> int:
    """Mark this process's private writable mappings mergeable; return how many
    bytes were marked.

    Raises:
        OSError: the kernel refused every range (it was built without KSM:
            ``EINVAL``), so nothing will be merged.
    """
    libc = ctypes.CDLL(None, use_errno=True)  # this process, and the libc it uses
    madvise = libc.madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    marked = 0
    error = 0
    for start, end in mergeable_ranges(Path("/proc/self/maps").read_text()):
        if madvise(start, end - start, MADV_MERGEABLE) == 0:
            marked += end - start
        else:
            error = ctypes.get_errno()
    if not marked and error:
        raise OSError(error, f"madvise(MADV_MERGEABLE): {os.strerror(error)}")
    return marked


def ksm_running() -> bool | None:
    """Whether ``ksmd`` merges pages now (``/sys/kernel/mm/ksm/run`` is 1);
    ``None`` if this kernel has no KSM."""
    try:
        return (KSM_SYSFS / "run").read_text().strip() == "1"
    except OSError:
        return None


def merged_pages(pid: int) -> int | None:
    """How many of a process's pages ``ksmd`` has merged (``ksm_merging_pages``
    of ``/proc/PID/ksm_stat``); ``None`` where the kernel does not say."""
    try:
        text = Path(f"/proc/{pid}/ksm_stat").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "ksm_merging_pages":
            return int(value)
    return None
