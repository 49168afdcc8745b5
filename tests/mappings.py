"""A process's memory mappings, as ``/proc/PID/smaps`` shows them."""

from __future__ import annotations

from pathlib import Path


def vm_flags(pid: int | None, name: str) -> set[str]:
    """The VmFlags of *pid*'s mapping called *name* (``[heap]``, ``[stack]``)."""
    found = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            found = fields[-1] == name
        elif found and fields[0] == "VmFlags:":
            return set(fields[1:])
    raise AssertionError(f"process {pid} has no mapping {name}")
