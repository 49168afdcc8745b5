"""Keeping implementation-detail nurseries out of the exceptions users see."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def unwrap_sole_exception() -> Iterator[None]:
    """Re-raise a lone exception from a nursery as itself, not wrapped in a group.

    A nursery that is an implementation detail should not make callers handle
    an ExceptionGroup they did not ask for. Only the one layer that nursery adds
    is removed: an exception group the user raised passes through unchanged, and
    a group of several is left alone.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        only = group.exceptions[0]
        raise only from only.__cause__
