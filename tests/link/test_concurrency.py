"""Concurrent senders and random payloads."""

from __future__ import annotations

import os
import socket
import struct

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from nursery_procs._errors import LinkClosed
from nursery_procs._link import Link, accept_link, connect_link

from .peers import (
    BINARY,
    digest,
    frame,
    open_pair,
    open_raw,
    pattern,
)

SENDERS = 20
PER_SENDER = 50
TAG = struct.Struct("!III")


def tagged(task: int, seq: int) -> bytes:
    size = 70_000 if seq % 10 == 3 else (task * 37 + seq * 11) % 300
    return TAG.pack(task, seq, size) + pattern(size, task * 1000 + seq)


@pytest.mark.parametrize("sender_role", ["client", "server"])
async def test_concurrent_senders_never_interleave_frames(kind: str, sender_role: str) -> None:
    async with open_pair(kind) as (a, b):
        links: dict[str, Link] = {}

        async def connect() -> None:
            links["client"] = await connect_link(a)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(connect)
            links["server"], _ = await accept_link(b)
        sender = links[sender_role]
        receiver = links["server" if sender_role == "client" else "client"]

        async def send_all_of(task: int) -> None:
            for seq in range(PER_SENDER):
                await sender.send(tagged(task, seq))

        next_seq = [0] * SENDERS
        async with trio.open_nursery() as nursery:
            for task in range(SENDERS):
                nursery.start_soon(send_all_of, task)
            for _ in range(SENDERS * PER_SENDER):
                message = await receiver.receive()
                task, seq, size = TAG.unpack_from(message)
                assert seq == next_seq[task], "one task's messages arrive in order"
                next_seq[task] += 1
                assert message == tagged(task, seq), "the message arrives whole"
                assert len(message) == TAG.size + size
        assert next_seq == [PER_SENDER] * SENDERS
        assert sender.messages_sent == receiver.messages_received == SENDERS * PER_SENDER
        await sender.aclose()
        with pytest.raises(LinkClosed) as info:
            await receiver.receive()
        assert info.value.code == 1000
        await receiver.aclose()


payloads = st.lists(
    st.one_of(
        st.binary(max_size=300),
        st.builds(pattern, st.integers(min_value=0, max_value=70_000), st.integers(0, 2**16)),
    ),
    max_size=10,
)


@settings(max_examples=50, deadline=None, database=None)
@given(up=payloads, down=payloads)
def test_random_payloads_arrive_intact_and_in_order(up: list[bytes], down: list[bytes]) -> None:
    async def main() -> None:
        a, b = trio.testing.memory_stream_pair()
        links: dict[str, Link] = {}

        async def connect() -> None:
            links["client"] = await connect_link(a)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(connect)
            links["server"], _ = await accept_link(b)
        client, server = links["client"], links["server"]

        async def send(link: Link, messages: list[bytes]) -> None:
            for message in messages:
                await link.send(message)

        async def receive(link: Link, count: int, into: list[bytes]) -> None:
            for _ in range(count):
                into.append(await link.receive())

        got_up: list[bytes] = []
        got_down: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, client, up)
            nursery.start_soon(send, server, down)
            nursery.start_soon(receive, server, len(up), got_up)
            nursery.start_soon(receive, client, len(down), got_down)
        assert digest(got_up) == digest(up)
        assert digest(got_down) == digest(down)
        await client.aclose(1000, "end")
        with pytest.raises(LinkClosed) as info:
            await server.receive()
        assert (info.value.code, info.value.reason) == (1000, "end")
        await server.aclose()

    trio.run(main)


class Ticker:
    """Another task that counts its turns: how often the scheduler let it run."""

    def __init__(self) -> None:
        self.ticks = 0

    async def run(self) -> None:
        while True:
            self.ticks += 1
            await trio.lowlevel.checkpoint()


async def test_a_busy_link_still_lets_other_tasks_run() -> None:
    # Over a socket the link uses direct system calls, which do not yield; it must
    # yield now and then anyway, or a busy link would starve every other task.
    async with open_raw("socket", "server") as (link, peer):
        other = Ticker()

        async def drain_peer() -> None:  # many tiny frames fill a Unix socket fast
            while await peer.receive_some(65536):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other.run)
            nursery.start_soon(drain_peer)
            await peer.send_all(b"".join(frame(BINARY, b"m", mask=True) for _ in range(300)))
            before = other.ticks
            for _ in range(300):
                assert await link.receive() == b"m"
            # Without its periodic yields the link would let the other task run at
            # most once (if it had to wait for the data), and not at all below.
            assert other.ticks - before >= 2
            before = other.ticks
            for _ in range(300):
                await link.send(b"s")
            assert other.ticks - before >= 2
            nursery.cancel_scope.cancel()


# Linux's socket options that set a buffer past the system's maximum (root only).
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33


@pytest.mark.skipif(os.geteuid() != 0, reason="socket buffers past rmem_max need root")
async def test_a_link_reading_large_messages_yields_after_each_mebibyte() -> None:
    # Large messages that are all there already: a reader that yielded only every
    # 64 messages would queue them all before anyone could take one.
    async with open_raw("socket", "server") as (link, peer):
        big = b"b" * (512 * 1024)
        frames = b"".join(frame(BINARY, big, mask=True) for _ in range(16))
        assert isinstance(peer, trio.SocketStream) and isinstance(link.stream, trio.SocketStream)
        peer.socket.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 4 * len(frames))
        link.stream.socket.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 * len(frames))
        await peer.send_all(frames)  # all 8 MiB wait in the socket: no read will block
        other = Ticker()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other.run)
            before = other.ticks
            for _ in range(16):
                assert await link.receive() == big
            # Far fewer messages than the yield every 64, but 8 MiB of them: a yield
            # before every third message on, 7 in all, and the other task runs once
            # in each turn of the scheduler (before or after this one).
            assert other.ticks - before >= 6
            nursery.cancel_scope.cancel()
