"""Protocol violations and limits: each answered with its close code."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
import trio
import trio.testing

from nursery_procs._errors import LinkClosed

from .peers import (
    BINARY,
    CLOSE,
    CONT,
    GUARD,
    PING,
    PONG,
    TEXT,
    frame,
    open_raw,
    parse_frames,
    pattern,
    read_to_eof,
)

FrameBuilder = Callable[[bool], bytes]

BAD_FRAMES = [
    pytest.param(lambda m: frame(BINARY, b"x", rsv=0x40, mask=m), (1002,), id="rsv1"),
    pytest.param(lambda m: frame(BINARY, b"x", rsv=0x20, mask=m), (1002,), id="rsv2"),
    pytest.param(lambda m: frame(BINARY, b"x", rsv=0x10, mask=m), (1002,), id="rsv3"),
    pytest.param(lambda m: frame(PING, b"x", rsv=0x40, mask=m), (1002,), id="rsv1-on-ping"),
    pytest.param(lambda m: frame(BINARY, b"x", mask=not m), (1002,), id="wrong-masking"),
    pytest.param(lambda m: frame(0x3, b"x", mask=m), (1002,), id="opcode-0x3"),
    pytest.param(lambda m: frame(0x7, b"x", mask=m), (1002,), id="opcode-0x7"),
    pytest.param(lambda m: frame(0xB, b"x", mask=m), (1002,), id="opcode-0xb"),
    pytest.param(lambda m: frame(0xF, b"", mask=m), (1002,), id="opcode-0xf"),
    pytest.param(lambda m: frame(TEXT, b"hello", mask=m), (1003,), id="text"),
    pytest.param(
        lambda m: frame(TEXT, b"he", fin=False, mask=m) + frame(CONT, b"llo", mask=m),
        (1003,),
        id="fragmented-text",
    ),
    # The payload is never sent: our side must judge by the header alone.
    pytest.param(lambda m: frame(BINARY, length=2**40, mask=m), (1009,), id="too-big"),
    pytest.param(lambda m: frame(BINARY, length=2**63, mask=m), (1002,), id="length-top-bit-set"),
    pytest.param(lambda m: frame(PING, b"p" * 126, mask=m), (1002,), id="ping-over-125"),
    pytest.param(lambda m: frame(CLOSE, b"\x03\xe8" + b"r" * 124, mask=m), (1002,), id="close-126"),
    pytest.param(lambda m: frame(PONG, b"p" * 200, mask=m), (1002,), id="pong-over-125"),
    pytest.param(lambda m: frame(PING, b"p", fin=False, mask=m), (1002,), id="fragmented-ping"),
    pytest.param(
        lambda m: frame(CLOSE, b"\x03\xe8", fin=False, mask=m), (1002,), id="fragmented-close"
    ),
    pytest.param(lambda m: frame(CONT, b"orphan", mask=m), (1002,), id="continuation-first"),
    pytest.param(
        lambda m: frame(BINARY, b"a", fin=False, mask=m) + frame(BINARY, b"b", mask=m),
        (1002,),
        id="new-message-inside-fragmented",
    ),
    pytest.param(lambda m: frame(CLOSE, b"\x03", mask=m), (1002,), id="close-1-byte"),
    pytest.param(
        lambda m: frame(CLOSE, b"\x03\xe8\xff\xfe", mask=m), (1002, 1007), id="close-reason-utf8"
    ),
]


@pytest.mark.parametrize(("build", "codes"), BAD_FRAMES)
async def test_protocol_violation_is_answered_with_its_close_code(
    kind: str, our_role: str, build: FrameBuilder, codes: tuple[int, ...]
) -> None:
    peer_masks = our_role == "server"
    with trio.fail_after(GUARD):
        async with open_raw(kind, our_role) as (link, peer):
            await peer.send_all(build(peer_masks))
            with pytest.raises(LinkClosed) as info:
                await link.receive()
            code = info.value.code
            assert code in codes
            assert link.close_code == code
            # What our side sent back, as the peer reads it.
            sent = parse_frames(await read_to_eof(peer))
            assert [f.opcode for f in sent] == [CLOSE]
            assert sent[0].fin
            assert sent[0].rsv == 0
            assert sent[0].masked == (our_role == "client")
            sent_code, sent_reason = sent[0].close_code_and_reason()
            assert sent_code == code
            assert sent_reason == info.value.reason[:123]
            with pytest.raises(LinkClosed) as again:
                await link.receive()
            assert again.value.code == code
            with pytest.raises(LinkClosed):
                await link.send(b"after the violation")


@pytest.mark.parametrize(
    ("opcode", "code"), [(TEXT, 1003), (CONT, 1002)], ids=["text", "orphan-continuation"]
)
async def test_message_before_the_violation_is_delivered(
    kind: str, our_role: str, opcode: int, code: int
) -> None:
    mask = our_role == "server"
    async with open_raw(kind, our_role) as (link, peer):
        await peer.send_all(frame(BINARY, b"fine", mask=mask) + frame(opcode, b"bad", mask=mask))
        assert await link.receive() == b"fine"
        with pytest.raises(LinkClosed) as info:
            await link.receive()
        assert info.value.code == code
        sent = parse_frames(await read_to_eof(peer))
        assert [f.close_code_and_reason()[0] for f in sent] == [code]


@pytest.mark.parametrize("size", [999, 1000])
async def test_message_up_to_the_limit_is_accepted(kind: str, our_role: str, size: int) -> None:
    mask = our_role == "server"
    async with open_raw(kind, our_role, max_message_size=1000) as (link, peer):
        payload = pattern(size, size)
        await peer.send_all(frame(BINARY, payload, mask=mask))
        assert await link.receive() == payload
        half = size // 2
        await peer.send_all(
            frame(BINARY, payload[:half], fin=False, mask=mask)
            + frame(CONT, payload[half:], mask=mask)
        )
        assert await link.receive() == payload


@pytest.mark.parametrize(
    "fragments",
    [[1001], [600, 401], [500, 0, 500, 1], [1, 1, 1, 998]],
    ids=["single", "two", "four-with-empty", "small-then-big"],
)
async def test_message_over_the_limit_closes_with_1009(
    kind: str, our_role: str, fragments: list[int]
) -> None:
    mask = our_role == "server"
    with trio.fail_after(GUARD):
        async with open_raw(kind, our_role, max_message_size=1000) as (link, peer):
            data = b"".join(
                frame(BINARY if i == 0 else CONT, bytes(n), fin=i == len(fragments) - 1, mask=mask)
                for i, n in enumerate(fragments)
            )
            await peer.send_all(data)
            with pytest.raises(LinkClosed) as info:
                await link.receive()
            assert info.value.code == 1009
            sent = parse_frames(await read_to_eof(peer))
            assert [f.close_code_and_reason()[0] for f in sent] == [1009]


async def test_close_frame_from_peer_is_echoed(kind: str, our_role: str) -> None:
    mask = our_role == "server"
    async with open_raw(kind, our_role) as (link, peer):
        await peer.send_all(
            frame(CLOSE, struct.pack("!H", 1001) + "au revoir é".encode(), mask=mask)
        )
        with pytest.raises(LinkClosed) as info:
            await link.receive()
        assert (info.value.code, info.value.reason) == (1001, "au revoir é")
        sent = parse_frames(await read_to_eof(peer))
        assert len(sent) == 1
        assert sent[0].masked == (our_role == "client")
        assert sent[0].close_code_and_reason()[0] == 1001


async def test_empty_close_frame_means_1005_and_is_echoed_empty(kind: str, our_role: str) -> None:
    mask = our_role == "server"
    async with open_raw(kind, our_role) as (link, peer):
        await peer.send_all(frame(CLOSE, b"", mask=mask))
        with pytest.raises(LinkClosed) as info:
            await link.receive()
        assert info.value.code == 1005
        sent = parse_frames(await read_to_eof(peer))
        assert [(f.opcode, f.payload) for f in sent] == [(CLOSE, b"")]


@pytest.mark.parametrize("bad_code", [0, 999, 1005, 1006, 1015, 5000])
async def test_invalid_close_code_from_peer_is_a_protocol_error(
    kind: str, our_role: str, bad_code: int
) -> None:
    mask = our_role == "server"
    async with open_raw(kind, our_role) as (link, peer):
        await peer.send_all(frame(CLOSE, struct.pack("!H", bad_code), mask=mask))
        with pytest.raises(LinkClosed) as info:
            await link.receive()
        assert info.value.code == 1002


async def test_long_non_ascii_close_reason_stays_valid_utf8(kind: str, our_role: str) -> None:
    reason = "é" * 100  # 200 bytes in UTF-8
    async with open_raw(kind, our_role) as (link, peer):
        await link.aclose(1000, reason)
        sent = parse_frames(await read_to_eof(peer))
        assert len(sent) == 1
        assert len(sent[0].payload) <= 125
        code, text = sent[0].close_code_and_reason()  # UnicodeDecodeError today
        assert code == 1000
        assert reason.startswith(text)


@pytest.mark.parametrize("cut", [1, 3, 7, 12, 20], ids=lambda c: f"cut-at-{c}")
async def test_eof_in_the_middle_of_a_frame_is_1006(kind: str, our_role: str, cut: int) -> None:
    mask = our_role == "server"
    # 300 bytes: a 16-bit length, so cuts fall in the header, the length, the key, the payload.
    whole = frame(BINARY, bytes(300), mask=mask)
    async with open_raw(kind, our_role) as (link, peer):
        await peer.send_all(whole[:cut])
        await peer.aclose()
        with pytest.raises(LinkClosed) as info:
            await link.receive()
        assert info.value.code == 1006
        assert link.close_code == 1006
        with pytest.raises(LinkClosed) as info:
            await link.send(b"x")
        assert info.value.code == 1006


async def test_eof_between_frames_is_1006(kind: str, our_role: str) -> None:
    mask = our_role == "server"
    async with open_raw(kind, our_role) as (link, peer):
        await peer.send_all(frame(BINARY, b"last words", mask=mask))
        await peer.aclose()
        assert await link.receive() == b"last words"
        with pytest.raises(LinkClosed) as info:
            await link.receive()
        assert info.value.code == 1006
