"""A blocking client of the control socket: :mod:`http.client` over a Unix socket.

Used by the ``nursery-procs`` command; standard library only, so that the
command starts quickly. Every way of failing becomes a :class:`ClientError`
carrying the exit status the command uses for it, and the server is checked
(``SO_PEERCRED``) to run as an expected user before anything is sent to it.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
from collections.abc import Collection
from typing import Any, Final

from ._control_schema import SOCKET_ENV
from ._peercred import peer_credentials, user_name

#: Done.
EXIT_OK: Final = 0
#: The server answered with an error (its message is printed).
EXIT_SERVER_ERROR: Final = 1
#: A usage error.
EXIT_USAGE: Final = 2
#: Nothing at the path (or its folder does not exist).
EXIT_NO_SOCKET: Final = 3
#: A stale socket: the file is there, nobody listens on it.
EXIT_STALE: Final = 4
#: No proper answer: a timeout, or a malformed answer.
EXIT_BAD_ANSWER: Final = 5
#: Something other than a socket is at the path (a regular file, a folder).
EXIT_NOT_A_SOCKET: Final = 6
#: The server refused us: no permission to connect, or it answered 403.
EXIT_REFUSED: Final = 7
#: The server runs as a user we do not expect: nothing was sent to it.
EXIT_WRONG_SERVER: Final = 8

_MAX_RESPONSE: Final = 16 * 1024 * 1024


class ClientError(Exception):
    """The request could not be made or answered; carries the exit status to use."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def default_server_uids() -> frozenset[int]:
    """The users a server may run as, unless told otherwise: ours, or root."""
    return frozenset({os.getuid(), 0})


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "not a socket"


def _check_path(path: str) -> None:
    """Tell a missing path and something that is not a socket apart from a socket."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        folder = os.path.dirname(path) or "."
        if not os.path.isdir(folder):
            raise ClientError(
                f"no control socket at {path!r}: the folder {folder!r} does not exist",
                EXIT_NO_SOCKET,
            ) from None
        raise ClientError(
            f"no control socket at {path!r}: is the supervisor running with its "
            f"control socket enabled? (set --socket or ${SOCKET_ENV})",
            EXIT_NO_SOCKET,
        ) from None
    except PermissionError:
        raise ClientError(
            f"permission denied looking at {path!r}: its folder belongs to another user",
            EXIT_REFUSED,
        ) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ClientError(
            f"{path!r} is {_kind(st.st_mode)}, not a socket: is the path right?",
            EXIT_NOT_A_SOCKET,
        )


class _UnixConnection(http.client.HTTPConnection):
    """:class:`http.client.HTTPConnection` over a Unix socket, checking who serves it."""

    def __init__(self, socket_path: str, timeout: float, server_uids: Collection[int]) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path
        self.server_uids = server_uids

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            self._connect(sock)
            self._check_server(sock)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def _connect(self, sock: socket.socket) -> None:
        path = self.socket_path
        try:
            sock.connect(path)
        except FileNotFoundError:
            _check_path(path)  # gone meanwhile: say how
            raise
        except ConnectionRefusedError:
            raise ClientError(
                f"the control socket {path!r} is stale: nobody listens on it (its server "
                "is gone; the next one replaces the file)",
                EXIT_STALE,
            ) from None
        except PermissionError:
            owner = user_name(os.stat(path).st_uid)
            raise ClientError(
                f"permission denied connecting to the control socket {path!r}: it belongs "
                f"to {owner}; run the command as that user",
                EXIT_REFUSED,
            ) from None

    def _check_server(self, sock: socket.socket) -> None:
        uid = peer_credentials(sock).uid
        if uid not in self.server_uids:
            expected = " or ".join(user_name(u) for u in sorted(self.server_uids))
            raise ClientError(
                f"the server at {self.socket_path!r} runs as {user_name(uid)}, not as "
                f"{expected}: nothing was sent to it (if it is the right server, pass "
                f"--server-uid {uid})",
                EXIT_WRONG_SERVER,
            )


def request_raw(
    socket_path: str,
    method: str,
    target: str,
    body: Any = None,
    *,
    timeout: float = 10.0,
    server_uids: Collection[int] | None = None,
) -> tuple[int, str, bytes]:
    """One request over the Unix socket *socket_path* (blocking): the status, the
    content type and the body of the answer. *body*, if not ``None``, is sent as JSON.

    Raises:
        ClientError: see :func:`request`.
    """
    _check_path(socket_path)
    headers = {"Accept": "application/json"}
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    uids = default_server_uids() if server_uids is None else server_uids
    conn = _UnixConnection(socket_path, timeout, uids)
    try:
        conn.request(method, target, body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read(_MAX_RESPONSE + 1)
        if len(data) > _MAX_RESPONSE:
            raise http.client.HTTPException("the answer is too large")
    except TimeoutError:
        raise ClientError(
            f"no answer from the control socket {socket_path!r} within {timeout} s",
            EXIT_BAD_ANSWER,
        ) from None
    except (http.client.HTTPException, OSError) as exc:
        raise ClientError(
            f"bad answer from the control socket {socket_path!r}: {exc or type(exc).__name__}",
            EXIT_BAD_ANSWER,
        ) from None
    finally:
        conn.close()
    if response.status == 403:
        raise ClientError(
            f"the server at {socket_path!r} refused us: {_error_of(data) or 'forbidden'}",
            EXIT_REFUSED,
        )
    return response.status, response.getheader("Content-Type", ""), data


def _error_of(data: bytes) -> str | None:
    try:
        message = json.loads(data)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    return message if isinstance(message, str) else None


def request(
    socket_path: str,
    method: str,
    target: str,
    body: Any = None,
    *,
    timeout: float = 10.0,
    server_uids: Collection[int] | None = None,
) -> tuple[int, Any]:
    """Make one HTTP/1.1 request over the Unix socket *socket_path* (blocking).

    *body*, if not ``None``, is sent as JSON. Returns the status code and the
    decoded JSON body of the answer. The server must run as one of
    *server_uids* (default: this process's user, or root).

    Raises:
        ClientError: with the exit status for each way of failing (see the
            ``EXIT_*`` constants): no socket, not a socket, a stale socket, a
            refusal, a server of another user, no proper answer.
    """
    status, _type, data = request_raw(
        socket_path, method, target, body, timeout=timeout, server_uids=server_uids
    )
    try:
        return status, json.loads(data.decode("utf-8")) if data else None
    except (UnicodeDecodeError, ValueError):
        raise ClientError(
            f"bad answer from the control socket {socket_path!r}: the answer is not JSON",
            EXIT_BAD_ANSWER,
        ) from None
