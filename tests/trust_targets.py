"""Targets for the untrusted-children tests: children that send what they should not."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import trio

import nursery_procs
from nursery_procs import _wire
from nursery_procs._router import current_router
from nursery_procs._wire import Handle, Message


class Canary:
    """Unpickling this creates a file: proof that someone unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


def crafted(dst_id: int, handle: int, payload: object, reply_to: int = 0) -> Message:
    """A message whose payload is a pickle, whatever this context is supposed to send."""
    router = current_router()
    return Message(dst_id, router.id, handle, reply_to, pickle.dumps(payload))


async def send_crafted_pickles(canary: str) -> None:
    """Send pickles that would create *canary* if unpickled, on every way up, then
    report what came back."""
    router = current_router()
    parent_id = nursery_procs.parent().id
    bomb = Canary(canary)
    for handle in (
        Handle.CHANNEL,
        Handle.REQUEST,
        Handle.LOG,
        Handle.READY,
        Handle.RESULT,
        Handle.ADD_ROUTE,
    ):
        await router.send(crafted(parent_id, handle, bomb))
    # A pickle hidden in a data payload: a failure whose "pickled exception" is a bomb.
    failure = [pickle.dumps(bomb), "ValueError", "boom", "traceback", None]
    await router.send(_wire.make_data(parent_id, router.id, Handle.RESULT, [False, failure]))
    await nursery_procs.parent().send("done")
    await trio.sleep_forever()


class Opaque:
    """An object with no plain-data form."""


def returns_an_object() -> Opaque:
    return Opaque()


def raises_value_error(text: str) -> None:
    raise ValueError(text, 42)


def returns_containers() -> Any:
    return {"tuple": (1, "two"), "list": [b"three"], "nested": {"n": None}}


def type_name(obj: Any) -> str:
    """What arrived: calls into an untrusted child may carry any picklable object."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


async def echo_requests() -> None:
    await nursery_procs.parent().serve_requests(lambda obj: obj)
