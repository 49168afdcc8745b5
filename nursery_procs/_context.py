"""The handle one context holds for another: send, receive, request, call, close."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar, TypeVarTuple, overload

import attrs
import trio

from . import _wire
from ._answering import ANY_SOURCE
from ._asking import OnCancel
from ._errors import ContextDied, LinkClosed
from ._isolation import Isolation
from ._lifecycle import Lifecycle, Lineage, State
from ._process import Policy
from ._router import Router, current_router
from ._wire import Handle

log = logging.getLogger("nursery_procs.context")

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_PARENT: trio.lowlevel.RunVar[Context] = trio.lowlevel.RunVar("nursery_procs.parent")
_DEFAULT_POLICY = Policy()
#: The contexts this process started and still owns, by id.
_OWNED: trio.lowlevel.RunVar[dict[int, Context]] = trio.lowlevel.RunVar("nursery_procs.owned")


def parent() -> Context:
    """The context that started this process.

    Raises:
        RuntimeError: this process was not started by nursery_procs.
    """
    try:
        return _PARENT.get()
    except LookupError:
        raise RuntimeError("this process is not a nursery_procs child: it has no parent") from None


def owned_contexts() -> dict[int, Context]:
    """The contexts this process started and still owns (the supervisors add and
    remove them)."""
    try:
        return _OWNED.get()
    except LookupError:
        owned: dict[int, Context] = {}
        _OWNED.set(owned)
        return owned


def context_by_id(context_id: int) -> Context:
    """A handle for messaging any context by id, from anywhere in the tree.

    For a child this process started, the handle is the one :meth:`Supervisor.start_child`
    returned. The name is known if the context is below this one; messages to a
    context that does not exist get dead replies.
    """
    return handle_for(context_id, _DEFAULT_POLICY)


def handle_for(context_id: int, policy: Policy) -> Context:
    """:func:`context_by_id`, with *policy* bounding how long closing a context
    deeper in the tree waits for it (a supervisor passes its own)."""
    owned = owned_contexts().get(context_id)
    if owned is not None:
        return owned
    router = current_router()
    if router.parent_route is not None and context_id == router.parent_route.peer_id:
        return parent()
    info = router.directory.get(context_id)
    name = info.name if info is not None else f"context-{context_id}"
    parent_id = info.parent_id if info is not None else None
    pid = info.pid if info is not None else None
    remote = _Remote(router, context_id, pid, policy)
    return Context(context_id, name, parent_id, router, remote)


async def serve_requests(
    handler: Callable[[Any], Awaitable[Any] | Any],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer requests from every context (those without a server of their own).

    Like :meth:`Context.serve_requests`, for any requester in the tree: the
    handler's return value is the reply, its exception is raised to the
    requester. Never returns. ``await nursery.start(serve_requests, handler)``
    returns once requests are being served.

    Raises:
        RuntimeError: requests from every context are already being served here.

    **Cancellation:** stops serving; requests being handled are cancelled.
    """
    await current_router().answering.serve_all(ANY_SOURCE, handler, None, task_status)


def in_child() -> bool:
    """Whether this process is a child started by nursery_procs."""
    try:
        _PARENT.get()
    except LookupError:
        return False
    return True


@attrs.frozen
class ContextStatistics:
    """Traffic on the link to a direct child (zeros for other contexts)."""

    #: Messages received from the child.
    messages_in: int
    #: Messages sent to the child.
    messages_out: int
    #: Payload bytes received from the child.
    bytes_in: int
    #: Payload bytes sent to the child.
    bytes_out: int
    #: Seconds (of ``trio.current_time()``) since the child was started, or 0.0.
    uptime: float
    #: The isolation in force for the child, as the kernel shows it from outside
    #: (``None``: not known, such as for a context this process did not start).
    isolation: Isolation | None = None


def _statistics_of(life: Lifecycle | None) -> ContextStatistics:
    """The figures of a child's current incarnation (zeros if none, or unlinked)."""
    link = life.link if life is not None else None
    if life is None or link is None:
        return ContextStatistics(0, 0, 0, 0, 0.0)
    end = life.exited_at if life.exited_at is not None else trio.current_time()
    return ContextStatistics(
        messages_in=link.messages_received,
        messages_out=link.messages_sent,
        bytes_in=link.bytes_received,
        bytes_out=link.bytes_sent,
        uptime=end - life.started_at,
        isolation=life.isolation,
    )


class _Peer(Protocol):
    """What a :class:`Context` handle knows about the context it points at, and how
    it closes it: a child this process owns, its parent, or another context."""

    @property
    def pid(self) -> int | None: ...

    @property
    def state(self) -> State: ...

    @property
    def life(self) -> Lifecycle | None:
        """The current incarnation, for a child this process owns."""

    @property
    def cancel_timeout(self) -> float:
        """How long a cancelled call waits for the context to acknowledge."""

    def unresponsive(self) -> None:
        """A cancellation was not acknowledged in time."""

    def kill(self, why: str) -> None:
        """Kill the process at once (children this process owns only)."""

    async def wait_exited(self) -> int | None:
        """Wait until the context is gone; its exit status if known here."""

    async def aclose(self) -> None: ...


@attrs.define(eq=False)
class OwnedChild:
    """A direct child this process started: its incarnations and how to stop it.

    The supervisor's runner writes the :class:`Lifecycle`; everything else reads it.
    """

    context_id: int
    router: Router
    lineage: Lineage

    @property
    def life(self) -> Lifecycle:
        return self.lineage.current

    @property
    def pid(self) -> int | None:
        return self.life.pid

    @property
    def state(self) -> State:
        return self.life.state

    @property
    def cancel_timeout(self) -> float:
        return self.life.policy.cancel_timeout

    def unresponsive(self) -> None:
        timeout = self.life.policy.cancel_timeout
        self.life.note(fault=f"it did not acknowledge a cancelled call within {timeout} s")

    def kill(self, why: str) -> None:
        self.life.note(kill_requested=True, fault=f"killed: {why}")

    async def send_shutdown(self) -> None:
        """Send SHUTDOWN once to the current incarnation (a closed link is fine:
        the child is going anyway)."""
        life = self.life
        if life.shutdown_sent or life.state in (State.SPAWNING, State.EXITED):
            return
        life.note(shutdown_sent=True)
        router = self.router
        await router.send_or_drop(
            _wire.make_data(self.context_id, router.id, Handle.SHUTDOWN, None)
        )

    async def wait_exited(self) -> int | None:
        life = self.life
        await life.wait_for_state(State.EXITED)
        return life.returncode

    async def outcome(self) -> tuple[bool, Any] | None:
        """The current incarnation's outcome, once it has exited."""
        life = self.life
        await life.wait_for_state(State.EXITED)
        return life.outcome

    @trio.lowlevel.enable_ki_protection
    async def aclose(self) -> None:
        """Ask for a graceful stop and wait until reaped (shielded, bounded)."""
        life = self.life
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + life.policy.close_deadline
            await self.send_shutdown()
            life.note(stop_requested=True, closed_by_owner=life.closed_by_owner or not life.exited)
            await life.wait_for_state(State.EXITED)


@attrs.define(eq=False)
class _Remote:
    """A context deeper in the tree (or elsewhere): known through the router only."""

    router: Router
    context_id: int
    pid: int | None
    policy: Policy
    life: None = None

    @property
    def cancel_timeout(self) -> float:
        return self.policy.cancel_timeout

    def unresponsive(self) -> None:
        pass  # its own parent watches over it

    def kill(self, why: str) -> None:
        raise ValueError("only a child this process started can be killed")

    @property
    def state(self) -> State:
        router = self.router
        if self.context_id == router.id or router.knows(self.context_id):
            return State.READY
        return State.EXITED

    async def wait_exited(self) -> None:
        await self.router.wait_gone(self.context_id)

    async def aclose(self) -> None:
        """SHUTDOWN through the tree, then wait until its parent has reaped it and
        withdrawn its route (shielded, for at most the policy's close deadline: its
        own parent escalates and reaps it; this only waits)."""
        router = self.router
        if not router.knows(self.context_id):
            return
        shutdown = _wire.make_data(self.context_id, router.id, Handle.SHUTDOWN, None)
        deadline = self.policy.close_deadline
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + deadline
            if await router.send_or_drop(shutdown):
                await router.wait_gone(self.context_id)
        if scope.cancelled_caught:
            log.warning(
                "context %d was not gone %s s after SHUTDOWN; its parent goes on escalating",
                self.context_id,
                deadline,
            )


@attrs.define(eq=False)
class _Parent:
    """This child's parent, reached over the upward link."""

    router: Router
    pid: int | None
    life: None = None

    @property
    def cancel_timeout(self) -> float:
        return _DEFAULT_POLICY.cancel_timeout

    def unresponsive(self) -> None:
        pass  # its own parent watches over it

    def kill(self, why: str) -> None:
        raise ValueError("only a child this process started can be killed")

    @property
    def state(self) -> State:
        route = self.router.parent_route
        return State.EXITED if route is None or route.link.closed else State.READY

    async def wait_exited(self) -> None:
        raise RuntimeError("a child cannot wait for its parent to exit")

    async def aclose(self) -> None:
        raise RuntimeError("a child cannot close its parent")


@attrs.define(eq=False, repr=False)
class Context(trio.abc.Channel[Any]):
    """A handle on another context: a child you started, your parent, or any context
    reachable through the tree.

    Messages are any picklable object; ``bytes`` travel without pickling. It is a
    :class:`trio.abc.Channel` (``send``, ``receive``, ``async for``) and an
    :class:`trio.abc.AsyncResource`: ``async with ctx:`` closes the child when the
    block ends. Using a child's handle after closing it raises
    :class:`trio.ClosedResourceError`.
    """

    #: The context's id (the root is 0).
    id: int
    #: The context's name.
    name: str
    #: The id of the context that started it (``None`` for the root).
    parent_id: int | None
    _router: Router
    _peer: _Peer
    _inbox: trio.MemoryReceiveChannel[_wire.Message] = attrs.field(init=False)
    _requests: trio.MemoryReceiveChannel[_wire.Message] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.reopen_inboxes()

    def reopen_inboxes(self) -> None:
        """Read this context's messages from fresh inboxes (a restarted child's)."""
        self._inbox = self._router.inboxes.inbox(self.id, Handle.CHANNEL)
        self._requests = self._router.inboxes.inbox(self.id, Handle.REQUEST)

    def __repr__(self) -> str:
        return f"<Context {self.id} {self.name!r} {self.state.value} pid={self.pid}>"

    @property
    def pid(self) -> int | None:
        """The process id, if known here."""
        return self._peer.pid

    @property
    def state(self) -> State:
        """The context's :class:`State`, as far as this process knows."""
        return self._peer.state

    @property
    def returncode(self) -> int | None:
        """The exit status once reaped (negative: killed by that signal), else ``None``."""
        life = self._peer.life
        return life.returncode if life is not None else None

    @property
    def stderr_tail(self) -> tuple[str, ...]:
        """The last lines the child wrote to stderr (children you started only)."""
        life = self._peer.life
        return tuple(life.stderr_tail) if life is not None else ()

    def statistics(self) -> ContextStatistics:
        """Traffic and uptime, for children this process started."""
        return _statistics_of(self._peer.life)

    def _died(self, detail: str = "") -> ContextDied:
        return ContextDied(self.name, self.id, self.returncode, self.stderr_tail, detail)

    def _check_alive(self) -> None:
        life = self._peer.life
        if life is None or not life.reached(State.STOPPING):
            return
        if life.closed_by_owner and life.exited:
            raise trio.ClosedResourceError(f"{self!r} was closed")
        if life.exited:
            raise self._died("it has exited")

    # -- messages --------------------------------------------------------

    async def send(self, obj: object) -> None:
        """Send *obj* to the context, to be read by its :meth:`receive`.

        Raises:
            ContextDied: the context is gone or its link is closed.
            MessageUndeliverable: there is no route to it.
            WireError: *obj* cannot be pickled or is over the size limit.

        **Cancellation:** if cancelled before any byte is written, nothing was sent
        and the link is intact; if cancelled after part of the frame was written
        (only possible when the socket is full), the link is closed, since a
        half-written frame cannot be taken back.
        """
        self._check_alive()
        with self._link_errors():
            router = self._router
            msg = _wire.make(self.id, router.id, Handle.CHANNEL, obj, data_only=router.data_only)
            await router.send(msg)

    async def receive(self) -> Any:
        """Receive the next object the context sent to this one.

        Raises:
            trio.EndOfChannel: the context finished normally and everything it
                sent has been received.
            ContextDied: the context died (messages it sent before dying are
                still delivered first).

        **Cancellation:** safe; no message is lost.
        """
        try:
            msg = await self._inbox.receive()
        except trio.EndOfChannel:
            raise self._end_of_channel() from None
        return _wire.decode(msg)

    def receive_nowait(self) -> Any:
        """Like :meth:`receive` but raise :class:`trio.WouldBlock` if nothing is queued."""
        try:
            msg = self._inbox.receive_nowait()
        except trio.EndOfChannel:
            raise self._end_of_channel() from None
        return _wire.decode(msg)

    def _end_of_channel(self) -> BaseException:
        life = self._peer.life
        if life is not None and life.returncode == 0 and not life.crashed:
            return trio.EndOfChannel()
        return self._died()

    async def request(self, obj: object) -> Any:
        """Send *obj* as a request and return the one reply.

        The other side answers with :meth:`serve_requests`.

        Raises:
            ContextDied: the context died (or its route was lost) before replying.
            MessageUndeliverable: the message could not be delivered (dead reply).
            Exception: the remote handler raised this; it is re-raised here as its
                own type, the remote traceback as its ``__cause__``
                (:class:`RemoteError` if the type cannot be rebuilt here).

        **Cancellation:** cancels the handler's task in the other context and waits
        (shielded, at most ``policy.cancel_timeout``) until it says so; a reply
        that comes later is dropped.
        """
        self._check_alive()
        with self._link_errors():
            return await self._router.asking.request(
                self.id,
                Handle.REQUEST,
                obj,
                cancel_timeout=self._peer.cancel_timeout,
                on_unacknowledged=self._peer.unresponsive,
            )

    @overload
    async def call(
        self,
        fn: Callable[[*Ts], Awaitable[T]],
        *args: *Ts,
        kill_on_cancel: bool = False,
        in_thread: bool = True,
    ) -> T: ...

    @overload
    async def call(
        self,
        fn: Callable[[*Ts], T],
        *args: *Ts,
        kill_on_cancel: bool = False,
        in_thread: bool = True,
    ) -> T: ...

    @overload
    async def call(
        self, fn: str, *args: object, kill_on_cancel: bool = False, in_thread: bool = True
    ) -> Any: ...

    async def call(
        self,
        fn: Callable[[*Ts], Any] | str,
        *args: *Ts,
        kill_on_cancel: bool = False,
        in_thread: bool = True,
    ) -> Any:
        """Run ``fn(*args)`` in the context and return its result.

        *fn* is an importable function (sync or async), or a ``"module:function"``
        string; pass keyword arguments with :func:`functools.partial`. An async
        function runs as a task of the child; a sync one in a worker thread of the
        child, so the child goes on serving SHUTDOWN, other calls and
        cancellation while it runs. Calls go down the tree only: a child cannot
        call into its parent.

        With ``in_thread=False`` a sync function runs on the child's event loop
        instead: no thread hop, so the round trip is shorter, but while it runs
        the child serves nothing else (no other call, no SHUTDOWN until it
        returns). That suits a worker that does one call at a time, which is how
        :meth:`WorkerPool.run <nursery_procs.WorkerPool.run>` calls its workers.

        Raises:
            Exception: *fn* raised this; it is re-raised here as its own type, its
                remote traceback as its ``__cause__`` (a
                :class:`~nursery_procs.RemoteTraceback`); exception groups arrive as
                groups. Where the exception cannot be rebuilt here (its type does
                not exist here, or it does not pickle), :class:`RemoteError`
                carries its type name, message and traceback.
            ContextDied: the context died before answering.
            MessageUndeliverable: the context refused the call (for example it is
                not below this one).
            WireError: the function or arguments cannot be pickled.
            ValueError: ``kill_on_cancel`` for a context this process did not start.

        **Cancellation:** an async *fn* is cancelled in the child (its ``finally``
        blocks run) and this returns once the child acknowledges, shielded, within
        ``policy.cancel_timeout``; a child that does not acknowledge by then is
        shut down as hung. A sync *fn* cannot be interrupted: cancelling waits for
        it to finish, as :func:`trio.to_thread.run_sync` does, unless
        ``kill_on_cancel=True``, which kills the child at once (SIGKILL) and
        returns promptly; the child then counts as crashed (a pooled or
        restartable child is replaced). Since such a call is never interrupted
        but by the kill, its sync function runs on the child's event loop, as
        with ``in_thread=False`` (the fastest path, as in `trio-parallel
        <https://trio-parallel.readthedocs.io/>`_).
        """
        self._check_alive()
        peer = self._peer
        if kill_on_cancel and not isinstance(peer, OwnedChild):
            raise ValueError(f"kill_on_cancel needs a child this process started, not {self!r}")
        on_loop = kill_on_cancel or not in_thread
        on_cancel = _on_cancel(fn, kill_on_cancel=kill_on_cancel, on_loop=on_loop)
        with self._link_errors():
            try:
                return await self._router.asking.request(
                    self.id,
                    Handle.CALL,
                    (fn, args, {}, on_loop),
                    cancel_timeout=peer.cancel_timeout,
                    on_unacknowledged=peer.unresponsive,
                    on_cancel=on_cancel,
                )
            except trio.Cancelled:
                if kill_on_cancel:
                    peer.kill("a call was cancelled with kill_on_cancel")
                raise

    @contextmanager
    def _link_errors(self) -> Iterator[None]:
        try:
            yield
        except LinkClosed as exc:
            raise self._died(f"its link is closed ({exc})") from None

    async def serve_requests(
        self,
        handler: Callable[[Any], Awaitable[Any] | Any],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Answer every :meth:`request` this context sends here with ``handler(obj)``.

        A sync handler is called straight from the link's reader (the fastest
        path); an async one runs in a task per request, which a cancelled
        requester cancels. The handler's return value is the reply; its exception
        is raised to the requester as its own type. Returns when the context is
        gone. ``await nursery.start(ctx.serve_requests, handler)`` returns once
        requests are being served.

        Raises:
            RuntimeError: requests from this context are already being served.

        **Cancellation:** stops serving; requests still being handled are cancelled
        and their requesters get no reply until the context is gone.
        """
        await self._router.answering.serve_all(self.id, handler, self._requests, task_status)

    def _owned(self) -> OwnedChild:
        peer = self._peer
        if not isinstance(peer, OwnedChild):
            raise RuntimeError(f"{self!r} was not started by this process")
        return peer

    async def aclose(self) -> None:
        """Shut the child down gracefully and reap it: SHUTDOWN (the child cancels
        its target, closes its own children and exits), then after
        ``grace_period`` SIGTERM, after ``kill_after`` more SIGKILL. Idempotent: a
        second call waits for the first to finish. For a context deeper in the
        tree, SHUTDOWN goes through the tree, and this waits until its parent has
        reaped it and withdrawn its route.

        **Cancellation:** shielded, with a deadline of ``grace_period + kill_after``
        plus a margin: the child is always reaped, gracefully or not.

        **Resource handling:** on return the process has been reaped and its link,
        pipes and route are closed.

        Raises:
            RuntimeError: this is the parent's handle (a child cannot close it).
        """
        await self._peer.aclose()

    async def wait_ready(self) -> None:
        """Wait until the child is READY: now, or after a restart.

        Raises:
            ContextDied: it exited and will not be restarted.

        **Cancellation:** safe; the child is not affected.
        """
        try:
            await self._owned().lineage.wait_ready()
        except LookupError as exc:
            raise self._died(str(exc)) from None

    async def wait_exited(self) -> int | None:
        """Wait until the context has exited; return its exit status if known here.

        For a child this process started: until it has been reaped, with its exit
        status. For a context deeper in the tree: until its parent has reaped it
        and withdrawn its route (``None``: the status is known only there).

        Never raises for the context's sake (compare :meth:`wait`).

        Raises:
            RuntimeError: this is the parent's handle.

        **Cancellation:** safe; the context is not affected.
        """
        return await self._peer.wait_exited()

    @property
    def has_exited(self) -> bool:
        """Whether the child has exited and been reaped."""
        return self._owned().life.exited

    def process_exited(self) -> bool:
        """Whether the child's process has exited, asking the kernel now (before
        it is reaped, whoever reaps it); ``False`` before it started."""
        process = self._owned().life.process
        return process is not None and process.poll_exited()

    async def wait(self) -> Any:
        """Wait for the child to exit and return its target's return value.

        Raises:
            Exception: the target raised this (as :meth:`call` re-raises).
            ContextDied: the child died without reporting a result (crash, kill).

        **Cancellation:** safe; the child is not affected.
        """
        ok, value = (await self._owned().outcome()) or (False, None)
        if ok:
            return value
        if isinstance(value, BaseException):
            raise value
        raise self._died("it exited without reporting a result")


def _on_cancel(fn: object, *, kill_on_cancel: bool, on_loop: bool) -> OnCancel:
    """What a cancelled call does about its work in the child."""
    if kill_on_cancel:
        return OnCancel.ABANDON
    if on_loop and not (callable(fn) and inspect.iscoroutinefunction(fn)):
        return OnCancel.WAIT  # a sync function on the child's loop cannot acknowledge
    return OnCancel.CANCEL


def owned_context(
    context_id: int, name: str, router: Router, lineage: Lineage
) -> tuple[Context, OwnedChild]:
    """The handle on a child this process starts, and the owner's side of it."""
    child = OwnedChild(context_id, router, lineage)
    return Context(context_id, name, router.id, router, child), child


def parent_context(router: Router, parent_id: int, parent_name: str) -> Context:
    """The child's handle on its parent (pid from the OS)."""
    return Context(parent_id, parent_name, None, router, _Parent(router, os.getppid()))
