"""A pool's settings (one validated value) and its statistics (one snapshot)."""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs

_Validator = Callable[[object, "attrs.Attribute[int]", object], None]


def check_whole_number(setting: str, value: object, minimum: int) -> None:
    """Raise TypeError or ValueError, naming *setting*, unless *value* is an int >= *minimum*."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{setting} must be an integer, not {value!r}")
    if value < minimum:
        raise ValueError(f"{setting} must be >= {minimum}, not {value!r}")


def _seconds(setting: str, value: object) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{setting} must be a number of seconds, not {value!r}")
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{setting} must be >= 0, not {value!r}")


def _check_count(minimum: int) -> _Validator:
    def check(_instance: object, attribute: attrs.Attribute[int], value: object) -> None:
        check_whole_number(attribute.name, value, minimum)

    return check


def _check_seconds(_instance: object, attribute: attrs.Attribute[float], value: object) -> None:
    _seconds(attribute.name, value)


def _check_timeout(
    _instance: object, attribute: attrs.Attribute[float | None], value: object
) -> None:
    if value is not None:
        _seconds(attribute.name, value)


def _forever_is_none(value: object) -> object:
    """``math.inf`` means "no timeout", as ``None`` does: keep one spelling."""
    if isinstance(value, float) and math.isinf(value) and value > 0:
        return None
    return value


@attrs.frozen(kw_only=True)
class PoolSettings:
    """A pool's settings: one value, validated as a whole whenever it is made.

    Every way of changing a pool (:func:`open_pool`, :meth:`Pool.resize`, the
    control socket) builds a new value with :func:`attrs.evolve`, so an invalid
    combination raises before anything changes. Errors name the setting:
    :exc:`TypeError` for a value of the wrong type, :exc:`ValueError` for one out
    of range.
    """

    #: Idle, ready children the pool keeps (at least 0, at most ``max``).
    spare: int = attrs.field(default=2, validator=_check_count(0))
    #: The most children in all: idle, handed out, starting and shutting down
    #: (at least 1).
    max: int = attrs.field(default=32, validator=_check_count(1))
    #: Seconds an idle child above ``spare`` is kept before it is retired
    #: (``None``, or ``math.inf`` which becomes ``None``: kept for ever).
    idle_timeout: float | None = attrs.field(
        default=None, converter=_forever_is_none, validator=_check_timeout
    )
    #: Seconds a session's child outlives its last user.
    linger: float = attrs.field(default=0.0, validator=_check_seconds)
    #: Seconds before retrying after a failed start; doubled after each further
    #: failure, reset by a successful start.
    backoff_initial: float = attrs.field(default=0.1, validator=_check_seconds)
    #: The longest delay between start attempts (at least ``backoff_initial``).
    backoff_max: float = attrs.field(default=30.0, validator=_check_seconds)

    def __attrs_post_init__(self) -> None:
        if self.spare > self.max:
            raise ValueError(f"spare ({self.spare!r}) must not be more than max ({self.max!r})")
        if self.backoff_max < self.backoff_initial:
            raise ValueError(
                f"backoff_max ({self.backoff_max!r}) must not be less than "
                f"backoff_initial ({self.backoff_initial!r})"
            )


@attrs.frozen
class PoolStatistics:
    """A snapshot of a pool, from :meth:`Pool.statistics`.

    The counts of children are read from the pool's slots (one state each) at
    the moment of the call.
    """

    #: Children started, ready, and waiting to be handed out.
    idle: int
    #: Children handed out and not yet given back: taken ones, session children,
    #: and workers running a call.
    busy: int
    #: Children being started (not ready yet).
    starting: int
    #: Children the pool is shutting down (given back, retired, or lingered out).
    stopping: int
    #: Callers waiting in :meth:`Pool.take` (or for a new session's child, or for
    #: a worker).
    waiting: int
    #: Live keyed sessions (each holds one busy child).
    sessions: int
    #: Children started successfully since the pool opened.
    total_spawned: int
    #: Start attempts that failed (the child exited or was not ready in time).
    spawn_failures: int
    #: Idle children that died while waiting to be handed out.
    idle_deaths: int
    #: Children handed out: by :meth:`Pool.take`, :meth:`Pool.take_nowait`, to
    #: open a session, or to run a call.
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
    #: Children retired after serving their ``max_uses`` calls (worker pools).
    retired_after_max_uses: int = 0
