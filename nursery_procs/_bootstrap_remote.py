"""Where a shipped runtime starts, once its import hook is installed.

The first stage (:data:`nursery_procs._importer.STAGE1`) and the second
(:func:`nursery_procs._importer.stage2`) have loaded the runtime bundle; this
module then runs the normal child runtime:

* over standard input and output, for a context started through ``ssh``: its
  link is the ssh session, its prints go to standard error (which ssh carries
  to the parent's logs), and the orphan watchdog watches standard input, so
  that the process (and everything it started) ends within
  :data:`~nursery_procs._runtime.ORPHAN_GRACE` of its parent's connection
  going away, even if its event loop is stuck;
* as ``python -m nursery_procs._child ARGS``, for a context that a shipped
  context starts on its own host (the bundle came in an inherited memory file).
"""

from __future__ import annotations

import os
import runpy
import select
import sys
from functools import partial
from typing import NoReturn

import trio

from . import _runtime

_HANGUP = select.POLLHUP | select.POLLRDHUP | select.POLLERR | select.POLLNVAL


def main(over_stdio: bool, argv: list[str]) -> NoReturn:
    """Run the runtime; never returns."""
    if over_stdio:
        _main_over_stdio()
    sys.argv = [sys.argv[0], *argv]
    runpy.run_module("nursery_procs._child", run_name="__main__", alter_sys=True)
    os._exit(0)  # pragma: no cover - the child's main never returns


def _main_over_stdio() -> NoReturn:
    def main() -> int:
        link_in, link_out = os.dup(0), os.dup(1)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        # Output goes where standard error goes: through ssh to the parent's logs.
        os.dup2(2, 1)
        _runtime.start_watchdog(partial(_wait_hangup, os.dup(link_in)))
        return trio.run(_serve_over_pipes, link_in, link_out)

    _runtime.run_process(main)


async def _serve_over_pipes(link_in: int, link_out: int) -> int:
    stream = trio.StapledStream(trio.lowlevel.FdStream(link_out), trio.lowlevel.FdStream(link_in))
    return await _runtime.serve_stream(stream)


def _wait_hangup(fd: int) -> None:
    """Return once *fd* (a duplicate of the link's input: the ssh session) hangs
    up: the parent, or the connection, is gone. Polls for hang-ups only, so it
    never takes a byte from the link."""
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    while not any(mask & _HANGUP for _, mask in poller.poll()):
        pass
