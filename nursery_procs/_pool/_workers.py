"""Worker pools: run a function in a reusable child process and get its result."""

from __future__ import annotations

import inspect
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar, TypeVarTuple, overload

import trio

from .._context import Context
from .._isolation import Isolation
from .._process import Policy
from .._ssh import SSH
from .._supervisor import ChildOptions, Supervisor
from ._direct import DirectChannel
from ._keeper import SlotKeeper
from ._prespawn import Pool, run_keeper
from ._settings import PoolSettings, PoolStatistics, check_whole_number
from ._slots import Slot, SlotState

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


def _is_sync(fn: object) -> bool:
    """Whether *fn* is a function known here to be sync (a ``"module:function"``
    name is not: only the worker can tell)."""
    return callable(fn) and not inspect.iscoroutinefunction(fn)


class WorkerPool:
    """Reusable worker processes for calls; made by :func:`open_worker_pool`.

    A worker is a child that serves :meth:`Context.call`. :meth:`run` borrows
    one for a single call and gives it back for the next: no process start per
    call once the workers are up.
    """

    def __init__(
        self,
        pool: Pool,
        keeper: SlotKeeper,
        limiter: trio.CapacityLimiter,
        max_uses: int | None,
        *,
        direct: bool = False,
    ) -> None:
        self._pool = pool
        self._keeper = keeper
        self._limiter = limiter
        self._max_uses = max_uses
        # Direct calls (see _direct.py), for local, trusted workers: each worker's
        # channel, or None once it is known that it cannot have one.
        self._direct = direct
        self._channels: dict[Slot, DirectChannel | None] = {}

    def __repr__(self) -> str:
        stats = self.statistics()
        return (
            f"<WorkerPool {self.name!r} idle={stats.idle} busy={stats.busy} "
            f"limit={self.limiter.total_tokens}{' closed' if self.closed else ''}>"
        )

    @property
    def name(self) -> str:
        """The pool's name, unique in its supervisor (the control API lists it)."""
        return self._pool.name

    @property
    def closed(self) -> bool:
        """Whether the pool is closed (its block has been left)."""
        return self._pool.closed

    @property
    def limiter(self) -> trio.CapacityLimiter:
        """The limit on concurrent calls (change ``total_tokens`` to change it)."""
        return self._limiter

    @property
    def max_uses(self) -> int | None:
        """Calls a worker serves before it is retired (``None``: no limit)."""
        return self._max_uses

    @property
    def settings(self) -> PoolSettings:
        """The underlying pool's settings (``spare`` workers are kept started)."""
        return self._pool.settings

    def statistics(self) -> PoolStatistics:
        """A snapshot: ``busy`` workers are running a call, ``idle`` ones wait for
        the next, ``takes`` counts calls that got a worker."""
        return self._pool.statistics()

    @overload
    async def run(
        self, fn: Callable[[*Ts], Awaitable[T]], *args: *Ts, kill_on_cancel: bool = False
    ) -> T: ...

    @overload
    async def run(self, fn: Callable[[*Ts], T], *args: *Ts, kill_on_cancel: bool = False) -> T: ...

    @overload
    async def run(self, fn: str, *args: object, kill_on_cancel: bool = False) -> Any: ...

    async def run(
        self, fn: Callable[[*Ts], Any] | str, *args: *Ts, kill_on_cancel: bool = False
    ) -> Any:
        """Run ``fn(*args)`` in a worker and return its result.

        *fn* is what :meth:`Context.call` accepts: an importable function, sync
        or async, or a ``"module:function"`` string; pass keyword arguments with
        :func:`functools.partial`. The call waits for a free worker while the
        limit of concurrent calls is reached (first come, first served), uses
        the most recently returned idle worker, or starts a new one. A worker
        serves one call at a time.

        Raises:
            Exception: *fn* raised this; it is re-raised here as its own type,
                as :meth:`Context.call` does.
            ContextDied: the worker died during the call (it is replaced by the
                next call that needs one).
            PoolClosed: the pool is closed, or closed while this was waiting.
            WireError: the function, the arguments or the result cannot be pickled.

        A sync *fn* called on a local, trusted worker goes over a socket of the
        worker's own, to a thread there that runs it (see "Direct calls" in
        :doc:`pools`); otherwise, and for async functions, ``"module:function"``
        names and ``kill_on_cancel`` calls, the call goes over the link and runs
        on the worker's event loop (``in_thread=False`` for :meth:`Context.call`).

        **Cancellation:** waiting for a worker is safe to cancel. Once the call
        runs, cancelling it behaves as for :meth:`Context.call`: an async *fn* is
        cancelled in the worker, a sync one is waited for, unless
        ``kill_on_cancel=True``, which kills the worker at once (it is replaced,
        never reused) and returns promptly.

        **Resource handling:** the worker goes back to the pool for the next
        call, unless it has served ``max_uses`` calls or is no longer running,
        in which case it is retired in the background.

        **Error handling:** an exception from *fn* leaves the worker in service;
        a worker that dies is never handed out again.
        """
        # No schedule point between choosing a worker and calling it when a
        # token is free: the worker found running is the one called.
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._limiter.acquire_nowait()
        except trio.WouldBlock:
            await self._limiter.acquire()
        try:
            keeper = self._keeper
            slot = keeper.take_idle(newest=True) or await keeper.wait_for_child()
            try:
                ctx = slot.ctx
                assert ctx is not None
                if self._direct and not kill_on_cancel and _is_sync(fn):
                    channel = await self._channel(slot, ctx)
                    if channel is not None:
                        return await channel.call(fn, args)
                return await ctx.call(fn, *args, kill_on_cancel=kill_on_cancel, in_thread=False)
            finally:
                self._give_back(slot)
        finally:
            self._limiter.release()

    async def _channel(self, slot: Slot, ctx: Context) -> DirectChannel | None:
        """The worker's direct channel, opened on its first direct call."""
        if slot in self._channels:
            return self._channels[slot]
        # A new worker: close the channels of workers that died while idle.
        for gone in [each for each in self._channels if each.state is SlotState.GONE]:
            self._forget(gone)
        self._channels[slot] = None  # if opening fails, this worker's calls use the link
        channel = self._channels[slot] = await DirectChannel.open(ctx)
        return channel

    def _give_back(self, slot: Slot) -> None:
        slot.uses += 1
        keeper = self._keeper
        if keeper.closed:
            self._forget(slot)
            keeper.move(slot, SlotState.GONE)  # the pool's shutdown closes it
        elif not slot.ready or self._broken(slot):
            # (a worker that died unnoticed is caught when next taken)
            self._forget(slot)
            keeper.retire(slot, "it stopped running")
        elif self._max_uses is not None and slot.uses >= self._max_uses:
            self._forget(slot)
            keeper.retire(slot, f"it served {slot.uses} calls", max_uses=True)
        else:
            keeper.offer(slot)

    def _broken(self, slot: Slot) -> bool:
        channel = self._channels.get(slot)
        return channel is not None and channel.closed

    def _forget(self, slot: Slot) -> None:
        channel = self._channels.pop(slot, None)
        if channel is not None:
            channel.close()

    def close_channels(self) -> None:
        """Close every direct channel (the pool is closing)."""
        for slot in list(self._channels):
            self._forget(slot)


def open_worker_pool(
    supervisor: Supervisor,
    *,
    limit: int | None = None,
    max_uses: int | None = None,
    idle_timeout: float | None = 600.0,
    spare: int = 0,
    name: str | None = None,
    backoff_initial: float = 0.1,
    backoff_max: float = 30.0,
    policy: Policy | None = None,
    trusted: bool | None = None,
    start_method: str | None = None,
    preload: Iterable[str] | None = None,
    isolation: Isolation | None = None,
    via: SSH | None = None,
) -> AbstractAsyncContextManager[WorkerPool]:
    """Open a pool of worker processes of *supervisor* for :meth:`WorkerPool.run`.

    Use it as ``async with open_worker_pool(supervisor) as workers:``. Workers
    are started when calls need them and kept between calls.

    Args:
        supervisor: the supervisor that owns the workers.
        limit: the most calls running at once, so the most workers busy
            (default: :func:`os.cpu_count`). Up to as many more may be shutting
            down at a time.
        max_uses: calls a worker serves before it is retired and replaced
            (``None``: no limit), for code that leaks.
        idle_timeout: seconds an idle worker above ``spare`` is kept (``None``
            or ``math.inf``: for ever).
        spare: workers kept started even when no call needs them.
        name: the pool's name, unique in its supervisor (as for :func:`open_pool`).
        backoff_initial: seconds before retrying after a failed start (doubled
            after each further failure).
        backoff_max: the longest delay between attempts.
        policy: the workers' :class:`Policy` (default: the supervisor's).
        trusted: ``False`` for workers whose messages must never be unpickled
            (see :meth:`Supervisor.start_child`; default: the supervisor's).
        start_method: ``"exec"`` or ``"forkserver"`` (default: the supervisor's).
        preload: modules the fork server imports, and functions it runs
            (``"package.module:function"``), before forking the workers.
        isolation: the workers' :class:`Isolation` (default: the supervisor's).
        via: the host the workers run on (:func:`ssh`; default: the supervisor's).

    Raises:
        ValueError: a setting out of range (named in the message): ``limit < 1``,
            ``max_uses < 1``, a negative time, ``spare > limit``.
        TypeError: a setting of the wrong type (named in the message).

    **Cancellation:** however the block exits, the pool closes as a
    :func:`open_pool` pool does: calls waiting for a worker get
    :class:`PoolClosed`, and every worker is shut down gracefully, concurrently,
    shielded from cancellation.

    **Resource handling:** the pool's tasks run in a nursery it opens itself; the
    workers run in the supervisor, which must outlive the pool's block.

    **Error handling:** failed starts are logged, counted and retried with
    backoff; an exception from the block propagates as itself.
    """
    if limit is None:
        limit = os.cpu_count() or 1
    check_whole_number("limit", limit, minimum=1)
    if max_uses is not None:
        check_whole_number("max_uses", max_uses, minimum=1)
    settings = PoolSettings(
        spare=spare,
        max=2 * limit,
        idle_timeout=idle_timeout,
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
    )
    if spare > limit:
        raise ValueError(f"spare ({spare!r}) must not be more than limit ({limit!r})")
    options = ChildOptions(
        policy=policy,
        trusted=trusted,
        start_method=start_method,
        preload=preload,
        isolation=isolation,
        via=via,
    )
    return _open_worker_pool(supervisor, name, settings, options, limit, max_uses)


@asynccontextmanager
async def _open_worker_pool(
    supervisor: Supervisor,
    name: str | None,
    settings: PoolSettings,
    options: ChildOptions,
    limit: int,
    max_uses: int | None,
) -> AsyncIterator[WorkerPool]:
    async with run_keeper(
        supervisor,
        None,
        (),
        name=name,
        default_name="workers",
        settings=settings,
        options=options,
    ) as (pool, keeper):
        asked = options.get("trusted")
        trusted = supervisor.trusted if asked is None else asked
        via = options.get("via") or supervisor.start_options.via
        direct = trusted and via is None and not supervisor.fake
        workers = WorkerPool(pool, keeper, trio.CapacityLimiter(limit), max_uses, direct=direct)
        try:
            yield workers
        finally:
            workers.close_channels()
