"""Waiting for a process to die, as the kernel sees it."""

from __future__ import annotations

import os
import select


def wait_until_dead_unreaped(pid: int) -> None:
    """Block (this thread, so no Trio task runs meanwhile) until the kernel says
    the child *pid* has exited, reaped or not (a pidfd: whoever its parent is,
    this process or a fork server)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:  # reaped already, by its fork server
        return
    try:
        select.select([pidfd], [], [])
    finally:
        os.close(pidfd)
