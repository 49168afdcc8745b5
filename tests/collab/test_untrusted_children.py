"""The collab server's document children are untrusted: nothing they send is
unpickled, and what they send is checked before the master acts on it."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import process_targets
import pytest
import trio
from mappings import vm_flags

import nursery_procs
from examples.collab.settings import parse_args

from . import hostile
from .servers import TIMEOUT, check_works, running, ws_url
from .yclient import connect


async def test_a_document_child_cannot_make_the_master_unpickle(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    canary = tmp_path / "canary"
    async with running(tmp_path) as server:
        with trio.fail_after(TIMEOUT):
            async with (
                connect(ws_url(server, "target"), user="Ann") as ann,
                connect(ws_url(server, "target"), user="Bob") as bob,
            ):
                await ann.synced.wait()
                await bob.synced.wait()
                ctx = server.documents()["target"]
                assert await ctx.call(hostile.send_crafted_pickles, str(canary)) == "sent"
                # Ann is client 1 of this fresh server: the malformed orders name her.
                sent = await ctx.call(hostile.send_malformed, 1)
                # The edit goes through the same pumps, after those messages.
                await ann.append("<ann:0>")
                await bob.wait_until(lambda: "<ann:0>" in bob.content())
                assert not ann.closed.is_set() and not bob.closed.is_set()
                assert not ctx.has_exited
            await check_works(server)
    assert not canary.exists()
    refusals = [
        r
        for r in caplog.records
        if r.name == "nursery_procs.router" and "may send only data" in r.getMessage()
    ]
    assert len(refusals) == 3  # the channel message, the request and the log record
    unexpected = [r for r in caplog.records if "sent an unexpected message" in r.getMessage()]
    assert len(unexpected) == sent == len(hostile.MALFORMED)
    assert all(r.levelno == logging.WARNING for r in unexpected)


async def _confinement(server_port: int, ctx: nursery_procs.Context) -> tuple[str, int | None, str]:
    """What a document child sees when it reaches for the network, its address-space
    limit and its ``NoNewPrivs`` flag (read from outside, in /proc)."""
    reached = await ctx.call(process_targets.connect, server_port)
    limits = await trio.Path(f"/proc/{ctx.pid}/limits").read_text()
    address_space = next(line for line in limits.splitlines() if "address space" in line)
    status = await trio.Path(f"/proc/{ctx.pid}/status").read_text()
    no_new_privs = next(line for line in status.splitlines() if line.startswith("NoNewPrivs"))
    soft = address_space.split()[3]
    return reached, None if soft == "unlimited" else int(soft), no_new_privs.split()[1]


async def test_document_children_are_confined_by_default(tmp_path: Path) -> None:
    async with running(tmp_path, memory_limit=1536 * 1024 * 1024) as server:
        with trio.fail_after(TIMEOUT):
            async with connect(ws_url(server, "walled"), user="Ann") as ann:
                await ann.synced.wait()
                ctx = server.documents()["walled"]
                reached, address_space, no_new_privs = await _confinement(server.port, ctx)
                in_force = ctx.statistics().isolation
                await ann.append("still edits")
                await ann.wait_until(lambda: "still edits" in ann.content())
    assert reached == f"OSError: [Errno {errno.ENETUNREACH}] Network is unreachable"
    assert address_space == 1536 * 1024 * 1024
    assert no_new_privs == "1"
    assert in_force is not None
    assert in_force.in_force() == {
        "address_space": 1536 * 1024 * 1024,
        "no_new_privs": True,
        "network": True,
        **({"user": True} if os.geteuid() != 0 else {}),
    }


async def test_no_isolation_leaves_document_children_unconfined(tmp_path: Path) -> None:
    async with running(tmp_path, isolate=False) as server:
        with trio.fail_after(TIMEOUT):
            async with connect(ws_url(server, "open"), user="Ann") as ann:
                await ann.synced.wait()
                ctx = server.documents()["open"]
                reached, address_space, no_new_privs = await _confinement(server.port, ctx)
    assert (reached, address_space, no_new_privs) == ("connected", None, "0")


@pytest.mark.parametrize("merge_pages", [True, False])
async def test_merge_pages_marks_document_children_for_the_kernel(
    tmp_path: Path, merge_pages: bool
) -> None:
    async with running(tmp_path, merge_pages=merge_pages) as server:
        with trio.fail_after(TIMEOUT):
            async with connect(ws_url(server, "merged"), user="Ann") as ann:
                await ann.synced.wait()
                flags = vm_flags(server.documents()["merged"].pid, "[heap]")
                await ann.append("still edits")
                await ann.wait_until(lambda: "still edits" in ann.content())
    assert ("mg" in flags) is merge_pages


def test_the_command_line_asks_for_merged_pages() -> None:
    assert parse_args(["--merge-pages"]).merge_pages is True
    assert parse_args([]).merge_pages is False
