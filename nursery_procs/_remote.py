"""Outcomes that cross the process boundary: results, and exceptions that keep
their type.

An exception raised in another context travels pickled, with its formatted
traceback beside it. Where it can be rebuilt it is re-raised as itself, its
``__cause__`` a :class:`RemoteTraceback` holding the remote traceback (as
:mod:`concurrent.futures` does); exception groups arrive as groups. Where it
cannot be rebuilt (its type does not exist here, or it does not pickle),
:class:`~nursery_procs.RemoteError` carries its type name, message and traceback.
"""

from __future__ import annotations

import pickle
import traceback
from typing import Any

from . import _wire
from ._errors import RemoteError

#: ``(pickled exception or None, type name, message, formatted traceback)``.
Failure = tuple[bytes | None, str, str, str]


class RemoteTraceback(Exception):
    """The ``__cause__`` of an exception re-raised from another context: its
    traceback there, as text."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n--- remote traceback ---\n{self.text.rstrip()}"


def _type_name(exc: BaseException) -> str:
    kind = type(exc)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def capture(exc: BaseException) -> Failure:
    """Describe *exc* so that another context can re-raise it (or say what it was)."""
    if isinstance(exc, RemoteError):
        return (
            _dump(exc),
            exc.remote_type,
            exc.remote_message,
            exc.remote_traceback,
        )
    text = "".join(traceback.format_exception(exc))
    return _dump(exc), _type_name(exc), str(exc), text


def _dump(exc: BaseException) -> bytes | None:
    # The traceback and chained exceptions stay here: the text above carries them.
    try:
        return pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return None


def rebuild(failure: Any) -> BaseException:
    """The exception to raise here for a failure captured in another context."""
    try:
        blob, name, message, text = failure
    except (TypeError, ValueError):
        if isinstance(failure, BaseException):
            return failure
        return RemoteError("unknown", repr(failure), "")
    if isinstance(blob, bytes):
        try:
            exc = _wire.loads(blob)
        except Exception:
            exc = None
        if isinstance(exc, BaseException):
            if not isinstance(exc, RemoteError):
                exc.__cause__ = RemoteTraceback(str(text))
            return exc
    return RemoteError(str(name), str(message), str(text))


def failed(exc: BaseException) -> tuple[bool, Failure]:
    """The outcome ``(False, failure)`` of work that raised *exc*."""
    return False, capture(exc)
