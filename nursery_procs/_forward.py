"""Pumping messages from one source to one sink, or to several, ending quietly when a
side goes away: the scope boundary where writes to a closed peer are swallowed."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any, Literal, Protocol

import attrs
import trio

from ._errors import ContextDied, LinkClosed, MessageUndeliverable

log = logging.getLogger("nursery_procs.forward")


class Source(Protocol):
    """Anything :func:`forward` can read from: ``async receive()``."""

    async def receive(self) -> Any: ...


class Sink(Protocol):
    """Anything :func:`forward` can write to: ``async send(value)``."""

    async def send(self, value: Any, /) -> None: ...


#: The errors that mean "that side has gone": they end a forward quietly.
GONE: tuple[type[BaseException], ...] = (
    trio.EndOfChannel,
    trio.ClosedResourceError,
    trio.BrokenResourceError,
    LinkClosed,
    ContextDied,
    MessageUndeliverable,
)


def gone_errors() -> tuple[type[BaseException], ...]:
    """:data:`GONE`, plus trio-websocket's ``ConnectionClosed`` once trio-websocket
    is imported: until then no side can be one of its connections, and neither
    nursery_procs nor a program that does not use it pays for importing it."""
    module = sys.modules.get("trio_websocket")
    closed = getattr(module, "ConnectionClosed", None)
    return GONE if closed is None else (*GONE, closed)


@attrs.frozen
class Forwarded:
    """What :func:`forward` did, returned once a side has gone."""

    #: Values taken from the source.
    received: int
    #: Completed sends: one for each value and each sink it reached.
    sent: int
    #: Values that reached no sink: skipped by ``transform``, routed nowhere by
    #: ``fan_out``, lost to an error in ``drop_on``, or meant only for sinks that had gone.
    dropped: int
    #: Which side had gone: the ``"source"``, or the one ``"sink"``. A fan-out
    #: ends only when its source does.
    gone: Literal["source", "sink"]
    #: The error that ended it: :class:`trio.EndOfChannel` when the source finished
    #: normally, or :class:`~nursery_procs.ContextDied`, a closed or broken resource,
    #: a closed link or WebSocket, and so on.
    reason: BaseException


@attrs.define
class _Tally:
    received: int = 0
    sent: int = 0
    dropped: int = 0

    def ended(self, side: Literal["source", "sink"], reason: BaseException) -> Forwarded:
        log.debug("forward ended (%s gone) after %d values: %r", side, self.received, reason)
        return Forwarded(self.received, self.sent, self.dropped, side, reason)

    def drop(self, error: BaseException) -> None:
        log.warning("forward: dropped a value: %s", error)
        self.dropped += 1


async def forward(
    source: Source,
    sink: Sink | None = None,
    *,
    fan_out: Callable[[Any], Iterable[Sink]] | None = None,
    transform: Callable[[Any], Any] | None = None,
    drop_on: tuple[type[Exception], ...] = (),
) -> Forwarded:
    """Send everything received from *source* on, until a side goes away.

    *source* needs ``async receive()``, a sink ``async send(value)``: Trio memory
    channels, :class:`Context` objects, :class:`Link` objects, or anything shaped like
    them (wrap a trio-websocket connection's ``get_message`` / ``send_message``).

    Give either one *sink* or ``fan_out``:

    * With *sink*, every value goes to it; the forward ends when the source or the
      sink has gone.
    * With ``fan_out(value)``, each value goes to the sinks that call returns for it,
      one after the other, in that order (a sink that blocks holds the rest of that
      value's sinks back). A sink that has gone is skipped for that value and the
      others still get it; choosing sinks is ``fan_out``'s job, so it is asked
      afresh for every value. The forward ends only when the source has gone.
      ``fan_out`` sees the value as received, before ``transform``.

    ``transform(value)``, if given, is sent instead of each value, computed once per
    value however many sinks get it (so a broadcast can encode a message once for
    every receiver); a ``None`` from it skips the value. Use it to tag values
    (``lambda m: (client_id, m)``), to filter them, or to check them: an exception
    from it propagates.

    Args:
        drop_on: exception types that cost only the value at hand: raised while
            receiving, transforming, routing or sending it, they are logged at
            WARNING (on the ``nursery_procs.forward`` logger) and the forward goes
            on with the next value. For example :class:`WireError`, a message over
            a link's size limit or one that cannot be decoded.

    Returns:
        A :class:`Forwarded`: the counts, which side had gone, and why.

    Raises:
        TypeError: neither or both of *sink* and ``fan_out`` were given.

    **Cancellation:** cancel it to stop it. A value already received but not yet
    sent to all its sinks is lost (put a queue in front if that matters); a
    :class:`Context` or :class:`Link` sink cancelled in the middle of writing a
    frame closes its link (see :meth:`Context.send`).

    **Error handling:** the end of a channel, closed or broken resources, closed
    links and WebSockets, dead contexts and undeliverable messages on either side
    end the forward quietly (with a sink; with ``fan_out``, a sink's only skip it):
    this is the scope boundary where writes to a peer that has gone are swallowed,
    while ``send``, ``request`` and ``call`` themselves still raise. Anything else
    propagates, and the forward stops.

    **Resource handling:** it closes nothing; the caller owns the source and sinks.
    """
    route = _routing(sink, fan_out)
    gone = gone_errors()
    tally = _Tally()
    while True:
        try:
            value = await source.receive()
        except gone as exc:
            return tally.ended("source", exc)
        except drop_on as exc:
            tally.drop(exc)
            continue
        tally.received += 1
        try:
            item = value if transform is None else transform(value)
            sinks = () if item is None else route(value)
        except drop_on as exc:
            tally.drop(exc)
            continue
        ended = await _send_each(sinks, item, tally, drop_on, gone, alone=fan_out is None)
        if ended is not None:
            return tally.ended("sink", ended)


def _routing(
    sink: Sink | None, fan_out: Callable[[Any], Iterable[Sink]] | None
) -> Callable[[Any], Iterable[Sink]]:
    if fan_out is not None and sink is None:
        return fan_out
    if sink is not None and fan_out is None:
        only = (sink,)
        return lambda _value: only
    raise TypeError("forward() takes either a sink or fan_out=, not both or neither")


async def _send_each(
    sinks: Iterable[Sink],
    item: Any,
    tally: _Tally,
    drop_on: tuple[type[Exception], ...],
    gone: tuple[type[BaseException], ...],
    *,
    alone: bool,
) -> BaseException | None:
    """Send *item* to each sink; return the error if the only sink (*alone*) has gone."""
    reached = 0
    for sink in sinks:
        try:
            await sink.send(item)
        except gone as exc:
            if alone:
                tally.dropped += 1
                return exc
            log.debug("forward: skipped a sink that has gone: %r", exc)
        except drop_on as exc:
            log.warning("forward: dropped a value: %s", exc)
        else:
            reached += 1
    tally.sent += reached
    if not reached:
        tally.dropped += 1
    return None
