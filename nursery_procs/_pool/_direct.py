"""Direct calls: a worker's own socket for sync calls, beside its link.

A call over the link crosses the parent's router and its reader task, the
child's event loop and its router, and two envelopes. A worker pool's call needs
none of that: one caller at a time, a sync function, a result. So each local,
trusted worker also gets a socket of its own for such calls, served by a thread
in the worker that reads a call, runs it and writes the outcome, blocking, with
no event loop in between; the parent's caller writes and reads that socket
itself, with no task hop. Frames are a 4-byte big-endian length and a pickle:
``(fn, args)`` one way, an outcome ``(ok, value)`` the other, as on the link.

How the socket gets there: the worker makes a socket pair and keeps one end for
its thread; the parent takes a copy of the other end out of the worker with
``pidfd_getfd(2)`` (it is the worker's ancestor, which the kernel allows), and the
worker then closes its copy, so that either side sees the other go as end of file.
Where that is refused, the pool calls over the link as before.

The worker's event loop is not involved: it still serves its link (SHUTDOWN,
other calls), and the thread ends with the process.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import socket
import struct
import threading
import traceback
from typing import Any

import trio

from .. import _wire
from .._context import Context
from .._errors import ContextDied, WireError
from .._remote import failed, rebuild
from .._spec import resolve

log = logging.getLogger("nursery_procs.pool")

_LENGTH = struct.Struct("!I")
_SYS_PIDFD_GETFD = 438  # x86_64 and aarch64 alike (the generic syscall table)
_libc = ctypes.CDLL(None, use_errno=True)

# -- the worker's side --------------------------------------------------------

#: Socket ends made for the parent, kept open until it has taken its copy.
_handed: dict[int, socket.socket] = {}


def open_in_worker() -> tuple[int, int]:
    """In a worker: start serving direct calls; the number of the descriptor the
    parent is to take, and this process's id (as this process sees itself)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    threading.Thread(
        target=_serve, args=(ours,), name="nursery_procs direct calls", daemon=True
    ).start()
    _handed[theirs.fileno()] = theirs
    return theirs.fileno(), os.getpid()


def close_handed(fd: int) -> None:
    """In a worker: the parent has its copy of *fd*; close ours."""
    _handed.pop(fd).close()


def _receive_exactly(sock: socket.socket, size: int) -> bytes | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        count = sock.recv_into(view[got:])
        if count == 0:
            return None
        got += count
    return bytes(buffer)


def _serve(sock: socket.socket) -> None:
    """Run each call that arrives, until the parent closes its end."""
    with sock:
        while (head := _receive_exactly(sock, _LENGTH.size)) is not None:
            body = _receive_exactly(sock, _LENGTH.unpack(head)[0])
            if body is None:
                return
            blob = _outcome(body)
            sock.sendall(_LENGTH.pack(len(blob)) + blob)


def _outcome(body: bytes) -> bytes:
    try:
        fn, args = _wire.loads(body)
        outcome: tuple[bool, Any] = (True, resolve(fn)(*args))
    except Exception as exc:
        outcome = failed(exc)
    except BaseException:
        # SystemExit and the like end the worker, as they do a call over the
        # link: the caller gets ContextDied, and the pool a fresh worker.
        traceback.print_exc()
        os._exit(1)
    try:
        return pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        error = WireError(f"cannot pickle the result ({type(outcome[1]).__name__}): {exc}")
        return pickle.dumps(failed(error), protocol=pickle.HIGHEST_PROTOCOL)


# -- the parent's side ----------------------------------------------------------


def _take_descriptor(pid: int, fd: int) -> int:
    pidfd = os.pidfd_open(pid)
    try:
        taken = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if taken < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return int(taken)
    finally:
        os.close(pidfd)


class DirectChannel:
    """The parent's end of one worker's direct-call socket."""

    def __init__(self, ctx: Context, fd: int) -> None:
        self._ctx = ctx
        self._fd = fd
        os.set_blocking(fd, False)
        # The exchange in progress: what is left to send, what has been read.
        self._outgoing = memoryview(b"")
        self._incoming = bytearray()

    @classmethod
    async def open(cls, ctx: Context) -> DirectChannel | None:
        """A direct channel to the worker *ctx*, or ``None`` where the kernel
        refuses it (then calls go over the link)."""
        fd, pid = await ctx.call(open_in_worker, in_thread=False)
        # The process that answered must be the one whose descriptor is taken: the
        # same pid, or the same process seen from inside its own PID namespace.
        if ctx.pid is None or (pid != ctx.pid and not _same_process(ctx.pid, pid)):
            await ctx.call(close_handed, fd, in_thread=False)
            return None
        try:
            taken = _take_descriptor(ctx.pid, fd)
        except OSError as exc:
            log.debug("%r: no direct calls (%s); calls go over the link", ctx, exc)
            await ctx.call(close_handed, fd, in_thread=False)
            return None
        channel = cls(ctx, taken)
        try:
            await ctx.call(close_handed, fd, in_thread=False)
        except BaseException:
            channel.close()
            raise
        return channel

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def call(self, fn: Any, args: tuple[Any, ...]) -> Any:
        """Run ``fn(*args)`` in the worker and return its result, or raise its
        exception.

        **Cancellation:** before anything is sent, at once; after, the call is
        waited for (a sync function cannot be interrupted), then
        :class:`trio.Cancelled` is raised, as :meth:`Context.call` does for a sync
        function.
        """
        try:
            blob = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise WireError(f"cannot pickle the call: {exc}") from exc
        await trio.lowlevel.checkpoint_if_cancelled()
        self._outgoing = memoryview(_LENGTH.pack(len(blob)) + blob)
        self._incoming = bytearray()
        try:
            reply = await self._progress()
        except trio.Cancelled:
            # Shielded only now, when it is needed: entering a shielded scope on
            # every call would cost more than the rest of the caller's side.
            with trio.CancelScope(shield=True):
                if await self._progress() is None:
                    self.close()
            raise
        if reply is None:
            self.close()
            raise await self._died()
        ok, value = pickle.loads(reply)
        if ok:
            return value
        raise rebuild(value, trusted=True)

    async def _progress(self) -> bytes | None:
        """Carry the exchange on from where it is (it may have been interrupted):
        send the rest of the call, then read the reply; ``None`` if the worker
        went. What each system call did is recorded before the next wait."""
        fd = self._fd
        while self._outgoing:
            try:
                self._outgoing = self._outgoing[os.write(fd, self._outgoing) :]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(fd)
            except (BrokenPipeError, ConnectionResetError):
                return None
        incoming = self._incoming
        while True:
            needed = _LENGTH.size
            if len(incoming) >= needed:
                needed += _LENGTH.unpack_from(incoming)[0]
                if len(incoming) >= needed:
                    return bytes(incoming[_LENGTH.size : needed])
            try:
                chunk = os.read(fd, max(65536, needed - len(incoming)))
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                continue
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            incoming += chunk

    async def _died(self) -> ContextDied:
        ctx = self._ctx
        with trio.move_on_after(5):  # it has gone: the supervisor reaps it at once
            await ctx.wait_exited()
        return ContextDied(
            ctx.name,
            ctx.id,
            ctx.returncode,
            ctx.stderr_tail,
            "it died during a call",
        )


def _same_process(outer_pid: int, inner_pid: int) -> bool:
    """Whether *outer_pid* (as this process sees it) is *inner_pid* in its own
    PID namespace (the last ``NSpid`` of its status)."""
    try:
        with open(f"/proc/{outer_pid}/status") as status:
            for line in status:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1]) == inner_pid
    except (OSError, ValueError, IndexError):
        return False
    return False
