"""``nursery-procs``: look at and control a running supervisor through its control socket.

Usage::

    nursery-procs --version
    nursery-procs [--socket PATH] [--json] status
    nursery-procs tree
    nursery-procs stop NAME
    nursery-procs pools
    nursery-procs resize NAME [--spare N] [--max M] [--idle-timeout T]

The socket defaults to ``$NURSERY_PROCS_CONTROL``, else ``./nursery-procs.sock``.
Before sending anything, the command checks that the server runs as this user or
root (``--server-uid`` names another). Exit statuses: see :data:`EXIT_STATUSES`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

from . import _control_schema as schema
from ._cli_format import format_pools, format_status, format_stopping, format_tree
from ._control_client import (
    EXIT_BAD_ANSWER,
    EXIT_NO_SOCKET,
    EXIT_NOT_A_SOCKET,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_SERVER_ERROR,
    EXIT_STALE,
    EXIT_USAGE,
    EXIT_WRONG_SERVER,
    ClientError,
    default_server_uids,
    request,
)
from ._control_schema import DEFAULT_SOCKET, SOCKET_ENV
from ._version import __version__

#: Each exit status of the command and what it means.
EXIT_STATUSES: Final = {
    EXIT_OK: "done",
    EXIT_SERVER_ERROR: "the server answered with an error",
    EXIT_USAGE: "usage error",
    EXIT_NO_SOCKET: "nothing at the path",
    EXIT_STALE: "a stale socket: nobody listens on it",
    EXIT_BAD_ANSWER: "no proper answer (timeout, malformed)",
    EXIT_NOT_A_SOCKET: "the path is not a socket (a file, a folder)",
    EXIT_REFUSED: "the server refused us (permission denied, 403)",
    EXIT_WRONG_SERVER: "the server runs as an unexpected user (nothing sent)",
}

# -- commands ------------------------------------------------------------------


class UsageError(Exception):
    """The command line asks for something that cannot be sent."""


def _idle_timeout(text: str) -> float | None:
    """``--idle-timeout``: seconds, or ``none``/``inf`` to keep idle children for ever."""
    if text.lower() in ("none", "inf", "infinity", "forever", "never"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds or 'none', not {text!r}") from None
    if value == float("inf"):
        return None
    return value


def _resize_body(args: argparse.Namespace) -> dict[str, Any]:
    body = {key: getattr(args, key) for key in schema.POOL_FIELDS if hasattr(args, key)}
    if not body:
        raise UsageError("resize needs --spare, --max and/or --idle-timeout")
    return body


@dataclass(frozen=True)
class Argument:
    """One argument of a command, as :meth:`argparse.ArgumentParser.add_argument` takes it."""

    flags: tuple[str, ...]
    options: Mapping[str, Any] = field(default_factory=dict)


def _arg(*flags: str, **options: Any) -> Argument:
    return Argument(flags, options)


@dataclass(frozen=True)
class Command:
    """One command: its arguments, the request it makes and how it shows the answer."""

    name: str
    help: str
    method: str
    #: The request's path, from the parsed arguments.
    path: Callable[[argparse.Namespace], str]
    #: The answer (decoded JSON), for people.
    format: Callable[[Any], str]
    arguments: tuple[Argument, ...] = ()
    #: The request's JSON body, from the parsed arguments (``None``: no body).
    body: Callable[[argparse.Namespace], Any] | None = None


COMMANDS: Final = (
    Command(
        "status",
        "uptime, counts and statistics",
        "GET",
        lambda args: schema.path("status"),
        format_status,
    ),
    Command(
        "tree",
        "the tree of contexts, like pstree",
        "GET",
        lambda args: schema.path("contexts"),
        format_tree,
    ),
    Command(
        "stop",
        "shut a context (and its subtree) down gracefully",
        "DELETE",
        lambda args: schema.path("contexts", args.name),
        format_stopping,
        (_arg("name", help="the context's name"),),
    ),
    Command(
        "pools",
        "the pools and their statistics",
        "GET",
        lambda args: schema.path("pools"),
        lambda answer: format_pools(answer.get("pools", [])),
    ),
    Command(
        "resize",
        "change a pool's settings, live",
        "PUT",
        lambda args: schema.path("pools", args.name),
        lambda answer: format_pools([answer]),
        (
            _arg("name", help="the pool's name"),
            _arg(
                "--spare",
                type=int,
                metavar="N",
                default=argparse.SUPPRESS,
                help="idle children kept ready",
            ),
            _arg(
                "--max",
                type=int,
                metavar="M",
                default=argparse.SUPPRESS,
                help="most children in all",
            ),
            _arg(
                "--idle-timeout",
                type=_idle_timeout,
                metavar="T",
                default=argparse.SUPPRESS,
                help="seconds an idle child above spare is kept ('none': for ever)",
            ),
        ),
        _resize_body,
    ),
)
_BY_NAME: Final = {command.name: command for command in COMMANDS}


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--socket",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"the control socket (default: ${SOCKET_ENV}, else {DEFAULT_SOCKET})",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the JSON answer"
    )
    common.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=argparse.SUPPRESS,
        help="how long to wait for an answer (default: 10)",
    )
    common.add_argument(
        "--server-uid",
        type=int,
        action="append",
        metavar="UID",
        default=argparse.SUPPRESS,
        help="a user id the server may run as (repeat for several; default: yours, or root)",
    )
    parser = argparse.ArgumentParser(
        prog="nursery-procs",
        description="Look at and control a running nursery_procs supervisor "
        "through its control socket.",
        parents=[common],
        epilog="exit status: "
        + "; ".join(f"{code} {text}" for code, text in EXIT_STATUSES.items()),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, parents=[common], help=command.help)
        for argument in command.arguments:
            sub.add_argument(*argument.flags, **argument.options)
    return parser


def _error(message: str) -> None:
    print(f"nursery-procs: error: {message}", file=sys.stderr)


def _run(args: argparse.Namespace, out: TextIO) -> int:
    path: str = getattr(args, "socket", None) or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET
    as_json: bool = getattr(args, "json", False)
    command = _BY_NAME[args.command]
    try:
        body = None if command.body is None else command.body(args)
        status, answer = request(
            path,
            command.method,
            command.path(args),
            body,
            timeout=getattr(args, "timeout", 10.0),
            server_uids=getattr(args, "server_uid", None) or default_server_uids(),
        )
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except ClientError as exc:
        _error(exc.message)
        return exc.exit_code
    if status >= 400:
        message = answer.get("error") if isinstance(answer, dict) else None
        _error(message or f"HTTP {status}")
    if as_json:
        print(json.dumps(answer, indent=2), file=out)
    elif status < 400:
        print(command.format(answer), file=out)
    return EXIT_SERVER_ERROR if status >= 400 else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``nursery-procs`` command with *argv* (default ``sys.argv[1:]``);
    return its exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help, or a usage error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return _run(args, sys.stdout)


if __name__ == "__main__":
    raise SystemExit(main())
