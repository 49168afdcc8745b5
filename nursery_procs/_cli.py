"""``nursery-procs``: look at and control a running supervisor through its control socket.

Usage::

    nursery-procs --version
    nursery-procs [--socket PATH] [--json] status
    nursery-procs tree
    nursery-procs stop NAME
    nursery-procs pools
    nursery-procs resize NAME [--spare N] [--max M] [--idle-timeout T]

The socket defaults to ``$NURSERY_PROCS_CONTROL``, else ``./nursery-procs.sock``.

Exit status: 0 on success, 1 if the server answered with an error, 2 for a usage
error, 3 if there is no socket file, 4 if the socket refuses connections (a stale
file, or no permission), 5 if the server did not answer properly (timeout,
malformed answer).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import urllib.parse
from collections.abc import Sequence
from typing import Any, Final, TextIO

import h11

from ._version import __version__

#: The environment variable holding the default control socket path.
SOCKET_ENV: Final = "NURSERY_PROCS_CONTROL"
DEFAULT_SOCKET: Final = "./nursery-procs.sock"

EXIT_OK: Final = 0
EXIT_SERVER_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_NO_SOCKET: Final = 3
EXIT_REFUSED: Final = 4
EXIT_BAD_ANSWER: Final = 5

_MAX_RESPONSE: Final = 16 * 1024 * 1024


class ClientError(Exception):
    """The request could not be made or answered; carries the exit status to use."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def request(
    socket_path: str,
    method: str,
    target: str,
    body: Any = None,
    *,
    timeout: float = 10.0,
) -> tuple[int, Any]:
    """Make one HTTP/1.1 request over the Unix socket *socket_path* (blocking).

    *body*, if not ``None``, is sent as JSON. Returns the status code and the
    decoded JSON body of the answer.

    Raises:
        ClientError: no socket file (exit status 3), the socket refuses
            connections (4), or no proper answer came (5).
    """
    payload = b"" if body is None else json.dumps(body).encode()
    headers = [("Host", "localhost"), ("Connection", "close"), ("Accept", "application/json")]
    if body is not None:
        headers += [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    conn = h11.Connection(h11.CLIENT)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
        except (FileNotFoundError, NotADirectoryError):
            raise ClientError(
                f"no control socket at {socket_path!r}: is the supervisor running with its "
                f"control socket enabled? (set --socket or ${SOCKET_ENV})",
                EXIT_NO_SOCKET,
            ) from None
        except ConnectionRefusedError:
            raise ClientError(
                f"the control socket {socket_path!r} refuses connections: its server is gone "
                "(a stale file)",
                EXIT_REFUSED,
            ) from None
        except PermissionError:
            raise ClientError(
                f"permission denied connecting to the control socket {socket_path!r}: "
                "it belongs to another user",
                EXIT_REFUSED,
            ) from None
        try:
            data = conn.send(h11.Request(method=method, target=target, headers=headers))
            if payload:
                data += conn.send(h11.Data(data=payload))
            data += conn.send(h11.EndOfMessage())
            sock.sendall(data)
            return _read_response(sock, conn)
        except TimeoutError:
            raise ClientError(
                f"no answer from the control socket {socket_path!r} within {timeout} s",
                EXIT_BAD_ANSWER,
            ) from None
        except (h11.ProtocolError, OSError) as exc:
            raise ClientError(
                f"bad answer from the control socket {socket_path!r}: {exc}", EXIT_BAD_ANSWER
            ) from None
    finally:
        sock.close()


def _read_response(sock: socket.socket, conn: h11.Connection) -> tuple[int, Any]:
    status = 0
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > _MAX_RESPONSE:
                raise h11.RemoteProtocolError("the answer is too large")
        elif isinstance(event, h11.EndOfMessage):
            break
        elif isinstance(event, h11.ConnectionClosed):
            raise h11.RemoteProtocolError("the server closed the connection without answering")
        # 1xx informational responses need nothing.
    try:
        return status, json.loads(body.decode("utf-8")) if body else None
    except (UnicodeDecodeError, ValueError):
        raise h11.RemoteProtocolError("the answer is not JSON") from None


# -- formatting ----------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _size(value: int | None) -> str:
    if value is None:
        return "?"
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} GiB"  # pragma: no cover - the loop always returns


def _describe_context(node: dict[str, Any]) -> str:
    parts = [f"id {node.get('id')}", f"pid {node.get('pid')}", str(node.get("state"))]
    if node.get("uptime") is not None:
        parts.append(f"up {_duration(node['uptime'])}")
    if node.get("rss_bytes") is not None:
        parts.append(f"rss {_size(node['rss_bytes'])}")
    if node.get("messages_in") is not None:
        parts.append(f"msgs {node['messages_in']} in/{node['messages_out']} out")
    return f"{node.get('name')} ({', '.join(parts)})"


def format_tree(root: dict[str, Any]) -> str:
    """A ``pstree``-like drawing of the context tree answered by ``GET /contexts``."""
    lines = [_describe_context(root)]

    def walk(children: list[dict[str, Any]], prefix: str) -> None:
        for index, child in enumerate(children):
            last = index == len(children) - 1
            lines.append(f"{prefix}{'└── ' if last else '├── '}{_describe_context(child)}")
            walk(child.get("children", []), prefix + ("    " if last else "│   "))

    walk(root.get("children", []), "")
    return "\n".join(lines)


def format_status(status: dict[str, Any]) -> str:
    """The answer of ``GET /status``, for people."""
    counts = status.get("counts", {})
    by_state = counts.get("contexts", {})
    states = ", ".join(f"{n} {state}" for state, n in by_state.items() if n) or "none"
    stats = status.get("statistics", {})
    return "\n".join(
        [
            f"supervisor {status.get('name')} (context {status.get('context_id')}, "
            f"pid {status.get('pid')}), up {_duration(status.get('uptime'))}",
            f"contexts: {counts.get('contexts_total', 0)} ({states})",
            f"pools:    {counts.get('pools', 0)}",
            f"children: {stats.get('running', 0)} running, {stats.get('starting', 0)} starting, "
            f"{stats.get('stopping', 0)} stopping",
            f"totals:   {stats.get('started_total', 0)} started, "
            f"{stats.get('failed_starts', 0)} failed to start, "
            f"{stats.get('exited_total', 0)} exited, {stats.get('crashed_total', 0)} crashed",
        ]
    )


_POOL_COLUMNS: Final = (
    "spare",
    "max",
    "idle",
    "busy",
    "starting",
    "stopping",
    "waiting",
    "sessions",
    "idle_timeout",
)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_pools(pools: list[dict[str, Any]]) -> str:
    if not pools:
        return "no pools"
    header = ["name", *_POOL_COLUMNS]
    rows = [header]
    for pool in pools:
        stats = pool.get("statistics", {})
        row = [str(pool.get("name"))]
        row += [_cell(stats.get(column)) for column in _POOL_COLUMNS]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def format_pool(pool: dict[str, Any]) -> str:
    stats = pool.get("statistics", {})
    lines = [f"pool {pool.get('name')}" + (" (closed)" if pool.get("closed") else "")]
    lines += [f"  {key}: {'-' if value is None else value}" for key, value in stats.items()]
    return "\n".join(lines)


# -- commands ------------------------------------------------------------------


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


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
    parser = argparse.ArgumentParser(
        prog="nursery-procs",
        description="Look at and control a running nursery_procs supervisor "
        "through its control socket.",
        parents=[common],
        epilog="exit status: 0 ok, 1 the server answered an error, 2 usage error, "
        "3 no socket file, 4 the socket refuses connections, 5 no proper answer",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("status", parents=[common], help="uptime, counts and statistics")
    commands.add_parser("tree", parents=[common], help="the tree of contexts, like pstree")
    stop = commands.add_parser(
        "stop", parents=[common], help="shut a context (and its subtree) down gracefully"
    )
    stop.add_argument("name", help="the context's name")
    commands.add_parser("pools", parents=[common], help="the pools and their statistics")
    resize = commands.add_parser("resize", parents=[common], help="change a pool's settings, live")
    resize.add_argument("name", help="the pool's name")
    resize.add_argument("--spare", type=int, metavar="N", help="idle children kept ready")
    resize.add_argument("--max", type=int, metavar="M", help="most children in all")
    resize.add_argument(
        "--idle-timeout",
        type=_idle_timeout,
        metavar="T",
        default=argparse.SUPPRESS,
        help="seconds an idle child above spare is kept ('none': for ever)",
    )
    return parser


def _run(args: argparse.Namespace, out: TextIO) -> int:  # noqa: C901 - one branch per command
    path: str = getattr(args, "socket", None) or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET
    as_json: bool = getattr(args, "json", False)
    timeout: float = getattr(args, "timeout", 10.0)
    command: str = args.command
    body: Any = None
    if command == "status":
        method, target = "GET", "/status"
    elif command == "tree":
        method, target = "GET", "/contexts"
    elif command == "stop":
        method, target = "DELETE", f"/contexts/{_quote(args.name)}"
    elif command == "pools":
        method, target = "GET", "/pools"
    else:
        method, target = "PUT", f"/pools/{_quote(args.name)}"
        body = {}
        if args.spare is not None:
            body["spare"] = args.spare
        if args.max is not None:
            body["max"] = args.max
        if hasattr(args, "idle_timeout"):
            body["idle_timeout"] = args.idle_timeout
        if not body:
            print(
                "nursery-procs: error: resize needs --spare, --max and/or --idle-timeout",
                file=sys.stderr,
            )
            return EXIT_USAGE
    try:
        status, answer = request(path, method, target, body, timeout=timeout)
    except ClientError as exc:
        print(f"nursery-procs: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    if status >= 400:
        message = answer.get("error") if isinstance(answer, dict) else None
        print(f"nursery-procs: error: {message or f'HTTP {status}'}", file=sys.stderr)
        if as_json:
            print(json.dumps(answer, indent=2), file=out)
        return EXIT_SERVER_ERROR
    if as_json:
        print(json.dumps(answer, indent=2), file=out)
        return EXIT_OK
    if command == "status":
        text = format_status(answer)
    elif command == "tree":
        text = format_tree(answer)
    elif command == "stop":
        text = f"stopping {_describe_context(answer)}"
        below = len(answer.get("children", []))
        if below:
            text += f" and the {below} context(s) it started"
    elif command == "pools":
        text = format_pools(answer.get("pools", []))
    else:
        text = format_pool(answer)
    print(text, file=out)
    return EXIT_OK


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
