"""Waiting for processes that are not our children."""

from __future__ import annotations

import os

import trio


async def wait_process_gone(pid: int) -> None:
    """Wait, without polling, until process *pid* has exited.

    Works for any process, not only our children (a grandchild, an orphan),
    through a pidfd. Returns at once if there is no such process.

    **Cancellation:** safe; the pidfd is closed.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
