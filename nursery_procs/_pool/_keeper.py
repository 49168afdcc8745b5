"""The engine of a pool: its slots, the callers waiting for one, and its policies.

Three policies run in one maintenance task, one method each: *demand* starts
children (with backoff while starts fail), *over max* retires idle children
after ``max`` was lowered, *idle timeout* retires idle children above
``spare``. Everything else reacts to events: a child becoming ready, being
handed out, given back or exiting.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TypeVarTuple

import attrs
import trio

from .._errors import ChildStartError, PoolClosed, PoolEmpty, WireError
from .._process import Policy, describe_exit
from .._spec import Target
from .._supervisor import ChildOptions, Supervisor
from ._settings import PoolSettings
from ._slots import Slot, Slots, SlotState

Ts = TypeVarTuple("Ts")

log = logging.getLogger("nursery_procs.pool")

#: How many of the most recent takes :attr:`PoolStatistics.take_latency_median` covers.
LATENCY_WINDOW = 1000


@attrs.define(eq=False)
class _Waiter:
    """A caller waiting for a child; a ready one is handed to it directly."""

    event: trio.Event = attrs.field(factory=trio.Event)
    slot: Slot | None = None


@attrs.define
class _Backoff:
    """Exponential backoff of start attempts while they fail."""

    delay: float
    failing: bool = False
    #: Failures of attempts made before the last back-off belong to it.
    epoch: int = 0
    retry_at: float = -math.inf

    def fail(self, epoch: int, settings: PoolSettings) -> float:
        """Note a failure; return seconds until the next attempt."""
        now = trio.current_time()
        if epoch == self.epoch:
            self.epoch += 1
            self.failing = True
            self.retry_at = now + self.delay
            self.delay = min(self.delay * 2, settings.backoff_max)
        return max(self.retry_at - now, 0.0)

    def succeed(self, settings: PoolSettings) -> None:
        self.failing = False
        self.delay = settings.backoff_initial


@attrs.define(eq=False)
class Counters:
    """What happened since the pool opened (the rest of its statistics are read
    from its slots)."""

    total_spawned: int = 0
    spawn_failures: int = 0
    idle_deaths: int = 0
    takes: int = 0
    retired_after_max_uses: int = 0
    latencies: collections.deque[float] = attrs.field(
        factory=lambda: collections.deque(maxlen=LATENCY_WINDOW)
    )


class SlotKeeper:
    """Keeps a pool's slots: starts, hands out, takes back and retires children.

    ``on_exit`` is called when a child that the keeper does not own at that
    moment (one in a session) exits, so that its owner can react.
    """

    def __init__(
        self,
        supervisor: Supervisor,
        target: Target,
        args: tuple[object, ...],
        *,
        name: str,
        settings: PoolSettings,
        options: ChildOptions,
    ) -> None:
        self.name = name
        self.supervisor = supervisor
        self.settings = settings
        self.slots = Slots()
        self.closed = False
        self.on_exit: Callable[[Slot], None] = lambda slot: None
        # Starts a child of the pool, given its name.
        self._start = functools.partial(
            supervisor.start_child, target, *args, raise_on_crash=False, **options
        )
        self._nursery: trio.Nursery | None = None
        self._maintainer = trio.CancelScope()
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._backoff = _Backoff(settings.backoff_initial)
        self.counters = Counters()
        self._number = 0
        self._wake = trio.Event()
        # The maintainer's sleep: its deadline is when a policy is next due. Moved
        # earlier in place (no wake-up) when a child given back will time out first.
        self._sleep: trio.CancelScope | None = None
        # Set when a slot changes state, for whoever waits for that (made on demand:
        # a state change is on every take's path, and usually nobody waits).
        self._changed: trio.Event | None = None

    # -- reading ---------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Callers waiting for a child."""
        return len(self._waiters)

    def check_open(self) -> None:
        if self.closed:
            raise PoolClosed(f"pool {self.name!r} is closed")

    async def wait_changed(self) -> None:
        if self._changed is None:
            self._changed = trio.Event()
        await self._changed.wait()

    @property
    def policy(self) -> Policy:
        """The children's policy."""
        return self._start.keywords.get("policy") or self.supervisor.policy

    # -- changing state --------------------------------------------------------

    def move(self, slot: Slot, state: SlotState, now: float | None = None) -> None:
        self.slots.move(slot, state, now)
        self._notify_changed()

    def _notify_changed(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def kick(self) -> None:
        """Ask the maintenance task to look again."""
        self._wake.set()

    def apply(self, settings: PoolSettings) -> None:
        """New settings, already validated: retire what they no longer allow."""
        self.settings = settings
        surplus = self.slots.count(SlotState.IDLE) - settings.spare
        for _ in range(max(surplus, len(self.slots) - settings.max, 0)):
            oldest = self.slots.first(SlotState.IDLE)
            if oldest is None:
                break
            self.retire(oldest, "the pool was resized")
        self.kick()

    # -- handing out and taking back -------------------------------------------

    async def acquire(self, *, wait: bool) -> Slot:
        """Hand out the child idle the longest (its slot now TAKEN), waiting for
        one if *wait*."""
        await trio.lowlevel.checkpoint_if_cancelled()
        slot = self.take_idle()
        if slot is not None:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return slot
        if not wait:
            raise PoolEmpty(f"pool {self.name!r} has no idle child")
        return await self.wait_for_child()

    def take_idle(self, *, newest: bool = False) -> Slot | None:
        """Hand out a live idle child now (its slot now TAKEN), if there is one.

        *newest*: the one most recently given back (a warm worker), rather than
        the one idle the longest. Dead ones met on the way are noted.
        """
        self.check_open()
        while (slot := self.slots.first(SlotState.IDLE, newest=newest)) is not None:
            if slot.alive:
                asked_at = trio.current_time()
                self.move(slot, SlotState.TAKEN, asked_at)
                self._taken(asked_at)
                if self._demand() > 0:
                    self.kick()  # start its replacement
                return slot
            self._idle_died(slot)
        return None

    def _taken(self, asked_at: float) -> None:
        self.counters.takes += 1
        self.counters.latencies.append(trio.current_time() - asked_at)

    def _demand(self) -> int:
        """Children wanted beyond those idle and starting (before max)."""
        slots = self.slots
        wanted = self.settings.spare + len(self._waiters)
        return wanted - slots.count(SlotState.IDLE) - slots.count(SlotState.STARTING)

    async def wait_for_child(self) -> Slot:
        """Wait for a child started (or given back) for this caller; FIFO."""
        self.check_open()
        asked_at = trio.current_time()
        waiter = _Waiter()
        self._waiters.append(waiter)
        self.kick()
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.slot is None:
                self._waiters.remove(waiter)
            elif not self.closed:
                self.offer(waiter.slot)  # handed over as we were cancelled: unused
            self.kick()
            raise
        if waiter.slot is None or self.closed:
            # The pool's shutdown closes a child handed over at that moment.
            raise PoolClosed(f"pool {self.name!r} closed while waiting for a child")
        self._taken(asked_at)
        return waiter.slot

    def offer(self, slot: Slot) -> None:
        """A ready child nobody holds: to the first waiter, else idle."""
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.slot = slot
            self.move(slot, SlotState.TAKEN)
            waiter.event.set()
        else:
            self.move(slot, SlotState.IDLE)
            timeout = self.settings.idle_timeout
            sleep = self._sleep
            if timeout is not None and sleep is not None:
                # Its idle timeout may be due before the maintainer looks again.
                due = slot.since + timeout
                if due < sleep.deadline:
                    sleep.deadline = due

    async def stop(self, slot: Slot) -> None:
        """Shut the slot's child down and wait until it is reaped (shielded)."""
        if slot.state is not SlotState.GONE:
            self.move(slot, SlotState.STOPPING)
        self.kick()
        try:
            if slot.ctx is not None:
                await slot.ctx.aclose()
        finally:
            self.move(slot, SlotState.GONE)
            self.kick()

    def retire(self, slot: Slot, why: str, *, max_uses: bool = False) -> None:
        """Shut a child down in the background."""
        log.debug("pool %r: retiring %s (%s)", self.name, slot.name, why)
        if max_uses:
            self.counters.retired_after_max_uses += 1
        self.move(slot, SlotState.STOPPING)
        self.start_soon(self.stop, slot, name=f"{self.name}: retire {slot.name}")

    def start_soon(self, fn: Callable[[*Ts], Awaitable[object]], *args: *Ts, name: str) -> None:
        """Run ``await fn(*args)`` in the pool's nursery."""
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args, name=name)

    # -- children exiting --------------------------------------------------------

    async def _watch(self, slot: Slot) -> None:
        assert slot.ctx is not None
        await slot.ctx.wait_exited()
        if self.closed:
            return
        if slot.state is SlotState.IDLE:
            self._idle_died(slot)
        elif slot.state is SlotState.SESSION:
            self.on_exit(slot)

    def _idle_died(self, slot: Slot) -> None:
        ctx = slot.ctx
        assert ctx is not None
        self.counters.idle_deaths += 1
        log.warning(
            "pool %r: idle child %s (pid %s) died: %s; replacing it",
            self.name,
            slot.name,
            ctx.pid,
            "not reaped yet" if ctx.returncode is None else describe_exit(ctx.returncode),
        )
        if ctx.has_exited:
            self.move(slot, SlotState.GONE)
        else:  # dying, or only unreachable: its supervisor finishes it off
            self.retire(slot, "it stopped running")
        # A child that dies before it is used counts as a failed start: a target
        # that exits at once is restarted with backoff, not in a loop. Deaths
        # during a back-off (several children killed together) count once.
        if not self._backoff.failing:
            self._backoff.fail(self._backoff.epoch, self.settings)
        self.kick()

    # -- maintenance: one method per policy ------------------------------------------

    async def maintain(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Apply the policies whenever kicked, or when one of them is due."""
        with self._maintainer:
            async with trio.open_nursery() as starts:
                task_status.started()
                while True:
                    self._wake = trio.Event()
                    now = trio.current_time()
                    self._retire_over_max()
                    deadline = min(self._meet_demand(starts, now), self._retire_idle(now))
                    with trio.move_on_at(deadline) as self._sleep:
                        await self._wake.wait()
                    self._sleep = None

    def _meet_demand(self, starts: trio.Nursery, now: float) -> float:
        """Start the children that spare and waiters need, within max; while
        starts fail, one at a time after the backoff. Returns when to look again."""
        starting = self.slots.count(SlotState.STARTING)
        needed = min(self._demand(), self.settings.max - len(self.slots))
        if needed <= 0:
            return math.inf
        if not self._backoff.failing:
            for _ in range(needed):
                self._start_one(starts)
        elif starting == 0:
            if now < self._backoff.retry_at:
                return self._backoff.retry_at
            self._start_one(starts)
        return math.inf

    def _retire_over_max(self) -> None:
        """After ``max`` was lowered: retire idle children (the oldest first)
        until the total fits (children that were starting then are ready now)."""
        while len(self.slots) > self.settings.max:
            oldest = self.slots.first(SlotState.IDLE)
            if oldest is None:
                return
            self.retire(oldest, "over max")

    def _retire_idle(self, now: float) -> float:
        """Retire children idle above ``spare`` for ``idle_timeout``; returns
        when the next one is due."""
        timeout = self.settings.idle_timeout
        if timeout is None:
            return math.inf
        while self.slots.count(SlotState.IDLE) > self.settings.spare:
            oldest = self.slots.first(SlotState.IDLE)
            assert oldest is not None
            due = oldest.since + timeout
            if due > now:
                return due
            self.retire(oldest, f"idle for {timeout} s above spare")
        return math.inf

    # -- starting children -----------------------------------------------------------

    def _start_one(self, starts: trio.Nursery) -> None:
        self._number += 1
        slot = Slot(f"{self.name}-{self._number}")
        self.slots.add(slot)
        epoch = self._backoff.epoch
        starts.start_soon(self._start_child, slot, epoch, name=f"start {slot.name}")

    async def _start_child(self, slot: Slot, epoch: int) -> None:
        try:
            ctx = await self._start(name=slot.name)
        except (ChildStartError, WireError, OSError) as exc:
            self.move(slot, SlotState.GONE)
            self._start_failed(slot, epoch, exc)
            return
        except BaseException:
            self.move(slot, SlotState.GONE)
            self.kick()
            raise
        slot.ctx = ctx
        self.counters.total_spawned += 1
        self._backoff.succeed(self.settings)
        if self.closed:
            self.move(slot, SlotState.STOPPING)
            await self.stop(slot)
            return
        self.start_soon(self._watch, slot, name=f"{self.name}: watch {slot.name}")
        self.offer(slot)
        self.kick()

    def _start_failed(self, slot: Slot, epoch: int, exc: Exception) -> None:
        self.counters.spawn_failures += 1
        delay = self._backoff.fail(epoch, self.settings)
        log.warning(
            "pool %r: child %s failed to start (%d failures so far); next attempt in %.3g s: %s",
            self.name,
            slot.name,
            self.counters.spawn_failures,
            delay,
            str(exc).splitlines()[0],
        )
        self.kick()

    # -- opening and closing ------------------------------------------------------------

    def open(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    async def shutdown(self, before_closing: Callable[[], None]) -> None:
        """Close: fail waiters, stop starting, shut every child down concurrently."""
        self.closed = True
        for waiter in self._waiters:
            waiter.event.set()
        self._waiters.clear()
        self._maintainer.cancel()
        before_closing()
        self._notify_changed()
        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                if slot.state in (SlotState.IDLE, SlotState.SESSION):
                    nursery.start_soon(self.stop, slot)
                elif slot.state is SlotState.TAKEN:
                    # Its holder gives it back; close it now all the same.
                    assert slot.ctx is not None
                    nursery.start_soon(slot.ctx.aclose)
