"""Prespawned pools: ready children handed out at once, and keyed sessions.

A pool keeps ``spare`` idle children that have already started and said they
are ready, so that handing one out costs no process start. Children taken from
the pool are never reused: leaving the ``take()`` block shuts the child down and
the pool starts a fresh one in the background. Keyed sessions share one child
between every concurrent user of the same key.
"""

from __future__ import annotations

import statistics
import weakref
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import MappingProxyType
from typing import TypeVarTuple

import attrs
import trio

from .._context import Context
from .._groups import unwrap_sole_exception
from .._isolation import Isolation
from .._process import Policy
from .._spec import Target, dump_target
from .._ssh import SSH
from .._supervisor import ChildOptions, Supervisor
from ._keeper import SlotKeeper
from ._sessions import Sessions
from ._settings import PoolSettings, PoolStatistics
from ._slots import SlotState

Ts = TypeVarTuple("Ts")


class Pool:
    """Prespawned children of a supervisor; made by :func:`open_pool`.

    The pool keeps ``spare`` idle children ready, and never has more than ``max``
    children in all (idle, handed out, starting, and shutting down). Timing uses
    :func:`trio.current_time` only, so a fake clock drives it in tests.
    """

    def __init__(self, keeper: SlotKeeper) -> None:
        self._keeper = keeper
        self._sessions = Sessions(keeper)

    @property
    def name(self) -> str:
        """The pool's name, unique in its supervisor."""
        return self._keeper.name

    @property
    def supervisor(self) -> Supervisor:
        """The supervisor that owns the pool's children."""
        return self._keeper.supervisor

    def __repr__(self) -> str:
        stats = self.statistics()
        return (
            f"<Pool {self.name!r} idle={stats.idle} busy={stats.busy} "
            f"starting={stats.starting}{' closed' if self.closed else ''}>"
        )

    # -- introspection ---------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the pool is closed (its block has been left)."""
        return self._keeper.closed

    @property
    def settings(self) -> PoolSettings:
        """The current settings (change them with :meth:`resize`)."""
        return self._keeper.settings

    @property
    def idle_children(self) -> tuple[Context, ...]:
        """The idle children, oldest first (the next :meth:`take` gets the first)."""
        idle = self._keeper.slots.in_state(SlotState.IDLE)
        return tuple(slot.ctx for slot in idle if slot.ctx is not None)

    def sessions(self) -> dict[Hashable, Context]:
        """The live sessions: key → the child they share.

        Sessions still getting their child, or shutting it down, are left out.
        """
        return self._sessions.live()

    def statistics(self) -> PoolStatistics:
        """A snapshot of the pool's children, counters and settings."""
        keeper = self._keeper
        slots, counters, settings = keeper.slots, keeper.counters, keeper.settings
        latencies = counters.latencies
        return PoolStatistics(
            idle=slots.count(SlotState.IDLE),
            busy=slots.count(SlotState.TAKEN) + slots.count(SlotState.SESSION),
            starting=slots.count(SlotState.STARTING),
            stopping=slots.count(SlotState.STOPPING),
            waiting=keeper.waiting,
            sessions=len(self._sessions.live()),
            total_spawned=counters.total_spawned,
            spawn_failures=counters.spawn_failures,
            idle_deaths=counters.idle_deaths,
            takes=counters.takes,
            take_latency_median=statistics.median(latencies) if latencies else 0.0,
            spare=settings.spare,
            max=settings.max,
            idle_timeout=settings.idle_timeout,
            retired_after_max_uses=counters.retired_after_max_uses,
        )

    # -- settings --------------------------------------------------------

    def resize(
        self,
        *,
        spare: int | None = None,
        max: int | None = None,
        idle_timeout: float | None = None,
        linger: float | None = None,
        backoff_initial: float | None = None,
        backoff_max: float | None = None,
    ) -> PoolSettings:
        """Apply new settings now and return them; ``None`` leaves a setting as it is.

        The new :class:`PoolSettings` is the current one with these changes
        (:func:`attrs.evolve`), validated as a whole. Growing ``spare`` (or
        ``max``) starts more children in the background. Shrinking retires idle
        children at once, gracefully: those above the new ``spare``, and as many
        as needed to bring the total down to the new ``max`` (busy children are
        never taken back; the pool simply starts no more until enough come back).
        Pass ``idle_timeout=math.inf`` to keep idle children above ``spare`` for
        ever.

        Raises:
            ValueError: a new value is out of range, or the combination is
                invalid (the message names the setting); nothing is changed.
            TypeError: a new value has the wrong type, or the setting does not
                exist (the message names it); nothing is changed.
            PoolClosed: the pool is closed.
        """
        self._keeper.check_open()
        given: dict[str, object] = {
            "spare": spare,
            "max": max,
            "idle_timeout": idle_timeout,
            "linger": linger,
            "backoff_initial": backoff_initial,
            "backoff_max": backoff_max,
        }
        changes = {setting: value for setting, value in given.items() if value is not None}
        settings = attrs.evolve(self._keeper.settings, **changes)  # type: ignore[arg-type]
        self._keeper.apply(settings)
        return settings

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
        slot = await self._keeper.acquire(wait=wait)
        try:
            assert slot.ctx is not None
            yield slot.ctx
        finally:
            await self._keeper.stop(slot)

    @asynccontextmanager
    async def session(self, key: Hashable) -> AsyncIterator[Context]:
        """Share one child between every concurrent user of *key*.

        The first user takes an idle child (as :meth:`take` does; its replacement
        is started at once); later users of the same key get the same child while
        any user holds it. When the last user leaves, the child is kept for
        ``linger`` seconds: a user who comes back in that time reuses it,
        otherwise it is shut down gracefully. A user who arrives while the child
        is shutting down waits until it has exited and then gets a fresh one, so
        that one key never has two children at a time. A child that has died (or
        is dying) is never handed out, even before the pool has noticed its
        death: its user gets a fresh one.

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
        session = await self._sessions.join(key)
        try:
            yield session.ctx
        finally:
            self._sessions.leave(session)

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
        keeper = self._keeper
        while True:
            keeper.check_open()
            wanted = keeper.settings.spare if count is None else count
            if sum(slot.alive for slot in keeper.slots.in_state(SlotState.IDLE)) >= wanted:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return
            await keeper.wait_changed()


#: The open pools of each supervisor, by name (the control API lists them).
_POOLS: weakref.WeakKeyDictionary[Supervisor, dict[str, Pool]] = weakref.WeakKeyDictionary()


def _registry(supervisor: Supervisor) -> dict[str, Pool]:
    return _POOLS.setdefault(supervisor, {})


def pools_of(supervisor: Supervisor) -> Mapping[str, Pool]:
    """The open pools of *supervisor*, by name (a read-only view)."""
    return MappingProxyType(_registry(supervisor))


def _unique_name(supervisor: Supervisor, name: str | None, default: str) -> str:
    if name is not None:
        if name in _registry(supervisor):
            raise ValueError(f"name: this supervisor already has a pool named {name!r}")
        return name
    name, serial = default, 1
    while name in _registry(supervisor):
        serial += 1
        name = f"{default}-{serial}"
    return name


@asynccontextmanager
async def run_keeper(
    supervisor: Supervisor,
    target: Target,
    args: tuple[object, ...],
    *,
    name: str | None,
    settings: PoolSettings,
    options: ChildOptions,
    default_name: str = "pool",
) -> AsyncIterator[tuple[Pool, SlotKeeper]]:
    """Open a pool's nursery and keeper, register it, and close it on the way out."""
    if not isinstance(supervisor, Supervisor):
        raise TypeError(f"supervisor must be a Supervisor, not {supervisor!r}")
    dump_target(target, args)  # fail now, not in every start
    name = _unique_name(supervisor, name, default_name)
    keeper = SlotKeeper(supervisor, target, args, name=name, settings=settings, options=options)
    pool = Pool(keeper)
    _registry(supervisor)[name] = pool
    try:
        with unwrap_sole_exception():
            async with trio.open_nursery() as nursery:
                keeper.open(nursery)
                await nursery.start(keeper.maintain)
                try:
                    yield pool, keeper
                finally:
                    with trio.CancelScope(shield=True):
                        await keeper.shutdown(before_closing=pool._sessions.close_all)
                    nursery.cancel_scope.cancel()
    finally:
        _registry(supervisor).pop(name, None)


def open_pool(
    supervisor: Supervisor,
    target: Callable[[*Ts], object] | str | None = None,
    *args: *Ts,
    name: str | None = None,
    spare: int = 2,
    max: int = 32,
    idle_timeout: float | None = None,
    linger: float = 0.0,
    backoff_initial: float = 0.1,
    backoff_max: float = 30.0,
    policy: Policy | None = None,
    trusted: bool | None = None,
    start_method: str | None = None,
    preload: Iterable[str] | None = None,
    isolation: Isolation | None = None,
    via: SSH | None = None,
) -> AbstractAsyncContextManager[Pool]:
    """Open a pool of prespawned children of *supervisor*, running ``target(*args)``.

    Use it as ``async with open_pool(supervisor, ...) as pool:``.

    Args:
        supervisor: the supervisor that owns the children.
        target: as for :meth:`Supervisor.start_child` (``None``: a child that
            only serves :meth:`Context.call`); a function's arguments are
            type-checked against *args*.
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
        trusted: ``False`` for children whose messages must never be unpickled
            (see :meth:`Supervisor.start_child`; default: the supervisor's).
        start_method: ``"exec"`` or ``"forkserver"`` (default: the supervisor's).
        preload: modules the fork server imports, and functions it runs
            (``"package.module:function"``), before forking the children.
        isolation: the children's :class:`Isolation` (default: the supervisor's).
        via: the host the children run on (:func:`ssh`; default: the supervisor's).

    The settings make one :class:`PoolSettings`, validated as a whole.

    Raises:
        ValueError: an invalid setting (named in the message): ``max < 1``,
            ``spare < 0``, ``spare > max``, a negative time, or
            ``backoff_max < backoff_initial``; or a name already in use.
        TypeError: a setting of the wrong type (named in the message), or
            *supervisor* is not a :class:`Supervisor`.
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
    settings = PoolSettings(
        spare=spare,
        max=max,
        idle_timeout=idle_timeout,
        linger=linger,
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
    )
    options = ChildOptions(
        policy=policy,
        trusted=trusted,
        start_method=start_method,
        preload=preload,
        isolation=isolation,
        via=via,
    )
    return _open_pool(supervisor, target, args, name=name, settings=settings, options=options)


@asynccontextmanager
async def _open_pool(
    supervisor: Supervisor,
    target: Target,
    args: tuple[object, ...],
    *,
    name: str | None,
    settings: PoolSettings,
    options: ChildOptions,
) -> AsyncIterator[Pool]:
    async with run_keeper(
        supervisor, target, args, name=name, settings=settings, options=options
    ) as (pool, _):
        yield pool
