"""``open_supervisor()``: the nursery that owns child processes."""

from __future__ import annotations

import collections
import enum
import functools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TypedDict, TypeVarTuple

import attrs
import trio

from ._context import Context, OwnedChild, handle_for, owned_context, owned_contexts
from ._errors import (
    ChildStartError,
    ContextDied,
    SupervisorError,
)
from ._forkserver import ForkServers
from ._groups import unwrap_sole_exception
from ._isolation import Isolation
from ._lifecycle import Lifecycle, Lineage, State
from ._process import (
    DEBUG_SLEEP_ENV,
    Policy,
    Spawned,
    StartOptions,
    describe_exit,
)
from ._router import Router, current_router
from ._runner import Runner
from ._spec import dump_target
from ._ssh import SSH
from ._stdio import child_logger

log = logging.getLogger("nursery_procs.supervisor")

Ts = TypeVarTuple("Ts")


class ChildOptions(TypedDict, total=False):
    """How to start children: the options a pool passes to
    :meth:`Supervisor.start_child` for each of its children (``None``: the
    supervisor's setting)."""

    policy: Policy | None
    trusted: bool | None
    start_method: str | None
    preload: Iterable[str] | None
    isolation: Isolation | None
    via: SSH | None


class Restart(enum.Enum):
    """When a supervisor restarts a child that exited (as in Erlang/OTP)."""

    #: Always, however it exited (unless it was shut down on purpose).
    PERMANENT = "permanent"
    #: Only if it exited abnormally: non-zero status, a signal, or its target raised.
    TRANSIENT = "transient"
    #: Never (the default).
    TEMPORARY = "temporary"


@attrs.frozen
class SupervisorStatistics:
    """A snapshot of a supervisor's children."""

    #: Children starting (spawned, not yet ready).
    starting: int
    #: Children ready and running.
    running: int
    #: Children shutting down.
    stopping: int
    #: Children started since the supervisor opened (failed starts included).
    started_total: int
    #: Children that failed to start.
    failed_starts: int
    #: Children that have exited and been reaped.
    exited_total: int
    #: Exited children whose exit was not clean (non-zero status or a signal, or
    #: no result reported).
    crashed_total: int
    #: Children restarted under their restart policy.
    restarts_total: int = 0
    #: Fork servers started (a server that died and was started again counts twice).
    fork_servers_started: int = 0


class Supervisor:
    """Owns child processes; made by :func:`open_supervisor`."""

    def __init__(
        self,
        nursery: trio.Nursery,
        runner: Runner,
        policy: Policy,
        max_restarts: int = 3,
        restart_window: float = 5.0,
        trusted: bool = True,
        start: StartOptions | None = None,
    ) -> None:
        _check_restart_intensity(max_restarts, restart_window)
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        #: Whether children are trusted unless :meth:`start_child` says otherwise.
        self.trusted = trusted
        self._restart_times: collections.deque[float] = collections.deque()
        self._restarts_total = 0
        self._nursery = nursery
        self._runner = runner
        #: How children start unless told otherwise (see :meth:`start_child`).
        self.start_options = start or StartOptions()
        self._router = runner.router
        self.policy = policy
        self._children: dict[int, tuple[Context, OwnedChild]] = {}
        self.started_at = trio.current_time()
        self._closed = False
        self._started_total = 0

    @property
    def router(self) -> Router:
        return self._router

    @property
    def children(self) -> list[Context]:
        """The children that have not exited yet, oldest first."""
        return [ctx for ctx, _ in self._children.values()]

    @property
    def fake(self) -> bool:
        """Whether its children are fakes (a ``spawner`` such as
        :func:`nursery_procs.testing.fake_spawner` starts them), not processes."""
        return self._runner.spawner is not None

    def statistics(self) -> SupervisorStatistics:
        states = [child.state for _, child in self._children.values()]
        return SupervisorStatistics(
            starting=sum(s in (State.SPAWNING, State.CREATED) for s in states),
            running=states.count(State.READY),
            stopping=states.count(State.STOPPING),
            started_total=self._started_total,
            failed_starts=self._runner.failed_starts,
            exited_total=self._runner.exited_total,
            crashed_total=self._runner.crashed_total,
            restarts_total=self._restarts_total,
            fork_servers_started=self._runner.forkservers.started_total,
        )

    def context_by_name(self, name: str) -> Context | None:
        """The handle on the context called *name* in this supervisor's subtree
        (the oldest, if several share it), or ``None`` if there is none.

        Names are not unique and contexts come and go, so this is a lookup that may
        find nothing; :func:`nursery_procs.context_by_id` is the addressing
        function, which always returns a handle.
        """
        for ctx, _ in self._children.values():
            if ctx.name == name:
                return ctx
        for info in self._router.directory.values():
            if info.name == name:
                return handle_for(info.id, self.policy)
        return None

    async def start_child(
        self,
        target: Callable[[*Ts], object] | str | None = None,
        *args: *Ts,
        name: str | None = None,
        policy: Policy | None = None,
        debug_sleep: float | None = None,
        restart: Restart | str = Restart.TEMPORARY,
        raise_on_crash: bool = True,
        trusted: bool | None = None,
        start_method: str | None = None,
        preload: Iterable[str] | None = None,
        isolation: Isolation | None = None,
        via: SSH | None = None,
    ) -> Context:
        """Start ``target(*args)`` in a new child process; return once it is ready.

        Args:
            target: an importable function (sync or async), a ``"module:function"``
                string, or ``None`` for a child that only serves :meth:`Context.call`
                until it is shut down. When the target returns, the child exits.
            *args: picklable arguments for the target.
            name: the context's name (default ``child-<id>``), used in logs.
            policy: timing and limits, default the supervisor's.
            debug_sleep: seconds the child sleeps (after logging its pid) before
                running the target, for a debugger to attach. Default: the
                ``NURSERY_PROCS_SLEEP_FOR_DEBUGGER`` environment variable.
            restart: ``"temporary"`` (never restarted), ``"transient"`` (restarted
                if it exits abnormally) or ``"permanent"`` (always restarted), unless
                it was shut down on purpose. A restarted child keeps its
                :class:`Context`, id and name; requests pending when it died get
                :class:`ContextDied`. More than ``max_restarts`` restarts within
                ``restart_window`` seconds make the supervisor fail with
                :class:`SupervisorError`.
            raise_on_crash: a child that ends abnormally (a non-zero status, a
                signal, its target raised, a cancellation it did not acknowledge)
                without being shut down on purpose, and is not restarted, raises
                :class:`ContextDied` into the supervisor's block, cancelling it, as a
                failing task cancels its nursery. ``False``: it is only logged (and
                its handle's :meth:`Context.wait` still reports it).
            trusted: ``False`` for a child whose messages must never be unpickled
                here (it may be compromised, for example because it parses input
                from the network): it sends only plain data (see
                :doc:`security`), and its exceptions are rebuilt only as built-in
                types. Default: the supervisor's setting.
            start_method: ``"exec"`` (a fresh interpreter) or ``"forkserver"``
                (forked from a fork server of this supervisor); default the
                supervisor's. See :doc:`start_methods`.
            preload: for ``"forkserver"``, the modules its fork server has
                imported, and the functions it has run
                (``"package.module:function"``), before forking (children with
                different lists come from different fork servers); for a child
                on another host, the modules sent to it ahead of its target.
                Default the supervisor's.
            isolation: how the child is confined (resource limits, namespaces,
                a read-only file system; see :class:`Isolation` and
                :doc:`security`); default the supervisor's.
            via: the host the child runs on: ``None`` for this one, or
                :func:`nursery_procs.ssh` for another, whose Python is sent the
                runtime and the modules the child needs (a fresh interpreter
                there: ``start_method`` does not apply; see :doc:`remote`).
                Default the supervisor's.

        Raises:
            ChildStartError: the child exited, broke its handshake, or was not ready
                within ``policy.ready_timeout`` (plus any debug sleep). Carries its
                return code and the tail of its stderr. When its fork server could
                not start or died while forking it, the cause is a
                :class:`ForkServerError`; when its host could not be reached, an
                :class:`SSHError`.
            WireError: the target or arguments cannot be pickled.
            ValueError, TypeError: an unknown start method, a bad preload list or
                isolation.
            RuntimeError: the supervisor is closed.

        **Cancellation:** the half-started child is killed and reaped.
        """
        if self._closed:
            raise RuntimeError("this supervisor is closed")
        restart = Restart(restart)
        start = self.start_options.override(start_method, preload, isolation, via)
        blob = dump_target(target, args)
        if debug_sleep is None:
            env_value = os.environ.get(DEBUG_SLEEP_ENV)
            debug_sleep = float(env_value) if env_value else 0.0
        context_id = await self._router.allocate_id()
        name = name or f"child-{context_id}"
        life = Lifecycle(
            name=name,
            policy=policy or self.policy,
            debug_sleep=debug_sleep,
            trusted=self.trusted if trusted is None else trusted,
        )
        ctx, child = owned_context(context_id, name, self._router, Lineage(life))
        self._started_total += 1
        result: Context = await self._nursery.start(
            self._run_with_restarts, ctx, child, blob, restart, raise_on_crash, start
        )
        return result

    async def _run_with_restarts(
        self,
        ctx: Context,
        child: OwnedChild,
        blob: bytes,
        restart: Restart,
        raise_on_crash: bool,
        start: StartOptions,
        *,
        task_status: trio.TaskStatus[Context],
    ) -> None:
        owned = owned_contexts()
        owned[ctx.id] = ctx
        self._children[ctx.id] = (ctx, child)
        try:
            await self._runner.run(ctx, child, blob, start, task_status=task_status)
            while self._should_restart(child.life, restart):
                self._count_restart(child.life)
                child.lineage.renew()
                ctx.reopen_inboxes()
                try:
                    await self._runner.run(
                        ctx, child, blob, start, task_status=trio.TASK_STATUS_IGNORED
                    )
                except ChildStartError as exc:
                    child.life.note(fault="restart failed")
                    child_logger(ctx.name).warning(
                        "restart failed: %s", exc.args[0].splitlines()[0]
                    )
        finally:
            self._children.pop(ctx.id, None)
            owned.pop(ctx.id, None)
            child.lineage.end()
        life = child.life
        if raise_on_crash and self._crash_is_an_error(life):
            raise ContextDied(
                life.name,
                ctx.id,
                life.returncode,
                tuple(life.stderr_tail),
                f"it crashed ({life.fault or describe_exit(life.returncode)})",
            ) from (life.outcome[1] if life.target_failed and life.outcome else None)

    def _crash_is_an_error(self, life: Lifecycle) -> bool:
        """Whether the end of a child that is not restarted fails the supervisor."""
        if self._closed or life.stop_requested or life.kill_requested:
            return False
        return life.crashed

    def _should_restart(self, life: Lifecycle, restart: Restart) -> bool:
        if self._closed or life.stop_requested or restart is Restart.TEMPORARY:
            return False
        return restart is Restart.PERMANENT or life.crashed

    def _count_restart(self, life: Lifecycle) -> None:
        """Note a restart; fail the supervisor if there were too many too fast."""
        now = trio.current_time()
        times = self._restart_times
        while times and times[0] <= now - self.restart_window:
            times.popleft()
        if len(times) >= self.max_restarts:
            raise SupervisorError(
                f"child {life.name!r} exited ({describe_exit(life.returncode)}) after "
                f"{len(times)} restarts within {self.restart_window} s: giving up"
            )
        times.append(now)
        self._restarts_total += 1
        child_logger(life.name).warning(
            "restarting child %r after it exited (%s)", life.name, describe_exit(life.returncode)
        )

    def open_child(
        self,
        target: Callable[[*Ts], object] | str | None = None,
        *args: *Ts,
        name: str | None = None,
        policy: Policy | None = None,
        debug_sleep: float | None = None,
        restart: Restart | str = Restart.TEMPORARY,
        raise_on_crash: bool = True,
        trusted: bool | None = None,
        start_method: str | None = None,
        preload: Iterable[str] | None = None,
        isolation: Isolation | None = None,
        via: SSH | None = None,
    ) -> AbstractAsyncContextManager[Context]:
        """Start a child bound to a block: leaving the block shuts it down gracefully.

        The arguments are those of :meth:`start_child`.
        """
        return _closing(
            functools.partial(
                self.start_child,
                target,
                *args,
                name=name,
                policy=policy,
                debug_sleep=debug_sleep,
                restart=restart,
                raise_on_crash=raise_on_crash,
                trusted=trusted,
                start_method=start_method,
                preload=preload,
                isolation=isolation,
                via=via,
            )
        )

    @trio.lowlevel.enable_ki_protection
    async def _close_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for _, child in list(self._children.values()):
                nursery.start_soon(child.aclose)


def _check_restart_intensity(max_restarts: int, restart_window: float) -> None:
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, not {max_restarts!r}")
    if not restart_window > 0:
        raise ValueError(f"restart_window must be > 0, not {restart_window!r}")


async def _host_services(done: trio.Event, *, task_status: trio.TaskStatus[trio.Nursery]) -> None:
    """Own the shielded nursery where children's pipes and links are read, until
    *done*."""
    with trio.CancelScope(shield=True):
        async with trio.open_nursery() as service:
            task_status.started(service)
            await done.wait()
            service.cancel_scope.cancel()


@asynccontextmanager
async def _closing(start: Callable[[], Awaitable[Context]]) -> AsyncIterator[Context]:
    """Start a context and close it when the block ends."""
    ctx = await start()
    try:
        yield ctx
    finally:
        await ctx.aclose()


@asynccontextmanager
async def open_supervisor(
    *,
    policy: Policy | None = None,
    siblings_may_talk: bool = True,
    spawner: Callable[..., Awaitable[Spawned]] | None = None,
    max_restarts: int = 3,
    restart_window: float = 5.0,
    trusted: bool | None = None,
    start_method: str | None = None,
    preload: Iterable[str] | None = None,
    isolation: Isolation | None = None,
    via: SSH | None = None,
) -> AsyncIterator[Supervisor]:
    """Open a supervisor: every child started in it is shut down and reaped before
    the block exits.

    Args:
        policy: default timing and limits for the children (see :class:`Policy`).
        siblings_may_talk: if ``False``, this process's router refuses messages
            between its children's subtrees (only up and down the tree).
        spawner: how to start a child process (default: by its start method).
            Tests pass :func:`nursery_procs.testing.fake_spawner`.
        max_restarts: restart intensity: at most this many restarts (of children
            started with ``restart="permanent"`` or ``"transient"``) ...
        restart_window: ... within this many seconds; one more makes the
            supervisor fail with :class:`SupervisorError`, closing every child.
        trusted: whether children may send pickles (``False``: plain data only;
            see :meth:`Supervisor.start_child`). Default: ``True``, unless this
            process is itself an untrusted child (then its children are not
            trusted either).
        start_method: how children start unless :meth:`~Supervisor.start_child`
            says otherwise: ``"exec"`` (a fresh interpreter each) or
            ``"forkserver"`` (forked in milliseconds from a fork server that
            this supervisor starts when its first child needs it, or at once if
            there is something to preload, and closes at its end). Default: the
            ``NURSERY_PROCS_START_METHOD`` environment variable, else
            ``"forkserver"``.
            See :doc:`start_methods`.
        preload: modules the fork server imports before it forks (``"__main__"``
            for the main script or module), and functions it then calls once
            (``"package.module:function"``); the server starts at once, so that
            one that fails to import, or a function that raises, fails here.
        isolation: how children are confined unless
            :meth:`~Supervisor.start_child` says otherwise (see :class:`Isolation`).
        via: the host children run on unless :meth:`~Supervisor.start_child` says
            otherwise: ``None`` for this one, or :func:`nursery_procs.ssh` (see
            :doc:`remote`). Connections to other hosts are made when a child
            first needs one, shared by the children there, and closed at the
            end of the block.

    Raises:
        ForkServerError: the fork server could not start (for example a
            ``preload`` module failed to import); nothing is left running.
        ValueError, TypeError: an unknown start method, a bad preload list, or
            isolation for children on another host.

    **Cancellation / errors:** however the block exits (normally, by an exception,
    by cancellation or Ctrl-C), every child gets SHUTDOWN, its grace period, then
    SIGTERM and SIGKILL as needed, and is reaped. Children are closed concurrently.
    An exception from the block propagates as itself, not wrapped in a group.
    """
    start = StartOptions.build(start_method, preload, isolation, via)
    # Checked before anything starts, so that a bad value leaves nothing behind.
    _check_restart_intensity(max_restarts, restart_window)
    policy = policy or Policy()
    router = current_router()
    if not siblings_may_talk:
        router.siblings_may_talk = False
    with unwrap_sole_exception():
        async with trio.open_nursery() as nursery:
            services_done = trio.Event()
            service: trio.Nursery = await nursery.start(_host_services, services_done)
            forkservers = ForkServers(service, policy)
            supervisor = Supervisor(
                nursery,
                Runner(router, service, forkservers, spawner, policy),
                policy,
                max_restarts=max_restarts,
                restart_window=restart_window,
                trusted=not router.data_only if trusted is None else trusted,
                start=start,
            )
            try:
                if (
                    start.method == "forkserver"
                    and start.preload
                    and start.via is None
                    and spawner is None
                ):
                    # Now, so that a preload that fails to import fails here.
                    await forkservers.get(start.preload)
                yield supervisor
            finally:
                with trio.CancelScope(shield=True):
                    await supervisor._close_all()
                    await forkservers.aclose()
                    await supervisor._runner.aclose_connections()
                supervisor._closed = True
                services_done.set()
