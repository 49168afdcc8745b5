"""Keyed sessions: every concurrent user of a key shares one child of the pool."""

from __future__ import annotations

import logging
from collections.abc import Hashable
from functools import partial

import attrs
import trio

from .._context import Context
from .._process import describe_exit
from ._keeper import SlotKeeper
from ._slots import Slot, SlotState

log = logging.getLogger("nursery_procs.pool")


@attrs.define(eq=False)
class Session:
    """One key's shared child and the users holding it."""

    key: Hashable
    slot: Slot | None = None
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

    @property
    def ctx(self) -> Context:
        assert self.slot is not None and self.slot.ctx is not None
        return self.slot.ctx


class Sessions:
    """The sessions of one pool, by key."""

    def __init__(self, keeper: SlotKeeper) -> None:
        self._keeper = keeper
        self._table: dict[Hashable, Session] = {}
        keeper.on_exit = self._child_exited

    def live(self) -> dict[Hashable, Context]:
        """Sessions that hold a child that is not being shut down."""
        return {
            key: session.ctx
            for key, session in self._table.items()
            if session.slot is not None and not session.closing
        }

    async def join(self, key: Hashable) -> Session:
        """Become a user of *key*'s session, opening it if need be."""
        # No schedule point before the check below: the child found alive is the
        # one handed out.
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            self._keeper.check_open()
            session = self._table.get(key)
            if session is None:
                return await self._open(key)
            if session.slot is not None and not session.closing and not session.slot.alive:
                # Died before its watcher noticed: never hand it out.
                self._child_died(session)
            if session.closing:
                # One key never has two children: wait until the old one is gone.
                await session.gone.wait()
                continue
            session.users += 1
            session.generation += 1
            if session.linger_scope is not None:
                session.linger_scope.cancel()
                session.linger_scope = None
            if session.slot is not None:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return session
            try:
                await session.acquired.wait()
            except BaseException:
                self.leave(session)
                raise
            if not session.failed:
                return session
            session.users -= 1

    async def _open(self, key: Hashable) -> Session:
        session = Session(key, users=1)
        self._table[key] = session
        try:
            slot = await self._keeper.acquire(wait=True)
        except BaseException:
            session.users -= 1
            session.failed = True
            self._drop(session)
            session.acquired.set()
            raise
        self._keeper.move(slot, SlotState.SESSION)
        session.slot = slot
        session.acquired.set()
        return session

    def leave(self, session: Session) -> None:
        """A user is done; the last one starts the linger timer."""
        session.users -= 1
        session.generation += 1
        if session.users or session.slot is None or session.closing or self._keeper.closed:
            return
        self._keeper.start_soon(
            self._linger_then_close,
            session,
            session.generation,
            name=f"{self._keeper.name}: linger {session.key!r}",
        )

    async def _linger_then_close(self, session: Session, generation: int) -> None:
        with trio.CancelScope() as scope:
            if session.generation == generation:
                session.linger_scope = scope
                await trio.sleep(self._keeper.settings.linger)
        if session.linger_scope is scope:
            session.linger_scope = None
        if session.generation != generation or session.users or self._keeper.closed:
            return
        if not session.closing:
            self._begin_close(session)
            await self._finish_close(session)

    def _child_exited(self, slot: Slot) -> None:
        for session in self._table.values():
            if session.slot is slot and not session.closing:
                self._child_died(session)
                return

    def _child_died(self, session: Session) -> None:
        returncode = session.ctx.returncode
        log.warning(
            "pool %r: the child %s (pid %s) of session %r died: %s",
            self._keeper.name,
            session.ctx.name,
            session.ctx.pid,
            session.key,
            "not reaped yet" if returncode is None else describe_exit(returncode),
        )
        self._begin_close(session)
        self._keeper.start_soon(
            partial(self._finish_close, died=True),
            session,
            name=f"{self._keeper.name}: end {session.key!r}",
        )

    def _begin_close(self, session: Session) -> None:
        session.closing = True
        if session.linger_scope is not None:
            session.linger_scope.cancel()
        assert session.slot is not None
        self._keeper.move(session.slot, SlotState.STOPPING)

    async def _finish_close(self, session: Session, *, died: bool = False) -> None:
        """Shut the session's child down (shielded) and drop the session."""
        slot = session.slot
        assert slot is not None and slot.ctx is not None
        try:
            if died:
                # Let its supervisor reap it first (bounded, for a child that is
                # only unreachable), so that its users' calls raise ContextDied,
                # not "closed by its owner".
                with (
                    trio.CancelScope(shield=True),
                    trio.move_on_after(self._keeper.policy.close_deadline),
                ):
                    await slot.ctx.wait_exited()
            await self._keeper.stop(slot)
        finally:
            self._drop(session)

    def _drop(self, session: Session) -> None:
        if self._table.get(session.key) is session:
            del self._table[session.key]
        session.gone.set()

    def close_all(self) -> None:
        """The pool is closing: stop every linger timer."""
        for session in self._table.values():
            if session.linger_scope is not None:
                session.linger_scope.cancel()
