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
        await nursery_procs.current_router().request(context_id, 10, "hello")
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
