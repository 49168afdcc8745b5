"""The message envelope and its codec.

Every message between contexts is one binary WebSocket message holding a fixed
20-byte header followed by the payload::

    flags (u8) | 3 bytes zero | dst_id (u32) | src_id (u32) | handle (u32) | reply_to (u32)

``flags`` says how the payload is encoded — :data:`RAW` bytes, :data:`DATA`
(msgpack: plain data only, nothing that can run code when decoded), or else a
pickle — and whether the message is a *dead* reply. Handles below
:data:`FIRST_DYNAMIC_HANDLE` are reserved for the runtime (see :class:`Handle`);
the rest are allocated per process for replies.

The runtime's own messages (routes, logs, readiness, cancellation) are always
:data:`DATA`. Users' payloads are pickled between trusted contexts; an untrusted
context encodes everything it sends as :data:`DATA`, and routers refuse pickles
that arrive from it (see ``docs/security.rst``).
"""

from __future__ import annotations

import enum
import io
import pickle
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

import msgpack

from ._errors import WireError

HEADER = struct.Struct("!BxxxIIII")

#: Flag: the payload is the raw bytes of the message, not a pickle.
RAW = 0x01
#: Flag: this message is a dead reply; its payload is the UTF-8 reason.
DEAD = 0x02
#: Flag: the payload is msgpack (data only: decoding it cannot run code).
DATA = 0x04
_KNOWN_FLAGS = RAW | DEAD | DATA
#: The flags of payloads that are not pickles.
NOT_PICKLED = RAW | DEAD | DATA

#: Default largest message (header included) a link accepts.
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024


class Handle(enum.IntEnum):
    """Reserved handles: where a message goes inside the receiving context."""

    #: Shut this context down gracefully (cancel its target, close its children).
    SHUTDOWN = 1
    #: Run an importable function; the reply carries its outcome.
    CALL = 2
    #: A child's target finished; the payload carries its outcome.
    RESULT = 3
    #: A context behind the sender came up: ``(id, name, parent_id, pid)``.
    ADD_ROUTE = 4
    #: Contexts behind the sender are gone: a tuple of ids.
    DEL_ROUTE = 5
    #: Ask the root for a block of context ids.
    ALLOCATE_ID = 6
    #: A forwarded :mod:`logging` record.
    LOG = 7
    #: A dead notice for a message that had no ``reply_to``.
    DEAD = 8
    #: User messages (``Context.send`` / ``Context.receive``).
    CHANNEL = 9
    #: User requests (``Context.request`` / ``Context.serve_requests``).
    REQUEST = 10
    #: First message on a new link, parent to child: the bootstrap spec.
    BOOTSTRAP = 11
    #: Child to parent: the bootstrap is done and the target is starting.
    READY = 12
    #: Cancel the work a request or call started: the payload is its ``reply_to``.
    CANCEL = 13
    #: Child to parent: send me this module (a shipped runtime lacks it); the
    #: reply carries module records (see ``nursery_procs._importer``).
    GET_MODULE = 14
    #: Parent to child: module records sent ahead of the message that needs them.
    LOAD_MODULE = 15


FIRST_DYNAMIC_HANDLE = 100


class Message(NamedTuple):
    """One routed message: Mitogen's ``(dst_id, src_id, handle, reply_to, data)``."""

    dst_id: int
    src_id: int
    handle: int
    reply_to: int = 0
    data: bytes = b""
    flags: int = 0

    @property
    def is_dead(self) -> bool:
        return bool(self.flags & DEAD)

    @property
    def is_pickle(self) -> bool:
        """Whether decoding the payload means unpickling it."""
        return not self.flags & NOT_PICKLED


def pack(msg: Message) -> bytes:
    """Encode *msg* into one buffer ready for a link."""
    try:
        header = HEADER.pack(msg.flags, msg.dst_id, msg.src_id, msg.handle, msg.reply_to)
    except struct.error as exc:
        raise WireError(f"envelope field out of range: {exc}") from None
    return header + msg.data


def unpack(buf: bytes) -> Message:
    """Decode one buffer from a link; raise :class:`WireError` if it is malformed."""
    if len(buf) < HEADER.size:
        raise WireError(
            f"message of {len(buf)} bytes is shorter than the {HEADER.size}-byte header"
        )
    flags, dst_id, src_id, handle, reply_to = HEADER.unpack_from(buf)
    if flags & ~_KNOWN_FLAGS:
        raise WireError(f"unknown flags 0x{flags:02x}")
    return Message(dst_id, src_id, handle, reply_to, buf[HEADER.size :], flags)


_packer = msgpack.Packer()


def encode_data(obj: object) -> bytes:
    """Encode *obj* as plain data (msgpack), or raise :class:`WireError` saying why not."""
    try:
        packed: bytes = _packer.pack(obj)
        return packed
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(
            f"not plain data ({exc}): an untrusted context sends only plain data (None, "
            "bool, int, float, str, bytes, and lists, tuples and dicts of them; see "
            "docs/security.rst)"
        ) from None


def decode_data(data: bytes) -> Any:
    """Decode a :data:`DATA` payload; raise :class:`WireError` if it is malformed."""
    try:
        return msgpack.unpackb(data, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types for malformed input
        raise WireError(f"malformed data payload: {exc!r}") from None


def encode(obj: object, *, data_only: bool = False) -> tuple[int, bytes]:
    """Encode a payload: ``bytes`` travel as they are; anything else is pickled, or
    with *data_only* encoded as plain data."""
    if type(obj) is bytes:
        return RAW, obj
    if data_only:
        return DATA, encode_data(obj)
    try:
        return 0, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise WireError(f"cannot pickle {type(obj).__name__}: {exc}") from exc


_main_loader: Callable[[], None] | None = None


def set_main_loader(loader: Callable[[], None] | None) -> None:
    """In a child: how to load the parent's ``__main__`` when a payload needs it."""
    global _main_loader
    _main_loader = loader


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        loader = _main_loader
        if module in ("__main__", "__mp_main__") and loader is not None:
            loader()
        return super().find_class(module, name)


def loads(data: bytes) -> Any:
    """Unpickle *data*, loading the parent's ``__main__`` first if it refers to it."""
    if _main_loader is None:
        return pickle.loads(data)
    return _Unpickler(io.BytesIO(data)).load()


def decode(msg: Message) -> Any:
    """Decode a payload encoded by :func:`encode`.

    Routers never let a pickle arrive from an untrusted context (see
    :meth:`Message.is_pickle`), so what is unpickled here came from a trusted one.
    """
    if msg.flags & RAW:
        return msg.data
    if msg.flags & DATA:
        return decode_data(msg.data)
    try:
        return loads(msg.data)
    except Exception as exc:
        raise WireError(f"cannot unpickle payload for handle {msg.handle}: {exc!r}") from exc


def make(
    dst_id: int,
    src_id: int,
    handle: int,
    obj: object,
    reply_to: int = 0,
    *,
    data_only: bool = False,
) -> Message:
    """Build a message carrying *obj* (as plain data only, with *data_only*)."""
    flags, data = encode(obj, data_only=data_only)
    return Message(dst_id, src_id, handle, reply_to, data, flags)


def make_data(dst_id: int, src_id: int, handle: int, obj: object, reply_to: int = 0) -> Message:
    """Build one of the runtime's own messages: always plain data."""
    return Message(dst_id, src_id, handle, reply_to, encode_data(obj), DATA)
