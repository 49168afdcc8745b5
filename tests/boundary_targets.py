"""Functions that tests run in children to check the process boundary: remote
cancellation, exceptions that keep their type, sync functions off the event loop."""

from __future__ import annotations

import sys
import threading

import trio

import nursery_procs

_released = threading.Event()


async def _tell_root(obj: object) -> None:
    await nursery_procs.context_by_id(0).send(obj)


async def wait_until_cancelled(tag: str) -> None:
    """Say "started", sleep; when cancelled, say "cancelled" before acknowledging."""
    try:
        await _tell_root((tag, "started"))
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await _tell_root((tag, "cancelled"))


async def ignore_cancellation(tag: str) -> None:
    """A hung child: it never lets a cancellation end the call."""
    await _tell_root((tag, "started"))
    with trio.CancelScope(shield=True):
        await trio.sleep_forever()


def block_until_released(tag: str) -> str:
    """A sync function: blocks a worker thread until :func:`release` is called."""
    trio.from_thread.run(_tell_root, (tag, "started"))
    _released.wait()
    return f"{tag} released"


def release() -> str:
    _released.set()
    return "released"


def raise_group() -> None:
    raise ExceptionGroup("two failures", [ValueError("a"), KeyError("b")])


class _LocalError(Exception):
    pass


def raise_unpicklable() -> None:
    class Unpicklable(Exception):  # a local class cannot be pickled by reference
        pass

    raise Unpicklable("made in the child")


def raise_from_module_only_here(folder: str) -> None:
    """Raise an exception whose type lives in a module the parent cannot import."""
    sys.path.insert(0, folder)
    import ghostmodule  # type: ignore[import-not-found]

    raise ghostmodule.GhostError("boo")


def raise_custom() -> None:
    raise _LocalError("keeps its type")


def block_the_loop(address: str) -> None:
    """A sync function run on the child's event loop: say so over a datagram
    socket, then block (only a kill ends it)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"started", address)
    threading.Event().wait()


async def host_stubborn_child() -> None:
    """Start a child that ignores SHUTDOWN (with a long grace period for it), tell
    the parent "ready", and serve until shut down."""
    patient = nursery_procs.Policy(grace_period=60.0, kill_after=60.0)
    async with nursery_procs.open_supervisor(policy=patient) as sup:
        me = nursery_procs.current_router().name
        await sup.start_child(ignore_cancellation, "stubborn", name=f"{me}.stubborn")
        await nursery_procs.parent().send("ready")
        await trio.sleep_forever()


def sleep_on_the_loop(address: str, seconds: float) -> str:
    """Runs on the child's event loop (``in_thread=False``): say so, then block a while."""
    import socket
    import time

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"started", address)
    time.sleep(seconds)
    return "slept"
