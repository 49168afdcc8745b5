"""Keeping implementation-detail nurseries out of the exceptions users see."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one leaf of nested single-member groups, or ``None``."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


@contextmanager
def unwrap_sole_exception() -> Iterator[None]:
    """Re-raise a lone exception from a nursery as itself, not wrapped in a group.

    A nursery that is an implementation detail should not make callers handle
    an ExceptionGroup they did not ask for; groups of several are left alone.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        only = sole_exception(group)
        if only is None:
            raise
        raise only from only.__cause__
