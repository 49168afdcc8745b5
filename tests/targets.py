"""Functions that tests run inside child processes (importable by name there)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import trio
import trio.lowlevel

import nursery_procs


def echo(obj: Any) -> Any:
    return obj


def add(a: int, b: int) -> int:
    return a + b


async def async_add(a: int, b: int) -> int:
    await trio.lowlevel.checkpoint()
    return a + b


def fail(message: str) -> None:
    raise ValueError(message)


def getpid() -> int:
    return os.getpid()


async def serve_echo() -> None:
    await nursery_procs.parent().serve_requests(echo)


async def echo_messages() -> None:
    parent = nursery_procs.parent()
    async for msg in parent:
        await parent.send(msg)


def returns(value: Any) -> Any:
    return value


def raises_in_target(message: str) -> None:
    raise RuntimeError(message)


def die_with_stderr(marker: str, code: int) -> None:
    """Write *marker* to stderr, then exit at once (a crash mid-call)."""
    sys.stderr.write(f"{marker}\n")
    sys.stderr.flush()
    os._exit(code)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


async def serve_dying_requests() -> None:
    async def handler(obj: Any) -> Any:
        if obj == "die":
            die_with_stderr("about to die mid-request", 7)
        return obj

    await nursery_procs.parent().serve_requests(handler)


def chatter(lines: int) -> str:
    """Write to stdout, stderr and logging, then return at once."""
    log = logging.getLogger("chatter")
    for i in range(lines):
        print(f"stdout line {i}")
        sys.stderr.write(f"stderr line {i}\n")
        log.warning("log record %d", i)
    return "done"


async def record_cleanup(path: str) -> None:
    """Run until cancelled; then write 'clean' to *path* (proves finally blocks ran)."""
    try:
        await trio.sleep_forever()
    finally:
        # Blocking on purpose: this runs while the child is being cancelled.
        Path(path).write_text(f"clean {os.getpid()}\n")  # noqa: ASYNC240


def block_forever() -> None:
    """Block the child's Trio thread: SHUTDOWN cannot be obeyed, SIGTERM is needed."""
    while True:
        signal.pause()


def ignore_sigterm_and_block() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        signal.pause()


async def write_raw(data: bytes) -> None:
    """Write bytes straight onto the link to the parent, bypassing the framing."""
    router = nursery_procs.current_router()
    assert router.parent_route is not None
    await router.parent_route.link.stream.send_all(data)


async def request_unknown_context(context_id: int) -> str:
    try:
        await nursery_procs.current_router().asking.request(context_id, 10, "hello")
    except nursery_procs.MessageUndeliverable as exc:
        return exc.reason
    return "delivered?"


async def send_to_parent(obj: Any) -> None:
    await nursery_procs.parent().send(obj)


def import_fails() -> None:  # pragma: no cover - never runs: its module fails to import
    raise AssertionError


async def forward_between(count: int) -> int:
    """Echo back *count* messages, then return."""
    parent = nursery_procs.parent()
    for _ in range(count):
        await parent.send(await parent.receive())
    return count


async def tree_node(depth: int, fanout: int, marker_dir: str | None = None) -> None:
    """One node of a test tree: start *fanout* children (each a subtree of *depth* - 1),
    report the subtree's size to the parent once all are ready, then serve requests.

    With *marker_dir*, the node writes ``<name> <monotonic time>`` there when it
    finishes, after its own children have finished.
    """
    import time

    me = nursery_procs.current_router().name
    parent = nursery_procs.parent()
    try:
        async with nursery_procs.open_supervisor() as sup:
            kids: list[nursery_procs.Context] = []
            if depth > 0:
                async with trio.open_nursery() as nursery:
                    for i in range(fanout):

                        async def start(i: int = i) -> None:
                            kids.append(
                                await sup.start_child(
                                    tree_node,
                                    depth - 1,
                                    fanout,
                                    marker_dir,
                                    name=f"{me}.{i}",
                                    raise_on_crash=False,
                                )
                            )

                        nursery.start_soon(start)
            size = 1
            for kid in kids:
                _, kid_size = await kid.receive()
                size += kid_size
            await parent.send(("ready", size))
            await nursery_procs.serve_requests(tree_request)
    finally:
        if marker_dir is not None:
            Path(marker_dir, me).write_text(f"{me} {time.monotonic()}\n")  # noqa: ASYNC240


async def tree_request(obj: Any) -> Any:
    if obj == "block":
        await trio.sleep_forever()
    if obj == "whoami":
        router = nursery_procs.current_router()
        return (router.id, router.name, os.getpid())
    return obj


async def message_context(context_id: int, obj: Any, handle: int = 9) -> str:
    """Send *obj* from here to any context; report a dead reply's reason, if any."""
    router = nursery_procs.current_router()
    try:
        if handle == 9:
            await nursery_procs.context_by_id(context_id).send(obj)
            return "sent"
        await router.asking.request(context_id, handle, obj)
    except nursery_procs.MessageUndeliverable as exc:
        return exc.reason
    return "delivered"


async def send_spoofed(src_id: int, handle: int, obj: Any) -> None:
    """Send a well-formed envelope to the parent that claims another source."""
    from nursery_procs import _wire

    router = nursery_procs.current_router()
    route = router.parent_route
    assert route is not None
    msg = _wire.make(route.peer_id, src_id, handle, obj)
    await route.link.send(_wire.pack(msg))


async def post(context_id: int, handle: int, obj: Any) -> None:
    """Route one message with any handle from here, expecting no reply."""
    from nursery_procs import _wire

    router = nursery_procs.current_router()
    await router.send(_wire.make(context_id, router.id, handle, obj))


async def request_with_payload(context_id: int, size: int) -> str:
    """Send a request of *size* bytes to any context; report a dead reply's reason."""
    try:
        await nursery_procs.current_router().asking.request(context_id, 10, b"x" * size)
    except nursery_procs.MessageUndeliverable as exc:
        return exc.reason
    return "delivered"


async def serve_slow_requests() -> None:
    """Answer "quick" at once; any other request waits until cancelled."""
    import boundary_targets

    async def handler(obj: Any) -> Any:
        if obj == "quick":
            return obj
        await boundary_targets.wait_until_cancelled(obj)

    await nursery_procs.parent().serve_requests(handler)


async def request_parent(obj: Any) -> Any:
    """Ask the parent one request and return its answer."""
    return await nursery_procs.parent().request(obj)
