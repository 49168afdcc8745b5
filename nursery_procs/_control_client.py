"""A blocking client of the control socket: :mod:`http.client` over a Unix socket.

Used by the ``nursery-procs`` command; standard library only, so that the
command starts quickly. Every way of failing becomes a :class:`ClientError`
with the exit status the command uses for it.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any, Final

from ._control_schema import SOCKET_ENV

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


class _UnixConnection(http.client.HTTPConnection):
    """:class:`http.client.HTTPConnection` over a Unix socket."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _connect(conn: _UnixConnection) -> None:
    """Connect, turning each way of failing into a :class:`ClientError`."""
    path = conn.socket_path
    try:
        conn.connect()
    except (FileNotFoundError, NotADirectoryError):
        raise ClientError(
            f"no control socket at {path!r}: is the supervisor running with its "
            f"control socket enabled? (set --socket or ${SOCKET_ENV})",
            EXIT_NO_SOCKET,
        ) from None
    except ConnectionRefusedError:
        raise ClientError(
            f"the control socket {path!r} refuses connections: its server is gone (a stale file)",
            EXIT_REFUSED,
        ) from None
    except PermissionError:
        raise ClientError(
            f"permission denied connecting to the control socket {path!r}: "
            "it belongs to another user",
            EXIT_REFUSED,
        ) from None


def request_raw(
    socket_path: str, method: str, target: str, body: Any = None, *, timeout: float = 10.0
) -> tuple[int, str, bytes]:
    """One request over the Unix socket *socket_path* (blocking): the status, the
    content type and the body of the answer. *body*, if not ``None``, is sent as JSON.

    Raises:
        ClientError: see :func:`request`.
    """
    headers = {"Accept": "application/json"}
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    conn = _UnixConnection(socket_path, timeout)
    try:
        _connect(conn)
        conn.request(method, target, body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read(_MAX_RESPONSE + 1)
        if len(data) > _MAX_RESPONSE:
            raise http.client.HTTPException("the answer is too large")
        return response.status, response.getheader("Content-Type", ""), data
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


def request(
    socket_path: str, method: str, target: str, body: Any = None, *, timeout: float = 10.0
) -> tuple[int, Any]:
    """Make one HTTP/1.1 request over the Unix socket *socket_path* (blocking).

    *body*, if not ``None``, is sent as JSON. Returns the status code and the
    decoded JSON body of the answer.

    Raises:
        ClientError: no socket file (exit status 3), the socket refuses
            connections (4), or no proper answer came (5).
    """
    status, _type, data = request_raw(socket_path, method, target, body, timeout=timeout)
    try:
        return status, json.loads(data.decode("utf-8")) if data else None
    except (UnicodeDecodeError, ValueError):
        raise ClientError(
            f"bad answer from the control socket {socket_path!r}: the answer is not JSON",
            EXIT_BAD_ANSWER,
        ) from None
