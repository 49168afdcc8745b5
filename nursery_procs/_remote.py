"""Outcomes that cross the process boundary: results, and exceptions that keep
their type.

An exception raised in another context travels pickled, with its formatted
traceback beside it. Where it can be rebuilt it is re-raised as itself, its
``__cause__`` a :class:`RemoteTraceback` holding the remote traceback (as
:mod:`concurrent.futures` does); exception groups arrive as groups. Where it
cannot be rebuilt (its type does not exist here, or it does not pickle),
:class:`~nursery_procs.RemoteError` carries its type name, message and traceback.

An untrusted context sends no pickles: its exceptions travel as their type name,
message, arguments and traceback text, and are rebuilt here only if they are
built-in exception types (constructed from their arguments, which are plain
data); any other type arrives as :class:`~nursery_procs.RemoteError`.
"""

from __future__ import annotations

import builtins
import pickle
import traceback
from typing import Any

from . import _wire
from ._errors import RemoteError

#: ``(pickled exception or None, type name, message, formatted traceback,
#: arguments as plain data or None)``.
Failure = tuple[bytes | None, str, str, str, list[Any] | None]


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


def capture(exc: BaseException, *, data_only: bool = False) -> Failure:
    """Describe *exc* so that another context can re-raise it (or say what it was).

    With *data_only* (an untrusted context), nothing is pickled: the arguments go
    as plain data if they are, so that a built-in type can be rebuilt.
    """
    blob = None if data_only else _dump(exc)
    if isinstance(exc, RemoteError):
        return (blob, exc.remote_type, exc.remote_message, exc.remote_traceback, None)
    text = "".join(traceback.format_exception(exc))
    return blob, _type_name(exc), str(exc), text, _plain_args(exc)


def _plain_args(exc: BaseException) -> list[Any] | None:
    try:
        _wire.encode_data(exc.args)
    except Exception:
        return None
    return list(exc.args)


def _dump(exc: BaseException) -> bytes | None:
    # The traceback and chained exceptions stay here: the text above carries them.
    try:
        return pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return None


def rebuild(failure: Any, *, trusted: bool) -> BaseException:
    """The exception to raise here for a failure captured in another context.

    Only a *trusted* sender's pickled exception is unpickled (the caller knows:
    the failure came in a pickled message, and routers refuse those from
    untrusted contexts); otherwise only built-in types are rebuilt.
    """
    try:
        blob, name, message, text, args = failure
    except (TypeError, ValueError):
        if trusted and isinstance(failure, BaseException):
            return failure
        return RemoteError("unknown", repr(failure)[:1000], "")
    exc: BaseException | None = None
    if trusted and isinstance(blob, bytes):
        try:
            exc = _wire.loads(blob)
        except Exception:
            exc = None
        if isinstance(exc, RemoteError):
            return exc
    if not isinstance(exc, BaseException):
        exc = _builtin(name, args)
    if exc is None:
        return RemoteError(str(name), str(message), str(text))
    exc.__cause__ = RemoteTraceback(str(text))
    return exc


def _builtin(name: Any, args: Any) -> BaseException | None:
    """A built-in exception rebuilt from its name and plain-data arguments."""
    kind = getattr(builtins, name, None) if isinstance(name, str) else None
    if (
        not isinstance(kind, type)
        or not issubclass(kind, Exception)
        or issubclass(kind, BaseExceptionGroup)
        or not isinstance(args, list)
    ):
        return None
    try:
        return kind(*args)
    except Exception:
        return None


def failed(exc: BaseException, *, data_only: bool = False) -> tuple[bool, Failure]:
    """The outcome ``(False, failure)`` of work that raised *exc*."""
    return False, capture(exc, data_only=data_only)
