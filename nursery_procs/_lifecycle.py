"""One child's life, kept in one place.

A :class:`Lifecycle` is one incarnation of a child process: its state, pid, exit
status, outcome and stderr tail, and the facts that decide how it ended. The
supervisor's runner is its only writer; the :class:`~nursery_procs.Context`
handle, the pool and the control API only read it and wait on it. A
:class:`Lineage` is the sequence of incarnations behind one context (a restarted
child keeps its context, id and name).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from typing import Any

import attrs
import trio

from ._isolation import Isolation
from ._link import Link
from ._process import ChildProcess, Policy
from ._stdio import new_tail


class State(enum.Enum):
    """Where a context is in its life. States only ever move forward, in this order."""

    #: The process is being started.
    SPAWNING = "spawning"
    #: The link is up and the bootstrap sent; the child is loading its target.
    CREATED = "created"
    #: The child said it is ready; its target is running.
    READY = "ready"
    #: Shutdown has begun (SHUTDOWN sent, or the link closed).
    STOPPING = "stopping"
    #: The process has exited and been reaped.
    EXITED = "exited"

    @property
    def rank(self) -> int:
        """The position of this state in a life (``SPAWNING`` is 0)."""
        return _RANKS[self]


_RANKS = {state: rank for rank, state in enumerate(State)}


class Changes:
    """A condition to wait on: :meth:`notify` wakes every :meth:`wait_until`.

    Each waiter re-checks its own predicate, so one notifier serves any number of
    different waits, and no wait races another.
    """

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return as soon as *predicate()* is true (checked now and after each change).

        **Cancellation:** safe.
        """
        while not predicate():
            await self._event.wait()


@attrs.define(eq=False)
class Lifecycle:
    """One incarnation of a child process."""

    #: The context's name.
    name: str
    #: Its timing and limits.
    policy: Policy
    #: Seconds a new child sleeps before its target, for a debugger.
    debug_sleep: float
    #: Whether what the child sends may be unpickled (``False``: data only).
    trusted: bool = True
    #: Wakes the waits of every incarnation of the same context.
    changes: Changes = attrs.field(factory=Changes)
    #: 1 for the first start, 2 after the first restart, ...
    incarnation: int = 1
    state: State = State.SPAWNING
    pid: int | None = None
    #: The exit status once reaped (negative: the signal that killed it).
    returncode: int | None = None
    #: ``(True, value)`` or ``(False, exception)`` as the child reported it.
    outcome: tuple[bool, Any] | None = None
    stderr_tail: Any = attrs.field(factory=new_tail)
    link: Link | None = None
    started_at: float = 0.0
    exited_at: float | None = None
    #: The child said READY (its own word; the state follows once the runner sees it).
    said_ready: bool = False
    #: The link's reader has stopped (the link is closed).
    link_done: bool = False
    #: The process has exited (seen by a watcher; reaping follows).
    process_exited: bool = False
    #: Someone asked for this child to stop: it is not restarted.
    stop_requested: bool = False
    #: ... and asked while it was still running (its handle is then closed, not dead).
    closed_by_owner: bool = False
    shutdown_sent: bool = False
    #: Why the child was judged faulty even if it exited 0 (a protocol error, a
    #: failed restart, a cancellation it did not acknowledge).
    fault: str | None = None
    #: Kill it at once, without a grace period (a call cancelled with
    #: ``kill_on_cancel``).
    kill_requested: bool = False
    #: The isolation in force, as seen from outside once it was ready.
    isolation: Isolation | None = None
    #: The process (to ask the kernel whether it has exited before anyone noticed).
    process: ChildProcess | None = None

    # -- the runner's writes -------------------------------------------------

    def advance(self, state: State) -> None:
        """Move to *state* (never backward) and wake the waiters."""
        if state.rank > self.state.rank:
            self.state = state
            if state is State.EXITED:
                self.exited_at = trio.current_time()
        self.changes.notify()

    def note(self, **facts: Any) -> None:
        """Record *facts* (attributes of this class) and wake the waiters."""
        for key, value in facts.items():
            if not hasattr(self, key):
                raise AttributeError(f"a lifecycle has no {key!r}")
            setattr(self, key, value)
        self.changes.notify()

    # -- what readers ask ----------------------------------------------------

    def reached(self, state: State) -> bool:
        return self.state.rank >= state.rank

    @property
    def exited(self) -> bool:
        return self.state is State.EXITED

    @property
    def crashed(self) -> bool:
        """Whether it ended abnormally: non-zero status, a signal, a fault, or (not
        stopped on purpose) without reporting a result."""
        if self.fault is not None:
            return True
        if not self.exited:
            return False
        return self.returncode != 0 or (self.outcome is None and not self.shutdown_sent)

    @property
    def must_stop(self) -> bool:
        """Whether the runner should wind this incarnation down now."""
        return (
            self.link_done
            or self.stop_requested
            or self.process_exited
            or self.kill_requested
            or self.fault is not None
        )

    @property
    def target_failed(self) -> bool:
        return self.outcome is not None and not self.outcome[0]

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        await self.changes.wait_until(predicate)

    async def wait_for_state(self, state: State) -> None:
        """Wait until this incarnation has reached *state* (or a later one)."""
        await self.changes.wait_until(lambda: self.reached(state))


@attrs.define(eq=False)
class Lineage:
    """The incarnations behind one context, newest last."""

    current: Lifecycle
    #: No incarnation will follow the current one.
    final: bool = False

    @property
    def changes(self) -> Changes:
        return self.current.changes

    def renew(self) -> Lifecycle:
        """Begin the next incarnation (a restart), with the same name and policy."""
        old = self.current
        self.current = Lifecycle(
            name=old.name,
            policy=old.policy,
            debug_sleep=old.debug_sleep,
            trusted=old.trusted,
            changes=old.changes,
            incarnation=old.incarnation + 1,
        )
        self.changes.notify()
        return self.current

    def end(self) -> None:
        """No more incarnations: the current one is the last."""
        self.final = True
        self.changes.notify()

    def _moved_on(self, life: Lifecycle) -> bool:
        """Whether waiting for *life* to be READY is over: it is, it was replaced,
        or it is past READY and nothing will replace it."""
        if self.current is not life or life.state is State.READY:
            return True
        return life.reached(State.STOPPING) and self.final

    async def wait_ready(self) -> Lifecycle:
        """Wait until an incarnation is READY (now, or after a restart); return it.

        Raises:
            LookupError: the last incarnation is past READY (stopping or exited) and
                no other will follow.
        """
        while True:
            life = self.current
            await self.changes.wait_until(functools.partial(self._moved_on, life))
            if life.state is State.READY:
                return life
            if self.current is life:
                raise LookupError("it exited and will not be restarted")
