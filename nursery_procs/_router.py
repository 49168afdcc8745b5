"""Per-process routing: the route table, handles, pending replies and dead replies.

Each process has one :class:`Router` per Trio run. It knows the link toward its
parent (the default route upward) and, for each child link, the set of context
ids that live behind it. A message for another context is forwarded; a message
for this context goes to the handler registered for its handle; a message that
cannot be delivered is answered with a *dead* reply so that nobody waits on it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import attrs
import trio

from . import _wire
from ._answering import Answering
from ._asking import UNSENDABLE, Asking
from ._errors import (
    ContextDied,
    LinkClosed,
    MessageUndeliverable,
    WireError,
)
from ._inboxes import Inboxes
from ._link import CLOSE_PROTOCOL_ERROR, Link
from ._wire import Handle, Message

log = logging.getLogger("nursery_procs.router")

ROOT_ID = 0
_ROUTER: trio.lowlevel.RunVar[Router] = trio.lowlevel.RunVar("nursery_procs.router")
_CHILD_CONTROL = frozenset((Handle.RESULT, Handle.LOG, Handle.READY))
#: How many ids the root hands out at once to a context that starts children.
ID_BLOCK_SIZE = 64


#: A message handler: sync, or returning an awaitable that the link's pump awaits.
Handler = Callable[["Message", "Route | None"], Awaitable[None] | None]


class RouteOwner(Protocol):
    """Who is told about the control messages of a direct child (its supervisor)."""

    def handle_control(self, msg: Message) -> None: ...


class ModulePusher(Protocol):
    """Sends pickled messages down a link to contexts whose runtime was shipped
    to them, each after the modules it refers to (see ``_module_server``)."""

    async def send_pickle(self, route: Route, header: bytes, msg: Message) -> None: ...


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
    #: For a link to a child whose runtime was shipped to it: what sends pickles
    #: after the modules they need.
    module_pusher: ModulePusher | None = None


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


class _Ids:
    """Context ids: the root counts them out, and hands blocks of them to the
    contexts that start children, so that a grandchild starts without a round
    trip to the root."""

    def __init__(self, router: Router) -> None:
        self._router = router
        self._next = 1
        self._block: list[int] = []
        self._lock = trio.Lock()

    def on_allocate(self, msg: Message, route: Route | None) -> Awaitable[None]:
        start = self._next
        self._next += ID_BLOCK_SIZE
        return self._router.answering.reply(msg, (True, (start, start + ID_BLOCK_SIZE)))

    async def allocate(self) -> int:
        router = self._router
        if router.id == ROOT_ID:
            self._next += 1
            return self._next - 1
        async with self._lock:
            if not self._block:
                start, stop = await router.asking.request(
                    ROOT_ID, Handle.ALLOCATE_ID, ID_BLOCK_SIZE, data=True
                )
                self._block = list(range(int(start), int(stop)))
            return self._block.pop(0)


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
        self._next_handle = _wire.FIRST_DYNAMIC_HANDLE
        self._ids = _Ids(self)
        #: Contexts this router knows about (its subtree; for the root, the whole tree).
        self.directory: dict[int, ContextInfo] = {}
        self._gone_waiters: dict[int, trio.Event] = {}
        #: User messages waiting to be read.
        self.inboxes = Inboxes()
        #: The requests this context waits on ...
        self.asking = Asking(self)
        #: ... and those it answers.
        self.answering = Answering(self, self.inboxes)
        self._handlers[Handle.ADD_ROUTE] = self._on_add_route
        self._handlers[Handle.DEL_ROUTE] = self._on_del_route
        self._handlers[Handle.DEAD] = self._on_dead_notice
        self._handlers[Handle.CHANNEL] = self._to_inbox
        self._handlers[Handle.REQUEST] = self.answering.on_request
        self._handlers[Handle.CANCEL] = self.answering.on_cancel
        if context_id == ROOT_ID:
            self._handlers[Handle.ALLOCATE_ID] = self._ids.on_allocate

    def __repr__(self) -> str:
        return f"<Router {self.id} {self.name!r}>"

    # -- handles ---------------------------------------------------------

    def add_handler(self, handle: int, handler: Handler) -> None:
        """Deliver messages for *handle* to *handler*.

        It runs in the link's pump: if it returns an awaitable, the pump awaits it
        before reading the next message, so it must not wait for long.
        """
        self._handlers[handle] = handler

    def remove_handler(self, handle: int) -> None:
        self._handlers.pop(handle, None)

    def new_handle(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        return handle

    def _to_inbox(self, msg: Message, route: Route | None) -> None:
        self.inboxes.put(msg)

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
        self.answering.forget(ids)
        for context_id in ids:
            self._routes.pop(context_id, None)
            self.directory.pop(context_id, None)
            self.inboxes.close(context_id)
        self.asking.forget(ids, error)
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

    async def allocate_id(self) -> int:
        """A fresh context id: counted at the root, from blocks the root hands out elsewhere."""
        return await self._ids.allocate()

    # -- sending ---------------------------------------------------------

    async def _send_on(self, route: Route, msg: Message) -> None:
        header = _wire.HEADER.pack(msg.flags, msg.dst_id, msg.src_id, msg.handle, msg.reply_to)
        if len(header) + len(msg.data) > route.link.max_message_size:
            raise WireError(
                f"message of {len(msg.data)} bytes is over the link's limit of "
                f"{route.link.max_message_size} bytes"
            )
        if route.module_pusher is not None and msg.is_pickle:
            await route.module_pusher.send_pickle(route, header, msg)
            return
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
            if self.asking.late_reply(msg.handle):
                return  # a reply (or its dead notice) after its caller stopped waiting
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
