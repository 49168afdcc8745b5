"""Per-process routing: the route table, handles, pending replies and dead replies.

Each process has one :class:`Router` per Trio run. It knows the link toward its
parent (the default route upward) and, for each child link, the set of context
ids that live behind it. A message for another context is forwarded; a message
for this context goes to the handler registered for its handle; a message that
cannot be delivered is answered with a *dead* reply so that nobody waits on it.
"""

from __future__ import annotations

import enum
import functools
import inspect
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

import attrs
import trio

from . import _wire
from ._errors import (
    ContextDied,
    LinkClosed,
    MessageUndeliverable,
    WireError,
)
from ._link import CLOSE_PROTOCOL_ERROR, Link
from ._remote import failed, rebuild
from ._wire import Handle, Message

log = logging.getLogger("nursery_procs.router")

ROOT_ID = 0
#: ``serve_requests`` key for a server answering requests from every context.
ANY_SOURCE = -1
_ROUTER: trio.lowlevel.RunVar[Router] = trio.lowlevel.RunVar("nursery_procs.router")
_CHILD_CONTROL = frozenset((Handle.RESULT, Handle.LOG, Handle.READY))
#: How many ids the root hands out at once to a context that starts children.
ID_BLOCK_SIZE = 64


#: What :meth:`Router.send` raises when a message cannot leave this process.
UNSENDABLE: Final = (LinkClosed, MessageUndeliverable, WireError)

#: A message handler: sync, or returning an awaitable that the link's pump awaits.
Handler = Callable[["Message", "Route | None"], Awaitable[None] | None]


class RouteOwner(Protocol):
    """Who is told about the control messages of a direct child (its supervisor)."""

    def handle_control(self, msg: Message) -> None: ...


@attrs.define(eq=False)
class Route:
    """A link to a neighbouring context and the ids reachable through it."""

    link: Link
    #: The id of the context at the other end of the link.
    peer_id: int
    #: Every id reachable through this link (the peer and, for a child, its subtree).
    ids: set[int] = attrs.field(factory=set)
    #: ``True`` for the link toward this process's parent.
    upward: bool = False
    owner: RouteOwner | None = None
    #: ``False`` for a link to an untrusted child: nothing that arrives on it is
    #: unpickled (pickled payloads are refused with a dead reply).
    trusted: bool = True


@attrs.frozen
class ContextInfo:
    """What a router knows about a context it can reach."""

    #: The context's id.
    id: int
    #: The context's name.
    name: str
    #: The id of the context that started it.
    parent_id: int
    #: Its process id.
    pid: int


#: The payload of a reply that acknowledges a cancellation: the work was cancelled.
_CANCELLED: Final = (None, "cancelled")
#: ... or: the work cannot be interrupted (a sync function); its reply follows.
_DEFERRED: Final = (None, "deferred")


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


class OnCancel(enum.Enum):
    """What a cancelled :meth:`Router.request` does about the work it started."""

    #: Tell the destination to cancel the work, and wait for it to say it did.
    CANCEL = "cancel"
    #: Wait for the work to finish (it cannot be interrupted), then raise.
    WAIT = "wait"
    #: Return at once: the caller deals with the work (for example kills its process).
    ABANDON = "abandon"


class CancelledRemotely(Exception):
    """The other side acknowledged the cancellation of a request (never raised to
    users: their own ``Cancelled`` is)."""


def current_router() -> Router:
    """This process's router (the root router, id 0, unless this is a child)."""
    try:
        return _ROUTER.get()
    except LookupError:
        router = Router(ROOT_ID, "root")
        _ROUTER.set(router)
        return router


class Router:
    """The router of one process (one Trio run).

    Args:
        context_id: this context's id (the root is 0).
        name: this context's name.
        siblings_may_talk: when ``False``, a message arriving from one child link
            and bound for another is refused with a dead reply.
    """

    def __init__(self, context_id: int, name: str, *, siblings_may_talk: bool = True) -> None:
        self.id = context_id
        self.name = name
        self.siblings_may_talk = siblings_may_talk
        #: This context is untrusted: everything it sends is plain data, never a pickle.
        self.data_only = False
        self.parent_route: Route | None = None
        self._routes: dict[int, Route] = {}
        self._handlers: dict[int, Handler] = {}
        self._request_servers: dict[int, tuple[Callable[[Any], Any], trio.Nursery]] = {}
        self._pending: dict[int, _Pending] = {}
        self._next_handle = _wire.FIRST_DYNAMIC_HANDLE
        self._inboxes: dict[
            tuple[int, int],
            tuple[trio.MemorySendChannel[Message], trio.MemoryReceiveChannel[Message]],
        ] = {}
        self._next_id = 1
        self._id_block: list[int] = []
        self._id_lock = trio.Lock()
        #: Contexts this router knows about (its subtree; for the root, the whole tree).
        self.directory: dict[int, ContextInfo] = {}
        self._gone_waiters: dict[int, trio.Event] = {}
        #: Requests being answered here, by ``(requester, reply_to)``: their scopes,
        #: and whether the work is a sync function (which cannot be interrupted).
        self._answering: dict[tuple[int, int], tuple[trio.CancelScope, bool]] = {}
        #: Requests waiting in an inbox, and those among them already cancelled.
        self._queued: set[tuple[int, int]] = set()
        self._cancelled: set[tuple[int, int]] = set()
        #: Reply handles whose caller stopped waiting: a late reply is dropped quietly.
        self._abandoned: set[int] = set()
        self._handlers[Handle.ADD_ROUTE] = self._on_add_route
        self._handlers[Handle.DEL_ROUTE] = self._on_del_route
        self._handlers[Handle.DEAD] = self._on_dead_notice
        self._handlers[Handle.CHANNEL] = self._to_inbox
        self._handlers[Handle.REQUEST] = self._on_request
        self._handlers[Handle.CANCEL] = self._on_cancel
        if context_id == ROOT_ID:
            self._handlers[Handle.ALLOCATE_ID] = self._on_allocate_id

    def __repr__(self) -> str:
        return f"<Router {self.id} {self.name!r}>"

    # -- handles ---------------------------------------------------------

    def add_handler(self, handle: int, handler: Handler) -> None:
        """Deliver messages for *handle* to *handler*.

        It runs in the link's pump: if it returns an awaitable, the pump awaits it
        before reading the next message, so it must not wait for long.
        """
        self._handlers[handle] = handler

    def serve_requests(
        self, src_id: int, handler: Callable[[Any], Any], nursery: trio.Nursery
    ) -> None:
        """Answer REQUESTs from *src_id* with *handler* straight from the pump.

        A sync handler's reply is sent without a task switch; an async one runs in
        a task of *nursery*.
        """
        if src_id in self._request_servers:
            raise RuntimeError(f"requests from context {src_id} are already being served")
        self._request_servers[src_id] = (handler, nursery)

    def stop_serving_requests(self, src_id: int) -> None:
        self._request_servers.pop(src_id, None)

    def queued_requests(self) -> list[Message]:
        """Take every request queued (unserved) so far, from every context."""
        taken: list[Message] = []
        for (_, handle), (_, receive) in list(self._inboxes.items()):
            if handle != Handle.REQUEST:
                continue
            while True:
                try:
                    taken.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
        return taken

    def _on_request(self, msg: Message, route: Route | None) -> Awaitable[None] | None:
        server = self._request_servers.get(msg.src_id) or self._request_servers.get(ANY_SOURCE)
        if server is None:
            self._to_inbox(msg, route)
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
        (a call whose caller kills the child if cancelled), a sync function runs
        here and now too.
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
            await self.reply(msg, failed(exc, data_only=self.data_only))
            return
        if inspect.isawaitable(result):
            nursery.start_soon(self._finish_answer, msg, result)
        else:
            await self.reply(msg, (True, result))

    async def _finish_answer(self, msg: Message, pending: Awaitable[Any]) -> None:
        key = (msg.src_id, msg.reply_to)
        outcome: tuple[Any, Any] = _CANCELLED
        with trio.CancelScope() as scope:
            self._answering[key] = (scope, False)
            try:
                outcome = (True, await pending)
            except Exception as exc:
                outcome = failed(exc, data_only=self.data_only)
            finally:
                del self._answering[key]
        await self.reply(msg, outcome)

    async def _answer_in_thread(self, msg: Message, work: Callable[[], Any]) -> None:
        key = (msg.src_id, msg.reply_to)
        self._answering[key] = (trio.CancelScope(), True)
        try:
            outcome: tuple[Any, Any] = (True, await trio.to_thread.run_sync(work))
        except Exception as exc:
            outcome = failed(exc, data_only=self.data_only)
        finally:
            del self._answering[key]
        await self.reply(msg, outcome)

    def _on_cancel(self, msg: Message, route: Route | None) -> Awaitable[None] | None:
        try:
            reply_to = int(_wire.decode(msg))
        except (WireError, ValueError, TypeError):
            self._drop(msg, route, "malformed CANCEL")
            return None
        key = (msg.src_id, reply_to)
        answering = self._answering.get(key)
        if answering is not None:
            scope, uninterruptible = answering
            if uninterruptible:
                return self._send_reply(msg.src_id, reply_to, _DEFERRED)
            scope.cancel()  # its task acknowledges with its reply
            return None
        if key in self._queued:
            self._queued.discard(key)
            self._cancelled.add(key)
            return self._send_reply(msg.src_id, reply_to, _CANCELLED)
        return None  # answered already: that reply is the acknowledgement

    def new_handle(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        return handle

    def inbox(
        self, src_id: int, handle: int = Handle.CHANNEL
    ) -> trio.MemoryReceiveChannel[Message]:
        """The queue of messages from *src_id* for a user handle (CHANNEL or REQUEST).

        It is unbounded on purpose: a reader that stopped reading must never stop
        the link's pump, or replies and SHUTDOWN behind it would never arrive.
        """
        pair = self._inboxes.get((src_id, handle))
        if pair is None:
            pair = trio.open_memory_channel[Message](math.inf)
            self._inboxes[(src_id, handle)] = pair
        return pair[1]

    def close_inboxes(self, src_id: int) -> None:
        for handle in (Handle.CHANNEL, Handle.REQUEST):
            pair = self._inboxes.pop((src_id, handle), None)
            if pair is not None:
                pair[0].close()

    def _to_inbox(self, msg: Message, route: Route | None) -> None:
        if msg.handle == Handle.REQUEST and msg.reply_to:
            self._queued.add((msg.src_id, msg.reply_to))
        pair = self._inboxes.get((msg.src_id, msg.handle))
        if pair is None:
            self.inbox(msg.src_id, msg.handle)
            pair = self._inboxes[(msg.src_id, msg.handle)]
        pair[0].send_nowait(msg)

    # -- routes ----------------------------------------------------------

    def route_for(self, dst_id: int) -> Route | None:
        route = self._routes.get(dst_id)
        if route is not None:
            return route
        return self.parent_route

    def knows(self, context_id: int) -> bool:
        return context_id in self._routes

    def set_parent(self, link: Link, parent_id: int) -> Route:
        self.parent_route = Route(link, parent_id, {parent_id}, upward=True)
        return self.parent_route

    async def add_child_route(
        self, link: Link, info: ContextInfo, owner: RouteOwner, *, trusted: bool = True
    ) -> Route:
        """Register a direct child and tell the parent (ADD_ROUTE upward).

        Nothing that arrives from an untrusted child (or its subtree) is unpickled.
        """
        route = Route(link, info.id, {info.id}, owner=owner, trusted=trusted)
        self._routes[info.id] = route
        self.directory[info.id] = info
        await self._announce(Handle.ADD_ROUTE, (info.id, info.name, info.parent_id, info.pid))
        return route

    async def remove_route(self, route: Route, error: Callable[[int], BaseException]) -> None:
        """Forget every context behind *route*; fail requests waiting on them."""
        ids = frozenset(i for i, r in self._routes.items() if r is route)
        await self._forget(ids, error)

    async def _forget(self, ids: frozenset[int], error: Callable[[int], BaseException]) -> None:
        if not ids:
            return
        self._queued = {key for key in self._queued if key[0] not in ids}
        self._cancelled = {key for key in self._cancelled if key[0] not in ids}
        for context_id in ids:
            self._routes.pop(context_id, None)
            self.directory.pop(context_id, None)
            self.close_inboxes(context_id)
        for pending in list(self._pending.values()):
            if pending.dst_id in ids:
                pending.settle(error=error(pending.dst_id))
        for context_id in ids:
            waiter = self._gone_waiters.pop(context_id, None)
            if waiter is not None:
                waiter.set()
        await self._announce(Handle.DEL_ROUTE, tuple(sorted(ids)))

    async def wait_gone(self, context_id: int) -> None:
        """Wait until the context is no longer reachable from here (its route was removed)."""
        if context_id not in self._routes:
            return
        waiter = self._gone_waiters.setdefault(context_id, trio.Event())
        await waiter.wait()

    async def _announce(self, handle: int, payload: object) -> None:
        if self.parent_route is None:
            return
        msg = _wire.make_data(self.parent_route.peer_id, self.id, handle, payload)
        try:
            await self._send_on(self.parent_route, msg)
        except LinkClosed:
            pass

    def _on_add_route(self, msg: Message, route: Route | None) -> Awaitable[None] | None:
        if route is None or route.upward or msg.src_id != route.peer_id:
            self._drop(msg, route, "ADD_ROUTE from a context that is not an immediate child")
            return None
        try:
            context_id, name, parent_id, pid = _wire.decode(msg)
        except (WireError, ValueError, TypeError):
            self._drop(msg, route, "malformed ADD_ROUTE")
            return None
        if (
            not isinstance(context_id, int)
            or parent_id not in route.ids
            or context_id in self._routes
            or context_id in (self.id, ROOT_ID)
        ):
            self._drop(msg, route, f"ADD_ROUTE for {context_id} under {parent_id} is not allowed")
            return None
        route.ids.add(context_id)
        self._routes[context_id] = route
        self.directory[context_id] = ContextInfo(context_id, str(name), parent_id, int(pid))
        return self._announce(Handle.ADD_ROUTE, (context_id, name, parent_id, pid))

    def _on_del_route(self, msg: Message, route: Route | None) -> Awaitable[None] | None:
        if route is None or route.upward or msg.src_id != route.peer_id:
            self._drop(msg, route, "DEL_ROUTE from a context that is not an immediate child")
            return None
        try:
            ids = frozenset(int(i) for i in _wire.decode(msg))
        except (WireError, ValueError, TypeError):
            self._drop(msg, route, "malformed DEL_ROUTE")
            return None
        # A child may only withdraw contexts behind itself, never itself.
        ids = frozenset(i for i in ids if i in route.ids and i != route.peer_id)
        route.ids -= ids

        def gone(context_id: int) -> BaseException:
            info = self.directory.get(context_id)
            name = info.name if info else str(context_id)
            return ContextDied(name, context_id, detail="its route was lost")

        return self._forget(ids, gone)

    def _on_allocate_id(self, msg: Message, route: Route | None) -> Awaitable[None]:
        start = self._next_id
        self._next_id += ID_BLOCK_SIZE
        return self.reply(msg, (True, (start, start + ID_BLOCK_SIZE)))

    async def allocate_id(self) -> int:
        """A fresh context id: counted at the root, from blocks the root hands out elsewhere."""
        if self.id == ROOT_ID:
            context_id = self._next_id
            self._next_id += 1
            return context_id
        async with self._id_lock:
            if not self._id_block:
                start, stop = await self.request(
                    ROOT_ID, Handle.ALLOCATE_ID, ID_BLOCK_SIZE, data=True
                )
                self._id_block = list(range(int(start), int(stop)))
            return self._id_block.pop(0)

    # -- sending ---------------------------------------------------------

    async def _send_on(self, route: Route, msg: Message) -> None:
        header = _wire.HEADER.pack(msg.flags, msg.dst_id, msg.src_id, msg.handle, msg.reply_to)
        if len(header) + len(msg.data) > route.link.max_message_size:
            raise WireError(
                f"message of {len(msg.data)} bytes is over the link's limit of "
                f"{route.link.max_message_size} bytes"
            )
        await route.link.send(header, msg.data)

    async def send_or_drop(self, msg: Message) -> bool:
        """Send *msg* if it can be; return whether it was sent.

        For messages whose loss only means their destination has gone (replies to
        a vanished requester, SHUTDOWN to a dying child, dead replies, logs).
        """
        try:
            await self.send(msg)
        except UNSENDABLE:
            return False
        return True

    async def send(self, msg: Message) -> None:
        """Send *msg* toward its destination.

        Raises:
            MessageUndeliverable: there is no route to the destination.
            LinkClosed: the link toward it is closed.
            WireError: the message is larger than the link accepts.
        """
        if msg.dst_id == self.id:
            await self._deliver(msg, None)
            return
        route = self.route_for(msg.dst_id)
        if route is None:
            raise MessageUndeliverable(f"no route to context {msg.dst_id} (from {self.id})")
        await self._send_on(route, msg)

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
        reply_to = self.new_handle()
        pending = _Pending(dst_id)
        self._pending[reply_to] = pending
        self._handlers[reply_to] = self._on_reply
        sent = False
        try:
            msg = _wire.make(
                dst_id, self.id, handle, obj, reply_to, data_only=data or self.data_only
            )
            await self.send(msg)
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
            del self._handlers[reply_to]
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
        with trio.CancelScope(shield=True):
            if not await self.send_or_drop(
                _wire.make_data(dst_id, self.id, Handle.CANCEL, reply_to)
            ):
                return  # the work is going away with its context
            with trio.move_on_after(wait_at_most):
                await pending.noted.wait()
            if pending.deferred:
                await pending.event.wait()
            elif not pending.event.is_set():
                log.warning(
                    "%r: context %d did not acknowledge a cancellation within %s s",
                    self,
                    dst_id,
                    wait_at_most,
                )
                if on_unacknowledged is not None:
                    on_unacknowledged()

    def _on_reply(self, msg: Message, route: Route | None) -> None:
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
            if value == _DEFERRED[1]:
                pending.defer()
            else:
                pending.settle(error=CancelledRemotely("the work was cancelled"))
        elif ok:
            pending.settle(result=value)
        else:
            pending.settle(error=rebuild(value, trusted=msg.is_pickle))

    async def _send_reply(self, dst_id: int, reply_to: int, outcome: tuple[Any, Any]) -> None:
        if not await self.send_or_drop(_wire.make_data(dst_id, self.id, reply_to, outcome)):
            log.debug("%r: the requester %d went away before its reply", self, dst_id)

    async def reply(self, msg: Message, outcome: tuple[Any, object]) -> None:
        """Answer *msg* (which carried a ``reply_to``); swallow a vanished requester."""
        if not msg.reply_to:
            return
        data_only = self.data_only
        try:
            reply = _wire.make(msg.src_id, self.id, msg.reply_to, outcome, data_only=data_only)
        except WireError as exc:
            reply = self._failure_reply(msg, exc)
        try:
            await self.send(reply)
        except (LinkClosed, MessageUndeliverable):
            log.debug("%r: the requester %d went away before its reply", self, msg.src_id)
        except WireError as exc:  # over the size limit
            await self.send_or_drop(self._failure_reply(msg, exc))

    def _failure_reply(self, msg: Message, exc: WireError) -> Message:
        outcome = failed(exc, data_only=self.data_only)
        return _wire.make(msg.src_id, self.id, msg.reply_to, outcome, data_only=self.data_only)

    # -- receiving -------------------------------------------------------

    async def pump(self, route: Route) -> None:
        """Read *route*'s link until it closes, dispatching every message.

        A malformed envelope closes the link with 1002. Returns when the link is
        closed; never raises :class:`LinkClosed`.
        """
        link = route.link
        while True:
            try:
                raw = await link.receive()
            except LinkClosed:
                return
            try:
                msg = _wire.unpack(raw)
            except WireError as exc:
                log.warning("%r: closing the link to %d: %s", self, route.peer_id, exc)
                await link.aclose(CLOSE_PROTOCOL_ERROR, str(exc)[:100])
                return
            await self.dispatch(msg, route)

    async def dispatch(self, msg: Message, route: Route | None) -> None:
        """Deliver or forward one message that arrived on *route*."""
        if route is not None and not self._source_ok(msg.src_id, route):
            self._drop(msg, route, f"source {msg.src_id} cannot be behind this link")
            return
        if route is not None and not route.trusted and msg.is_pickle:
            self._drop(msg, route, "an untrusted context may send only data, not pickles")
            await self.send_dead(
                msg,
                f"refused at {self.id}: {msg.src_id} is untrusted and "
                "may send only data, not pickles",
            )
            return
        if msg.dst_id == self.id:
            await self._deliver(msg, route)
            return
        target = self.route_for(msg.dst_id)
        if target is None:
            await self.send_dead(msg, f"no route to context {msg.dst_id} (from {self.id})")
            return
        if target is route:
            await self.send_dead(msg, f"context {msg.dst_id} is not behind {self.id}")
            return
        if (
            not self.siblings_may_talk
            and route is not None
            and not route.upward
            and not target.upward
        ):
            await self.send_dead(
                msg,
                f"policy: context {msg.src_id} may not message {msg.dst_id} (not up or down "
                f"the tree, at {self.id})",
            )
            return
        try:
            await self._send_on(target, msg)
        except (LinkClosed, WireError) as exc:
            await self.send_dead(msg, f"could not forward to {msg.dst_id} at {self.id}: {exc}")

    def _source_ok(self, src_id: int, route: Route) -> bool:
        expected = self._routes.get(src_id)
        if expected is not None:
            return expected is route
        # Ids that are not below us can only arrive from above.
        return route.upward and src_id != self.id

    async def _deliver(self, msg: Message, route: Route | None) -> None:
        if (
            route is not None
            and route.owner is not None
            and msg.src_id == route.peer_id
            and msg.handle in _CHILD_CONTROL
        ):
            route.owner.handle_control(msg)
            return
        handler = self._handlers.get(msg.handle)
        if handler is None:
            if msg.handle in self._abandoned:
                # A reply (or its dead notice) after its caller stopped waiting.
                self._abandoned.discard(msg.handle)
                return
            if msg.is_dead:
                self._on_dead_notice(msg, route)
                return
            await self.send_dead(msg, f"no handle {msg.handle} in context {self.id} ({self.name})")
            return
        pending = handler(msg, route)
        if pending is not None:
            await pending

    def _drop(self, msg: Message, route: Route | None, why: str) -> None:
        peer = route.peer_id if route is not None else self.id
        log.warning(
            "%r dropped a message (dst %d, src %d, handle %d) from the link to %d: %s",
            self,
            msg.dst_id,
            msg.src_id,
            msg.handle,
            peer,
            why,
        )

    async def send_dead(self, msg: Message, reason: str) -> None:
        """Answer an undeliverable *msg* with a dead reply (never a dead reply to a dead one)."""
        if msg.is_dead:
            log.info("%r: a dead reply was itself undeliverable: %s", self, reason)
            return
        log.info(
            "%r: undeliverable message (handle %d from %d): %s",
            self,
            msg.handle,
            msg.src_id,
            reason,
        )
        handle = msg.reply_to or Handle.DEAD
        dead = Message(
            msg.src_id, self.id, handle, 0, reason.encode("utf-8"), _wire.DEAD | _wire.RAW
        )
        if not await self.send_or_drop(dead):
            log.debug("%r: could not deliver a dead reply to %d", self, msg.src_id)

    def _on_dead_notice(self, msg: Message, route: Route | None) -> None:
        log.warning(
            "%r: a message sent from here could not be delivered: %s",
            self,
            msg.data.decode("utf-8", "replace"),
        )
