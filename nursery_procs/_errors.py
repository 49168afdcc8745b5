"""The exceptions nursery_procs raises, and the one place where a byte stream's
failures become them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import trio

#: What a Trio byte stream raises when it cannot be used any more: the peer went
#: away, the stream was closed under us, or the kernel refused.
STREAM_ERRORS: tuple[type[Exception], ...] = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    OSError,
)


@contextmanager
def map_stream_errors(into: Callable[[Exception], BaseException] | None) -> Iterator[None]:
    """Raise ``into(error)`` for a failed byte stream, or swallow it if *into* is
    ``None`` (at scope boundaries, where the other side may have gone).

    Every layer that talks to a socket uses this instead of its own tuple of
    exception types, so what counts as "the stream is gone" is decided once.
    """
    try:
        yield
    except STREAM_ERRORS as exc:
        if into is not None:
            raise into(exc) from None


class NurseryProcsError(Exception):
    """Base class of every error this library raises."""


class WireError(NurseryProcsError):
    """A message could not be encoded or decoded (bad envelope, bad pickle)."""


class LinkClosed(NurseryProcsError):
    """The link is closed: by us, by the peer (with a close code), or by a lost stream.

    Attributes:
        code: the WebSocket close code (1000 normal, 1002 protocol error, 1006
            connection lost without a close frame, 1009 message too big, ...).
        reason: the close reason text, possibly empty.
    """

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"link closed with code {code}" + (f": {reason}" if reason else ""))
        self.code = code
        self.reason = reason


class LinkClosedHere(LinkClosed, trio.ClosedResourceError):
    """The link was closed by this side, and then used: as with any Trio resource,
    that raises :class:`trio.ClosedResourceError` (this is one, and a
    :class:`LinkClosed` too)."""


class HandshakeError(NurseryProcsError):
    """The WebSocket opening handshake failed."""


class ContextError(NurseryProcsError):
    """Base class of errors about one context (a process in the tree)."""


class ContextDied(ContextError):
    """The context exited (or its link was lost) before it could answer.

    Attributes:
        name: the context's name.
        context_id: the context's id.
        returncode: the process's exit status, if it was reaped here (a negative
            value is a signal number), else ``None``.
        stderr_tail: the last lines the process wrote to stderr.
    """

    def __init__(
        self,
        name: str,
        context_id: int,
        returncode: int | None = None,
        stderr_tail: tuple[str, ...] = (),
        detail: str = "",
    ) -> None:
        text = f"context {name!r} (id {context_id}) died"
        if returncode is not None:
            text += f" with return code {returncode}"
        if detail:
            text += f": {detail}"
        if stderr_tail:
            text += "\n--- tail of its stderr ---\n" + "\n".join(stderr_tail)
        super().__init__(text)
        self.name = name
        self.context_id = context_id
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class ChildStartError(ContextDied):
    """A child failed while starting: it exited, broke its handshake or was not ready in time."""


class ForkServerError(NurseryProcsError):
    """A fork server failed: it could not start (a ``preload`` module failed to
    import, or it was not ready in time), could not fork, or died while a child
    was being forked. :meth:`Supervisor.start_child` raises it as the cause of a
    :class:`ChildStartError`; :func:`open_supervisor` raises it as itself.

    Attributes:
        detail: what went wrong.
        returncode: the fork server's exit status, if it has exited.
        stderr_tail: the last lines the fork server wrote to stderr.
    """

    def __init__(
        self, detail: str, returncode: int | None = None, stderr_tail: tuple[str, ...] = ()
    ) -> None:
        text = detail
        if stderr_tail:
            text += "\n--- tail of its stderr ---\n" + "\n".join(stderr_tail)
        super().__init__(text)
        self.detail = detail
        self.returncode = returncode
        self.stderr_tail = stderr_tail

    def __reduce__(self) -> tuple[type[ForkServerError], tuple[str, int | None, tuple[str, ...]]]:
        return (type(self), (self.detail, self.returncode, self.stderr_tail))


class MessageUndeliverable(ContextError):
    """A *dead* reply came back: the message could not be delivered.

    Attributes:
        reason: why, as told by the router that refused it (for example
            ``"no route to context 17 (from 3)"``).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RemoteError(NurseryProcsError):
    """A function or request handler raised in another context.

    Attributes:
        remote_type: the qualified name of the remote exception's type.
        remote_message: ``str()`` of the remote exception.
        remote_traceback: the formatted remote traceback.
    """

    def __init__(self, remote_type: str, remote_message: str, remote_traceback: str) -> None:
        super().__init__(f"{remote_type}: {remote_message}")
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str, str, str]]:
        return (type(self), (self.remote_type, self.remote_message, self.remote_traceback))

    def __str__(self) -> str:
        return (
            f"{self.remote_type}: {self.remote_message}\n"
            f"--- remote traceback ---\n{self.remote_traceback.rstrip()}"
        )


class MainModuleError(NurseryProcsError, RuntimeError):
    """A child could not import the parent's main module, most often because the
    script starts its work on import (no ``if __name__ == "__main__":`` guard)."""


class SupervisorError(NurseryProcsError):
    """The supervisor gave up, for example after too many restarts."""


class PoolClosed(NurseryProcsError, trio.ClosedResourceError):
    """The pool is closed (or closed while the caller was waiting for a child).

    It is a :exc:`trio.ClosedResourceError` too, as Trio raises for any resource
    used after it was closed.
    """


class PoolEmpty(NurseryProcsError):
    """:meth:`Pool.take_nowait` found no idle child ready."""


class ControlSocketBusy(NurseryProcsError):
    """Another server accepts connections on the control socket's path.

    The existing socket is left alone: a control socket is never taken over from
    a live server (or from one whose liveness cannot be checked, such as a socket
    of another user).

    Attributes:
        path: the socket's path.
    """

    def __init__(self, path: str, detail: str = "another server accepts connections on it") -> None:
        super().__init__(f"control socket {path!r} is in use: {detail}")
        self.path = path


class SSHError(NurseryProcsError):
    """The connection to another host could not be made: ``ssh`` failed to
    connect or to authenticate. :meth:`Supervisor.start_child` raises it as the
    cause of a :class:`ChildStartError`.

    Attributes:
        destination: the host, as given to :func:`nursery_procs.ssh`.
        detail: what went wrong.
        returncode: ``ssh``'s exit status, if it has exited.
        stderr_tail: the last lines ``ssh`` wrote to stderr.
    """

    def __init__(
        self,
        destination: str,
        detail: str,
        returncode: int | None = None,
        stderr_tail: tuple[str, ...] = (),
    ) -> None:
        text = f"ssh to {destination}: {detail}"
        if stderr_tail:
            text += "\n--- tail of its stderr ---\n" + "\n".join(stderr_tail)
        super().__init__(text)
        self.destination = destination
        self.detail = detail
        self.returncode = returncode
        self.stderr_tail = stderr_tail

    def __reduce__(
        self,
    ) -> tuple[type[SSHError], tuple[str, str, int | None, tuple[str, ...]]]:
        return (type(self), (self.destination, self.detail, self.returncode, self.stderr_tail))
