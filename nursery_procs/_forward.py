"""Pumping messages between two channels, ending quietly when either side goes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import trio

from ._errors import ContextDied, LinkClosed, MessageUndeliverable

log = logging.getLogger("nursery_procs.forward")


class Source(Protocol):
    async def receive(self) -> Any: ...


class Sink(Protocol):
    async def send(self, value: Any, /) -> None: ...


#: The errors that mean "the other side has gone": they end a forward quietly.
GONE: tuple[type[BaseException], ...] = (
    trio.EndOfChannel,
    trio.ClosedResourceError,
    trio.BrokenResourceError,
    LinkClosed,
    ContextDied,
    MessageUndeliverable,
)


def _gone_errors() -> tuple[type[BaseException], ...]:
    try:
        from trio_websocket import ConnectionClosed
    except ImportError:  # pragma: no cover - trio-websocket is a dependency
        return GONE
    return (*GONE, ConnectionClosed)


async def forward(
    source: Source,
    sink: Sink,
    *,
    transform: Callable[[Any], Any] | None = None,
) -> int:
    """Send everything received from *source* to *sink* until either side goes away.

    *source* needs ``async receive()``, *sink* ``async send(value)``: Trio memory
    channels, :class:`Context` objects, or anything shaped like them (wrap a
    trio-websocket connection's ``get_message`` / ``send_message``). If given,
    ``transform(value)`` is sent instead of each value; a ``None`` from it skips
    the value.

    Returns:
        How many values were forwarded.

    **Error handling:** end of channel, closed or broken resources, closed links
    and dead contexts on either side end the forward quietly (this is the scope
    boundary where writes to a closed peer are swallowed). Anything else
    propagates.
    """
    gone = _gone_errors()
    count = 0
    try:
        while True:
            value = await source.receive()
            if transform is not None:
                value = transform(value)
                if value is None:
                    continue
            await sink.send(value)
            count += 1
    except gone as exc:
        log.debug("forward ended after %d values: %r", count, exc)
    return count
