"""Where a shipped runtime starts, once its import hook is installed.

The first stage (:data:`nursery_procs._importer.STAGE1`) and the second
(:func:`nursery_procs._importer.stage2`) have loaded the runtime bundle; this
module then runs the normal child runtime:

* over standard input and output, for a context started through ``ssh``: its
  link is the ssh session, its prints go to standard error (which ssh carries
  to the parent's logs), and a thread watches standard input, so that the
  process ends within :data:`~nursery_procs._runtime.ORPHAN_GRACE` of its
  parent's connection going away, even if its event loop is stuck;
* as ``python -m nursery_procs._child ARGS``, for a context that a shipped
  context starts on its own host (the bundle came in an inherited memory file).
"""

from __future__ import annotations

import os
import runpy
import select
import signal
import sys
import threading
import time
import traceback
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
    code = 1
    try:
        link_in, link_out = os.dup(0), os.dup(1)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        # Output goes where standard error goes: through ssh to the parent's logs.
        os.dup2(2, 1)
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        _watch_input(link_in)
        code = trio.run(_serve_over_pipes, link_in, link_out)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    os._exit(code)


async def _serve_over_pipes(link_in: int, link_out: int) -> int:
    stream = trio.StapledStream(trio.lowlevel.FdStream(link_out), trio.lowlevel.FdStream(link_in))
    return await _runtime.serve_stream(stream)


def _watch_input(fd: int) -> None:
    """End this process soon after its input (the ssh session) hangs up.

    The parent, or the connection, is gone: whatever the event loop is doing,
    it gets :data:`~nursery_procs._runtime.ORPHAN_GRACE` seconds to finish, as
    a local child does when its parent dies. The thread polls a duplicate of the
    input for hang-ups only, so it never takes a byte from the link.
    """
    watched = os.dup(fd)

    def watch() -> None:
        poller = select.poll()
        poller.register(watched, select.POLLRDHUP)
        while True:
            events = poller.poll()
            if any(mask & _HANGUP for _, mask in events):
                break
        time.sleep(_runtime.ORPHAN_GRACE)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="nursery_procs input watchdog", daemon=True).start()
