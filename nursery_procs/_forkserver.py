"""The fork server: children forked in milliseconds from a process that has
already imported the runtime, trio and the user's ``preload`` modules.

Two sides live here, and they share only the protocol:

* **The server** (:func:`serve_forks`) runs in a process the supervisor starts
  once by exec (``python -m nursery_procs._child --fork-server FD MASTER_PID``).
  It imports what it was told to, calls :func:`gc.freeze`, and then, single
  threaded and outside any Trio run, serves requests in a blocking :func:`select.poll`
  loop over its control socket, a pidfd of the master (it exits if the master
  dies) and a pidfd per child (it reaps each one and reports its exit status).
* **The master's side** (:class:`ForkServers`, :class:`ForkServer`,
  :class:`ForkedProcess`) asks for children, watches each one through the pidfd
  the server sends back, and restarts a server that died.

The control socket is an ``AF_UNIX`` ``SOCK_SEQPACKET`` pair: one JSON object
per datagram, descriptors passed with ``SCM_RIGHTS``:

=============  =========================================  ==========================
direction      message                                    descriptors
=============  =========================================  ==========================
master→server  ``{"op": "config", "sys_path", "preload",  none
               "main", "merge_pages"}`` (once, first)
server→master  ``{"op": "ready", "pid", "merge"}`` or     none
               ``{"op": "failed", "error"}``
master→server  ``{"op": "fork", "id", "settings"}``       the child's link end, its
                                                          stdout and stderr pipe ends
server→master  ``{"op": "forked", "id", "pid"}``          a pidfd of the child
server→master  ``{"op": "fork-failed", "id", "error"}``   none
server→master  ``{"op": "exited", "pid", "returncode"}``  none
=============  =========================================  ==========================

A pidfd made by the server right after the fork, before it could reap the
child, refers to that very process for good: signals sent through it can never
reach a process that reused the pid.
"""

from __future__ import annotations

import array
import collections
import gc
import importlib
import inspect
import itertools
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any, Final, NoReturn, Protocol

import attrs
import trio

from . import _wire
from ._errors import ForkServerError
from ._isolation import Isolation
from ._ksm import KSM_SYSFS, ksm_running, mark_mergeable
from ._link import Link, accept_link, connect_link
from ._process import (
    Policy,
    Spawned,
    child_env,
    escalate,
    link_socketpair,
    pidfd_readable,
    runtime_command,
    socket_stream,
)
from ._proctree import become_subreaper, direct_children, kill_group, kill_tree
from ._spec import load_main_module, main_module_spec
from ._stdio import new_tail, pump_lines

log = logging.getLogger("nursery_procs.forkserver")

#: Largest control message (the config carries the master's ``sys.path``).
_MAX_MESSAGE: Final = 1 << 20
#: Descriptors a fork request carries: the link, stdout, stderr.
_REQUEST_FDS: Final = 3
_MAX_FDS: Final = 8
#: How long a server that lost its master (or was told to close) lets its
#: children finish on their own before it kills them; they see their link close
#: and run their ``finally`` blocks in that time.
_WIND_DOWN_GRACE: Final = 2.0
#: Modules the runtime imports lazily, imported by the server so that children
#: find them loaded (optional dependencies: skipped if absent).
_WARM_MODULES: Final = ("setproctitle", "websockets.speedups")


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def _fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    return list(fds)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ---------------------------------------------------------------------------
# The server (in the fork server process; plain blocking code, no Trio run)
# ---------------------------------------------------------------------------


@attrs.define
class _SignalState:
    """The signal handlers and mask this process had before anything was
    preloaded: what an exec'd child has, and what each forked child gets back."""

    handlers: dict[int, Any]
    mask: set[int | signal.Signals]

    @classmethod
    def capture(cls) -> _SignalState:
        handlers: dict[int, Any] = {}
        for signum in signal.valid_signals():
            if signum in (signal.SIGKILL, signal.SIGSTOP):
                continue
            handler = signal.getsignal(signum)
            if handler is not None:  # None: installed outside Python, left alone
                handlers[signum] = handler
        return cls(handlers, signal.pthread_sigmask(signal.SIG_BLOCK, []))

    def restore(self) -> None:
        signal.set_wakeup_fd(-1)
        for signum, handler in self.handlers.items():
            if signal.getsignal(signum) is not handler:
                signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)


def _reset_logging() -> None:
    """Drop every logging handler the server or a preloaded module installed:
    they belong to the server's streams. (The logging module's locks are
    reinitialised by its own fork hooks; none can be held, as the server has no
    other thread.) The runtime installs the child's own handler."""
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers.extend(
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    )
    for logger in loggers:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)


def _close_fds_except(keep: set[int]) -> None:
    """Close every descriptor of this process but *keep*."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:  # the listing's own descriptor, already closed
                pass


def _check_single_threaded() -> None:
    if len(os.listdir("/proc/self/task")) != 1 or threading.active_count() != 1:
        names = ", ".join(t.name for t in threading.enumerate()) or "outside Python"
        raise RuntimeError(
            f"preloading started a thread ({names}): a fork server must stay "
            "single-threaded to fork safely; preload modules that start no thread "
            "on import"
        )


async def exercise_link() -> None:
    """Open a link within this process, send one message each way, close it."""
    ours, theirs = trio.socket.socketpair()
    accepted: list[Link] = []

    async def accept() -> None:
        link, _resource = await accept_link(trio.SocketStream(ours))
        accepted.append(link)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        child = await connect_link(trio.SocketStream(theirs))
    (parent,) = accepted
    await child.send(_wire.pack(_wire.make(0, 1, _wire.Handle.READY, os.getpid())))
    await parent.send(_wire.pack(_wire.make(1, 0, _wire.Handle.RESULT, (True, None))))
    _wire.decode(_wire.unpack(await parent.receive()))
    _wire.decode(_wire.unpack(await child.receive()))
    await child.aclose()
    await parent.aclose()


class ChildEntry(Protocol):
    """How a new child runs the child runtime (given by the entry point, which
    may import the runtime; this module may not)."""

    def run(self, link_fd: int, master_pidfd: int, isolation: dict[str, Any] | None) -> NoReturn:
        """Run a child on its link at once (confined as *isolation* says)."""

    def run_spare(self, channel_fd: int, master_pidfd: int) -> NoReturn:
        """Run a spare: wait for its assignment on *channel_fd*, then run."""

    def rehearse(self) -> None:
        """Run what every child runs, in this process, before anything is forked;
        no loop, thread or descriptor may outlive it.

        Each child would otherwise pay for first-time work (lazy set-up, Python's
        specialisation of hot code) in pages it must copy from this process.
        """


@attrs.define(eq=False)
class _Spare:
    """A child forked ahead of its request, waiting for its assignment."""

    pid: int
    pidfd: int
    channel: socket.socket


class _Server:
    """The fork server's state and loop."""

    def __init__(self, control_fd: int, master_pid: int, entry: ChildEntry) -> None:
        self.signals = _SignalState.capture()
        # The orphans of a child that dies come here, to be killed (see reap).
        become_subreaper()
        self.sock = socket.socket(fileno=control_fd)
        self.sock.setblocking(True)
        self.master_pidfd = os.pidfd_open(master_pid)
        if os.getppid() != master_pid:
            raise SystemExit("the master died before its fork server started")
        self.entry = entry
        #: Children the master knows of, not yet reaped: pidfd -> pid.
        self.children: dict[int, int] = {}
        #: Spares not given to the master (the current one, or one that died
        #: before its request), not yet reaped: pidfd -> pid.
        self.unassigned: dict[int, int] = {}
        self.spare: _Spare | None = None
        self.poller = select.poll()
        self.master_alive = True

    # -- messages --------------------------------------------------------

    def receive(self) -> tuple[dict[str, Any] | None, list[int]]:
        """The next request and its descriptors; ``None`` at end of file."""
        data, ancdata, _flags, _address = self.sock.recvmsg(
            _MAX_MESSAGE, socket.CMSG_SPACE(_MAX_FDS * 4)
        )
        fds = _fds_of(ancdata)
        if not data:
            _close_all(fds)
            return None, []
        return json.loads(data), fds

    def send(self, message: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
        if not self.master_alive:
            return
        try:
            _send_message(self.sock, message, fds)
        except OSError:
            self.master_alive = False  # nobody reads: wind down at the next turn

    # -- start -----------------------------------------------------------

    def boot(self) -> bool:
        """Read the config, import everything, freeze; say ready or why not."""
        config, fds = self.receive()
        _close_all(fds)
        if config is None or config.get("op") != "config":
            return False
        sys.path[:] = list(dict.fromkeys([*config["sys_path"], *sys.path]))
        try:
            _preload(config["preload"], config.get("main"))
            self.entry.rehearse()
            _check_single_threaded()
        except BaseException as exc:
            traceback.print_exc()
            self.send({"op": "failed", "error": f"{type(exc).__name__}: {exc}"})
            return False
        try:
            import setproctitle  # optional: names the server in ps and top
        except ImportError:
            pass
        else:
            setproctitle.setproctitle("nursery_procs: fork server")
        # Objects that exist now are never collected: their pages stay shared
        # with every child instead of being touched by a child's collections.
        gc.collect()
        gc.freeze()
        self.send({"op": "ready", "pid": os.getpid(), "merge": _merge(config)})
        return True

    # -- the loop ----------------------------------------------------------

    def serve(self) -> int:
        if not self.boot():
            return 1
        control = self.sock.fileno()
        self.poller.register(control, select.POLLIN)
        self.poller.register(self.master_pidfd, select.POLLIN)
        self.fork_spare()
        while self.master_alive:
            for fd, _events in self.poller.poll():
                if fd == control:
                    if not self.serve_request():
                        return self.wind_down()
                elif fd == self.master_pidfd:
                    self.master_alive = False
                else:
                    self.reap(fd)
            if self.spare is None and self.master_alive:
                # Fork the next child now, while nobody waits for it.
                self.fork_spare()
        return self.wind_down()

    def serve_request(self) -> bool:
        """Give a child its link and pipes; ``False`` once the master closed the
        control socket."""
        request, fds = self.receive()
        if request is None:
            return False
        request_id = request.get("id")
        try:
            if request.get("op") != "fork" or len(fds) != _REQUEST_FDS:
                raise ValueError(f"bad request {request!r} with {len(fds)} descriptors")
            settings = request.get("settings", {})
            # A spare has a thread already: a namespace needs a new process.
            served = None if settings.get("isolation") else self.assign_spare(fds, settings)
            pid, pidfd = served or self.fork(fds, settings)
        except Exception as exc:
            self.send({"op": "fork-failed", "id": request_id, "error": f"{exc}"})
            return True
        finally:
            # The child has its copies: keeping these would hold its link and
            # pipes open in every later child, and here.
            _close_all(fds)
        self.unassigned.pop(pidfd, None)
        self.children[pidfd] = pid
        self.send({"op": "forked", "id": request_id, "pid": pid}, (pidfd,))
        return True

    def assign_spare(self, fds: list[int], settings: dict[str, Any]) -> tuple[int, int] | None:
        """Hand the request to the spare child, if there is one (and it is alive)."""
        spare, self.spare = self.spare, None
        if spare is None:
            return None
        try:
            _send_message(spare.channel, settings, tuple(fds))
        except OSError:  # it died: it is reaped when its pidfd says so
            return None
        finally:
            spare.channel.close()
        return spare.pid, spare.pidfd

    def fork_child(self, keep: tuple[int, ...]) -> int:
        """Fork; in the new child, make the process clean and keep only *keep*
        (and stdio); returns the child's pid in the server, 0 in the child."""
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # or the child would write the server's buffered output again
        pid = os.fork()
        if pid == 0:
            try:
                os.setpgid(0, 0)
                self.signals.restore()
                # Forget the server's state: its socket objects must not close
                # descriptor numbers that the child will reuse.
                self.sock.detach()
                if self.spare is not None:
                    self.spare.channel.detach()
                self.spare = None
                self.children.clear()
                _close_fds_except({0, 1, 2, self.master_pidfd, *keep})
                _reset_logging()
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            return 0
        try:
            # The child does the same; whichever runs first, the group exists
            # before anyone signals it.
            os.setpgid(pid, pid)
        except OSError:
            pass
        return pid

    def pidfd_of(self, pid: int) -> int:
        try:
            return os.pidfd_open(pid)
        except OSError:
            os.kill(pid, signal.SIGKILL)  # not reaped yet: the pid is still this child's
            os.waitpid(pid, 0)
            raise

    def fork(self, fds: list[int], settings: dict[str, Any]) -> tuple[int, int]:
        """Fork a child for this request now (no spare was ready)."""
        link, stdout, stderr = fds
        pid = self.fork_child((link, stdout, stderr))
        if pid == 0:
            try:
                _adopt_stdio(stdout, stderr)
                _apply_settings(settings)
                self.entry.run(link, self.master_pidfd, settings.get("isolation"))
            finally:
                os._exit(1)
        pidfd = self.pidfd_of(pid)
        self.poller.register(pidfd, select.POLLIN)
        return pid, pidfd

    def fork_spare(self) -> None:
        """Fork the child that will serve the next request."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = self.fork_child((theirs.fileno(),))
            if pid == 0:
                try:
                    ours.detach()
                    self.entry.run_spare(theirs.detach(), self.master_pidfd)
                finally:
                    os._exit(1)
            pidfd = self.pidfd_of(pid)
        except OSError:
            ours.close()
            traceback.print_exc()
            return
        finally:
            theirs.close()
        self.spare = _Spare(pid, pidfd, ours)
        self.unassigned[pidfd] = pid
        self.poller.register(pidfd, select.POLLIN)

    def reap(self, pidfd: int) -> None:
        """Reap the exited child of *pidfd*, and kill what it left behind."""
        self.poller.unregister(pidfd)
        os.close(pidfd)
        pid = self.children.pop(pidfd, None)
        known_to_master = pid is not None
        if pid is None:  # a spare that died before it had a request
            pid = self.unassigned.pop(pidfd)
            if self.spare is not None and self.spare.pidfd == pidfd:
                self.spare.channel.close()
                self.spare = None
        # Not reaped yet, so its pid (its group's id) is not reused: the rest of
        # its group dies first. Processes that left the group (setsid daemons)
        # were adopted by it, a subreaper, and are now adopted by this server.
        kill_group(pid)
        _, status = os.waitpid(pid, 0)
        self.end_adopted()
        if known_to_master:
            returncode = os.waitstatus_to_exitcode(status)
            self.send({"op": "exited", "pid": pid, "returncode": returncode})

    def end_adopted(self) -> None:
        """Kill and reap every child of this server that it did not fork: the
        orphans of a child that died (this server is a subreaper)."""
        known = {*self.children.values(), *self.unassigned.values()}
        for pid in direct_children(os.getpid()):
            if pid not in known:
                kill_tree(pid)
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass

    def wind_down(self) -> int:
        """Let the children end on their own for a moment, then kill and reap the rest."""
        for fd in (self.sock.fileno(), self.master_pidfd):
            self.poller.unregister(fd)
        for pidfd, pid in list(self.unassigned.items()):
            kill_tree(pid, root_pidfd=pidfd)
            self.reap(pidfd)
        deadline = time.monotonic() + _WIND_DOWN_GRACE
        while self.children:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for fd, _events in self.poller.poll(remaining * 1000):
                self.reap(fd)
        for pidfd, pid in list(self.children.items()):
            kill_tree(pid, root_pidfd=pidfd)
            self.reap(pidfd)
        return 0


def _merge(config: dict[str, Any]) -> dict[str, Any] | None:
    """Mark the server's pages mergeable if the config asks (every child inherits
    the marks); what happened, for the master to report."""
    if not config.get("merge_pages"):
        return None
    try:
        return {"marked": mark_mergeable()}
    except OSError as exc:
        return {"error": str(exc)}


def _adopt_stdio(stdout: int, stderr: int) -> None:
    """Make *stdout* and *stderr* (this child's own pipes) fds 1 and 2."""
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    _close_all([fd for fd in (stdout, stderr) if fd > 2])


def _apply_settings(settings: dict[str, Any]) -> None:
    """Make this child's environment and working directory the master's of now
    (the server has those of when it started)."""
    for name, value in settings.get("env", {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if "cwd" in settings:
        os.chdir(settings["cwd"])


def _send_message(sock: socket.socket, message: dict[str, Any], fds: tuple[int, ...]) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([_encode(message)], ancillary, socket.MSG_NOSIGNAL)


def _preload(entries: list[str], main: list[str] | None) -> None:
    """Import each module of *entries*, in order, and run each ``module:function``
    entry's function once its module is imported."""
    for name in _WARM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    for entry in entries:
        name, _, function = entry.partition(":")
        if name == "__main__":
            if main is None:
                continue  # no script or -m module to load: nothing to preload
            load_main_module((main[0], main[1]))
            module = sys.modules["__mp_main__"]
        else:
            module = importlib.import_module(name)
        if function:
            _run_preload_function(entry, module, function)


def _run_preload_function(entry: str, module: object, path: str) -> None:
    found: Any = module
    for attribute in path.split("."):
        found = getattr(found, attribute)
    if not callable(found):
        raise TypeError(f"preload {entry!r} is not callable")
    result = found()
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()  # never awaited: no warning about it
        raise TypeError(
            f"preload {entry!r} is async: a preload function is called in the fork "
            "server, outside any event loop; make it a sync function (it may call "
            "trio.run itself)"
        )


def serve_forks(argv: list[str], entry: ChildEntry) -> NoReturn:
    """Run a fork server (``argv``: control socket fd, master pid); never returns."""
    code = 1
    try:
        code = _Server(int(argv[0]), int(argv[1]), entry).serve()
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    os._exit(code)


async def receive_assignment(channel_fd: int) -> int | None:
    """In a spare child: wait for the request it is to serve; make its pipes
    stdout and stderr, and return its link's fd (``None``: the server closed).

    **Cancellation:** safe; the channel is closed.
    """
    with trio.socket.from_stdlib_socket(socket.socket(fileno=channel_fd)) as channel:
        data, ancdata, _flags, _address = await channel.recvmsg(
            _MAX_MESSAGE, socket.CMSG_SPACE(_MAX_FDS * 4)
        )
    fds = _fds_of(ancdata)
    if not data or len(fds) != _REQUEST_FDS:
        _close_all(fds)
        return None
    link, stdout, stderr = fds
    _adopt_stdio(stdout, stderr)
    _apply_settings(json.loads(data))
    return link


# ---------------------------------------------------------------------------
# The master's side
# ---------------------------------------------------------------------------


@attrs.define(eq=False)
class ForkedProcess:
    """A child forked by a fork server, as the master sees it (a
    :class:`~nursery_procs._process.ProcessLike`).

    Signals go through the pidfd the server sent; the exit status is the one the
    server reports when it reaps the child (it is the child's parent).
    """

    pid: int
    _pidfd: int
    stdout: trio.abc.ReceiveStream | None = None
    stderr: trio.abc.ReceiveStream | None = None
    #: The exit status, once the fork server reaped the child (negative: a signal).
    returncode: int | None = None
    _exited: trio.Event = attrs.field(factory=trio.Event)

    def send_signal(self, signum: int) -> None:
        if self.returncode is not None:
            return
        try:
            signal.pidfd_send_signal(self._pidfd, signum)
        except ProcessLookupError:
            pass  # reaped already: its exit report is on its way

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the child and every process below it (frozen first)."""
        if self.returncode is None:
            kill_tree(self.pid, root_pidfd=self._pidfd)

    def poll_exited(self) -> bool:
        # Reaped by the fork server or not, its pidfd says so at once.
        return self.returncode is not None or pidfd_readable(self._pidfd)

    async def wait(self) -> int:
        """Wait until the fork server has reaped the child; its exit status.

        **Cancellation:** safe.
        """
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    async def wait_gone(self) -> None:
        """Wait until the process has exited (reaped or not)."""
        if self.returncode is None:
            await trio.lowlevel.wait_readable(self._pidfd)

    def note_exit(self, returncode: int) -> None:
        if self.returncode is not None:
            return
        self.returncode = returncode
        trio.lowlevel.notify_closing(self._pidfd)
        os.close(self._pidfd)
        self._exited.set()


@attrs.define(eq=False)
class _Request:
    id: int
    done: trio.Event = attrs.field(factory=trio.Event)
    process: ForkedProcess | None = None
    error: str | None = None
    #: Its requester was cancelled: a child forked for it is killed.
    abandoned: bool = False


@attrs.define(eq=False)
class ForkServer:
    """The master's side of one fork server process."""

    preload: tuple[str, ...]
    process: trio.Process
    _sock: trio.socket.SocketType
    _policy: Policy
    _nursery: trio.Nursery
    #: The environment and working directory it was started with.
    env: dict[str, str]
    cwd: str
    stderr_tail: collections.deque[str] = attrs.field(factory=new_tail)
    #: Why it can fork no more (``None`` while it can).
    dead: str | None = None
    _closing: bool = False
    _pending: dict[int, _Request] = attrs.field(factory=dict)
    _children: dict[int, ForkedProcess] = attrs.field(factory=dict)
    _ids: Iterator[int] = attrs.field(factory=itertools.count)
    _send_lock: trio.Lock = attrs.field(factory=trio.Lock)
    _stopped: trio.Event = attrs.field(factory=trio.Event)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def children(self) -> int:
        """How many of its children have not been reaped yet."""
        return len(self._children)

    def settings_for(self, env: dict[str, str]) -> dict[str, Any]:
        """What a new child must change to have *env* and this process's working
        directory, as an exec'd child would."""
        settings: dict[str, Any] = {}
        changed: dict[str, str | None] = {
            name: value for name, value in env.items() if self.env.get(name) != value
        }
        changed.update((name, None) for name in self.env.keys() - env.keys())
        if changed:
            settings["env"] = changed
        cwd = os.getcwd()
        if cwd != self.cwd:
            settings["cwd"] = cwd
        return settings

    async def fork(self, fds: list[int], settings: dict[str, Any]) -> ForkedProcess:
        """Ask for a child that gets *fds* (link, stdout, stderr); the caller keeps
        and closes its own copies.

        Raises:
            ForkServerError: the server could not fork, or died first.

        **Cancellation:** a child forked for a cancelled request is killed.
        """
        request = _Request(next(self._ids))
        self._check_alive()
        self._pending[request.id] = request
        sent = False
        try:
            async with self._send_lock:
                self._check_alive()
                message = _encode({"op": "fork", "id": request.id, "settings": settings})
                rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))
                await self._sock.sendmsg([message], [rights])
                sent = True
            await request.done.wait()
        except BaseException:
            if sent and not request.done.is_set():
                request.abandoned = True  # the reply is coming: the reader handles it
            else:
                self._pending.pop(request.id, None)
            raise
        if request.process is None:
            raise ForkServerError(
                f"fork server (pid {self.pid}) could not fork: {request.error}",
                self.process.returncode,
                tuple(self.stderr_tail),
            )
        return request.process

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise ForkServerError(
                f"fork server (pid {self.pid}) {self.dead}",
                self.process.returncode,
                tuple(self.stderr_tail),
            )

    # -- the reader ------------------------------------------------------

    async def run(self) -> None:
        """Read the server's replies until it is gone; then fail what waits on it
        and kill its children (the master cannot reap them)."""
        why = "closed"
        try:
            why = await self._read()
        finally:
            with trio.CancelScope(shield=True):
                await self._lost(why)

    async def _read(self) -> str:
        while True:
            try:
                data, ancdata, _flags, _address = await self._sock.recvmsg(
                    _MAX_MESSAGE, socket.CMSG_SPACE(_MAX_FDS * 4)
                )
            except ConnectionResetError:  # it died with requests unread
                return "died"
            except OSError as exc:
                return f"broke its control socket ({exc})"
            fds = _fds_of(ancdata)
            if not data:
                _close_all(fds)
                return "closed" if self._closing else "died"
            try:
                self._dispatch(json.loads(data), fds)
            except (ValueError, KeyError, TypeError) as exc:
                _close_all(fds)
                self.process.kill()
                return f"sent a malformed message ({exc})"

    def _dispatch(self, message: dict[str, Any], fds: list[int]) -> None:
        op = message["op"]
        if op == "forked":
            (pidfd,) = fds
            process = ForkedProcess(int(message["pid"]), pidfd)
            self._children[process.pid] = process
            request = self._pending.pop(message["id"])
            if request.abandoned:
                process.kill()
            request.process = process
            request.done.set()
        elif op == "fork-failed":
            _close_all(fds)
            request = self._pending.pop(message["id"])
            request.error = str(message["error"])
            request.done.set()
        elif op == "exited":
            _close_all(fds)
            child = self._children.pop(int(message["pid"]), None)
            if child is not None:
                child.note_exit(int(message["returncode"]))
        else:
            raise ValueError(f"unknown op {op!r}")

    async def _lost(self, why: str) -> None:
        self.dead = why
        for request in self._pending.values():
            request.error = f"it {why} while forking"
            request.done.set()
        self._pending.clear()
        orphans = list(self._children.values())
        self._children.clear()
        if orphans or why != "closed":
            log.warning(
                "fork server (pid %d) %s; killing its %d children",
                self.pid,
                why,
                len(orphans),
                extra={"child_name": "fork-server", "child_pid": self.pid},
            )
        for child in orphans:
            child.kill()
        # The master is not their parent: it learns that they are gone from the
        # pidfd, and reports the SIGKILL it sent.
        async with trio.open_nursery() as nursery:
            for child in orphans:
                nursery.start_soon(_report_killed, child)
            nursery.start_soon(self._reap_server)
        self._sock.close()
        self._stopped.set()

    async def _reap_server(self) -> None:
        # Its control socket is gone: it is exiting, or it is broken.
        with trio.move_on_after(self._policy.kill_after):
            await self.process.wait()
            return
        self.process.kill()
        await self.process.wait()

    async def aclose(self) -> None:
        """Close the control socket: the server reaps what is left and exits.

        **Cancellation:** shielded; bounded by the policy's kill_after, then SIGKILL.
        """
        with trio.CancelScope(shield=True):
            if self.dead is None and not self._closing:
                self._closing = True
                try:
                    self._sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                await escalate(
                    self.process,
                    grace_period=_WIND_DOWN_GRACE + self._policy.grace_period,
                    kill_after=self._policy.kill_after,
                )
            await self._stopped.wait()


async def _report_killed(child: ForkedProcess) -> None:
    await child.wait_gone()
    child.note_exit(-signal.SIGKILL)


async def start_fork_server(
    nursery: trio.Nursery, preload: tuple[str, ...], policy: Policy
) -> ForkServer:
    """Start a fork server that preloads *preload*; return once it is ready to fork.

    Its output is logged under ``nursery_procs.forkserver`` and its reader runs in
    *nursery*.

    Raises:
        ForkServerError: it failed to start (a preload module failed to import,
            it died, or it was not ready within ``policy.ready_timeout``); it has
            been reaped.

    **Cancellation:** the half-started server is killed and reaped.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env = child_env(None)
    cwd = os.getcwd()
    try:
        fd = theirs.fileno()
        argv, inherited = runtime_command("--fork-server", str(fd), str(os.getpid()))
        process = await trio.lowlevel.open_process(
            argv,
            pass_fds=(fd, *inherited),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            process_group=0,
            env=env,
            cwd=cwd,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    sock = trio.socket.from_stdlib_socket(ours)
    server = ForkServer(preload, process, sock, policy, nursery, env, cwd)
    drained = _log_output(nursery, server)
    try:
        await _handshake(server, policy)
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            server.dead = "failed to start"
            if isinstance(exc, _SaidFailed):  # it exits by itself, with its status
                with trio.move_on_after(policy.kill_after):
                    await process.wait()
            if process.returncode is None:
                process.kill()
            await process.wait()
            with trio.move_on_after(policy.drain_timeout):
                await drained.wait()
            server._sock.close()
        if isinstance(exc, ForkServerError):
            raise ForkServerError(
                exc.detail, process.returncode, tuple(server.stderr_tail)
            ) from None
        raise
    nursery.start_soon(server.run)
    return server


class _SaidFailed(ForkServerError):
    """The fork server reported that it could not start (and is exiting)."""


async def _handshake(server: ForkServer, policy: Policy) -> None:
    sock = server._sock
    config = {
        "op": "config",
        "sys_path": sys.path,
        "preload": list(server.preload),
        "main": main_module_spec(),
        "merge_pages": policy.merge_pages,
    }
    try:
        with trio.fail_after(policy.ready_timeout):
            await sock.send(_encode(config))
            data, ancdata, _flags, _address = await sock.recvmsg(
                _MAX_MESSAGE, socket.CMSG_SPACE(_MAX_FDS * 4)
            )
    except trio.TooSlowError:
        raise ForkServerError(
            f"the fork server was not ready within {policy.ready_timeout} s"
        ) from None
    except OSError as exc:
        raise ForkServerError(f"the fork server broke its control socket: {exc}") from None
    _close_all(_fds_of(ancdata))
    reply = json.loads(data) if data else {"op": "failed", "error": "it exited while starting"}
    if reply.get("op") == "failed":
        preload = ", ".join(server.preload) or "nothing"
        raise _SaidFailed(
            f"the fork server failed to start (preload: {preload}): {reply.get('error')}"
        )
    if reply.get("op") != "ready":
        raise ForkServerError(f"the fork server said {reply!r} instead of ready")
    if policy.merge_pages:
        _check_merging(reply.get("merge"))


def _check_merging(merge: object) -> None:
    """Warn if pages asked to be merged will not be."""
    if not isinstance(merge, dict) or "marked" not in merge:
        error = merge.get("error") if isinstance(merge, dict) else None
        log.warning("merge_pages: the fork server's pages cannot be merged: %s", error)
        return
    running = ksm_running()
    if running is None:
        log.warning("merge_pages: this kernel has no KSM (%s): no page will be merged", KSM_SYSFS)
    elif not running:
        log.warning(
            "merge_pages: ksmd is not running (%s is 0): no page will be merged until "
            "root starts it",
            KSM_SYSFS / "run",
        )
    else:
        log.debug("merge_pages: %d MiB of the fork server marked", merge["marked"] >> 20)


def _log_output(nursery: trio.Nursery, server: ForkServer) -> trio.Event:
    """Log the server's stdout and stderr (its own, not its children's)."""
    drained = trio.Event()
    pipes = [
        (pipe, level, stream, tail)
        for pipe, level, stream, tail in (
            (server.process.stdout, logging.INFO, "stdout", None),
            (server.process.stderr, logging.WARNING, "stderr", server.stderr_tail),
        )
        if pipe is not None
    ]
    remaining = [len(pipes)]

    async def pump(pipe: trio.abc.ReceiveStream, level: int, stream: str, tail: Any) -> None:
        try:
            await pump_lines(
                pipe,
                logger=log,
                level=level,
                name="fork-server",
                pid=server.pid,
                stream=stream,
                tail=tail,
            )
        finally:
            remaining[0] -= 1
            if not remaining[0]:
                drained.set()

    for pipe, level, stream, tail in pipes:
        nursery.start_soon(pump, pipe, level, stream, tail)
    return drained


class ForkServers:
    """The fork servers of one supervisor, one per preload list: started on first
    use (or when the supervisor opens), started again after one dies, closed
    with the supervisor.

    A spawn that a dying server cannot serve fails with :class:`ForkServerError`;
    the next spawn starts a new server.
    """

    def __init__(self, nursery: trio.Nursery, policy: Policy) -> None:
        self._nursery = nursery
        self._policy = policy
        self._servers: dict[tuple[str, ...], ForkServer] = {}
        self._locks: collections.defaultdict[tuple[str, ...], trio.Lock] = collections.defaultdict(
            trio.Lock
        )
        self._closed = False
        #: Servers started, restarts included.
        self.started_total = 0

    def current(self, preload: tuple[str, ...]) -> ForkServer | None:
        """The server for *preload*, if one is running."""
        server = self._servers.get(preload)
        return server if server is not None and server.dead is None else None

    async def get(self, preload: tuple[str, ...]) -> ForkServer:
        """The running server for *preload*, started (again) if needed.

        Raises:
            ForkServerError: it could not be started.
        """
        async with self._locks[preload]:
            if self._closed:
                raise ForkServerError("the supervisor's fork servers are closed")
            server = self.current(preload)
            if server is None:
                old = self._servers.pop(preload, None)
                if old is not None:
                    log.info("starting a new fork server after pid %d %s", old.pid, old.dead)
                server = await start_fork_server(self._nursery, preload, self._policy)
                self._servers[preload] = server
                self.started_total += 1
                if self._closed:  # closed while this one was starting
                    await server.aclose()
                    raise ForkServerError("the supervisor's fork servers are closed")
        return server

    async def spawn(
        self,
        preload: tuple[str, ...],
        *,
        debug_sleep: float | None = None,
        isolation: Isolation | None = None,
    ) -> Spawned:
        """Fork a child from the server for *preload*: its link and its own pipes,
        and the environment and working directory an exec'd child would get.

        Raises:
            ForkServerError: the server could not be started, could not fork, or
                died while forking.

        **Cancellation:** nothing is left running or open.
        """
        server = await self.get(preload)
        settings = server.settings_for(child_env(debug_sleep))
        if isolation is not None and isolation.confines:
            settings["isolation"] = isolation.to_json()
        parent_sock, child_sock = link_socketpair()
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        try:
            process = await server.fork([child_sock.fileno(), out_write, err_write], settings)
        except BaseException:
            parent_sock.close()
            _close_all([out_read, err_read])
            raise
        finally:
            child_sock.close()
            _close_all([out_write, err_write])
        process.stdout = trio.lowlevel.FdStream(out_read)
        process.stderr = trio.lowlevel.FdStream(err_read)
        return Spawned(process, socket_stream(parent_sock))

    async def aclose(self) -> None:
        """Close every server (after the supervisor's children are gone).

        **Cancellation:** shielded.
        """
        self._closed = True
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for server in self._servers.values():
                    nursery.start_soon(server.aclose)
