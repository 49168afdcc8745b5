"""Starting child processes, escalating their shutdown, and reaping them."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final, Literal, Protocol

import attrs
import trio

from . import _importer
from ._isolation import Isolation
from ._proctree import kill_group, kill_tree
from ._ssh import SSH

#: Environment variable: a new child sleeps this many seconds before its target,
#: after logging its pid, so that a debugger can attach.
DEBUG_SLEEP_ENV = "NURSERY_PROCS_SLEEP_FOR_DEBUGGER"
#: Environment variable: the start method of supervisors that are not given one,
#: ``forkserver`` (the default) or ``exec``.
START_METHOD_ENV: Final = "NURSERY_PROCS_START_METHOD"

StartMethod = Literal["exec", "forkserver"]
#: The start methods, and the one used when neither the code nor
#: :data:`START_METHOD_ENV` names one (``docs/design.rst`` says why).
START_METHODS: Final[tuple[StartMethod, ...]] = ("exec", "forkserver")
DEFAULT_START_METHOD: Final[StartMethod] = "forkserver"

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
# Socket buffers sized so that a 1 MiB message needs few wake-ups each way.
_SOCKET_BUFFER = 1 << 20


def _nonnegative(name: str) -> Callable[[object, attrs.Attribute[float], float], None]:
    def check(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
        if value < 0:
            raise ValueError(f"{name} must be >= 0, not {value!r}")

    return check


@attrs.frozen
class Policy:
    """Timing and limits for the children of a supervisor (all in seconds of
    ``trio.current_time()``, so they run on a fake clock in tests)."""

    #: After SHUTDOWN, how long the child has to exit before SIGTERM.
    grace_period: float = attrs.field(default=5.0, validator=_nonnegative("grace_period"))
    #: After SIGTERM, how long before SIGKILL.
    kill_after: float = attrs.field(default=5.0, validator=_nonnegative("kill_after"))
    #: How long a new child may take to say it is ready (a debugger sleep is added).
    ready_timeout: float = attrs.field(default=60.0, validator=_nonnegative("ready_timeout"))
    #: The largest message a link accepts, either way.
    max_message_size: int = attrs.field(default=64 * 1024 * 1024)
    #: How long to wait for a reaped child's pipes to reach end of file (a process
    #: it started may still hold them).
    drain_timeout: float = attrs.field(default=1.0, validator=_nonnegative("drain_timeout"))
    #: After a call or request is cancelled, how long the child has to acknowledge
    #: that it cancelled the work; then it counts as hung and is shut down.
    cancel_timeout: float = attrs.field(default=2.0, validator=_nonnegative("cancel_timeout"))
    #: Let the kernel merge identical memory pages of the fork server and its
    #: children (KSM; see :ref:`merging-pages`): a forked child's private copies of
    #: pages it did not really change are shared again. Takes effect only while
    #: root runs ``ksmd``; a fork server started without KSM logs a warning.
    #: Exec'd children have no pages in common to merge and are not marked.
    merge_pages: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    @max_message_size.validator
    def _check_size(self, attribute: attrs.Attribute[int], value: int) -> None:
        if value < 1024:
            raise ValueError(f"max_message_size must be >= 1024, not {value!r}")

    @property
    def close_deadline(self) -> float:
        """How long a shielded close may take in all: grace, SIGTERM wait, and a margin."""
        return self.grace_period + self.kill_after + 2.0


def _dotted(name: str) -> bool:
    return all(part.isidentifier() for part in name.split("."))


def _preload_entry(entry: object) -> str:
    """A valid preload entry: ``"package.module"``, or ``"package.module:function"``."""
    if isinstance(entry, str):
        module, colon, function = entry.partition(":")
        if _dotted(module) and (not colon or _dotted(function)):
            return entry
    raise ValueError(
        "preload entries are module names like 'package.module', or "
        f"'package.module:function' for a function to run once imported, not {entry!r}"
    )


def preload_module(entry: str) -> str:
    """The module of a preload entry (``"package.module:function"``: ``"package.module"``)."""
    return entry.partition(":")[0]


@attrs.frozen
class StartOptions:
    """How a child's process is started: the start method and what a fork server
    imports before it forks (one validated value, shared by the supervisor and
    the pool)."""

    #: ``"exec"``: a fresh interpreter per child; ``"forkserver"``: a fork of a
    #: server process that has already imported the runtime and ``preload``.
    method: StartMethod = attrs.field(default=DEFAULT_START_METHOD)
    #: Modules a fork server imports once before it forks children (module
    #: names; ``"__main__"`` is the parent's main script or module), and
    #: functions it then runs once (``"package.module:function"``).
    preload: tuple[str, ...] = ()
    #: How the child is confined.
    isolation: Isolation = attrs.field(factory=Isolation)
    #: The host the child runs on: ``None`` for this one, else how to reach
    #: another (the child is then a fresh interpreter there, and ``preload``
    #: lists modules sent to it ahead of its target).
    via: SSH | None = attrs.field(default=None)

    @method.validator
    def _check_method(self, attribute: attrs.Attribute[str], value: str) -> None:
        if value not in START_METHODS:
            raise ValueError(
                f"start_method must be one of {', '.join(map(repr, START_METHODS))}, not {value!r}"
            )

    @via.validator
    def _check_via(self, attribute: attrs.Attribute[SSH | None], value: object) -> None:
        if value is not None and not isinstance(value, SSH):
            raise TypeError(f"via must be nursery_procs.ssh(...) or None, not {value!r}")
        if value is not None and self.isolation.confines:
            raise ValueError("isolation is not available for a child on another host")

    @classmethod
    def build(
        cls,
        method: str | None,
        preload: Iterable[str] | None,
        isolation: Isolation | None = None,
        via: SSH | None = None,
    ) -> StartOptions:
        """Validate a start method, preload list, isolation and host as given to
        the public API (``None`` method: :data:`START_METHOD_ENV`, else the
        default)."""
        if method is None:
            method = os.environ.get(START_METHOD_ENV) or DEFAULT_START_METHOD
        return cls(method, cls.modules(preload), cls.checked(isolation), via)  # type: ignore[arg-type]

    @staticmethod
    def checked(isolation: Isolation | None) -> Isolation:
        if isolation is None:
            return Isolation()
        if not isinstance(isolation, Isolation):
            raise TypeError(f"isolation must be an Isolation, not {isolation!r}")
        return isolation

    @staticmethod
    def modules(preload: Iterable[str] | None) -> tuple[str, ...]:
        """Validate a preload list (duplicates dropped, order kept)."""
        if preload is None:
            return ()
        if isinstance(preload, str | bytes):
            raise TypeError(f"preload is a list of module names, not the string {preload!r}")
        return tuple(dict.fromkeys(_preload_entry(entry) for entry in preload))

    def override(
        self,
        method: str | None,
        preload: Iterable[str] | None,
        isolation: Isolation | None = None,
        via: SSH | None = None,
    ) -> StartOptions:
        """These options with a child's own method, preload, isolation and host,
        where given."""
        if method is None and preload is None and isolation is None and via is None:
            return self
        return StartOptions(
            method or self.method,  # type: ignore[arg-type]
            self.preload if preload is None else self.modules(preload),
            self.isolation if isolation is None else self.checked(isolation),
            self.via if via is None else via,
        )


class ProcessLike(Protocol):
    """What escalation needs of a process; :class:`trio.Process` fits, and so do fakes."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


async def escalate(process: ProcessLike, *, grace_period: float, kill_after: float) -> int:
    """Wait for *process* to exit: ``grace_period``, then SIGTERM, ``kill_after``, then
    SIGKILL. Returns its exit status once reaped.

    The caller has already asked the process to stop (SHUTDOWN or a closed link).

    **Cancellation:** if cancelled, the process may be left running; callers shield
    it (see :meth:`Context.aclose`).
    """
    with trio.move_on_after(grace_period):
        return await process.wait()
    if process.returncode is None:
        process.terminate()
    with trio.move_on_after(kill_after):
        return await process.wait()
    if process.returncode is None:
        process.kill()
    return await process.wait()


async def kill_and_reap(process: ProcessLike) -> int:
    """SIGKILL (if still running) and reap, shielded: the last resort of every exit path."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            try:
                process.kill()
            except ProcessLookupError:  # pragma: no cover - already gone
                pass
        returncode = await process.wait()
    return returncode


class ChildProcess(ProcessLike, Protocol):
    """A started child process: what escalation needs, and its output pipes."""

    def poll_exited(self) -> bool:
        """Whether it has exited, asking the kernel now: true as soon as it is
        dead, before anyone reaped it or reported it. Never blocks."""

    @property
    def stdout(self) -> trio.abc.ReceiveStream | None: ...

    @property
    def stderr(self) -> trio.abc.ReceiveStream | None: ...


def pidfd_readable(pidfd: int) -> bool:
    """Whether the process of *pidfd* has exited (reaped or not), without waiting."""
    readable, _, _ = select.select([pidfd], [], [], 0)
    return bool(readable)


@attrs.define(eq=False)
class ExecProcess:
    """An exec'd child as the supervisor sees it: a :class:`trio.Process`, plus
    what Trio does not do. SIGKILL takes the child's whole process tree, and when
    the child exits, what is left of its process group is killed before the
    child is reaped (until then its pid, which is also its group's id, cannot be
    reused, so the kill reaches no stranger)."""

    _process: trio.Process
    _pidfd: int
    #: The exit status once reaped (negative: the signal that killed it).
    returncode: int | None = None
    _wait_lock: trio.Lock = attrs.field(factory=trio.Lock)

    @classmethod
    def wrap(cls, process: trio.Process) -> ExecProcess:
        # Not reaped yet (only wait() reaps): the pid is still this child's.
        return cls(process, os.pidfd_open(process.pid))

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def stdout(self) -> trio.abc.ReceiveStream | None:
        return self._process.stdout

    @property
    def stderr(self) -> trio.abc.ReceiveStream | None:
        return self._process.stderr

    def terminate(self) -> None:
        if self.returncode is None:
            signal.pidfd_send_signal(self._pidfd, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the child and every process below it (frozen first)."""
        if self.returncode is None:
            kill_tree(self.pid, root_pidfd=self._pidfd)

    def poll_exited(self) -> bool:
        return self.returncode is not None or pidfd_readable(self._pidfd)

    async def wait(self) -> int:
        """Wait until the child exits; kill the rest of its group; reap it.

        **Cancellation:** safe (nothing is reaped until the child has exited).
        """
        async with self._wait_lock:
            if self.returncode is None:
                await trio.lowlevel.wait_readable(self._pidfd)
                kill_group(self.pid)
                self.returncode = await self._process.wait()
                trio.lowlevel.notify_closing(self._pidfd)
                os.close(self._pidfd)
        return self.returncode


@attrs.define(eq=False)
class Spawned:
    """A freshly started child process and the parent's end of its socketpair."""

    process: ChildProcess
    stream: trio.abc.Stream


def link_socketpair() -> tuple[socket.socket, socket.socket]:
    """The parent's and the child's ends of a new link (buffers sized for big messages)."""
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in (parent_sock, child_sock):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
    return parent_sock, child_sock


def socket_stream(sock: socket.socket) -> trio.SocketStream:
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


def child_env(debug_sleep: float | None) -> dict[str, str]:
    env = dict(os.environ)
    # The child must import this very copy of nursery_procs, installed or not.
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = _PACKAGE_PARENT + (os.pathsep + existing if existing else "")
    if debug_sleep is not None:
        env[DEBUG_SLEEP_ENV] = str(debug_sleep)
    return env


def runtime_command(*args: str) -> tuple[list[str], tuple[int, ...]]:
    """How to run ``python -m nursery_procs._child ARGS`` here, and the file
    descriptors the new process must inherit for it.

    In a context whose runtime was shipped to its host (see :doc:`remote`),
    nursery_procs is not on the disk: the new interpreter runs the bootstrap's
    first stage with the flags of this one, and reads the runtime from this
    process's memory file of it.
    """
    shipped = _importer.installed()
    if shipped is None:
        return [sys.executable, "-m", "nursery_procs._child", *args], ()
    flags: list[str] = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    fd = shipped.bundle_file()
    return [sys.executable, *flags, "-c", _importer.STAGE1, str(fd), *args], (fd,)


async def spawn(*, debug_sleep: float | None = None, isolation: Isolation | None = None) -> Spawned:
    """Start ``python -m nursery_procs._child`` with one end of a socketpair.

    The child runs in its own process group, so a terminal's Ctrl-C reaches only
    the master, which then shuts children down in order. It confines itself as
    *isolation* says before it starts its runtime.
    """
    parent_sock, child_sock = link_socketpair()
    try:
        fd = child_sock.fileno()
        args = [str(fd), str(os.getpid())]
        if isolation is not None and isolation.confines:
            args.append(json.dumps(isolation.to_json()))
        argv, inherited = runtime_command(*args)
        process = await trio.lowlevel.open_process(
            argv,
            pass_fds=(fd, *inherited),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            process_group=0,
            env=child_env(debug_sleep),
        )
    except BaseException:
        parent_sock.close()
        raise
    finally:
        child_sock.close()
    return Spawned(ExecProcess.wrap(process), socket_stream(parent_sock))


def describe_exit(returncode: int | None) -> str:
    """Say how a process ended: ``"SIGKILL"`` for -9, ``"exit status 3"`` for 3,
    ``"still running"`` for ``None``."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"
