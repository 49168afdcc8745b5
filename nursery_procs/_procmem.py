"""What a process of this host holds in memory, as ``/proc`` tells it."""

from __future__ import annotations

import mmap
from collections.abc import Iterable

import attrs
import trio

from ._ksm import merged_pages


@attrs.frozen
class Memory:
    """Bytes of memory of one process; ``None`` where ``/proc`` does not say (the
    process is gone, or the kernel does not report the figure)."""

    #: Resident: every page it maps that is in memory, shared ones in full.
    rss: int | None
    #: Its proportional share: each page counted as a fraction, divided among
    #: the processes that map it. For forked children, which share most of their
    #: resident pages with the fork server and each other, this is what they cost.
    pss: int | None
    #: What the kernel merged of it with identical pages of other processes
    #: (see :attr:`nursery_procs.Policy.merge_pages`).
    merged: int | None


def _kilobytes_field(pid: int, file: str, field: bytes) -> int | None:
    """A ``kB`` field of ``/proc/<pid>/<file>``, in bytes, if readable."""
    try:
        with open(f"/proc/{pid}/{file}", "rb") as lines:
            for line in lines:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_of(pid: int) -> Memory:
    """The memory of process *pid* of this host."""
    merged = merged_pages(pid)
    return Memory(
        rss=_kilobytes_field(pid, "status", b"VmRSS:"),
        pss=_kilobytes_field(pid, "smaps_rollup", b"Pss:"),
        merged=None if merged is None else merged * mmap.PAGESIZE,
    )


async def memory_of_each(pids: Iterable[int]) -> dict[int, Memory]:
    """The memory of each process of *pids*, read in a worker thread: the kernel
    walks a process's page tables for ``smaps_rollup`` (about 0.4 ms for a 30 MB
    process), too long to do for a hundred children on the event loop."""
    wanted = list(dict.fromkeys(pids))
    return await trio.to_thread.run_sync(lambda: {pid: memory_of(pid) for pid in wanted})
