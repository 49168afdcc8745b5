"""Finding what a piece of code left behind: processes, zombies, fds, threads."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import attrs

#: Set in the environment of the test process; every descendant inherits it, so
#: a process that carries it and outlives a test is a leak (even an orphan).
MARKER_ENV = "NURSERY_PROCS_LEAK_MARKER"


def _descendant_pids(marker: str) -> dict[int, str]:
    """Live processes (not us) whose environment carries *marker*, with their command."""
    found: dict[int, str] = {}
    needle = f"{MARKER_ENV}={marker}".encode()
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes()
            if needle not in environ.split(b"\0"):
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state = stat.rsplit(")", 1)[1].split()[0]
        found[int(entry.name)] = f"[{state}] {cmdline.strip()}"
    return found


def _zombie_children() -> dict[int, str]:
    me = os.getpid()
    zombies: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z" and int(fields[1]) == me:
            zombies[int(entry.name)] = stat.split("(", 1)[1].rsplit(")", 1)[0]
    return zombies


def _open_fds() -> dict[int, str]:
    fds: dict[int, str] = {}
    for entry in Path("/proc/self/fd").iterdir():
        try:
            fds[int(entry.name)] = os.readlink(entry)
        except OSError:
            continue
    return fds


def _threads() -> dict[int, str]:
    return {
        thread.ident or 0: thread.name
        for thread in threading.enumerate()
        # Trio keeps idle worker threads for a few seconds as a cache; they are
        # not owned by the code under test.
        if not thread.name.startswith("Trio thread")
    }


@attrs.frozen
class LeakReport:
    """What is left over since a :class:`Snapshot`."""

    processes: dict[int, str]
    zombies: dict[int, str]
    fds: dict[int, str]
    threads: dict[int, str]

    def __bool__(self) -> bool:
        return bool(self.processes or self.zombies or self.fds or self.threads)

    def describe(self) -> str:
        lines = []
        for title, items in (
            ("processes still running", self.processes),
            ("zombies not reaped", self.zombies),
            ("file descriptors left open", self.fds),
            ("threads left running", self.threads),
        ):
            if items:
                lines.append(f"{title}:")
                lines.extend(f"  {key}: {value}" for key, value in sorted(items.items()))
        return "\n".join(lines)


@attrs.frozen
class Snapshot:
    """The fds and threads of this process, to compare against later."""

    marker: str
    fds: dict[int, str]
    threads: dict[int, str]

    @classmethod
    def take(cls, marker: str) -> Snapshot:
        return cls(marker, _open_fds(), _threads())

    def leaks(self) -> LeakReport:
        fds = {fd: target for fd, target in _open_fds().items() if fd not in self.fds}
        threads = {ident: name for ident, name in _threads().items() if ident not in self.threads}
        return LeakReport(_descendant_pids(self.marker), _zombie_children(), fds, threads)
