"""Functions that tests of the process layer run inside child processes."""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import sys
from typing import Any

import trio

import nursery_procs


def fd_table() -> dict[int, str]:
    """This process's open descriptors and what they are; a pidfd names its pid."""
    table: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the listing's own descriptor
            continue
        if target == "anon_inode:[pidfd]":
            with open(f"/proc/self/fdinfo/{name}") as info:
                pid = next(line.split()[1] for line in info if line.startswith("Pid:"))
            target = f"pidfd {pid}"
        table[int(name)] = target
    return table


def random_numbers() -> tuple[float, int]:
    return random.random(), random.getrandbits(64)


def _describe(handler: Any) -> str:
    if handler is signal.SIG_DFL:
        return "default"
    if handler is signal.SIG_IGN:
        return "ignore"
    if handler is None:
        return "not from Python"
    return f"{getattr(handler, '__module__', '?')}.{getattr(handler, '__qualname__', handler)}"


async def signal_state() -> tuple[dict[int, str], list[int]]:
    """Handlers of every signal, and the blocked signals, of the Trio thread."""
    handlers = {
        int(signum): _describe(signal.getsignal(signum))
        for signum in signal.valid_signals()
        if signum not in (signal.SIGKILL, signal.SIGSTOP)
    }
    blocked = sorted(int(signum) for signum in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    return handlers, blocked


async def logging_state() -> tuple[list[str], int, bool]:
    """Root handlers, the preloaded logger's handler count, and whether another
    thread can take the logging lock; logs one record."""
    lock = logging._lock  # type: ignore[attr-defined]

    def take_lock() -> bool:
        if lock.acquire(timeout=5):
            lock.release()
            return True
        return False

    free = await trio.to_thread.run_sync(take_lock)
    logging.getLogger("after.fork").warning("logged from a forked child")
    root = [type(handler).__name__ for handler in logging.getLogger().handlers]
    return root, len(logging.getLogger("preloaded").handlers), free


def run_a_program() -> str:
    """Start a grandchild process and return what it printed."""
    return subprocess.check_output([sys.executable, "-c", "print('grandchild says hi')"], text=True)


def fork_and_wait() -> int:
    """Fork a grandchild with os.fork and reap it; its exit status."""
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


async def nested_forkserver_child() -> tuple[int, int]:
    """Start a grandchild from a fork server of this child; its pid and its answer."""
    async with nursery_procs.open_supervisor(start_method="forkserver") as sup:
        grandchild = await sup.start_child(None, name="grandchild")
        return grandchild.pid or 0, await grandchild.call(os.getppid)


def parent_pid() -> int:
    return os.getppid()


def title() -> str:
    with open("/proc/self/cmdline", "rb") as cmdline:
        return cmdline.read().split(b"\0")[0].decode()


def environment(name: str) -> str | None:
    return os.environ.get(name)


def working_directory() -> str:
    return os.getcwd()


# A double fork: the middle process calls setsid and exits, so the last one, a
# daemon in a session of its own, is orphaned at once. It prints its pid.
DAEMONIZE = """
import os
if os.fork() == 0:
    os.setsid()
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.execvp("sleep", ["sleep", "1000"])
    print(pid, flush=True)
    os._exit(0)
os.wait()
"""
_KEPT: list[subprocess.Popen[bytes]] = []


def start_descendants() -> tuple[int, int]:
    """Start a grandchild (in this process's group) and a daemonised
    great-grandchild (in a session of its own); their pids."""
    grandchild = subprocess.Popen(["sleep", "1000"])
    _KEPT.append(grandchild)  # never collected: it outlives this call on purpose
    daemon = int(subprocess.check_output([sys.executable, "-c", DAEMONIZE]))
    return grandchild.pid, daemon


async def descendants_then_return() -> tuple[int, int]:
    """Start descendants, tell the parent, and return once it says so (it watches
    them first: they end as soon as this returns)."""
    pids = start_descendants()
    parent = nursery_procs.parent()
    await parent.send(pids)
    await parent.receive()
    return pids


async def descendants_then_block(ignore_sigterm: bool = False) -> None:
    """Start descendants, tell the parent, then block the Trio thread."""
    if ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    await nursery_procs.parent().send(start_descendants())
    while True:
        signal.pause()


async def descendants_then_wait() -> None:
    """Start descendants, tell the parent, then wait to be shut down."""
    await nursery_procs.parent().send(start_descendants())
    await trio.sleep_forever()


def die_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def connect(port: int) -> str:
    """Open a TCP connection to 127.0.0.1:*port*; ``"connected"`` or the error."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return "connected"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def write_file(path: str) -> str:
    """Write *path*; ``"written"`` or the error."""
    try:
        with open(path, "w") as file:
            file.write("from the child\n")
    except OSError as exc:
        return f"{type(exc).__name__}: errno {exc.errno}"
    return "written"


def allocate_forever() -> None:
    """Allocate 32 MiB at a time, touching it, until something stops it."""
    hoard = []
    while True:
        hoard.append(bytearray(32 << 20))


def spin_forever() -> None:
    while True:
        pass


def open_until_refused() -> tuple[int, str]:
    """Open /dev/null until the kernel refuses; how many, and the error."""
    opened = []
    try:
        while True:
            opened.append(os.open(os.devnull, os.O_RDONLY))
    except OSError as exc:
        return len(opened), f"{type(exc).__name__}: errno {exc.errno}"
    finally:
        for fd in opened:
            os.close(fd)


def process_view() -> tuple[int, list[int], str, str]:
    """This process's pid, the pids it can see, its uid map and NoNewPrivs."""
    pids = sorted(int(name) for name in os.listdir("/proc") if name.isdigit())
    with open("/proc/self/uid_map") as uid_map:
        mapping = " ".join(uid_map.read().split())
    with open("/proc/self/status") as status:
        no_new_privs = next(line.split()[1] for line in status if line.startswith("NoNewPrivs"))
    return os.getpid(), pids, mapping, no_new_privs
