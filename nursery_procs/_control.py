"""The control socket: a small HTTP/1.1 + JSON API on a Unix socket.

It shows what a supervisor is running (its contexts as a tree, its pools and
their counters) and changes it live (stop a context, resize a pool), for
operators (``curl --unix-socket``) and scripts (the ``nursery-procs`` command).

The parts: the socket file (:mod:`._control_socket`), the HTTP server
(:mod:`._control_http`), the views (:mod:`._control_views`) and the paths they
share with the command (:mod:`._control_schema`). This module puts them together.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, Final, NoReturn

import trio

from ._control_http import HTTPServer, Limits
from ._control_metrics import metrics_registry
from ._control_socket import open_socket_file
from ._control_views import ControlAPI
from ._groups import unwrap_sole_exception
from ._supervisor import Supervisor

if TYPE_CHECKING:  # prometheus-client is imported when a server starts
    from prometheus_client.registry import Collector

log = logging.getLogger("nursery_procs.control")

#: The largest request body accepted (bigger ones get 413).
DEFAULT_MAX_BODY: Final = 64 * 1024
#: Seconds a client may stay silent (or stall a write) before its connection is closed.
DEFAULT_READ_TIMEOUT: Final = 10.0
#: Connections served at once; more are answered 503 and closed.
DEFAULT_MAX_CONNECTIONS: Final = 64


async def serve_control(
    supervisor: Supervisor,
    path: str | os.PathLike[str],
    *,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    max_body: int = DEFAULT_MAX_BODY,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    backlog: int = 128,
    collectors: Iterable[Collector] = (),
    allow_uids: Iterable[int] = (),
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve the control API of *supervisor* on a Unix socket at *path*; never returns.

    Use it as ``await nursery.start(serve_control, supervisor, path)``: that returns
    the path once the socket file is in place and accepting connections. See
    :func:`open_control` for a block-scoped form.

    The file is created atomically: the socket is bound in a private temporary
    directory beside *path*, made ``0600`` (owner only), set listening, and only
    then renamed to *path*. So whenever *path* exists, a server accepts
    connections on it: a client never sees a file that refuses it, and never
    waits for one to start listening.

    Before the rename, an existing file at *path* is probed: a socket of this
    user that nobody listens on (left by a killed server) is replaced; a live
    one, another user's, a symbolic link (never followed) or anything else is
    not. The folder must be safe from other users first: owned by this user (or
    root) and writable by no one else, with every folder above it owned by this
    user or root and writable by others only if sticky (as ``/tmp``), so that
    ``/tmp/myapp/control.sock`` with a private ``/tmp/myapp`` is fine and
    ``/tmp/control.sock`` is not.

    Each connecting peer's user id is checked with ``SO_PEERCRED``: the server's
    own user and *allow_uids* are served, anyone else is answered 403 and
    logged (the file's ``0600`` mode already keeps other users out; this check
    holds even if the mode is changed).

    If two servers start on the same path at the same moment, both may find it
    free; each rename is atomic, so the later one owns the path and the earlier
    one keeps listening on a socket that no longer has a name. On exit the
    earlier one sees that the file is not its own (another inode) and leaves it.

    Args:
        supervisor: the supervisor to show and control.
        path: the socket file's path (at most 107 bytes).
        read_timeout: seconds a client has to send each whole request (counted
            from connecting, or from the previous answer on a kept-alive
            connection), and to take each of our writes; past it, the connection
            is closed.
        max_body: the largest request body, in bytes (bigger: 413).
        max_connections: connections served at once (more: 503).
        backlog: the listening socket's backlog.
        collectors: the application's own prometheus-client collectors, served
            at ``GET /metrics`` with the supervisor's figures (for example a
            :class:`prometheus_client.Counter` made with ``registry=None``, or
            any object with a ``collect()`` method).
        allow_uids: user ids allowed to use the socket besides the server's
            own (checked with ``SO_PEERCRED`` on each connection; others are
            answered 403). Root is not allowed unless it is the server's user
            or listed here.

    Raises:
        ControlSocketBusy: another server accepts connections on *path*, or it
            cannot be told, or the socket there is another user's.
        FileExistsError: *path* exists and is not a socket (a symbolic link
            among others).
        PermissionError: the folder is not safe from other users (the message
            names the folder and why).
        FileNotFoundError: the folder does not exist.
        ValueError: *path* is too long for a Unix socket, two collectors make
            metrics of the same name, or *allow_uids* holds something other
            than a user id.
        OSError: the socket could not be created.

    **Cancellation:** the way to stop it. Connections are closed at once; contexts
    already being stopped on a client's request finish stopping (their shutdown is
    shielded and bounded by their policy).

    **Resource handling:** however it exits (cancelled, or by an error), the
    listening socket is closed and *path* is removed if it is still our socket
    (same inode): a file another server has put there since is left alone. A
    ``SIGKILL`` leaves a stale file, which the next server replaces.

    **Error handling:** nothing a client sends stops the server or the
    supervisor. A peer of another user is answered 403, malformed HTTP 400 (431
    for huge headers), unknown paths 404, wrong methods 405 with ``Allow``,
    bodies that are not JSON or hold invalid values 400, and an error in a
    handler 500 without details (logged on the ``nursery_procs.control`` logger).
    """
    text = os.fspath(path)
    allowed = _allowed_uids(allow_uids)
    metrics, collector = metrics_registry(supervisor, collectors)
    listener = await open_socket_file(text, backlog)
    # serve_listeners closes the listener, which removes the file first.
    async with listener, trio.open_nursery() as tasks:
        limits = Limits(
            read_timeout=read_timeout, max_body=max_body, max_connections=max_connections
        )
        server = HTTPServer(ControlAPI(supervisor, tasks, metrics, collector), limits, allowed)
        # The socket listens already: clients wait in its backlog until accepted.
        tasks.start_soon(server.serve, listener)
        log.info("control socket listening at %r", text)
        task_status.started(text)
        await trio.sleep_forever()
    raise AssertionError("unreachable")  # pragma: no cover


def _allowed_uids(allow_uids: Iterable[int]) -> frozenset[int]:
    uids = frozenset(allow_uids)
    for uid in uids:
        if not isinstance(uid, int) or isinstance(uid, bool) or uid < 0:
            raise ValueError(f"allow_uids must hold user ids (integers >= 0), not {uid!r}")
    return uids | {os.getuid()}


@asynccontextmanager
async def open_control(
    supervisor: Supervisor, path: str | os.PathLike[str], **options: Any
) -> AsyncIterator[str]:
    """Serve the control API of *supervisor* at *path* for the duration of the block.

    Yields the socket's path, once the file is in place and accepting connections.
    *options* are those of :func:`serve_control`.

    Raises:
        ControlSocketBusy: another server accepts connections on *path*.
        FileExistsError: *path* exists and is not a socket.
        PermissionError: the folder is not safe from other users.
        ValueError: see :func:`serve_control`.

    **Cancellation:** leaving the block (normally, by an exception or by
    cancellation) stops the server.

    **Resource handling:** on exit the socket is closed and its file removed,
    unless another server has replaced it meanwhile.

    **Error handling:** an exception from the block propagates as itself, not
    wrapped in a group.
    """
    with unwrap_sole_exception():
        async with trio.open_nursery() as nursery:
            bound: str = await nursery.start(partial(serve_control, supervisor, path, **options))
            try:
                yield bound
            finally:
                nursery.cancel_scope.cancel()
