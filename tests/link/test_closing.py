"""Closing: idempotence, wake-ups, vanished peers, cancelled sends."""

from __future__ import annotations

import struct

import pytest
import trio
import trio.testing
from wsproto.events import CloseConnection

from nursery_procs._errors import LinkClosed

from .peers import (
    BINARY,
    PING,
    frame,
    open_interop,
    open_raw,
    parse_frames,
    read_to_eof,
    xor_mask,
)


async def test_aclose_is_idempotent_and_send_after_it_fails(kind: str, our_role: str) -> None:
    async with open_raw(kind, our_role) as (link, peer):
        await link.aclose(1000, "done")
        await link.aclose(1001, "again")
        await link.aclose()
        assert (link.close_code, link.close_reason) == (1000, "done")
        # Used after this side closed it: as any Trio resource, ClosedResourceError
        # (which also carries the close code, as a LinkClosed).
        with pytest.raises(trio.ClosedResourceError) as closed:
            await link.send(b"too late")
        assert isinstance(closed.value, LinkClosed)
        assert (closed.value.code, closed.value.reason) == (1000, "done")
        with pytest.raises(trio.ClosedResourceError) as closed:
            await link.receive()
        assert isinstance(closed.value, LinkClosed) and closed.value.code == 1000
        sent = parse_frames(await read_to_eof(peer))
        assert len(sent) == 1, "exactly one close frame"
        assert sent[0].masked == (our_role == "client")
        assert sent[0].close_code_and_reason() == (1000, "done")


async def test_aclose_wakes_a_task_blocked_in_receive(kind: str, our_role: str) -> None:
    async with open_raw(kind, our_role) as (link, peer):
        outcome: list[int] = []

        async def receiver() -> None:
            with pytest.raises(LinkClosed) as info:
                await link.receive()
            outcome.append(info.value.code)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver)
            await trio.testing.wait_all_tasks_blocked()
            await link.aclose(1001, "shutting down")
        assert outcome == [1001]
        sent = parse_frames(await read_to_eof(peer))
        assert [f.close_code_and_reason() for f in sent] == [(1001, "shutting down")]


async def test_peer_vanishing_makes_send_fail_with_1006(our_role: str) -> None:
    async with open_raw("socket", our_role) as (link, peer):
        await peer.aclose()
        with pytest.raises(LinkClosed) as info:
            # The kernel may accept a first write; a message bigger than any
            # socket buffer cannot be accepted whole.
            for _ in range(3):
                await link.send(bytes(8 << 20))
        assert info.value.code == 1006
        assert link.close_code == 1006


async def test_cancelled_half_written_send_closes_the_link(our_role: str) -> None:
    async with open_raw("socket", our_role) as (link, _peer):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.send, bytes(16 << 20))
            # Nobody reads, so the send fills the socket buffers and blocks.
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert link.close_code == 1006
        with pytest.raises(LinkClosed) as info:
            await link.send(b"x")
        assert info.value.code == 1006


async def test_send_cancelled_before_writing_leaves_the_link_open(our_role: str) -> None:
    async with open_raw("socket", our_role) as (link, peer):
        with trio.CancelScope() as scope:
            scope.cancel()
            await link.send(b"never sent")
        assert scope.cancelled_caught
        assert link.close_code is None
        await link.send(b"sent")
        await link.aclose()
        sent = parse_frames(await read_to_eof(peer))
        assert [f.payload for f in sent if f.opcode == BINARY] == [b"sent"]


async def test_nothing_is_written_after_a_half_written_frame(our_role: str) -> None:
    size = 16 << 20
    async with open_raw("socket", our_role) as (link, peer):
        received: list[bytes] = []

        async def drain() -> None:
            received.append(await read_to_eof(peer))

        async def keep_receiving() -> None:
            with pytest.raises(LinkClosed):
                while True:
                    await link.receive()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_receiving)
            async with trio.open_nursery() as senders:
                senders.start_soon(link.send, bytes(size))
                await trio.testing.wait_all_tasks_blocked()
                senders.cancel_scope.cancel()
            assert link.close_code == 1006
            await peer.send_all(frame(PING, b"\xff" * 8, mask=our_role == "server"))
            nursery.start_soon(drain)
            await trio.testing.wait_all_tasks_blocked()
            await link.aclose()
        data = received[0]
        header = 14 if our_role == "client" else 10
        assert data[1] & 0x7F == 127
        assert struct.unpack_from("!Q", data, 2)[0] == size
        body = data[header:]
        if our_role == "client":
            body = xor_mask(body, data[10:14])
        assert 0 < len(body) < size
        assert body.count(0) == len(body), "only the zero payload of the cut frame was sent"


async def test_a_link_is_a_trio_channel_and_a_peer_close_is_not_a_local_one(
    kind: str, our_role: str
) -> None:
    async with open_interop(kind, our_role) as (link, peer):
        assert isinstance(link, trio.abc.Channel)
        await peer.send(CloseConnection(code=1001, reason="bye"))
        with pytest.raises(LinkClosed) as info:
            await link.receive()
        assert not isinstance(info.value, trio.ClosedResourceError)
        assert (info.value.code, info.value.reason) == (1001, "bye")
        with pytest.raises(LinkClosed) as info:
            await link.send(b"after the peer left")
        assert not isinstance(info.value, trio.ClosedResourceError)
        await link.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await link.send(b"after we closed it too")
