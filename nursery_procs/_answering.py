"""Answering requests and calls here: a task per request, remote cancellation,
sync functions off the event loop, and a reply or an error with its type."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from . import _wire
from ._asking import CANCELLED, DEFERRED, Sender
from ._errors import LinkClosed, MessageUndeliverable, WireError
from ._inboxes import Inboxes
from ._remote import failed
from ._wire import Handle, Message

log = logging.getLogger("nursery_procs.router")

#: ``serve`` key for a server answering requests from every context.
ANY_SOURCE = -1


def _take_queued(queue: trio.MemoryReceiveChannel[Message]) -> list[Message]:
    taken: list[Message] = []
    while True:
        try:
            taken.append(queue.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return taken


class Answering:
    """The requests this context answers: who serves them, and those in progress."""

    def __init__(self, sender: Sender, inboxes: Inboxes) -> None:
        self._sender = sender
        self._inboxes = inboxes
        self._servers: dict[int, tuple[Callable[[Any], Any], trio.Nursery]] = {}
        #: Requests being answered here, by ``(requester, reply_to)``: their scopes,
        #: and whether the work is a sync function (which cannot be interrupted).
        self._answering: dict[tuple[int, int], tuple[trio.CancelScope, bool]] = {}
        #: Requests waiting in an inbox, and those among them already cancelled.
        self._queued: set[tuple[int, int]] = set()
        self._cancelled: set[tuple[int, int]] = set()

    def serve(self, src_id: int, handler: Callable[[Any], Any], nursery: trio.Nursery) -> None:
        """Answer REQUESTs from *src_id* (or :data:`ANY_SOURCE`) with *handler*
        straight from the pump: a sync handler's reply is sent without a task
        switch; an async one runs in a task of *nursery*."""
        if src_id in self._servers:
            raise RuntimeError(f"requests from context {src_id} are already being served")
        self._servers[src_id] = (handler, nursery)

    def stop(self, src_id: int) -> None:
        self._servers.pop(src_id, None)

    async def serve_all(
        self,
        src_id: int,
        handler: Callable[[Any], Any],
        queue: trio.MemoryReceiveChannel[Message] | None,
        task_status: trio.TaskStatus[None],
    ) -> None:
        """Answer the requests from *src_id* with *handler*: those queued so far in
        *queue* (``None``: every context's, for :data:`ANY_SOURCE`), then each as it
        comes, until the queue ends (the context is gone) or for ever."""
        async with trio.open_nursery() as nursery:
            for msg in self.queued() if queue is None else _take_queued(queue):
                await self.answer_soon(msg, handler, nursery, None)
            self.serve(src_id, handler, nursery)
            task_status.started()
            try:
                if queue is None:
                    await trio.sleep_forever()
                async for _ in queue:  # nothing more is queued: it ends when the context is gone
                    pass
            finally:
                self.stop(src_id)

    def queued(self) -> list[Message]:
        """Take every request queued (unserved) so far, from every context."""
        return self._inboxes.take_all(Handle.REQUEST)

    def on_request(self, msg: Message, route: object) -> Awaitable[None] | None:
        server = self._servers.get(msg.src_id) or self._servers.get(ANY_SOURCE)
        if server is None:
            if msg.reply_to:
                self._queued.add((msg.src_id, msg.reply_to))
            self._inboxes.put(msg)
            return None
        handler, nursery = server
        return self.answer_soon(msg, handler, nursery, None)

    async def answer_soon(
        self,
        msg: Message,
        handler: Callable[..., Any],
        nursery: trio.Nursery,
        call: tuple[tuple[Any, ...], dict[str, Any]] | None,
        *,
        inline: bool = False,
    ) -> None:
        """Run *handler* on *msg*'s payload (or, for a call, on *call*'s arguments)
        and reply.

        A request's sync handler runs here and now (the fastest path). An async
        handler or function runs in a task of *nursery*, and a called sync function
        in a worker thread, so that neither holds up the pump: SHUTDOWN, other
        requests and cancellations are still read while they run. With *inline*
        (a call whose caller waits or kills the child if cancelled), a sync
        function runs here and now too.
        """
        key = (msg.src_id, msg.reply_to)
        self._queued.discard(key)
        if key in self._cancelled:  # cancelled while it waited in an inbox
            self._cancelled.discard(key)
            return
        if call is not None and not inline and not inspect.iscoroutinefunction(handler):
            work = functools.partial(handler, *call[0], **call[1])
            nursery.start_soon(self._answer_in_thread, msg, work)
            return
        try:
            result = handler(_wire.decode(msg)) if call is None else handler(*call[0], **call[1])
        except Exception as exc:
            await self.reply(msg, failed(exc, data_only=self._sender.data_only))
            return
        if inspect.isawaitable(result):
            nursery.start_soon(self._finish_answer, msg, result)
        else:
            await self.reply(msg, (True, result))

    async def _finish_answer(self, msg: Message, pending: Awaitable[Any]) -> None:
        key = (msg.src_id, msg.reply_to)
        outcome: tuple[Any, Any] = CANCELLED
        with trio.CancelScope() as scope:
            self._answering[key] = (scope, False)
            try:
                outcome = (True, await pending)
            except Exception as exc:
                outcome = failed(exc, data_only=self._sender.data_only)
            finally:
                del self._answering[key]
        await self.reply(msg, outcome)

    async def _answer_in_thread(self, msg: Message, work: Callable[[], Any]) -> None:
        key = (msg.src_id, msg.reply_to)
        self._answering[key] = (trio.CancelScope(), True)
        try:
            outcome: tuple[Any, Any] = (True, await trio.to_thread.run_sync(work))
        except Exception as exc:
            outcome = failed(exc, data_only=self._sender.data_only)
        finally:
            del self._answering[key]
        await self.reply(msg, outcome)

    def on_cancel(self, msg: Message, route: object) -> Awaitable[None] | None:
        try:
            reply_to = int(_wire.decode(msg))
        except (WireError, ValueError, TypeError):
            log.warning("%r: dropped a malformed CANCEL from %d", self._sender, msg.src_id)
            return None
        key = (msg.src_id, reply_to)
        answering = self._answering.get(key)
        if answering is not None:
            scope, uninterruptible = answering
            if uninterruptible:
                return self._send_ack(msg.src_id, reply_to, DEFERRED)
            scope.cancel()  # its task acknowledges with its reply
            return None
        if key in self._queued:
            self._queued.discard(key)
            self._cancelled.add(key)
            return self._send_ack(msg.src_id, reply_to, CANCELLED)
        return None  # answered already: that reply is the acknowledgement

    async def _send_ack(self, dst_id: int, reply_to: int, outcome: tuple[Any, Any]) -> None:
        sender = self._sender
        if not await sender.send_or_drop(_wire.make_data(dst_id, sender.id, reply_to, outcome)):
            log.debug("%r: the requester %d went away before its reply", sender, dst_id)

    async def reply(self, msg: Message, outcome: tuple[Any, object]) -> None:
        """Answer *msg* (which carried a ``reply_to``); swallow a vanished requester."""
        if not msg.reply_to:
            return
        sender = self._sender
        try:
            reply = _wire.make(
                msg.src_id, sender.id, msg.reply_to, outcome, data_only=sender.data_only
            )
        except WireError as exc:
            reply = self._failure_reply(msg, exc)
        try:
            await sender.send(reply)
        except (LinkClosed, MessageUndeliverable):
            log.debug("%r: the requester %d went away before its reply", sender, msg.src_id)
        except WireError as exc:  # over the size limit
            await sender.send_or_drop(self._failure_reply(msg, exc))

    def _failure_reply(self, msg: Message, exc: WireError) -> Message:
        sender = self._sender
        outcome = failed(exc, data_only=sender.data_only)
        return _wire.make(msg.src_id, sender.id, msg.reply_to, outcome, data_only=sender.data_only)

    def forget(self, ids: frozenset[int]) -> None:
        """The contexts *ids* are gone: forget their queued and cancelled requests."""
        self._queued = {key for key in self._queued if key[0] not in ids}
        self._cancelled = {key for key in self._cancelled if key[0] not in ids}
