"""Signals that end a program gracefully: SIGTERM, SIGINT and SIGHUP cancel a
block, so that the supervisors, pools and control sockets inside it shut down in
order (children get SHUTDOWN, the socket file is removed) and the program goes on
to exit normally."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import attrs
import trio

from ._groups import unwrap_sole_exception

#: The signals :func:`open_signal_shutdown` handles by default.
DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@attrs.define(eq=False)
class SignalShutdown:
    """What :func:`open_signal_shutdown` saw."""

    #: The signal that ended the block, or ``None`` if none came.
    received: signal.Signals | None = None


@asynccontextmanager
async def open_signal_shutdown(
    signals: Iterable[int] = DEFAULT_SIGNALS,
) -> AsyncIterator[SignalShutdown]:
    """Cancel the block when one of *signals* arrives, instead of dying at once.

    Put a program's supervisors inside the block: on SIGTERM (or SIGINT, SIGHUP)
    the block is cancelled, so every child gets SHUTDOWN, its grace period and the
    usual escalation, control sockets are removed, and the block ends normally;
    the program then exits with status 0 (see :attr:`SignalShutdown.received`).
    Further signals while it shuts down are ignored: the shutdown is bounded by
    the children's policies.

    Only in the main thread (as :func:`trio.open_signal_receiver`).

    **Cancellation:** a signal cancels the block as any cancel scope would; a
    cancellation from outside passes through as usual.

    **Resource handling:** the signal handlers are restored when the block ends.

    **Error handling:** an exception from the block propagates as itself, not
    wrapped in a group.
    """
    state = SignalShutdown()
    wanted = tuple(signals)
    with trio.open_signal_receiver(*wanted) as receiver, unwrap_sole_exception():
        async with trio.open_nursery() as nursery:
            body = trio.CancelScope()

            async def watch() -> None:
                async for signum in receiver:
                    if state.received is None:
                        state.received = signal.Signals(signum)
                        body.cancel()

            nursery.start_soon(watch)
            try:
                with body:
                    yield state
            finally:
                nursery.cancel_scope.cancel()
