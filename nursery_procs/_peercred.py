"""Who is at the other end of a Unix socket: ``SO_PEERCRED`` (Linux).

The kernel records the peer's credentials when the connection is made (for
the server: when the client called ``connect``; for the client: when the server
called ``listen``), so they cannot be forged by what is sent over it.
Standard library only: the command-line client uses it too.
"""

from __future__ import annotations

import pwd
import socket
import struct
from dataclasses import dataclass
from typing import Final, Protocol

_UCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid


class _HasSockopt(Protocol):
    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes: ...


@dataclass(frozen=True)
class Credentials:
    """The process, user and group at the other end of a Unix socket."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: _HasSockopt) -> Credentials:
    """The peer's credentials of a connected Unix socket (a :mod:`socket` or Trio one)."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(data)
    return Credentials(pid, uid, gid)


def user_name(uid: int) -> str:
    """``uid 1000 (alice)``, or ``uid 1000`` for a uid with no name."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"
