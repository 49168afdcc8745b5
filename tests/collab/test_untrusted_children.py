"""The collab server's document children are untrusted: nothing they send is
unpickled, and what they send is checked before the master acts on it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from examples.collab.clients import parse_child_message

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


def test_child_messages_are_checked_for_shape() -> None:
    assert all(parse_child_message(m) is None for m in hostile.MALFORMED)
    # What a document child really sends arrives as lists (msgpack has no tuples).
    assert parse_child_message(["to", 3, b"x"]) is not None
    assert parse_child_message(["all", None, b"x"]) is not None
    assert parse_child_message(["all", 3, b"x"]) is not None
    kick = parse_child_message(["kick", 3, 4422, "é" * 100])
    assert kick is not None and len(kick.reason.encode()) <= 123  # type: ignore[union-attr]
