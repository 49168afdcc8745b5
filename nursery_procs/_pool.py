"""Prespawned pools: ready children handed out at once, and keyed sessions.

A pool keeps ``spare`` idle children that have already started and said they
are ready, so that handing one out costs no process start. Children taken from
the pool are never reused: leaving the ``take()`` block shuts the child down and
the pool starts a fresh one in the background. Keyed sessions share one child
between every concurrent user of the same key.
"""

from __future__ import annotations

import collections
import logging
import math
import statistics as _statistics
import weakref
from collections.abc import AsyncIterator, Hashable, Mapping
from contextlib import asynccontextmanager
from types import MappingProxyType as MappingProxy
from typing import Any

import attrs
import trio

from ._context import Context
from ._errors import ChildStartError, PoolClosed, PoolEmpty, WireError
from ._groups import unwrap_sole_exception
from ._process import Policy, describe_exit
from ._spec import Target, dump_target
from ._supervisor import Supervisor

log = logging.getLogger("nursery_procs.pool")

#: How many of the most recent takes :attr:`PoolStatistics.take_latency_median` covers.
LATENCY_WINDOW = 1000


@attrs.frozen
class PoolStatistics:
    """A snapshot of a pool, from :meth:`Pool.statistics`."""

    #: Children started, ready, and waiting to be handed out.
    idle: int
    #: Children handed out and not yet given back: taken ones and session children.
    busy: int
    #: Children being started (not ready yet).
    starting: int
    #: Children the pool is shutting down (given back, retired, or lingered out).
    stopping: int
    #: Callers waiting in :meth:`Pool.take` (or for a new session's child).
    waiting: int
    #: Live keyed sessions (each holds one busy child).
    sessions: int
    #: Children started successfully since the pool opened.
    total_spawned: int
    #: Start attempts that failed (the child exited or was not ready in time).
    spawn_failures: int
    #: Idle children that died while waiting to be handed out.
    idle_deaths: int
    #: Children handed out: by :meth:`Pool.take`, :meth:`Pool.take_nowait`, or to
    #: open a session.
    takes: int
    #: Median seconds from asking for a child to getting it, over the last 1000
    #: takes (0.0 if there were none).
    take_latency_median: float
    #: Setting: idle children kept ready.
    spare: int
    #: Setting: most children in all (idle, busy, starting and stopping).
    max: int
    #: Setting: seconds an idle child above ``spare`` is kept (``None``: for ever).
    idle_timeout: float | None


def _check_settings(
    *,
    spare: int,
    max: int,
    idle_timeout: float | None,
    linger: float = 0.0,
    backoff_initial: float = 0.0,
    backoff_max: float = 0.0,
) -> None:
    """Raise :class:`ValueError`, naming the setting, for an invalid combination."""
    if max < 1:
        raise ValueError(f"max must be >= 1, not {max!r}")
    if spare < 0:
        raise ValueError(f"spare must be >= 0, not {spare!r}")
    if spare > max:
        raise ValueError(f"spare ({spare!r}) must not be more than max ({max!r})")
    for setting, value in (
        ("idle_timeout", idle_timeout),
        ("linger", linger),
        ("backoff_initial", backoff_initial),
        ("backoff_max", backoff_max),
    ):
        if value is not None and not value >= 0:  # also rejects NaN
            raise ValueError(f"{setting} must be >= 0, not {value!r}")
    if backoff_max < backoff_initial:
        raise ValueError(
            f"backoff_max ({backoff_max!r}) must not be less than "
            f"backoff_initial ({backoff_initial!r})"
        )


@attrs.define(eq=False)
class _Idle:
    """An idle child, with the time it became idle and the scope of its watcher."""

    ctx: Context
    since: float
    watcher: trio.CancelScope = attrs.field(factory=trio.CancelScope)


@attrs.define(eq=False)
class _Waiter:
    """A caller blocked in ``take()``; a new child is handed to it directly."""

    event: trio.Event = attrs.field(factory=trio.Event)
    ctx: Context | None = None


@attrs.define(eq=False)
class _Session:
    """One key's shared child and the users holding it."""

    key: Hashable
    ctx: Context | None = None
    users: int = 0
    #: Bumped by every arrival and departure: a linger timer acts only if unchanged.
    generation: int = 0
    #: Set once the child was obtained, or getting it failed.
    acquired: trio.Event = attrs.field(factory=trio.Event)
    failed: bool = False
    closing: bool = False
    #: Set when the session has left the table (its child exited, or never came).
    gone: trio.Event = attrs.field(factory=trio.Event)
    linger_scope: trio.CancelScope | None = None


class Pool:
    """Prespawned children of a supervisor; made by :func:`open_pool`.

    The pool keeps ``spare`` idle children ready, and never has more than ``max``
    children in all (idle, handed out, starting, and shutting down). Timing uses
    :func:`trio.current_time` only, so a fake clock drives it in tests.
    """

    def __init__(
        self,
        supervisor: Supervisor,
        target: Target,
        args: tuple[Any, ...],
        *,
        name: str,
        spare: int,
        max: int,
        idle_timeout: float | None,
        linger: float,
        backoff_initial: float,
        backoff_max: float,
        policy: Policy | None,
    ) -> None:
        self.name = name
        self.supervisor = supervisor
        self._target = target
        self._args = args
        self._spare = spare
        self._max = max
        self._idle_timeout = _timeout_or_none(idle_timeout)
        self._linger = linger
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._policy = policy
        self._nursery: trio.Nursery | None = None
        self._maintainer: trio.CancelScope | None = None
        self._closed = False
        # Children, by what the pool is doing with them.
        self._idle: dict[Context, _Idle] = {}
        self._handed: set[Context] = set()
        self._busy = 0
        self._starting = 0
        self._stopping = 0
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._sessions: dict[Hashable, _Session] = {}
        # Start failures and backoff.
        self._backoff = backoff_initial
        self._failing = False
        self._failure_epoch = 0
        self._retry_at = -math.inf
        # Counters.
        self._number = 0
        self._total_spawned = 0
        self._spawn_failures = 0
        self._idle_deaths = 0
        self._takes = 0
        self._latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        # Wake-ups: the maintenance task, and anyone waiting for a change.
        self._wake = trio.Event()
        self._changed = trio.Event()

    def __repr__(self) -> str:
        return (
            f"<Pool {self.name!r} idle={len(self._idle)} busy={self._busy} "
            f"starting={self._starting}{' closed' if self._closed else ''}>"
        )

    # -- introspection ---------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the pool is closed (its block has been left)."""
        return self._closed

    @property
    def idle_children(self) -> tuple[Context, ...]:
        """The idle children, oldest first (the next :meth:`take` gets the first)."""
        return tuple(self._idle)

    def sessions(self) -> dict[Hashable, Context]:
        """The live sessions: key → the child they share.

        Sessions still getting their child, or shutting it down, are left out.
        """
        return {
            key: session.ctx
            for key, session in self._sessions.items()
            if session.ctx is not None and not session.closing
        }

    def statistics(self) -> PoolStatistics:
        """A snapshot of the pool's children, counters and settings."""
        latencies = self._latencies
        return PoolStatistics(
            idle=len(self._idle),
            busy=self._busy,
            starting=self._starting,
            stopping=self._stopping,
            waiting=len(self._waiters),
            sessions=len(self.sessions()),
            total_spawned=self._total_spawned,
            spawn_failures=self._spawn_failures,
            idle_deaths=self._idle_deaths,
            takes=self._takes,
            take_latency_median=_statistics.median(latencies) if latencies else 0.0,
            spare=self._spare,
            max=self._max,
            idle_timeout=self._idle_timeout,
        )

    # -- settings --------------------------------------------------------

    def resize(
        self,
        spare: int | None = None,
        max: int | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        """Apply new settings now; ``None`` leaves a setting as it is.

        Growing ``spare`` (or ``max``) starts more children in the background.
        Shrinking retires idle children at once, gracefully: those above the new
        ``spare``, and as many as needed to bring the total down to the new
        ``max`` (busy children are never taken back; the pool simply starts no
        more until enough come back). Pass ``idle_timeout=math.inf`` to keep idle
        children above ``spare`` for ever.

        Raises:
            ValueError: the new settings are invalid (the message names the
                setting); nothing is changed.
            PoolClosed: the pool is closed.
        """
        if self._closed:
            raise PoolClosed(f"pool {self.name!r} is closed")
        new_spare = self._spare if spare is None else spare
        new_max = self._max if max is None else max
        new_timeout = self._idle_timeout if idle_timeout is None else idle_timeout
        _check_settings(spare=new_spare, max=new_max, idle_timeout=new_timeout)
        self._spare = new_spare
        self._max = new_max
        self._idle_timeout = _timeout_or_none(new_timeout)
        surplus = len(self._idle) - new_spare
        over_max = self._total() - new_max
        for _ in range(min(len(self._idle), _max_of(surplus, over_max))):
            self._retire(next(iter(self._idle.values())), "the pool was resized")
        self._kick()

    # -- handing children out ------------------------------------------------

    @asynccontextmanager
    async def take(self) -> AsyncIterator[Context]:
        """Take a ready child for the duration of the block, then shut it down.

        An idle child is handed over at once and its replacement is started in
        the background. With none idle, this waits for a child being started;
        when ``max`` children exist, it waits until one comes back and a fresh
        one is ready. Bound the wait with :func:`trio.fail_after`. Waiters are
        served first come, first served.

        Raises:
            PoolClosed: the pool is closed, or closed while this was waiting.

        **Cancellation:** waiting is safe to cancel: nothing is taken (a child
        handed over at that moment goes back to the idle set). Cancelling the
        block does not interrupt the child's shutdown.

        **Resource handling:** leaving the block (normally, by an exception or by
        cancellation) shuts the child down gracefully and waits until it is
        reaped (see :meth:`Context.aclose`); a taken child is never reused.

        **Error handling:** an exception from the block propagates unchanged.
        If the child died while taken, its users' calls raise
        :class:`ContextDied`; the pool needs nothing more.
        """
        async with self._taken(wait=True) as ctx:
            yield ctx

    @asynccontextmanager
    async def take_nowait(self) -> AsyncIterator[Context]:
        """Like :meth:`take`, but fail at once unless a child is idle.

        Raises:
            PoolEmpty: no child is idle right now.
            PoolClosed: the pool is closed.

        **Cancellation:** entering never blocks; leaving shuts the child down,
        shielded, as for :meth:`take`.

        **Resource handling:** as for :meth:`take`.

        **Error handling:** as for :meth:`take`.
        """
        async with self._taken(wait=False) as ctx:
            yield ctx

    @asynccontextmanager
    async def _taken(self, *, wait: bool) -> AsyncIterator[Context]:
        ctx = await self._acquire(wait=wait)
        try:
            yield ctx
        finally:
            await self._give_back(ctx)

    @asynccontextmanager
    async def session(self, key: Hashable) -> AsyncIterator[Context]:
        """Share one child between every concurrent user of *key*.

        The first user takes an idle child (as :meth:`take` does; its replacement
        is started at once); later users of the same key get the same child while
        any user holds it. When the last user leaves, the child is kept for
        ``linger`` seconds: a user who comes back in that time reuses it,
        otherwise it is shut down gracefully. A user who arrives while the child
        is shutting down waits until it has exited and then gets a fresh one, so
        that one key never has two children at a time.

        Raises:
            PoolClosed: the pool is closed, or closed while this was waiting.

        **Cancellation:** waiting for the child is safe to cancel. If the user
        who was getting the child is cancelled, another waiting user of the key
        takes over.

        **Resource handling:** the child belongs to the pool; leaving the block
        only releases this user's hold on it. It is shut down after the linger
        time, or when the pool closes.

        **Error handling:** if the child dies, every user's calls raise
        :class:`ContextDied` (their blocks are not interrupted), the death is
        logged, and the next ``session(key)`` gets a fresh child. An exception
        from the block propagates unchanged.
        """
        session = await self._join_session(key)
        try:
            assert session.ctx is not None
            yield session.ctx
        finally:
            self._leave_session(session)

    async def wait_idle(self, count: int | None = None) -> None:
        """Wait until at least *count* idle children are alive (default ``spare``).

        Raises:
            PoolClosed: the pool is closed, or closed while this was waiting.

        **Cancellation:** safe; this only watches.

        **Resource handling:** nothing is taken or held.

        **Error handling:** none beyond :class:`PoolClosed`; failing starts are
        retried by the pool, so bound the wait with :func:`trio.fail_after`.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._closed:
                raise PoolClosed(f"pool {self.name!r} is closed")
            wanted = self._spare if count is None else count
            if sum(not entry.ctx.has_exited for entry in self._idle.values()) >= wanted:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return
            await self._changed.wait()

    # -- internals: taking and giving back -----------------------------------

    async def _acquire(self, *, wait: bool) -> Context:
        """Hand out a child (counted busy), waiting for one if *wait*."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise PoolClosed(f"pool {self.name!r} is closed")
        asked_at = trio.current_time()
        ctx = self._pop_idle()
        if ctx is None:
            if not wait:
                raise PoolEmpty(f"pool {self.name!r} has no idle child")
            waiter = _Waiter()
            self._waiters.append(waiter)
            self._kick()
            try:
                await waiter.event.wait()
            except BaseException:
                if waiter.ctx is None:
                    self._waiters.remove(waiter)
                elif not self._closed:
                    # Handed over as we were cancelled: unused, so it is still idle.
                    self._busy -= 1
                    self._handed.discard(waiter.ctx)
                    self._offer(waiter.ctx)
                self._kick()
                raise
            if self._closed or waiter.ctx is None:
                if waiter.ctx is not None:
                    self._busy -= 1  # the pool's shutdown closes it
                raise PoolClosed(f"pool {self.name!r} closed while waiting for a child")
            ctx = waiter.ctx
        else:
            self._busy += 1
            self._handed.add(ctx)
            self._kick()  # start the replacement
            await trio.lowlevel.cancel_shielded_checkpoint()
        self._takes += 1
        self._latencies.append(trio.current_time() - asked_at)
        self._notify()
        return ctx

    def _pop_idle(self) -> Context | None:
        """Remove and return the oldest live idle child (not yet counted busy)."""
        while self._idle:
            entry = self._idle.pop(next(iter(self._idle)))
            entry.watcher.cancel()
            if not entry.ctx.has_exited:
                return entry.ctx
            self._note_idle_death(entry.ctx)
        return None

    async def _give_back(self, ctx: Context) -> None:
        """Shut down a child handed out by ``take``; shielded (via ``aclose``)."""
        self._busy -= 1
        self._stopping += 1
        self._kick()
        try:
            await ctx.aclose()
        finally:
            self._stopping -= 1
            self._handed.discard(ctx)
            self._kick()

    def _offer(self, ctx: Context) -> None:
        """A ready, unused child: to the first waiter, else into the idle set."""
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.ctx = ctx
            self._busy += 1
            self._handed.add(ctx)
            waiter.event.set()
            self._notify()
            return
        entry = _Idle(ctx, trio.current_time())
        self._idle[ctx] = entry
        assert self._nursery is not None
        self._nursery.start_soon(self._watch_idle, entry, name=f"{self.name}: watch {ctx.name}")
        self._notify()

    async def _watch_idle(self, entry: _Idle) -> None:
        with entry.watcher:
            await entry.ctx.wait_exited()
            if self._idle.get(entry.ctx) is entry:
                del self._idle[entry.ctx]
                self._note_idle_death(entry.ctx)

    def _note_idle_death(self, ctx: Context) -> None:
        self._idle_deaths += 1
        log.warning(
            "pool %r: idle child %s (pid %s) died: %s; replacing it",
            self.name,
            ctx.name,
            ctx.pid,
            describe_exit(ctx.returncode),
        )
        # A child that dies before it is used counts as a failed start: a target
        # that exits at once is restarted with backoff, not in a loop. Deaths
        # during a back-off (several children killed together) count once.
        if not self._failing:
            self._note_failure(self._failure_epoch)
        self._kick()
        self._notify()

    def _retire(self, entry: _Idle, why: str) -> None:
        """Shut down an idle child in the background."""
        del self._idle[entry.ctx]
        entry.watcher.cancel()
        self._stopping += 1
        log.debug("pool %r: retiring %s (%s)", self.name, entry.ctx.name, why)
        assert self._nursery is not None
        self._nursery.start_soon(self._stop_retired, entry.ctx, name=f"{self.name}: retire")
        self._notify()

    async def _stop_retired(self, ctx: Context) -> None:
        try:
            await ctx.aclose()
        finally:
            self._stopping -= 1
            self._kick()
            self._notify()

    # -- internals: sessions ---------------------------------------------------

    async def _join_session(self, key: Hashable) -> _Session:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._closed:
                raise PoolClosed(f"pool {self.name!r} is closed")
            session = self._sessions.get(key)
            if session is None:
                return await self._open_session(key)
            if session.closing:
                # Never hand out the dying child: wait until it is gone.
                await session.gone.wait()
                continue
            session.users += 1
            session.generation += 1
            if session.linger_scope is not None:
                session.linger_scope.cancel()
                session.linger_scope = None
            if session.ctx is None:
                try:
                    await session.acquired.wait()
                except BaseException:
                    self._leave_session(session)
                    raise
                if session.failed:
                    session.users -= 1
                    continue
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return session

    async def _open_session(self, key: Hashable) -> _Session:
        session = _Session(key, users=1)
        self._sessions[key] = session
        try:
            ctx = await self._acquire(wait=True)
        except BaseException:
            session.users -= 1
            session.failed = True
            self._drop_session(session)
            session.acquired.set()
            raise
        session.ctx = ctx
        session.acquired.set()
        assert self._nursery is not None
        self._nursery.start_soon(
            self._watch_session, session, name=f"{self.name}: watch session {key!r}"
        )
        self._notify()
        return session

    def _leave_session(self, session: _Session) -> None:
        session.users -= 1
        session.generation += 1
        if session.users == 0 and session.ctx is not None and not session.closing:
            if self._closed:
                return
            assert self._nursery is not None
            self._nursery.start_soon(
                self._linger_then_close,
                session,
                session.generation,
                name=f"{self.name}: linger {session.key!r}",
            )

    async def _linger_then_close(self, session: _Session, generation: int) -> None:
        with trio.CancelScope() as scope:
            if session.generation == generation:
                session.linger_scope = scope
                await trio.sleep(self._linger)
        if session.linger_scope is scope:
            session.linger_scope = None
        if session.generation != generation or session.users or session.closing:
            return
        await self._close_session(session)

    async def _watch_session(self, session: _Session) -> None:
        assert session.ctx is not None
        status = await session.ctx.wait_exited()
        if not session.closing and not self._closed:
            log.warning(
                "pool %r: the child %s (pid %s) of session %r died: %s",
                self.name,
                session.ctx.name,
                session.ctx.pid,
                session.key,
                describe_exit(status),
            )
            await self._close_session(session)

    async def _close_session(self, session: _Session) -> None:
        """Shut the session's child down (shielded) and drop the session."""
        if session.closing or session.ctx is None:
            return
        session.closing = True
        if session.linger_scope is not None:
            session.linger_scope.cancel()
        self._busy -= 1
        self._stopping += 1
        self._notify()
        try:
            await session.ctx.aclose()
        finally:
            self._stopping -= 1
            self._handed.discard(session.ctx)
            self._drop_session(session)
            self._kick()

    def _drop_session(self, session: _Session) -> None:
        if self._sessions.get(session.key) is session:
            del self._sessions[session.key]
        session.gone.set()
        self._notify()

    # -- internals: starting children and keeping the numbers ----------------

    def _total(self) -> int:
        return len(self._idle) + self._busy + self._starting + self._stopping

    def _kick(self) -> None:
        """Ask the maintenance task to look again."""
        self._wake.set()

    def _notify(self) -> None:
        """Wake everyone waiting for a change of state."""
        self._changed.set()
        self._changed = trio.Event()

    async def _maintain(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Start children as needed, retire idle ones past their timeout."""
        with trio.CancelScope() as scope:
            self._maintainer = scope
            async with trio.open_nursery() as starts:
                task_status.started()
                while True:
                    self._wake = trio.Event()
                    deadline = self._step(starts)
                    with trio.move_on_at(deadline):
                        await self._wake.wait()

    def _step(self, starts: trio.Nursery) -> float:
        """Do what is due now; return when to look again (unless kicked)."""
        deadline = math.inf
        if self._closed:
            return deadline
        now = trio.current_time()
        demand = self._spare + len(self._waiters) - len(self._idle) - self._starting
        room = self._max - self._total()
        needed = demand if demand < room else room
        if needed > 0:
            if not self._failing:
                for _ in range(needed):
                    self._start_one(starts)
            elif self._starting == 0:
                # Backing off: one attempt at a time, once the delay is over.
                if now >= self._retry_at:
                    self._start_one(starts)
                else:
                    deadline = self._retry_at
        # Over max after a shrink (children that were starting then are ready now).
        while self._idle and self._total() > self._max:
            self._retire(next(iter(self._idle.values())), "over max")
        timeout = self._idle_timeout
        if timeout is not None:
            while len(self._idle) > self._spare:
                oldest = next(iter(self._idle.values()))
                due = oldest.since + timeout
                if due > now:
                    deadline = due if due < deadline else deadline
                    break
                self._retire(oldest, f"idle for {timeout} s above spare")
        return deadline

    def _start_one(self, starts: trio.Nursery) -> None:
        self._starting += 1
        self._number += 1
        name = f"{self.name}-{self._number}"
        starts.start_soon(self._start_child, name, self._failure_epoch, name=f"start {name}")

    async def _start_child(self, name: str, epoch: int) -> None:
        try:
            ctx = await self.supervisor.start_child(
                self._target, *self._args, name=name, policy=self._policy, raise_on_crash=False
            )
        except (ChildStartError, WireError, OSError) as exc:
            self._starting -= 1
            self._spawn_failures += 1
            delay = self._note_failure(epoch)
            log.warning(
                "pool %r: child %s failed to start (%d failures so far); "
                "next attempt in %.3g s: %s",
                self.name,
                name,
                self._spawn_failures,
                delay,
                str(exc).splitlines()[0],
            )
            self._kick()
            self._notify()
            return
        except BaseException:
            self._starting -= 1
            self._kick()
            raise
        self._starting -= 1
        self._total_spawned += 1
        self._failing = False
        self._backoff = self._backoff_initial
        if self._closed:
            await ctx.aclose()
            return
        self._offer(ctx)
        self._kick()

    def _note_failure(self, epoch: int) -> float:
        """Back off after a failure; return seconds until the next attempt.

        Failures of attempts made before the last back-off belong to it (several
        children started at once and failing together back off once).
        """
        if epoch == self._failure_epoch:
            self._failure_epoch += 1
            self._failing = True
            self._retry_at = trio.current_time() + self._backoff
            self._backoff = min(self._backoff * 2, self._backoff_max)
        return max(self._retry_at - trio.current_time(), 0.0)

    async def _shutdown(self) -> None:
        """Close the pool: fail waiters, stop starting, shut every child down."""
        self._closed = True
        for waiter in self._waiters:
            waiter.event.set()
        self._waiters.clear()
        if self._maintainer is not None:
            self._maintainer.cancel()
        children = list(self._idle)
        for entry in self._idle.values():
            entry.watcher.cancel()
        self._idle.clear()
        children.extend(self._handed)
        for session in self._sessions.values():
            if session.linger_scope is not None:
                session.linger_scope.cancel()
        self._notify()
        async with trio.open_nursery() as nursery:
            for ctx in children:
                nursery.start_soon(ctx.aclose)


def _timeout_or_none(value: float | None) -> float | None:
    return None if value is None or math.isinf(value) else value


def _max_of(a: int, b: int) -> int:
    return a if a > b else b


#: The open pools of each supervisor, by name (the control API lists them).
_POOLS: weakref.WeakKeyDictionary[Supervisor, dict[str, Pool]] = weakref.WeakKeyDictionary()


def _registry(supervisor: Supervisor) -> dict[str, Pool]:
    return _POOLS.setdefault(supervisor, {})


def pools_of(supervisor: Supervisor) -> Mapping[str, Pool]:
    """The open pools of *supervisor*, by name (a read-only view)."""
    return MappingProxy(_registry(supervisor))


@asynccontextmanager
async def open_pool(
    supervisor: Supervisor,
    target: Target = None,
    *args: Any,
    name: str | None = None,
    spare: int = 2,
    max: int = 32,
    idle_timeout: float | None = None,
    linger: float = 0.0,
    backoff_initial: float = 0.1,
    backoff_max: float = 30.0,
    policy: Policy | None = None,
) -> AsyncIterator[Pool]:
    """Open a pool of prespawned children of *supervisor*, running ``target(*args)``.

    Args:
        supervisor: the supervisor that owns the children.
        target: as for :meth:`Supervisor.start_child` (``None``: a child that
            only serves :meth:`Context.call`).
        *args: picklable arguments for the target.
        name: the pool's name, unique in its supervisor (default ``pool``,
            ``pool-2``, ...); children are named ``<name>-1``, ``<name>-2``, ...
        spare: idle children kept ready.
        max: most children in all: idle, handed out, starting and shutting down.
        idle_timeout: seconds an idle child above ``spare`` is kept before it is
            retired (``None`` or ``math.inf``: kept for ever).
        linger: seconds a session's child outlives its last user.
        backoff_initial: seconds before retrying after a failed start; doubled
            after each further failure, reset by a successful start.
        backoff_max: the longest delay between attempts.
        policy: the children's :class:`Policy` (default: the supervisor's).

    Raises:
        ValueError: an invalid setting (named in the message): ``max < 1``,
            ``spare < 0``, ``spare > max``, a negative time, or
            ``backoff_max < backoff_initial``.
        WireError: the target or arguments cannot be pickled.

    **Cancellation:** however the block exits, the pool closes: callers waiting
    for a child get :class:`PoolClosed`, starts in progress are cancelled (their
    half-started children killed and reaped), and every child of the pool, idle
    or handed out, is shut down gracefully, concurrently, shielded from
    cancellation (each within its policy's close deadline).

    **Resource handling:** the pool's tasks run in a nursery it opens itself;
    the children run in the supervisor, which must outlive the pool's block.

    **Error handling:** failed starts are logged (logger ``nursery_procs.pool``),
    counted, and retried with exponential backoff, one attempt at a time while
    failing, so a broken target causes no fork storm. Idle children that die
    are logged and replaced (with the same backoff). An exception from the
    block propagates as itself, not wrapped in a group.
    """
    _check_settings(
        spare=spare,
        max=max,
        idle_timeout=idle_timeout,
        linger=linger,
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
    )
    dump_target(target, args)  # fail now, not in every start
    if name is None:
        name = "pool"
        serial = 1
        while name in _registry(supervisor):
            serial += 1
            name = f"pool-{serial}"
    pool = Pool(
        supervisor,
        target,
        args,
        name=name,
        spare=spare,
        max=max,
        idle_timeout=idle_timeout,
        linger=linger,
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
        policy=policy,
    )
    if name in _registry(supervisor):
        raise ValueError(f"name: this supervisor already has a pool named {name!r}")
    _registry(supervisor)[name] = pool
    with unwrap_sole_exception():
        async with trio.open_nursery() as nursery:
            pool._nursery = nursery
            await nursery.start(pool._maintain)
            try:
                yield pool
            finally:
                with trio.CancelScope(shield=True):
                    await pool._shutdown()
                nursery.cancel_scope.cancel()
                _registry(supervisor).pop(name, None)
