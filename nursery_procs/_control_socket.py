"""The control socket's file: created atomically, removed only if it is still ours.

The socket is bound in a private temporary directory beside the path, made
``0600``, set listening, and only then renamed onto the path, so whenever the
file exists a server accepts connections on it (NGINX Unit does the same). A
stale file left by a killed server is replaced; a live one is never taken over.

The folder is checked first, as OpenSSH checks the modes of the files it
trusts: a folder another user can write to (or owns) lets that user remove our
socket and put an impostor in its place, so it is refused.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from contextlib import suppress
from typing import Final, NoReturn

import attrs
import trio

from ._errors import ControlSocketBusy
from ._peercred import user_name

log = logging.getLogger("nursery_procs.control")

#: How long the probe of an existing socket file waits for a connection.
PROBE_TIMEOUT: Final = 2.0
#: The longest path a Unix socket address can hold on Linux (``sun_path`` less its NUL).
MAX_SOCKET_PATH: Final = 107


@attrs.frozen
class _Identity:
    """Which file is ours: a socket file replaced by another server has another inode."""

    dev: int
    ino: int

    @classmethod
    def of(cls, path: str) -> _Identity:
        st = os.lstat(path)
        return cls(st.st_dev, st.st_ino)


@attrs.define(eq=False)
class SocketFileListener(trio.abc.Listener[trio.SocketStream]):
    """A listener on a Unix socket that owns its file.

    Closing it removes the file first (only if it is still the one it created,
    by inode), then closes the socket: while the file exists, it accepts.
    """

    path: str
    _listener: trio.SocketListener
    _identity: _Identity
    _closed: bool = False

    @property
    def socket(self) -> trio.socket.SocketType:
        return self._listener.socket

    async def accept(self) -> trio.SocketStream:
        return await self._listener.accept()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            _remove_if_ours(self.path, self._identity)
        await self._listener.aclose()


async def open_socket_file(path: str, backlog: int) -> SocketFileListener:
    """Listen on a Unix socket at *path*, which appears only once it accepts connections.

    Raises:
        ControlSocketBusy: another server accepts connections on *path*, it
            cannot be told, or the socket there is another user's.
        FileExistsError: *path* exists and is not a socket (a symbolic link
            among others: never followed).
        PermissionError: the folder is not private (see :func:`check_folder`).
        FileNotFoundError: the folder does not exist.
        ValueError: *path* is too long for a Unix socket.
        OSError: the socket could not be created.
    """
    _check_length(path)
    check_folder(path)
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
    return SocketFileListener(path, trio.SocketListener(sock), identity)


def _check_length(path: str) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ValueError(
            f"control socket path {path!r} is longer than the {MAX_SOCKET_PATH} bytes "
            "a Unix socket address can hold"
        )


def _trusted_owner(uid: int) -> bool:
    return uid in (os.getuid(), 0)


def _refuse(folder: str, why: str) -> NoReturn:
    raise PermissionError(
        errno.EACCES,
        f"refusing to create the control socket in {folder!r}: {why}; put it in a folder "
        "of its own that only this user can write to (mode 0700), such as "
        "$XDG_RUNTIME_DIR/<app>/ or /run/<app>/",
        folder,
    )


def check_folder(path: str) -> None:
    """Check that no other user can replace the socket at *path*.

    The socket's folder must be owned by this user (or root) and writable by
    no one else. Each folder above it must be owned by this user or root, and
    writable by others only if it is sticky (as ``/tmp`` is: there, others
    cannot rename or remove what is not theirs).

    Raises:
        FileNotFoundError: the folder does not exist.
        PermissionError: a folder fails the check (the message says which and why).
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        real = os.path.realpath(folder, strict=True)
    except FileNotFoundError:
        raise FileNotFoundError(
            errno.ENOENT, "the control socket's folder does not exist", folder
        ) from None
    current, own = real, True
    while True:
        st = os.stat(current)
        mode = stat.S_IMODE(st.st_mode)
        if not _trusted_owner(st.st_uid):
            _refuse(current, f"it belongs to {user_name(st.st_uid)}")
        if mode & (stat.S_IWGRP | stat.S_IWOTH) and (own or not mode & stat.S_ISVTX):
            sticky = " (sticky, but the socket must not go in it directly)" if own else ""
            _refuse(current, f"other users can write to it (mode {mode:04o}){sticky}")
        if current == "/":
            return
        current, own = os.path.dirname(current), False


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
    if stat.S_ISLNK(st.st_mode):
        raise FileExistsError(
            errno.EEXIST, "is a symbolic link (never followed): not replacing it", path
        )
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket; not replacing it", path)
    if st.st_uid != os.getuid():
        raise ControlSocketBusy(
            path, f"the socket there belongs to {user_name(st.st_uid)}: not taking it over"
        )
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
