"""Running ``ksmd`` (Kernel Samepage Merging) for a measurement, and what it cost.

``ksmd`` is a system setting: these helpers start it only for the duration of a
measurement (as root), at a stated scan rate, and put the previous settings back.
Its CPU time is read from ``/proc`` so that a figure with merging says what the
merging cost.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from nursery_procs._ksm import KSM_SYSFS as SYSFS

#: The scan rate used for measurements: 1,000 pages every 20 ms (about 200 MB/s
#: at most; the kernel's default is 100 pages every 20 ms).
PAGES_TO_SCAN = 1000
SLEEP_MILLISECS = 20
_SETTINGS = ("run", "pages_to_scan", "sleep_millisecs")


def available() -> str | None:
    """Why ``ksmd`` cannot be run for a measurement, or ``None`` if it can."""
    if not (SYSFS / "run").exists():
        return "this kernel has no KSM"
    if not os.access(SYSFS / "run", os.W_OK):
        return "starting ksmd needs root"
    return None


def _read(name: str) -> int:
    return int((SYSFS / name).read_text())


def _write(name: str, value: int) -> None:
    (SYSFS / name).write_text(f"{value}\n")


@contextmanager
def running(
    pages_to_scan: int = PAGES_TO_SCAN, sleep_millisecs: int = SLEEP_MILLISECS
) -> Iterator[None]:
    """Run ``ksmd`` at this rate within the block; restore the settings after."""
    saved = {name: _read(name) for name in _SETTINGS}
    try:
        _write("pages_to_scan", pages_to_scan)
        _write("sleep_millisecs", sleep_millisecs)
        _write("run", 1)
        yield
    finally:
        for name in reversed(_SETTINGS):
            _write(name, saved[name])


def full_scans() -> int:
    return _read("full_scans")


def _ksmd_pid() -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "ksmd":
                    return int(entry.name)
            except OSError:
                continue
    return None


def cpu_seconds() -> float:
    """CPU time ``ksmd`` has used since boot (0 if it cannot be found)."""
    pid = _ksmd_pid()
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat; fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def settle(scans: int = 3, limit: float = 600.0) -> float:
    """Wait until ``ksmd`` has made *scans* more full scans (what it could merge
    is merged: a page is merged once it has not changed over two scans); return
    the seconds waited."""
    start = trio.current_time()
    target = full_scans() + scans
    with trio.fail_after(limit):
        # A kernel counter, which no event announces: polled.
        while full_scans() < target:  # noqa: ASYNC110
            await trio.sleep(0.1)
    return trio.current_time() - start


async def cpu_share(seconds: float) -> float:
    """The share of one CPU ``ksmd`` used over the next *seconds* (0.0 to 1.0)."""
    before = cpu_seconds()
    await trio.sleep(seconds)
    return (cpu_seconds() - before) / seconds
