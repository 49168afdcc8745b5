"""The control API's shape, shared by the server and the ``nursery-procs`` command.

Its paths, the methods each allows, and how a name or a setting is written on
the wire. Standard library only, so that the command starts quickly.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from collections.abc import Mapping
from typing import Any, Final, NoReturn

#: The paths and the methods each allows: (first segment, whether a name follows).
ROUTES: Final[Mapping[tuple[str, bool], tuple[str, ...]]] = {
    ("status", False): ("GET",),
    ("metrics", False): ("GET",),
    ("contexts", False): ("GET",),
    ("contexts", True): ("GET", "DELETE"),
    ("pools", False): ("GET",),
    ("pools", True): ("GET", "PUT"),
}

#: The pool settings a ``PUT /pools/<name>`` body may hold (keyword arguments of
#: :meth:`~nursery_procs.Pool.resize`, which validates them).
POOL_FIELDS: Final = ("spare", "max", "idle_timeout")


class BadRequest(ValueError):
    """A request target or body that does not fit the API (answered 400 or 404)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def quote_name(name: str) -> str:
    """*name* as one path segment: every ``/`` (and anything unsafe) escaped."""
    return urllib.parse.quote(name, safe="")


def path(kind: str, name: str | None = None) -> str:
    """The path of a collection (``/pools``) or of one named item (``/pools/a%2Fb``)."""
    return f"/{kind}" if name is None else f"/{kind}/{quote_name(name)}"


def split_target(target: bytes) -> list[str]:
    """The request target's path as decoded segments (``%2F`` inside one is ``/``).

    Raises:
        BadRequest: not ASCII, not an absolute path, or not UTF-8 once decoded.
    """
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("the request target is not ASCII") from None
    target_path = urllib.parse.urlsplit(text).path if "://" in text else text.split("?", 1)[0]
    if not target_path.startswith("/"):
        raise BadRequest(f"the request target {text!r} is not an absolute path")
    try:
        return [urllib.parse.unquote(part, errors="strict") for part in target_path[1:].split("/")]
    except UnicodeDecodeError:
        raise BadRequest("the request path is not valid UTF-8 once decoded") from None


def match(segments: list[str], target: str) -> tuple[str, str | None, tuple[str, ...]]:
    """The route of a split path: its kind, the name in it (if any), the methods allowed.

    Raises:
        BadRequest: (404) no such path.
    """
    kind = segments[0]
    named = len(segments) == 2
    allowed = None
    if len(segments) == 1 or (named and segments[1]):
        allowed = ROUTES.get((kind, named))
    if allowed is None:
        hint = ""
        if (kind, True) in ROUTES and len(segments) > 2:
            hint = " (write '/' in a name as %2F)"
        raise BadRequest(f"unknown path {target!r}{hint}", 404)
    return kind, segments[1] if named else None, allowed


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> Any:
    """Strict JSON (no ``NaN`` or ``Infinity``).

    Raises:
        BadRequest: the body is not JSON.
    """
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"the request body is not JSON: {exc}") from None


def pool_changes(document: Any) -> dict[str, Any]:
    """The keyword arguments for :meth:`Pool.resize` that a ``PUT`` body asks for.

    Only the shape is checked here; the values are the pool's to validate. JSON
    has no infinity, so ``"idle_timeout": null`` stands for it (idle children are
    kept for ever).

    Raises:
        BadRequest: not a JSON object, or an empty one.
    """
    if not isinstance(document, dict):
        raise BadRequest("the request body must be a JSON object")
    if not document:
        raise BadRequest(f"nothing to change: give any of {', '.join(POOL_FIELDS)}")
    changes = dict(document)
    if "idle_timeout" in changes and changes["idle_timeout"] is None:
        changes["idle_timeout"] = math.inf
    return changes


def to_json(value: Any) -> bytes:
    """*value* as indented JSON, non-finite floats (not valid JSON) as ``null``."""
    return (json.dumps(_finite(value), indent=2) + "\n").encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


#: The environment variable holding the default control socket path.
SOCKET_ENV: Final = "NURSERY_PROCS_CONTROL"
#: The control socket's path when neither ``--socket`` nor :data:`SOCKET_ENV` gives one.
DEFAULT_SOCKET: Final = "./nursery-procs.sock"
