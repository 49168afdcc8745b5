"""Confining a child: resource limits, ``no_new_privs``, namespaces and a
read-only view of the file system, after NGINX Unit's ``isolation`` options.

:class:`Isolation` is the setting (one frozen, validated value). :func:`isolate`
applies it inside the new child, while it is still single-threaded and before
the runtime starts, through libc (``unshare``, ``mount``, ``mount_setattr``,
``prctl`` and ``setrlimit``; ``os.unshare`` only arrives in Python 3.12).
:func:`observe` says, from outside, which isolation is in force for a process.

A new PID namespace needs one more fork: the process that made it stays
outside as a small *relay* (it forwards the supervisor's signals and exits as
the child does), and its child is the namespace's first process, pid 1. When
that one ends, the kernel kills every process left in the namespace.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final, NoReturn

import attrs

_CLONE_NEWNS: Final = 0x00020000
_CLONE_NEWUSER: Final = 0x10000000
_CLONE_NEWPID: Final = 0x20000000
_CLONE_NEWNET: Final = 0x40000000
_MS_BIND: Final = 4096
_MS_REC: Final = 0x4000
_MS_PRIVATE: Final = 1 << 18
_MS_NOSUID: Final = 2
_MS_NODEV: Final = 4
_MS_NOEXEC: Final = 8
_AT_FDCWD: Final = -100
_AT_RECURSIVE: Final = 0x8000
_MOUNT_ATTR_RDONLY: Final = 1
_SYS_MOUNT_SETATTR: Final = 442  # the same number on every architecture
_PR_SET_PDEATHSIG: Final = 1
_PR_SET_NO_NEW_PRIVS: Final = 38
#: Signals the relay passes on to the child in a PID namespace.
_RELAYED: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
#: What pid 1 of a PID namespace exits with when SIGTERM ends it (the first
#: process of a namespace cannot die of a signal it sends itself); the relay
#: turns it back into death by SIGTERM.
PID1_SIGTERM_STATUS: Final = 128 + signal.SIGTERM


def _positive(instance: object, attribute: attrs.Attribute[int | None], value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"Isolation.{attribute.name} must be a positive integer, not {value!r}")


def _paths(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str | bytes):
        raise TypeError(f"writable_paths is a list of paths, not the string {value!r}")
    paths = tuple(str(path) for path in value)
    for path in paths:
        if not os.path.isabs(path):
            raise ValueError(f"writable_paths must be absolute paths, not {path!r}")
    return paths


@attrs.frozen
class Isolation:
    """How a child is confined; the default confines nothing.

    After NGINX Unit's ``isolation`` options. Given per supervisor, pool or child
    (``isolation=``); :doc:`security` says what each option stops and what it
    does not. A namespace the kernel refuses (no privileges, a container, a
    limit) fails the child's start, unless ``allow_fallback`` is set; then the
    child starts without it, and ``ctx.statistics().isolation`` shows what is in
    force.
    """

    #: ``RLIMIT_AS``: the most address space (bytes) the child may map. Past it,
    #: allocations fail (:class:`MemoryError`). Counts virtual memory, threads'
    #: stacks included: leave room (an idle child maps about 200 MiB).
    address_space: int | None = attrs.field(default=None, validator=_positive)
    #: ``RLIMIT_NOFILE``: the most descriptors it may hold open.
    open_files: int | None = attrs.field(default=None, validator=_positive)
    #: ``RLIMIT_CPU``: seconds of CPU time; then SIGXCPU ends it.
    cpu_time: int | None = attrs.field(default=None, validator=_positive)
    #: ``RLIMIT_NPROC``: the most processes its user may have (the kernel does not
    #: enforce it for root).
    processes: int | None = attrs.field(default=None, validator=_positive)
    #: ``PR_SET_NO_NEW_PRIVS``: nothing it runs gains privileges (set-user-id
    #: programs, file capabilities).
    no_new_privs: bool = False
    #: A user namespace: it is root inside, with the master's user outside, and
    #: has no privilege over anything outside.
    user: bool = False
    #: A PID namespace: it is pid 1 and sees only its own processes, which all
    #: die with it (implies ``mount``, for its own ``/proc``).
    pid: bool = False
    #: A mount namespace: its mounts are its own.
    mount: bool = False
    #: A network namespace with no interface up: no network at all, not even
    #: 127.0.0.1.
    network: bool = False
    #: The whole file system read-only, except ``writable_paths`` (implies
    #: ``mount``).
    read_only: bool = False
    #: Absolute paths that stay writable under ``read_only``.
    writable_paths: tuple[str, ...] = attrs.field(default=(), converter=_paths)
    #: Start without a namespace the kernel refuses, instead of failing.
    allow_fallback: bool = False

    def __attrs_post_init__(self) -> None:
        if self.writable_paths and not self.read_only:
            raise ValueError("writable_paths needs read_only=True")

    @property
    def confines(self) -> bool:
        """Whether this confines anything at all."""
        return self != Isolation(allow_fallback=self.allow_fallback)

    @property
    def needs_mount_namespace(self) -> bool:
        return self.mount or self.pid or self.read_only

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    def in_force(self) -> dict[str, Any]:
        """Only what confines: the options that differ from the default, without
        ``allow_fallback`` (``{}`` for an unconfined child)."""
        unconfined = Isolation()
        return {
            name: value
            for name, value in self.to_json().items()
            if name != "allow_fallback" and value != getattr(unconfined, name)
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Isolation:
        return cls(**data)


class IsolationError(OSError):
    """The kernel refused part of a child's isolation (raised in the child)."""


_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise IsolationError(errno, f"cannot {what}: {os.strerror(errno)}")


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _mount_setattr(path: str, *, set_flags: int = 0, clear: int = 0, recursive: bool) -> None:
    attr = _MountAttr(set_flags, clear, 0, 0)
    flags = _AT_RECURSIVE if recursive else 0
    result = _libc.syscall(
        _SYS_MOUNT_SETATTR, _AT_FDCWD, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr)
    )
    _check(result, f"change the mount at {path}")


def _mount(source: str | None, target: str, kind: str | None, flags: int) -> None:
    def encoded(text: str | None) -> bytes | None:
        return None if text is None else text.encode()

    result = _libc.mount(
        encoded(source), encoded(target), encoded(kind), ctypes.c_ulong(flags), None
    )
    _check(result, f"mount {source or kind} on {target}")


def _unshare_namespaces(isolation: Isolation) -> set[str]:
    """Make the namespaces asked for; the names of those made."""
    wanted = [
        ("user", _CLONE_NEWUSER, isolation.user),
        ("mount", _CLONE_NEWNS, isolation.needs_mount_namespace),
        ("network", _CLONE_NEWNET, isolation.network),
        ("pid", _CLONE_NEWPID, isolation.pid),
    ]
    uid, gid = os.getuid(), os.getgid()
    made: set[str] = set()
    for name, flag, asked in wanted:  # the user namespace first: it grants the rest
        if not asked:
            continue
        try:
            _check(_libc.unshare(flag), f"make a {name} namespace")
        except IsolationError:
            if not isolation.allow_fallback:
                raise
            continue
        made.add(name)
        if flag == _CLONE_NEWUSER:
            _map_ids(uid, gid)
    return made


def _map_ids(uid: int, gid: int) -> None:
    """Be root in the new user namespace, this process's user outside."""
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1")


def _set_up_mounts(isolation: Isolation, made: set[str]) -> None:
    if "mount" not in made:
        return
    # Nothing done here may reach the master's mount namespace.
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    if "pid" in made:
        _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    if isolation.read_only:
        _mount_setattr("/", set_flags=_MOUNT_ATTR_RDONLY, recursive=True)
        for path in isolation.writable_paths:
            _mount(path, path, None, _MS_BIND)
            _mount_setattr(path, clear=_MOUNT_ATTR_RDONLY, recursive=False)


def _set_limits(isolation: Isolation) -> None:
    for limit, value, hard in (
        (resource.RLIMIT_AS, isolation.address_space, isolation.address_space),
        (resource.RLIMIT_NOFILE, isolation.open_files, isolation.open_files),
        # One second between soft and hard: SIGXCPU ends it, not SIGKILL.
        (resource.RLIMIT_CPU, isolation.cpu_time, (isolation.cpu_time or 0) + 1),
        (resource.RLIMIT_NPROC, isolation.processes, isolation.processes),
    ):
        if value is not None:
            resource.setrlimit(limit, (value, hard or value))


def isolate(isolation: Isolation) -> None:
    """Confine this process (a new child, single-threaded, its pidfds already
    open) as *isolation* says. With a PID namespace, this process becomes the
    relay and never returns; its child returns, as the namespace's pid 1.

    Raises:
        IsolationError: a namespace or mount the kernel refused (and no fallback).
    """
    made = _unshare_namespaces(isolation)
    if "pid" in made:
        _become_pid1_or_relay()
    _set_up_mounts(isolation, made)
    _set_limits(isolation)
    if isolation.no_new_privs:
        _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "set no_new_privs")


def _become_pid1_or_relay() -> None:
    child = os.fork()
    if child == 0:
        # If the relay is killed, so is this whole namespace.
        _check(_libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "set a death signal")
        return
    _relay(child)


def _relay(child: int) -> NoReturn:
    """Stay outside the namespace, pass the supervisor's signals on to *child*,
    and end as it ends (its exit status, or the signal that killed it)."""
    relayed: list[int] = []

    def forward(signum: int, frame: object) -> None:
        relayed.append(signum)
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for signum in _RELAYED:
        signal.signal(signum, forward)
    # The link and everything else are the child's alone.
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, 1 << 16)
    _pid, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        _die_of(os.WTERMSIG(status))
    code = os.waitstatus_to_exitcode(status)
    if code == PID1_SIGTERM_STATUS and signal.SIGTERM in relayed:
        _die_of(signal.SIGTERM)
    os._exit(code)


def _die_of(signum: int) -> NoReturn:
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)


def is_pid1() -> bool:
    """Whether this process is the first of a PID namespace."""
    return os.getpid() == 1


# -- from outside -------------------------------------------------------------


def _namespace(pid: int | str, name: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{name}")
    except OSError:
        return None


def _limit(pid: int, title: str) -> int | None:
    try:
        lines = Path(f"/proc/{pid}/limits").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(title):
            soft = line[len(title) :].split()[0]
            return None if soft == "unlimited" else int(soft)
    return None


def _no_new_privs(pid: int) -> bool:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NoNewPrivs:"):
                return line.split()[1] == "1"
    except OSError:
        pass
    return False


def _root_is_read_only(pid: int) -> bool:
    try:
        for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
            fields = line.split()
            if fields[4] == "/":
                return "ro" in fields[5].split(",")
    except OSError:
        pass
    return False


def observe(pid: int, asked: Isolation) -> Isolation:
    """Which of *asked* is in force for process *pid*, seen from here (limits,
    namespaces and mounts as the kernel shows them, not as the child says).

    For a child in a PID namespace, *pid* is its relay; the child is the relay's
    only child.
    """
    if not asked.confines:
        return Isolation()
    if asked.pid and _namespace(pid, "pid") != _namespace(pid, "pid_for_children"):
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:  # the relay is gone already
            children = []
        pid = int(children[0]) if children else pid

    def differs(name: str) -> bool:
        return _namespace(pid, name) not in (None, _namespace("self", name))

    def limit(name: str, title: str) -> int | None:
        return _limit(pid, title) if getattr(asked, name) is not None else None

    read_only = asked.read_only and _root_is_read_only(pid)
    return Isolation(
        address_space=limit("address_space", "Max address space"),
        open_files=limit("open_files", "Max open files"),
        cpu_time=limit("cpu_time", "Max cpu time"),
        processes=limit("processes", "Max processes"),
        no_new_privs=_no_new_privs(pid),
        user=differs("user"),
        pid=differs("pid"),
        mount=differs("mnt") and asked.mount,
        network=differs("net"),
        read_only=read_only,
        writable_paths=asked.writable_paths if read_only else (),
        allow_fallback=asked.allow_fallback,
    )


def limit_reached(
    isolation: Isolation, returncode: int | None, error: BaseException | None
) -> str | None:
    """Which limit of *isolation* ended a child, judging by how it ended."""
    if isolation.cpu_time is not None and returncode == -signal.SIGXCPU:
        return f"it used up its CPU time limit (Isolation.cpu_time={isolation.cpu_time} s)"
    if isolation.address_space is not None and isinstance(error, MemoryError):
        return (
            "it ran out of its address-space limit "
            f"(Isolation.address_space={isolation.address_space} bytes)"
        )
    return None
