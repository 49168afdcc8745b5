"""Interoperability with wsproto, in both roles and over both kinds of stream."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from wsproto.connection import ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
)

from nursery_procs._errors import LinkClosed

from .peers import (
    SIZES,
    digest,
    open_interop,
    pattern,
)


async def test_messages_of_every_size_both_ways(kind: str, our_role: str) -> None:
    outgoing = [pattern(n, n) for n in SIZES]
    incoming = [pattern(n, n + 1) for n in SIZES]
    async with open_interop(kind, our_role) as (link, peer):
        received_by_peer: list[bytes] = []

        async def send_ours() -> None:
            for message in outgoing:
                await link.send(message)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_ours)
            for _ in outgoing:
                received_by_peer.append(await peer.receive_message())
        assert digest(received_by_peer) == digest(outgoing)

        async def send_theirs() -> None:
            for message in incoming:
                await peer.send(BytesMessage(data=message))

        received: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_theirs)
            for _ in incoming:
                received.append(await link.receive())
        assert digest(received) == digest(incoming)
        assert all(type(m) is bytes for m in received)
        assert (link.messages_sent, link.messages_received) == (len(SIZES), len(SIZES))
        assert link.bytes_sent == link.bytes_received == sum(SIZES)


async def test_message_in_several_parts_arrives_as_one(kind: str, our_role: str) -> None:
    parts = [b"head:", pattern(100_000, 1), b"", pattern(70_000, 2), b":tail"]
    async with open_interop(kind, our_role) as (link, peer):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.send, *parts)
            got = await peer.receive_message()
        assert digest([got]) == digest([b"".join(parts)])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.send, b"a", b"b", b"c")
            assert await peer.receive_message() == b"abc"


async def test_our_close_code_and_reason_reach_wsproto(kind: str, our_role: str) -> None:
    async with open_interop(kind, our_role) as (link, peer):
        await link.aclose(1001, "bye")
        event = await peer.next_event()
        assert isinstance(event, CloseConnection)
        assert (event.code, event.reason) == (1001, "bye")
        await peer.assert_eof()
        assert (link.close_code, link.close_reason) == (1001, "bye")


async def test_long_ascii_close_reason_is_cut_to_fit_a_control_frame(
    kind: str, our_role: str
) -> None:
    async with open_interop(kind, our_role) as (link, peer):
        await link.aclose(1000, "x" * 300)
        event = await peer.next_event()
        assert isinstance(event, CloseConnection)
        assert (event.code, event.reason) == (1000, "x" * 123)


@pytest.mark.parametrize("code", [1000, 1001, 1011, 4000])
async def test_wsproto_close_reaches_us_and_is_answered(
    kind: str, our_role: str, code: int
) -> None:
    async with open_interop(kind, our_role) as (link, peer):
        await peer.send(CloseConnection(code=code, reason="done"))
        with pytest.raises(LinkClosed) as info:
            await link.receive()
        assert (info.value.code, info.value.reason) == (code, "done")
        assert link.closed
        event = await peer.next_event()
        assert isinstance(event, CloseConnection)
        assert event.code == code
        assert peer.ws.state is ConnectionState.CLOSED
        await peer.assert_eof()
        with pytest.raises(LinkClosed) as info:
            await link.send(b"late")
        assert info.value.code == code


async def test_fragmented_message_from_wsproto_is_reassembled(kind: str, our_role: str) -> None:
    parts = [b"alpha-", b"", b"beta-" * 1000, pattern(100_000, 3), b"-omega"]
    async with open_interop(kind, our_role) as (link, peer):

        async def send_fragments() -> None:
            for i, part in enumerate(parts):
                await peer.send(BytesMessage(data=part, message_finished=i == len(parts) - 1))
                if i == 1:
                    # Control frames may come between the frames of a message.
                    await peer.send(Ping(payload=b"between"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_fragments)
            got = await link.receive()
        assert digest([got]) == digest([b"".join(parts)])
        event = await peer.next_event()
        assert isinstance(event, Pong)
        assert event.payload == b"between"
        await peer.send(BytesMessage(data=b"next"))
        assert await link.receive() == b"next"


async def test_wsproto_ping_gets_a_pong(kind: str, our_role: str) -> None:
    async with open_interop(kind, our_role) as (link, peer):
        for payload in (b"", b"are you there?", bytes(range(125))):
            await peer.send(Ping(payload=payload))
            await peer.send(BytesMessage(data=b"after " + payload))
            assert await link.receive() == b"after " + payload
            event = await peer.next_event()
            assert isinstance(event, Pong)
            assert event.payload == payload


async def test_unsolicited_pong_is_ignored(kind: str, our_role: str) -> None:
    async with open_interop(kind, our_role) as (link, peer):
        await peer.send(Pong(payload=b"unasked"))
        await peer.send(BytesMessage(data=b"payload"))
        assert await link.receive() == b"payload"
