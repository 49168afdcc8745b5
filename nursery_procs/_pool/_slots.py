"""A pool's children, one slot each, each slot in one state."""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterator

import attrs
import trio

from .._context import Context
from .._lifecycle import State


class SlotState(enum.Enum):
    """What the pool is doing with one of its children."""

    #: Being started; not ready yet.
    STARTING = "starting"
    #: Ready and unused (or a worker between calls), waiting to be handed out.
    IDLE = "idle"
    #: Handed out by ``take()`` or ``take_nowait()``, or running a worker's call.
    TAKEN = "taken"
    #: Shared by the users of one session key.
    SESSION = "session"
    #: Being shut down by the pool.
    STOPPING = "stopping"
    #: Gone: no longer counted (its start failed, or it exited and was reaped).
    GONE = "gone"

    # Members are singletons: hash them by identity, in C. (Enum's own __hash__
    # is Python code, and a worker pool counts slot states several times a call.)
    __hash__ = object.__hash__


@attrs.define(eq=False)
class Slot:
    """One child of a pool (or one attempt to start one)."""

    name: str
    state: SlotState = SlotState.STARTING
    #: The child, once it is ready.
    ctx: Context | None = None
    #: When the slot entered its state (:func:`trio.current_time`).
    since: float = attrs.field(factory=trio.current_time)
    #: Calls run on this child (worker pools).
    uses: int = 0

    @property
    def ready(self) -> bool:
        """The child is ready as far as this process has heard (no system call)."""
        ctx = self.ctx
        return ctx is not None and ctx.state is State.READY and self.state is not SlotState.GONE

    @property
    def alive(self) -> bool:
        """The child is ready: not known to be dying, dead or gone from the pool.

        Asks the kernel too: a child just killed may not be reaped yet, and must
        not be handed out.
        """
        ctx = self.ctx
        return self.ready and ctx is not None and not ctx.process_exited()


class Slots:
    """Every slot of a pool, in the order of their last change of state.

    That order makes the first idle slot the one idle the longest, and the last
    the most recently returned. The count per state is updated by :meth:`move`,
    the only place a slot changes state, so statistics never drift from the slots.
    """

    def __init__(self) -> None:
        self._slots: dict[Slot, None] = {}
        self._counts: Counter[SlotState] = Counter()

    def __len__(self) -> int:
        return len(self._slots)

    def count(self, state: SlotState) -> int:
        return self._counts[state]

    def add(self, slot: Slot) -> None:
        self._slots[slot] = None
        self._counts[slot.state] += 1

    def move(self, slot: Slot, state: SlotState, now: float | None = None) -> None:
        """Put *slot* in *state* (``GONE`` removes it) as of *now* (default: now)."""
        if slot.state is SlotState.GONE:
            return
        self._counts[slot.state] -= 1
        del self._slots[slot]
        slot.state = state
        slot.since = trio.current_time() if now is None else now
        if state is not SlotState.GONE:
            self._slots[slot] = None
            self._counts[state] += 1

    def in_state(self, state: SlotState, *, newest_first: bool = False) -> Iterator[Slot]:
        """The slots in *state*, oldest change first (or newest first)."""
        order = reversed(self._slots) if newest_first else iter(self._slots)
        return (slot for slot in order if slot.state is state)

    def first(self, state: SlotState, *, newest: bool = False) -> Slot | None:
        return next(self.in_state(state, newest_first=newest), None)

    def __iter__(self) -> Iterator[Slot]:
        return iter(list(self._slots))
