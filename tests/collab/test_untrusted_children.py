"""The collab server's document children are untrusted: nothing they send is
unpickled, and what they send is checked before the master acts on it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from examples.collab.protocol import (
    ALL,
    KICK,
    TO,
    BatchError,
    decode_from_child,
    decode_kick,
    encode_for_master,
    kick_payload,
)

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


def test_child_batches_are_checked_whole() -> None:
    for message in hostile.MALFORMED:
        with pytest.raises(BatchError):
            decode_from_child(message)
    batch = encode_for_master(
        [(TO, 3, b"x"), (ALL, 0, b"y"), (ALL, 3, b"z"), (KICK, 3, kick_payload(4422, "é" * 100))]
    )
    records = decode_from_child(batch)
    assert [kind for kind, _, _ in records] == [TO, ALL, ALL, KICK]
    code, reason = decode_kick(records[-1][2])
    assert code == 4422 and len(reason.encode()) <= 123
    with pytest.raises(BatchError):
        decode_from_child(batch, max_payload=0)
