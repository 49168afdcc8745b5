"""Asking other contexts: requests and calls that wait for their one reply.

A request gets a fresh reply handle; its reply (or a dead reply, or the loss of
the route to its destination) settles it. A cancelled caller tells the other
side to cancel the work and waits, bounded, for it to say so (see
:class:`OnCancel`).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

import attrs
import trio

from . import _wire
from ._errors import LinkClosed, MessageUndeliverable, WireError
from ._remote import rebuild
from ._wire import Handle, Message

log = logging.getLogger("nursery_procs.router")

#: What sending raises when a message cannot leave this process.
UNSENDABLE: Final = (LinkClosed, MessageUndeliverable, WireError)

#: The payload of a reply that acknowledges a cancellation: the work was cancelled.
CANCELLED: Final = (None, "cancelled")
#: ... or: the work cannot be interrupted (a sync function); its reply follows.
DEFERRED: Final = (None, "deferred")


class Sender(Protocol):
    """What asking and answering need of their router."""

    id: int
    #: This context is untrusted: everything it sends is plain data.
    data_only: bool

    async def send(self, msg: Message) -> None: ...

    async def send_or_drop(self, msg: Message) -> bool: ...

    def new_handle(self) -> int: ...

    def add_handler(
        self, handle: int, handler: Callable[[Message, Any], Awaitable[None] | None]
    ) -> None: ...

    def remove_handler(self, handle: int) -> None: ...


class OnCancel(enum.Enum):
    """What a cancelled request does about the work it started."""

    #: Tell the destination to cancel the work, and wait for it to say it did.
    CANCEL = "cancel"
    #: Wait for the work to finish (it cannot be interrupted), then raise.
    WAIT = "wait"
    #: Return at once: the caller deals with the work (for example kills its process).
    ABANDON = "abandon"


class CancelledRemotely(Exception):
    """The other side acknowledged the cancellation of a request (never raised to
    users: their own ``Cancelled`` is)."""


@attrs.define(eq=False)
class _Pending:
    dst_id: int
    event: trio.Event = attrs.field(factory=trio.Event)
    #: Set once settled, or once the other side said the work cannot be interrupted.
    noted: trio.Event = attrs.field(factory=trio.Event)
    deferred: bool = False
    result: Any = None
    error: BaseException | None = None

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        if not self.event.is_set():
            self.result = result
            self.error = error
            self.event.set()
            self.noted.set()

    def defer(self) -> None:
        self.deferred = True
        self.noted.set()


class Asking:
    """The requests this context is waiting on."""

    def __init__(self, sender: Sender) -> None:
        self._sender = sender
        self._pending: dict[int, _Pending] = {}
        #: Reply handles whose caller stopped waiting: a late reply is dropped quietly.
        self._abandoned: set[int] = set()

    async def request(
        self,
        dst_id: int,
        handle: int,
        obj: object,
        *,
        cancel_timeout: float = 5.0,
        on_unacknowledged: Callable[[], None] | None = None,
        on_cancel: OnCancel = OnCancel.CANCEL,
        data: bool = False,
    ) -> Any:
        """Send *obj* to ``(dst_id, handle)`` and wait for the one reply.

        *obj* is pickled, unless this context is untrusted or *data* is true: then
        it is sent as plain data.

        Raises:
            MessageUndeliverable: a dead reply came back.
            ContextDied: the destination (or the route to it) went away first.
            Exception: the remote handler raised this (rebuilt here), or
                :class:`RemoteError` where it cannot be rebuilt.

        **Cancellation:** as *on_cancel* says. With :attr:`OnCancel.CANCEL`, the
        destination is told to cancel the work (CANCEL), and this waits, shielded,
        for its acknowledgement: at most *cancel_timeout* seconds, after which
        *on_unacknowledged* is called; work that cannot be interrupted (a sync
        function in a thread) is waited for, as :func:`trio.to_thread.run_sync`
        does. With :attr:`OnCancel.WAIT` this waits, shielded, for the reply (or
        for the destination to be gone), then raises; with
        :attr:`OnCancel.ABANDON` it raises at once.
        """
        sender = self._sender
        reply_to = sender.new_handle()
        pending = _Pending(dst_id)
        self._pending[reply_to] = pending
        sender.add_handler(reply_to, self._on_reply)
        sent = False
        try:
            data_only = data or sender.data_only
            msg = _wire.make(dst_id, sender.id, handle, obj, reply_to, data_only=data_only)
            await sender.send(msg)
            sent = True
            await pending.event.wait()
        except trio.Cancelled:
            if not sent or pending.event.is_set():
                raise
            if on_cancel is OnCancel.CANCEL:
                await self._cancel_remote(
                    dst_id, reply_to, pending, cancel_timeout, on_unacknowledged
                )
            elif on_cancel is OnCancel.WAIT:
                with trio.CancelScope(shield=True):
                    await pending.event.wait()
            raise
        finally:
            del self._pending[reply_to]
            sender.remove_handler(reply_to)
            if sent and not pending.event.is_set():
                self._abandoned.add(reply_to)
        if pending.error is not None:
            raise pending.error
        return pending.result

    async def _cancel_remote(
        self,
        dst_id: int,
        reply_to: int,
        pending: _Pending,
        wait_at_most: float,
        on_unacknowledged: Callable[[], None] | None,
    ) -> None:
        sender = self._sender
        with trio.CancelScope(shield=True):
            cancel = _wire.make_data(dst_id, sender.id, Handle.CANCEL, reply_to)
            if not await sender.send_or_drop(cancel):
                return  # the work is going away with its context
            with trio.move_on_after(wait_at_most):
                await pending.noted.wait()
            if pending.deferred:
                await pending.event.wait()
            elif not pending.event.is_set():
                log.warning(
                    "%r: context %d did not acknowledge a cancellation within %s s",
                    sender,
                    dst_id,
                    wait_at_most,
                )
                if on_unacknowledged is not None:
                    on_unacknowledged()

    def _on_reply(self, msg: Message, route: object) -> None:
        pending = self._pending.get(msg.handle)
        if pending is None:  # pragma: no cover - removed under us
            return
        if msg.is_dead:
            pending.settle(error=MessageUndeliverable(msg.data.decode("utf-8", "replace")))
            return
        try:
            ok, value = _wire.decode(msg)
        except (WireError, ValueError, TypeError) as exc:
            pending.settle(error=WireError(f"malformed reply: {exc}"))
            return
        if ok is None:
            if value == DEFERRED[1]:
                pending.defer()
            else:
                pending.settle(error=CancelledRemotely("the work was cancelled"))
        elif ok:
            pending.settle(result=value)
        else:
            pending.settle(error=rebuild(value, trusted=msg.is_pickle))

    def late_reply(self, handle: int) -> bool:
        """Whether *handle* was a reply handle whose caller stopped waiting (a reply
        that comes after that is dropped quietly, once)."""
        if handle in self._abandoned:
            self._abandoned.discard(handle)
            return True
        return False

    def forget(self, ids: frozenset[int], error: Callable[[int], BaseException]) -> None:
        """The contexts *ids* are gone: requests waiting on them fail with *error*."""
        for pending in list(self._pending.values()):
            if pending.dst_id in ids:
                pending.settle(error=error(pending.dst_id))
