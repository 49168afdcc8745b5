"""The control socket: a small HTTP/1.1 + JSON API on a Unix socket.

It shows what a supervisor is running (its contexts as a tree, its pools and
their counters) and changes it live (stop a context, resize a pool), for
operators (``curl --unix-socket``) and scripts (the ``nursery-procs`` command).

The socket file is created atomically: the server listens on a temporary socket
first, then renames it into place, so whenever the file exists, a server accepts
connections on it. A stale file left by a killed server is replaced; a live one
is never taken over.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import secrets
import stat
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial
from typing import Any, Final, NoReturn

import attrs
import h11
import trio

from . import _wire
from ._context import Context
from ._errors import ControlSocketBusy, LinkClosed, MessageUndeliverable, PoolClosed, WireError
from ._groups import unwrap_sole_exception
from ._lifecycle import State
from ._pool import Pool, pools_of
from ._supervisor import Supervisor
from ._wire import Handle

log = logging.getLogger("nursery_procs.control")

#: The largest request body accepted (bigger ones get 413).
DEFAULT_MAX_BODY: Final = 64 * 1024
#: Seconds a client may stay silent (or stall a write) before its connection is closed.
DEFAULT_READ_TIMEOUT: Final = 10.0
#: Connections served at once; more are answered 503 and closed.
DEFAULT_MAX_CONNECTIONS: Final = 64
#: The largest request line plus headers accepted (bigger ones get 431).
MAX_HEADER_SIZE: Final = 16 * 1024
#: How long the probe of an existing socket file waits for a connection.
PROBE_TIMEOUT: Final = 2.0
#: The longest path a Unix socket address can hold on Linux (``sun_path`` less its NUL).
MAX_SOCKET_PATH: Final = 107
#: Seconds spent draining a client's unread input before closing after an error.
_LINGER: Final = 1.0
_RECEIVE_SIZE: Final = 16 * 1024


# -- the socket file -----------------------------------------------------------


@attrs.frozen
class _Identity:
    """Which file is ours: a socket file replaced by another server has another inode."""

    dev: int
    ino: int

    @classmethod
    def of(cls, path: str) -> _Identity:
        st = os.lstat(path)
        return cls(st.st_dev, st.st_ino)


def _check_length(path: str) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ValueError(
            f"control socket path {path!r} is longer than the {MAX_SOCKET_PATH} bytes "
            "a Unix socket address can hold"
        )


def _temporary_directory(path: str) -> str:
    """A new private (0700) directory beside *path*, for binding the socket unseen."""
    directory, base = os.path.split(path)
    token = secrets.token_hex(4)
    for candidate in (f".{base}.{os.getpid()}.{token}.tmp", f".{os.getpid()}.{token}.tmp"):
        temp = os.path.join(directory, candidate)
        if len(os.fsencode(os.path.join(temp, "s"))) <= MAX_SOCKET_PATH:
            os.mkdir(temp, 0o700)
            return temp
    raise ValueError(
        f"control socket path {path!r} is too long to bind a temporary socket beside it"
    )


async def _probe(path: str) -> bool:
    """Check that *path* is free to take; return whether a stale socket is there.

    Free means absent, or a socket nobody listens on (connection refused).

    Raises:
        ControlSocketBusy: something accepts connections on it, or it cannot be
            told (permission denied, no answer in time).
        FileExistsError: it exists and is not a socket.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket; not replacing it", path)
    probe = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with probe:
        try:
            with trio.fail_after(PROBE_TIMEOUT):
                await probe.connect(path)
        except ConnectionRefusedError:
            return True  # stale: nobody listens
        except FileNotFoundError:
            return False  # gone meanwhile
        except trio.TooSlowError:
            raise ControlSocketBusy(path, "a server holds it but did not accept in time") from None
        except OSError as exc:
            raise ControlSocketBusy(
                path, f"cannot tell whether it is in use ({exc.strerror or exc})"
            ) from None
    raise ControlSocketBusy(path)


async def _bind_atomically(path: str, backlog: int) -> tuple[trio.socket.SocketType, _Identity]:
    """Listen on a socket at *path*, which appears only once it accepts connections."""
    _check_length(path)
    temp_dir = _temporary_directory(path)
    temp = os.path.join(temp_dir, "s")
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(temp)
        os.chmod(temp, 0o600)
        sock.listen(backlog)
        identity = _Identity.of(temp)
        if await _probe(path):
            log.info("replacing the stale control socket at %r", path)
        os.rename(temp, path)  # atomic; replaces a stale socket file
    except BaseException:
        sock.close()
        _unlink_quietly(temp)
        raise
    finally:
        try:
            os.rmdir(temp_dir)
        except OSError:
            log.warning("could not remove the temporary directory %r", temp_dir)
    return sock, identity


def _unlink_quietly(path: str) -> None:
    with suppress(FileNotFoundError):
        os.unlink(path)


def _remove_if_ours(path: str, identity: _Identity) -> bool:
    """Remove *path* if it is still the socket we created; return whether it was."""
    try:
        current = _Identity.of(path)
    except FileNotFoundError:
        return False
    if current != identity:
        log.info("control socket %r was replaced by another server; leaving it", path)
        return False
    _unlink_quietly(path)
    return True


# -- JSON views ----------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """*value* with non-finite floats (not valid JSON) replaced by ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _rss_bytes(pid: int | None) -> int | None:
    """The resident set size of *pid* from ``/proc/<pid>/status``, if readable."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@attrs.define(eq=False)
class _Node:
    id: int
    data: dict[str, Any]
    parent_id: int | None
    children: list[_Node] = attrs.field(factory=list)

    def render(self) -> dict[str, Any]:
        out = dict(self.data)
        out["children"] = [child.render() for child in sorted(self.children, key=_node_key)]
        return out


def _node_key(node: _Node) -> int:
    return node.id


def _context_data(ctx: Context) -> dict[str, Any]:
    stats = ctx.statistics()
    return {
        "id": ctx.id,
        "name": ctx.name,
        "parent_id": ctx.parent_id,
        "pid": ctx.pid,
        "state": ctx.state.value,
        "direct": True,
        "uptime": stats.uptime,
        "rss_bytes": _rss_bytes(ctx.pid),
        "messages_in": stats.messages_in,
        "messages_out": stats.messages_out,
        "bytes_in": stats.bytes_in,
        "bytes_out": stats.bytes_out,
    }


def _deeper_data(context_id: int, name: str, parent_id: int, pid: int) -> dict[str, Any]:
    # Known through route announcements only: no link here, so no traffic; and its
    # pid may be of another host, so its memory is not read here.
    return {
        "id": context_id,
        "name": name,
        "parent_id": parent_id,
        "pid": pid,
        "state": State.READY.value,
        "direct": False,
        "uptime": None,
        "rss_bytes": None,
        "messages_in": None,
        "messages_out": None,
        "bytes_in": None,
        "bytes_out": None,
    }


def _nodes(supervisor: Supervisor) -> tuple[_Node, dict[int, _Node]]:
    """The root node (this process) and every context it knows, linked as a tree."""
    router = supervisor.router
    root = _Node(
        router.id,
        {
            "id": router.id,
            "name": router.name,
            "parent_id": None,
            "pid": os.getpid(),
            "state": State.READY.value,
            "direct": False,
            "uptime": trio.current_time() - supervisor.started_at,
            "rss_bytes": _rss_bytes(os.getpid()),
            "messages_in": None,
            "messages_out": None,
            "bytes_in": None,
            "bytes_out": None,
        },
        None,
    )
    nodes: dict[int, _Node] = {}
    for ctx in supervisor.children:
        nodes[ctx.id] = _Node(ctx.id, _context_data(ctx), router.id)
    for info in list(router.directory.values()):
        if info.id not in nodes and info.id != router.id:
            nodes[info.id] = _Node(
                info.id, _deeper_data(info.id, info.name, info.parent_id, info.pid), info.parent_id
            )
    for node in nodes.values():
        parent = nodes.get(node.parent_id) if node.parent_id is not None else None
        # A context whose parent is not known (yet) hangs under the root.
        (parent or root).children.append(node)
    return root, nodes


def _find(supervisor: Supervisor, name: str) -> _Node | None:
    """The oldest context called *name* (direct children first), with its subtree."""
    _root, nodes = _nodes(supervisor)
    matches = [node for node in nodes.values() if node.data["name"] == name]
    if not matches:
        return None
    return min(matches, key=lambda node: (not node.data["direct"], node.id))


def _pool_data(pool: Pool) -> dict[str, Any]:
    return {
        "name": pool.name,
        "closed": pool.closed,
        "statistics": attrs.asdict(pool.statistics()),
    }


def _status(supervisor: Supervisor) -> dict[str, Any]:
    _root, nodes = _nodes(supervisor)
    by_state = {state.value: 0 for state in State}
    for node in nodes.values():
        by_state[node.data["state"]] += 1
    router = supervisor.router
    return {
        "pid": os.getpid(),
        "context_id": router.id,
        "name": router.name,
        "uptime": trio.current_time() - supervisor.started_at,
        "counts": {
            "contexts": by_state,
            "contexts_total": len(nodes),
            "pools": len(pools_of(supervisor)),
        },
        "statistics": attrs.asdict(supervisor.statistics()),
    }


# -- HTTP ----------------------------------------------------------------------


class _HTTPError(Exception):
    def __init__(
        self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


@attrs.frozen
class _Reply:
    status: int
    body: Any
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False


class _Closed(Exception):
    """The client went away, or stayed silent past the read timeout."""


_REASONS: Final = {
    100: b"Continue",
    200: b"OK",
    202: b"Accepted",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}

#: Path patterns: the first segment, whether a name follows, and the methods allowed.
_ROUTES: Final[dict[tuple[str, bool], tuple[str, ...]]] = {
    ("status", False): ("GET",),
    ("contexts", False): ("GET",),
    ("contexts", True): ("GET", "DELETE"),
    ("pools", False): ("GET",),
    ("pools", True): ("GET", "PUT"),
}

_POOL_SETTINGS: Final = ("spare", "max", "idle_timeout")


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _HTTPError(400, f"the request body is not JSON: {exc}") from None


def _split_path(target: bytes) -> list[str]:
    """The request target's path as decoded segments (``%2F`` inside a segment is ``/``)."""
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise _HTTPError(400, "the request target is not ASCII") from None
    path = urllib.parse.urlsplit(text).path if "://" in text else text.split("?", 1)[0]
    if not path.startswith("/"):
        raise _HTTPError(400, f"the request target {text!r} is not an absolute path")
    try:
        return [urllib.parse.unquote(part, errors="strict") for part in path[1:].split("/")]
    except UnicodeDecodeError:
        raise _HTTPError(400, "the request path is not valid UTF-8 once decoded") from None


def _both_done(conn: h11.Connection) -> bool:
    """Whether the request and its response are complete, so the connection can be reused."""
    return conn.states == {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE}


class _Server:
    """Answers the requests of every connection to one control socket."""

    def __init__(
        self,
        supervisor: Supervisor,
        tasks: trio.Nursery,
        *,
        read_timeout: float,
        max_body: int,
        max_connections: int,
    ) -> None:
        self.supervisor = supervisor
        self.tasks = tasks
        self.read_timeout = read_timeout
        self.max_body = max_body
        self.max_connections = max_connections
        self.connections = 0

    # -- connections -------------------------------------------------------

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one connection until it closes; never raises for the client's sake."""
        self.connections += 1
        try:
            async with stream:
                await self._serve(stream)
        except Exception:
            log.exception("control connection failed")
        finally:
            self.connections -= 1

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_SIZE)
        if self.connections > self.max_connections:
            busy = _Reply(503, {"error": "too many control connections"}, close=True)
            await self._finish(stream, conn, busy)
            return
        while True:
            reply: _Reply | None
            try:
                reply = await self._one_request(stream, conn)
            except _Closed:
                return
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint if exc.error_status_hint in _REASONS else 400
                reply = _Reply(status, {"error": f"malformed HTTP request: {exc}"}, close=True)
            if reply is None:
                return  # the client closed the connection between requests
            if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
                return
            try:
                await self._send_reply(stream, conn, reply)
            except _Closed:
                return
            if reply.close or not _both_done(conn):
                await self._linger(stream)
                return
            conn.start_next_cycle()

    async def _finish(self, stream: trio.SocketStream, conn: h11.Connection, reply: _Reply) -> None:
        try:
            await self._send_reply(stream, conn, reply)
        except _Closed:
            return
        await self._linger(stream)

    async def _receive(
        self, stream: trio.SocketStream, conn: h11.Connection, deadline: float
    ) -> Any:
        """The next h11 event, reading from the client as needed, until *deadline*."""
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = b""
            with trio.move_on_at(deadline) as scope:
                try:
                    data = await stream.receive_some(_RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    raise _Closed from None
            if scope.cancelled_caught:
                raise _Closed
            conn.receive_data(data)

    async def _one_request(self, stream: trio.SocketStream, conn: h11.Connection) -> _Reply | None:
        # The whole request must arrive in time: a client sending a byte now and
        # then cannot hold its task for ever either.
        deadline = trio.current_time() + self.read_timeout
        event = await self._receive(stream, conn, deadline)
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):  # pragma: no cover - h11 guarantees a Request
            raise h11.RemoteProtocolError("expected a request")
        length = self._content_length(event)
        if length is not None and length > self.max_body:
            return self._too_large()
        if conn.they_are_waiting_for_100_continue:
            await self._send(stream, conn, h11.InformationalResponse(status_code=100, headers=[]))
        body = bytearray()
        while True:
            part = await self._receive(stream, conn, deadline)
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > self.max_body:
                    return self._too_large()
            elif isinstance(part, h11.EndOfMessage):
                break
            else:  # pragma: no cover - h11 ends a body with EndOfMessage or an error
                raise _Closed
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("ascii", "replace")
        reply = await self._dispatch(method, event.target, bytes(body))
        log.debug("control %s %s -> %d", method, target, reply.status)
        return reply

    def _content_length(self, request: h11.Request) -> int | None:
        for name, value in request.headers:
            if name == b"content-length":
                return int(value)  # h11 has checked that it is a number
        return None

    def _too_large(self) -> _Reply:
        message = f"the request body is over the limit of {self.max_body} bytes"
        return _Reply(413, {"error": message}, close=True)

    async def _send(self, stream: trio.SocketStream, conn: h11.Connection, event: Any) -> None:
        data = conn.send(event)
        if not data:
            return
        with trio.move_on_after(self.read_timeout) as scope:
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _Closed from None
        if scope.cancelled_caught:
            raise _Closed

    async def _send_reply(
        self, stream: trio.SocketStream, conn: h11.Connection, reply: _Reply
    ) -> None:
        payload = (json.dumps(_jsonable(reply.body), indent=2) + "\n").encode()
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            ("Server", "nursery_procs"),
            *reply.headers,
        ]
        if reply.close:
            headers.append(("Connection", "close"))
        response = h11.Response(
            status_code=reply.status, headers=headers, reason=_REASONS.get(reply.status, b"")
        )
        await self._send(stream, conn, response)
        await self._send(stream, conn, h11.Data(data=payload))
        await self._send(stream, conn, h11.EndOfMessage())

    async def _linger(self, stream: trio.SocketStream) -> None:
        """Half-close, then drain what the client still sends (briefly), so that
        closing with unread input does not reset the connection before the client
        has read our answer."""
        try:
            await stream.send_eof()
            with trio.move_on_after(_LINGER):
                drained = 0
                while drained < 16 * self.max_body:
                    data = await stream.receive_some(_RECEIVE_SIZE)
                    if not data:
                        return
                    drained += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return

    # -- requests ----------------------------------------------------------

    async def _dispatch(self, method: str, target: bytes, body: bytes) -> _Reply:
        try:
            return await self._route(method, target, body)
        except _HTTPError as exc:
            return _Reply(exc.status, {"error": exc.message}, exc.headers)
        except Exception:
            log.exception("control request %s %r failed", method, target)
            return _Reply(500, {"error": "internal error in the control server (see its log)"})

    async def _route(self, method: str, target: bytes, body: bytes) -> _Reply:
        segments = _split_path(target)
        kind = segments[0]
        named = len(segments) == 2
        allowed = None
        if len(segments) == 1 or (named and segments[1]):
            allowed = _ROUTES.get((kind, named))
        if allowed is None:
            hint = ""
            if kind in ("contexts", "pools") and len(segments) > 2:
                hint = " (write '/' in a name as %2F)"
            raise _HTTPError(404, f"unknown path {target.decode('ascii', 'replace')!r}{hint}")
        if method not in allowed:
            raise _HTTPError(
                405,
                f"method {method} is not allowed here; allowed: {', '.join(allowed)}",
                (("Allow", ", ".join(allowed)),),
            )
        handler: Callable[..., Any] = getattr(self, f"_{method.lower()}_{kind}")
        result: _Reply = await handler(segments[1], body) if named else await handler()
        return result

    async def _get_status(self) -> _Reply:
        return _Reply(200, _status(self.supervisor))

    async def _get_contexts(self, name: str | None = None, body: bytes = b"") -> _Reply:
        if name is None:
            root, _nodes_by_id = _nodes(self.supervisor)
            return _Reply(200, root.render())
        return _Reply(200, self._context(name).render())

    def _context(self, name: str) -> _Node:
        node = _find(self.supervisor, name)
        if node is None:
            raise _HTTPError(404, f"no context named {name!r}")
        return node

    async def _delete_contexts(self, name: str, body: bytes) -> _Reply:
        node = self._context(name)
        sup = self.supervisor
        direct = next((ctx for ctx in sup.children if ctx.id == node.id), None)
        if direct is not None:
            self.tasks.start_soon(_close_child, direct, name=f"control: stop {direct.name}")
        else:
            router = sup.router
            try:
                await router.send(_wire.make(node.id, router.id, Handle.SHUTDOWN, None))
            except (MessageUndeliverable, LinkClosed, WireError) as exc:
                raise _HTTPError(404, f"context {name!r} is gone: {exc}") from None
        data = node.render()
        if data["state"] not in (State.STOPPING.value, State.EXITED.value):
            data["state"] = State.STOPPING.value
        return _Reply(202, data)

    def _pool(self, name: str) -> Pool:
        pool = pools_of(self.supervisor).get(name)
        if pool is None:
            raise _HTTPError(404, f"no pool named {name!r}")
        return pool

    async def _get_pools(self, name: str | None = None, body: bytes = b"") -> _Reply:
        if name is None:
            pools = [_pool_data(pool) for _, pool in sorted(pools_of(self.supervisor).items())]
            return _Reply(200, {"pools": pools})
        return _Reply(200, _pool_data(self._pool(name)))

    async def _put_pools(self, name: str, body: bytes) -> _Reply:

        pool = self._pool(name)
        settings = _parse_json(body)
        if not isinstance(settings, dict):
            raise _HTTPError(400, "the request body must be a JSON object")
        unknown = sorted(set(settings) - set(_POOL_SETTINGS))
        if unknown:
            raise _HTTPError(
                400,
                f"unknown setting(s) {', '.join(unknown)}; "
                f"expected any of {', '.join(_POOL_SETTINGS)}",
            )
        if not settings:
            raise _HTTPError(400, f"nothing to change: give any of {', '.join(_POOL_SETTINGS)}")
        for key in ("spare", "max"):
            value = settings.get(key)
            if key in settings and (not isinstance(value, int) or isinstance(value, bool)):
                raise _HTTPError(400, f"{key} must be an integer, not {json.dumps(value)}")
        timeout = settings.get("idle_timeout")
        if "idle_timeout" in settings:
            if timeout is None:
                timeout = math.inf  # null: keep idle children for ever
            elif not isinstance(timeout, int | float) or isinstance(timeout, bool):
                raise _HTTPError(
                    400, f"idle_timeout must be a number or null, not {json.dumps(timeout)}"
                )
        try:
            pool.resize(spare=settings.get("spare"), max=settings.get("max"), idle_timeout=timeout)
        except ValueError as exc:
            raise _HTTPError(400, str(exc)) from None
        except PoolClosed as exc:
            raise _HTTPError(409, str(exc)) from None
        log.info("pool %r resized to %s over the control socket", name, settings)
        return _Reply(200, _pool_data(pool))


async def _close_child(ctx: Context) -> None:
    try:
        await ctx.aclose()
    except Exception:
        log.exception("stopping %r for the control socket failed", ctx)


# -- public API ----------------------------------------------------------------


async def serve_control(
    supervisor: Supervisor,
    path: str | os.PathLike[str],
    *,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    max_body: int = DEFAULT_MAX_BODY,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    backlog: int = 128,
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

    Before the rename, an existing file at *path* is probed: a socket nobody
    listens on (left by a killed server) is replaced; a live one is not.

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

    Raises:
        ControlSocketBusy: another server accepts connections on *path*, or it
            cannot be told (for example another user's socket).
        FileExistsError: *path* exists and is not a socket.
        ValueError: *path* is too long for a Unix socket.
        OSError: the socket could not be created (for example no such directory).

    **Cancellation:** the way to stop it. Connections are closed at once; contexts
    already being stopped on a client's request finish stopping (their shutdown is
    shielded and bounded by their policy).

    **Resource handling:** however it exits (cancelled, or by an error), the
    listening socket is closed and *path* is removed if it is still our socket
    (same inode): a file another server has put there since is left alone. A
    ``SIGKILL`` leaves a stale file, which the next server replaces.

    **Error handling:** nothing a client sends stops the server or the
    supervisor. Malformed HTTP is answered 400 (431 for huge headers), unknown
    paths 404, wrong methods 405 with ``Allow``, bodies that are not JSON or hold
    invalid values 400, and an error in a handler 500 without details (logged on
    the ``nursery_procs.control`` logger).
    """
    text = os.fspath(path)
    sock, identity = await _bind_atomically(text, backlog)
    listener = trio.SocketListener(sock)
    log.info("control socket listening at %r", text)

    stopped = False

    async def stop_listening() -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        # Unlink first: while the file exists, the socket behind it must accept.
        _remove_if_ours(text, identity)
        with trio.CancelScope(shield=True):
            await listener.aclose()

    try:
        async with trio.open_nursery() as tasks:
            server = _Server(
                supervisor,
                tasks,
                read_timeout=read_timeout,
                max_body=max_body,
                max_connections=max_connections,
            )
            try:
                task_status.started(text)
                await _accept_forever(listener, server.handle, tasks)
            finally:
                # Before waiting for the connections' tasks to end.
                await stop_listening()
    finally:
        await stop_listening()


_ACCEPT_RETRY_ERRNOS: Final = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS))


async def _accept_forever(
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream], Any],
    tasks: trio.Nursery,
) -> NoReturn:
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in _ACCEPT_RETRY_ERRNOS:
                raise
            log.warning("control socket: cannot accept (%s); retrying shortly", exc)
            await trio.sleep(0.1)
            continue
        tasks.start_soon(handler, stream)


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
