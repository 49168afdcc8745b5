"""The message envelope: header layout, validation and payload encoding."""

from __future__ import annotations

import pickle
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nursery_procs._errors import WireError
from nursery_procs._wire import (
    DEAD,
    HEADER,
    RAW,
    Handle,
    Message,
    decode,
    encode,
    make,
    pack,
    unpack,
)

U32_MAX = 2**32 - 1
# The layout written down independently of the module: flags, 3 zero bytes, 4 x u32.
LAYOUT = struct.Struct("!B3sIIII")

ids = st.integers(min_value=0, max_value=U32_MAX)
known_flags = st.sampled_from([0, RAW, DEAD, RAW | DEAD])


# -- pack / unpack -----------------------------------------------------------


def test_header_is_twenty_bytes_in_network_order() -> None:
    msg = Message(0x01020304, 0x0A0B0C0D, Handle.CALL, 0xDEADBEEF, b"payload", RAW)
    buf = pack(msg)
    assert HEADER.size == 20
    assert len(buf) == 20 + len(b"payload")
    assert buf[:20] == bytes.fromhex("01000000 01020304 0a0b0c0d 00000002 deadbeef")
    assert buf[20:] == b"payload"
    assert LAYOUT.unpack(buf[:20]) == (RAW, b"\0\0\0", 0x01020304, 0x0A0B0C0D, 2, 0xDEADBEEF)


def test_pack_unpack_round_trip() -> None:
    msg = Message(dst_id=7, src_id=3, handle=Handle.REQUEST, reply_to=101, data=b"x" * 300)
    back = unpack(pack(msg))
    assert back == msg
    assert back.data == b"x" * 300
    assert back.flags == 0
    assert not back.is_dead


def test_unpack_header_only_gives_empty_data() -> None:
    msg = unpack(pack(Message(1, 2, 3)))
    assert msg == Message(1, 2, 3, 0, b"", 0)


@pytest.mark.parametrize("flags", [0, RAW, DEAD, RAW | DEAD])
def test_known_flags_are_accepted(flags: int) -> None:
    msg = unpack(pack(Message(1, 2, 3, 4, b"d", flags)))
    assert msg.flags == flags
    assert msg.is_dead == bool(flags & DEAD)


@pytest.mark.parametrize("size", [0, 1, 12, 19])
def test_unpack_short_buffer_is_a_wire_error(size: int) -> None:
    with pytest.raises(WireError) as info:
        unpack(bytes(size))
    text = str(info.value)
    assert f"{size} bytes" in text
    assert "20-byte header" in text


@pytest.mark.parametrize("flags", [0x08, 0x80, 0xFF, RAW | 0x10])
def test_unpack_unknown_flags_is_a_wire_error(flags: int) -> None:
    buf = LAYOUT.pack(flags, b"\0\0\0", 1, 2, 3, 4) + b"data"
    with pytest.raises(WireError, match=f"unknown flags 0x{flags:02x}"):
        unpack(buf)


@pytest.mark.parametrize(
    "msg",
    [
        Message(-1, 0, 0),
        Message(2**32, 0, 0),
        Message(0, 2**32, 0),
        Message(0, 0, -5),
        Message(0, 0, 0, 2**40),
        Message(0, 0, 0, 0, b"", 256),
    ],
)
def test_pack_field_out_of_range_is_a_wire_error(msg: Message) -> None:
    with pytest.raises(WireError, match="out of range"):
        pack(msg)


@settings(max_examples=200, deadline=None, database=None)
@given(
    dst=ids,
    src=ids,
    handle=ids,
    reply_to=ids,
    data=st.binary(max_size=2000),
    flags=known_flags,
)
def test_random_envelopes_round_trip(
    dst: int, src: int, handle: int, reply_to: int, data: bytes, flags: int
) -> None:
    msg = Message(dst, src, handle, reply_to, data, flags)
    buf = pack(msg)
    assert LAYOUT.unpack(buf[:20]) == (flags, b"\0\0\0", dst, src, handle, reply_to)
    assert buf[20:] == data
    assert unpack(buf) == msg


@settings(max_examples=200, deadline=None, database=None)
@given(buf=st.binary(max_size=64))
def test_unpack_of_arbitrary_bytes_fails_only_with_wire_error(buf: bytes) -> None:
    try:
        msg = unpack(buf)
    except WireError:
        assert len(buf) < 20 or buf[0] & ~(RAW | DEAD)
    else:
        assert len(buf) >= 20
        assert pack(msg)[:1] + pack(msg)[4:] == buf[:1] + buf[4:]


# -- encode / decode ---------------------------------------------------------


def test_encode_bytes_is_raw_and_not_copied() -> None:
    payload = b"\x80\x05not a pickle \x00\xff"
    flags, data = encode(payload)
    assert flags == RAW
    assert data is payload


def test_raw_bytes_decode_to_themselves() -> None:
    payload = bytes(range(256)) * 4
    msg = unpack(pack(make(5, 6, Handle.CHANNEL, payload, reply_to=9)))
    assert msg.flags == RAW
    assert msg.data == payload
    assert (msg.dst_id, msg.src_id, msg.handle, msg.reply_to) == (5, 6, Handle.CHANNEL, 9)
    assert decode(msg) == payload


class Bytes2(bytes):
    """A bytes subclass: must keep its type, so it is pickled."""


@pytest.mark.parametrize(
    "obj",
    [
        None,
        0,
        "text",
        bytearray(b"mutable"),
        Bytes2(b"sub"),
        (1, "two", 3.0),
        {"key": [b"bytes", None, {1, 2}]},
        ValueError("boom"),
    ],
    ids=repr,
)
def test_other_objects_are_pickled(obj: object) -> None:
    flags, data = encode(obj)
    assert flags == 0
    back = pickle.loads(data)
    assert type(back) is type(obj)
    if isinstance(obj, BaseException):
        assert back.args == obj.args
    else:
        assert back == obj
    decoded = decode(unpack(pack(make(1, 2, Handle.CALL, obj))))
    assert type(decoded) is type(obj)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x80", b"\x80\x05garbage", pickle.dumps({"a": 1})[:-3], b"not a pickle at all"],
    ids=["empty", "one-byte", "garbage", "truncated", "text"],
)
def test_decode_corrupt_pickle_is_a_wire_error(data: bytes) -> None:
    msg = Message(1, 2, 4242, 0, data, 0)
    with pytest.raises(WireError, match="cannot unpickle payload for handle 4242") as info:
        decode(msg)
    assert info.value.__cause__ is not None


def _generator() -> Iterator[int]:
    yield 1


@pytest.mark.parametrize(
    ("make_obj", "type_name"),
    [
        (lambda: lambda: None, "function"),
        (lambda: _generator(), "generator"),
        (lambda: threading.Lock(), "lock"),
    ],
    ids=["lambda", "generator", "lock"],
)
def test_unpicklable_object_is_a_wire_error_naming_its_type(make_obj: Any, type_name: str) -> None:
    with pytest.raises(WireError, match=f"cannot pickle {type_name}"):
        encode(make_obj())


def test_unpicklable_socket_is_a_wire_error_naming_its_type() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        with pytest.raises(WireError, match="cannot pickle socket") as info:
            encode(sock)
        with pytest.raises(WireError, match="cannot pickle socket"):
            make(1, 2, Handle.CALL, sock)
    assert isinstance(info.value.__cause__, Exception)


def test_make_defaults() -> None:
    msg = make(3, 4, Handle.RESULT, (True, None))
    assert msg.reply_to == 0
    assert msg.flags == 0
    assert decode(msg) == (True, None)


scalars = st.none() | st.booleans() | st.integers() | st.text() | st.binary()
picklable = st.recursive(
    scalars | st.floats(allow_nan=False),
    lambda children: (
        st.lists(children) | st.dictionaries(st.text(), children) | st.tuples(children, children)
    ),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None, database=None)
@given(obj=picklable, dst=ids, src=ids, handle=ids, reply_to=ids)
def test_random_objects_round_trip(
    obj: object, dst: int, src: int, handle: int, reply_to: int
) -> None:
    msg = unpack(pack(make(dst, src, handle, obj, reply_to)))
    assert (msg.dst_id, msg.src_id, msg.handle, msg.reply_to) == (dst, src, handle, reply_to)
    assert msg.flags == (RAW if type(obj) is bytes else 0)
    assert decode(msg) == obj
