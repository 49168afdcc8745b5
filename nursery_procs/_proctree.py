"""A process's descendants: finding them, freezing and killing a whole tree, and
ending every descendant of a child subreaper. Plain blocking code on ``/proc``
(Linux), usable from a dying child, a fork server or the master.

A child subreaper (``PR_SET_CHILD_SUBREAPER``) adopts the orphans of its
descendants, so a daemon that double-forked and called ``setsid`` is still found
below it by its parent links, and can be reaped by it.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import time
from collections.abc import Iterable
from typing import Final

_PR_SET_CHILD_SUBREAPER: Final = 36
#: How many rounds of "find the children of what is frozen" a tree kill makes
#: at most (each round freezes a generation; a tree deeper than this is absurd).
_MAX_ROUNDS: Final = 64


def become_subreaper() -> bool:
    """Make this process adopt its descendants' orphans; ``False`` if the kernel refused."""
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def _parents() -> dict[int, int]:
    """Every process's parent, pid -> ppid, as ``/proc`` shows it now."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parents[int(entry.name)] = int(fields[1])
    return parents


def _proc_is_ours() -> bool:
    """Whether ``/proc`` shows this process's PID namespace (not so in a new PID
    namespace until a ``/proc`` of its own is mounted: pids would mean others)."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


def descendants(root: int) -> list[int]:
    """The pids of *root*'s descendants, nearest first."""
    if not _proc_is_ours():
        return []
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    frontier = [root]
    while frontier:
        generation = [pid for parent in frontier for pid in children.get(parent, ())]
        found.extend(generation)
        frontier = generation
    return found


def direct_children(pid: int) -> list[int]:
    """*pid*'s children (its main thread's), cheaply, from ``/proc``."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listing:
            return [int(word) for word in listing.read().split()]
    except OSError:
        return []


def has_children() -> bool:
    """Whether this process has a child (made by any of its threads, or adopted)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return True
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children") as listing:
                if listing.read().strip():
                    return True
        except OSError:
            continue
    return False


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def kill_tree(root: int, *, root_pidfd: int | None = None, include_root: bool = True) -> list[int]:
    """SIGKILL *root* and all its descendants; returns the descendants' pids.

    Each process is stopped (SIGSTOP) before its children are looked for, so no
    process of the tree can fork, or reap a child and let its pid be reused,
    while the tree is walked. *root_pidfd* signals the root without any
    pid-reuse race (the caller's pidfd on it).
    """
    frozen: set[int] = {root}
    if include_root:
        _send_root(root, root_pidfd, signal.SIGSTOP)
    order: list[int] = []
    for _ in range(_MAX_ROUNDS if _proc_is_ours() else 0):
        parents = _parents()
        new = [pid for pid, ppid in parents.items() if ppid in frozen and pid not in frozen]
        if not new:
            break
        for pid in new:
            _signal(pid, signal.SIGSTOP)
        frozen.update(new)
        order.extend(new)
    for pid in order:
        _signal(pid, signal.SIGKILL)
    if include_root:
        _send_root(root, root_pidfd, signal.SIGKILL)
    return order


def _send_root(root: int, pidfd: int | None, signum: int) -> None:
    if pidfd is None:
        _signal(root, signum)
        return
    try:
        signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:
        pass


def kill_group(pgid: int) -> None:
    """SIGKILL every process of the group *pgid* (none left is fine)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(pids: Iterable[int], deadline: float) -> None:
    """Wait until every one of *pids* has exited, or *deadline*; reaps own children."""
    pidfds: list[int] = []
    for pid in pids:
        try:
            pidfds.append(os.pidfd_open(pid))
        except OSError:
            continue
    try:
        while pidfds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            ready, _, _ = select.select(pidfds, [], [], remaining)
            for fd in ready:
                pidfds.remove(fd)
                os.close(fd)
            reap_children()
    finally:
        for fd in pidfds:
            os.close(fd)


def reap_children(*, block: bool = False) -> None:
    """Reap this process's exited children (with *block*: until it has none)."""
    while True:
        try:
            pid, _status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            continue
        if pid == 0:
            return


def end_descendants(grace: float) -> None:
    """End every descendant of this process (a subreaper): SIGTERM, up to *grace*
    seconds to exit, then SIGKILL for the whole remaining tree; reap them all.

    Orphans of killed descendants are reparented to this process as they die,
    so the reaping goes on until this process has no child left.
    """
    if not has_children():
        # A subreaper with no child has no descendant: any orphan below it
        # would have been adopted by it. (Saves walking all of /proc.)
        return
    me = os.getpid()
    pids = descendants(me)
    if pids:
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        _wait_gone(pids, time.monotonic() + grace)
        kill_tree(me, include_root=False)
    reap_children(block=True)
