"""``open_supervisor()``: the nursery that owns child processes."""

from __future__ import annotations

import collections
import enum
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from . import _wire
from ._context import Context
from ._errors import (
    ChildStartError,
    ContextDied,
    HandshakeError,
    LinkClosed,
    SupervisorError,
    WireError,
)
from ._groups import unwrap_sole_exception
from ._lifecycle import State
from ._link import Link, accept_link
from ._process import (
    DEBUG_SLEEP_ENV,
    Policy,
    Spawned,
    describe_exit,
    escalate,
    kill_and_reap,
    spawn,
)
from ._router import ContextInfo, Route, Router, current_router
from ._spec import Bootstrap, Target, dump_target, main_module_spec
from ._stdio import child_logger, emit, new_tail, pump_lines
from ._wire import Handle, Message

log = logging.getLogger("nursery_procs.supervisor")


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


@attrs.define(eq=False)
class _Child:
    """The parent's bookkeeping for one direct child: the route owner for its link."""

    ctx: Context = attrs.field(init=False)
    name: str
    policy: Policy
    debug_sleep: float
    state: State = State.SPAWNING
    pid: int | None = None
    returncode: int | None = None
    outcome: tuple[bool, Any] | None = None
    crashed: bool = False
    stderr_tail: Any = attrs.field(factory=new_tail)
    ready: trio.Event = attrs.field(factory=trio.Event)
    #: Set when the state becomes READY (after ``ready``, the child's own word).
    running: trio.Event = attrs.field(factory=trio.Event)
    stop_requested: trio.Event = attrs.field(factory=trio.Event)
    exited: trio.Event = attrs.field(factory=trio.Event)
    shutdown_sent: bool = False
    link: Link | None = None
    started_at: float = 0.0
    exited_at: float | None = None
    #: The scopes of the tasks reading this child's pipes and link.
    pump_scopes: list[trio.CancelScope] = attrs.field(factory=list)
    pumps_cancelled: bool = False

    def pump_scope(self) -> trio.CancelScope:
        scope = trio.CancelScope()
        if self.pumps_cancelled:
            scope.cancel()
        self.pump_scopes.append(scope)
        return scope

    def cancel_pumps(self) -> None:
        self.pumps_cancelled = True
        for scope in self.pump_scopes:
            scope.cancel()

    @property
    def logger(self) -> logging.Logger:
        return child_logger(self.name)

    def reincarnate(self) -> _Child:
        """A fresh incarnation behind the same :class:`Context` (for a restart)."""
        fresh = _Child(name=self.name, policy=self.policy, debug_sleep=self.debug_sleep)
        fresh.ctx = self.ctx
        self.ctx._rebind(fresh)
        return fresh

    def handle_control(self, msg: Message) -> None:
        if msg.handle == Handle.READY:
            self.ready.set()
        elif msg.handle == Handle.RESULT:
            try:
                self.outcome = _wire.decode(msg)
            except WireError as exc:
                self.outcome = (False, exc)
        elif msg.handle == Handle.LOG:
            try:
                logger_name, level, text, created, exc_text = _wire.decode(msg)
            except (WireError, ValueError, TypeError):
                self.logger.warning("malformed log record from the child")
                return
            emit(
                self.logger,
                int(level),
                str(text),
                pid=self.pid,
                name=self.name,
                stream="logging",
                created=float(created),
                exc_text=exc_text,
                extra={"child_logger": logger_name},
            )

    async def send_shutdown(self) -> None:
        """Send SHUTDOWN once (a closed link is fine: the child is going anyway)."""
        if self.shutdown_sent or self.state in (State.SPAWNING, State.EXITED):
            return
        self.shutdown_sent = True
        router = self.ctx._router
        try:
            await router.send(_wire.make(self.ctx.id, router.id, Handle.SHUTDOWN, None))
        except (LinkClosed, WireError):
            pass

    @trio.lowlevel.enable_ki_protection
    async def stop(self) -> None:
        """Ask for a graceful stop and wait until reaped (shielded, bounded)."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.policy.close_deadline
            await self.send_shutdown()
            self.stop_requested.set()
            await self.exited.wait()


class Supervisor:
    """Owns child processes; made by :func:`open_supervisor`."""

    def __init__(
        self,
        nursery: trio.Nursery,
        router: Router,
        policy: Policy,
        spawner: Callable[..., Awaitable[Spawned]] = spawn,
        max_restarts: int = 3,
        restart_window: float = 5.0,
    ) -> None:
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, not {max_restarts!r}")
        if not restart_window > 0:
            raise ValueError(f"restart_window must be > 0, not {restart_window!r}")
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self._restart_times: collections.deque[float] = collections.deque()
        self._restarts_total = 0
        self._nursery = nursery
        self._spawn = spawner
        self._service: trio.Nursery = nursery  # replaced by the shielded one on open
        self._service_done = trio.Event()
        self._router = router
        self.policy = policy
        self._children: dict[int, _Child] = {}
        self.started_at = trio.current_time()
        self._closed = False
        self._started_total = 0
        self._failed_starts = 0
        self._exited_total = 0
        self._crashed_total = 0

    @property
    def router(self) -> Router:
        return self._router

    @property
    def children(self) -> list[Context]:
        """The children that have not exited yet, oldest first."""
        return [c.ctx for c in self._children.values()]

    def statistics(self) -> SupervisorStatistics:
        states = [c.state for c in self._children.values()]
        return SupervisorStatistics(
            starting=sum(s in (State.SPAWNING, State.CREATED) for s in states),
            running=states.count(State.READY),
            stopping=states.count(State.STOPPING),
            started_total=self._started_total,
            failed_starts=self._failed_starts,
            exited_total=self._exited_total,
            crashed_total=self._crashed_total,
            restarts_total=self._restarts_total,
        )

    def context_by_id(self, context_id: int) -> Context | None:
        """A handle on any context this process can reach (``None`` if unknown)."""
        child = self._children.get(context_id)
        if child is not None:
            return child.ctx
        info = self._router.directory.get(context_id)
        if info is None:
            return None
        return Context(info.id, info.name, info.parent_id, self._router, None, info.pid)

    def context_by_name(self, name: str) -> Context | None:
        """Like :meth:`context_by_id`, by name (the oldest match)."""
        for child in self._children.values():
            if child.name == name:
                return child.ctx
        for info in self._router.directory.values():
            if info.name == name:
                return self.context_by_id(info.id)
        return None

    async def start_child(
        self,
        target: Target = None,
        *args: Any,
        name: str | None = None,
        policy: Policy | None = None,
        debug_sleep: float | None = None,
        restart: Restart | str = Restart.TEMPORARY,
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

        Raises:
            ChildStartError: the child exited, broke its handshake, or was not ready
                within ``policy.ready_timeout`` (plus any debug sleep). Carries its
                return code and the tail of its stderr.
            WireError: the target or arguments cannot be pickled.
            RuntimeError: the supervisor is closed.

        **Cancellation:** the half-started child is killed and reaped.
        """
        if self._closed:
            raise RuntimeError("this supervisor is closed")
        restart = Restart(restart)
        blob = dump_target(target, args)
        if debug_sleep is None:
            env_value = os.environ.get(DEBUG_SLEEP_ENV)
            debug_sleep = float(env_value) if env_value else 0.0
        context_id = await self._router.allocate_id()
        child = _Child(
            name=name or f"child-{context_id}",
            policy=policy or self.policy,
            debug_sleep=debug_sleep,
        )
        child.ctx = Context(context_id, child.name, self._router.id, self._router, child)
        self._started_total += 1
        result: Context = await self._nursery.start(self._run_with_restarts, child, blob, restart)
        return result

    async def _run_with_restarts(
        self,
        child: _Child,
        blob: bytes,
        restart: Restart,
        *,
        task_status: trio.TaskStatus[Context],
    ) -> None:
        await self._run_child(child, blob, task_status=task_status)
        while self._should_restart(child, restart):
            self._count_restart(child)
            child = child.reincarnate()
            try:
                await self._run_child(child, blob, task_status=trio.TASK_STATUS_IGNORED)
            except ChildStartError as exc:
                child.crashed = True
                child.logger.warning("restart failed: %s", exc.args[0].splitlines()[0])

    def _should_restart(self, child: _Child, restart: Restart) -> bool:
        stopped_on_purpose = child.stop_requested.is_set()
        if self._closed or stopped_on_purpose or restart is Restart.TEMPORARY:
            again = False
        else:
            again = restart is Restart.PERMANENT or child.crashed
        if not again:
            child.ctx._final()
        return again

    def _count_restart(self, child: _Child) -> None:
        """Note a restart; fail the supervisor if there were too many too fast."""
        now = trio.current_time()
        times = self._restart_times
        while times and times[0] <= now - self.restart_window:
            times.popleft()
        if len(times) >= self.max_restarts:
            raise SupervisorError(
                f"child {child.name!r} exited ({describe_exit(child.returncode)}) after "
                f"{len(times)} restarts within {self.restart_window} s: giving up"
            )
        times.append(now)
        self._restarts_total += 1
        child.logger.warning(
            "restarting child %r after it exited (%s)", child.name, describe_exit(child.returncode)
        )

    @asynccontextmanager
    async def open_child(
        self, target: Target = None, *args: Any, **options: Any
    ) -> AsyncIterator[Context]:
        """Start a child bound to a block: leaving the block shuts it down gracefully."""
        ctx = await self.start_child(target, *args, **options)
        try:
            yield ctx
        finally:
            await ctx.aclose()

    # -- one child's life ------------------------------------------------

    async def _run_child(
        self, child: _Child, blob: bytes, *, task_status: trio.TaskStatus[Context]
    ) -> None:
        """The manager of one child, in the supervisor's nursery.

        Its pipes and link are read by tasks in the supervisor's shielded service
        nursery, so that however this task ends (even cancelled) the child's last
        logs and result are still read while it is wound down here.
        """
        ctx = child.ctx
        self._children[ctx.id] = child
        child.started_at = trio.current_time()
        route: Route | None = None
        process: trio.Process | None = None
        drained: trio.Event | None = None
        booted = False
        boot_failure: _BootFailed | None = None
        try:
            spawned = await self._spawn(debug_sleep=child.debug_sleep or None)
            process = spawned.process
            child.pid = process.pid
            drained = _start_pipes(self._service, child, process)
            link_done = trio.Event()
            try:
                route = await self._boot(child, spawned, blob, link_done)
            except _BootFailed as exc:
                boot_failure = exc
            else:
                booted = True
                child.state = State.READY
                child.running.set()
                task_status.started(ctx)
                await _first_of(link_done.wait, child.stop_requested.wait, process.wait)
        finally:
            with trio.CancelScope(shield=True):
                await self._wind_down(child, process, booted, drained)
                await self._finish(child, route)
        if boot_failure is not None:
            raise ChildStartError(
                child.name, ctx.id, child.returncode, tuple(child.stderr_tail), boot_failure.detail
            ) from boot_failure.__cause__

    async def _wind_down(
        self,
        child: _Child,
        process: trio.Process | None,
        booted: bool,
        drained: trio.Event | None,
    ) -> None:
        """Stop the process (gracefully if it booted), reap it, close its link and pipes."""
        if process is not None:
            if booted and process.returncode is None:
                child.state = State.STOPPING
                self._note_link_close(child)
                await child.send_shutdown()
                child.returncode = await escalate(
                    process,
                    grace_period=child.policy.grace_period,
                    kill_after=child.policy.kill_after,
                )
            else:
                if not booted:
                    self._failed_starts += 1
                    child.shutdown_sent = True
                child.returncode = await kill_and_reap(process)
        if child.link is not None:
            await child.link.aclose()
        if drained is not None:
            with trio.move_on_after(child.policy.drain_timeout):
                await drained.wait()
        # A process the child started may still hold its pipes: stop reading them.
        child.cancel_pumps()

    async def _boot(
        self,
        child: _Child,
        spawned: Spawned,
        blob: bytes,
        link_done: trio.Event,
    ) -> Route:
        ctx = child.ctx
        policy = child.policy
        router = self._router
        try:
            with trio.fail_after(policy.ready_timeout + child.debug_sleep):
                link, _resource = await accept_link(
                    spawned.stream, max_message_size=policy.max_message_size
                )
                child.link = link
                info = ContextInfo(ctx.id, child.name, router.id, child.pid or 0)
                route = await router.add_child_route(link, info, child)
                child.state = State.CREATED
                boot = Bootstrap(
                    context_id=ctx.id,
                    name=child.name,
                    parent_id=router.id,
                    parent_name=router.name,
                    sys_path=tuple(sys.path),
                    target_blob=blob,
                    log_level=child.logger.getEffectiveLevel(),
                    debug_sleep=child.debug_sleep,
                    max_message_size=policy.max_message_size,
                    siblings_may_talk=router.siblings_may_talk,
                    main_module=main_module_spec(),
                )
                await link.send(_wire.pack(_wire.make(ctx.id, router.id, Handle.BOOTSTRAP, boot)))
                self._service.start_soon(
                    _pump_then_set, router, route, link_done, child.pump_scope()
                )
                await _first_of(child.ready.wait, link_done.wait, child.stop_requested.wait)
        except trio.TooSlowError:
            await self._drop_unlinked_stream(child, spawned)
            raise _BootFailed(
                f"not ready within {policy.ready_timeout + child.debug_sleep} s"
            ) from None
        except (HandshakeError, LinkClosed) as exc:
            await self._drop_unlinked_stream(child, spawned)
            raise _BootFailed(f"it broke its link while starting: {exc}") from exc
        except BaseException:
            await self._drop_unlinked_stream(child, spawned)
            raise
        if child.stop_requested.is_set() and not child.ready.is_set():
            raise _BootFailed("it was stopped while starting")
        if not child.ready.is_set():
            assert child.link is not None
            raise _BootFailed(
                f"it exited while starting (link closed with code {child.link.close_code})"
            )
        return route

    @staticmethod
    async def _drop_unlinked_stream(child: _Child, spawned: Spawned) -> None:
        # Before the handshake completes, the link does not own the stream yet.
        if child.link is None:
            await trio.aclose_forcefully(spawned.stream)

    def _note_link_close(self, child: _Child) -> None:
        link = child.link
        if link is None or not link.closed or child.shutdown_sent:
            return
        if link.close_code in (1002, 1003, 1007, 1009):
            child.logger.warning(
                "link closed with code %d (%s); shutting the child down",
                link.close_code,
                link.close_reason,
                extra={"child_name": child.name, "child_pid": child.pid},
            )
            child.crashed = True

    async def _finish(self, child: _Child, route: Route | None) -> None:
        ctx = child.ctx
        was_ready = child.ready.is_set()
        child.state = State.EXITED
        child.exited_at = trio.current_time()
        if child.returncode != 0 or (child.outcome is None and not child.shutdown_sent):
            child.crashed = True
        if route is not None:
            await self._router.remove_route(
                route,
                lambda context_id: ContextDied(
                    child.name, context_id, child.returncode, tuple(child.stderr_tail)
                ),
            )
        self._children.pop(ctx.id, None)
        if was_ready:
            self._exited_total += 1
            if child.crashed:
                self._crashed_total += 1
                if not child.shutdown_sent or child.returncode not in (0, None):
                    child.logger.warning(
                        "child exited: %s",
                        describe_exit(child.returncode),
                        extra={"child_name": child.name, "child_pid": child.pid},
                    )
        outcome = child.outcome
        if outcome is not None and not outcome[0]:
            child.logger.error(
                "target raised %s",
                outcome[1],
                extra={"child_name": child.name, "child_pid": child.pid},
            )
        child.exited.set()

    async def _host_services(self, *, task_status: trio.TaskStatus[trio.Nursery]) -> None:
        """Own the shielded nursery where children's pipes and links are read."""
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as service:
                task_status.started(service)
                await self._service_done.wait()
                service.cancel_scope.cancel()

    @trio.lowlevel.enable_ki_protection
    async def _close_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for child in list(self._children.values()):
                nursery.start_soon(child.stop)


class _BootFailed(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _start_pipes(service: trio.Nursery, child: _Child, process: trio.Process) -> trio.Event:
    """Log the child's stdout and stderr; the event is set when both reach EOF."""
    drained = trio.Event()
    remaining = [0]

    async def pump(pipe: trio.abc.ReceiveStream, level: int, stream: str, tail: Any) -> None:
        try:
            with child.pump_scope():
                await pump_lines(
                    pipe,
                    logger=child.logger,
                    level=level,
                    name=child.name,
                    pid=child.pid,
                    stream=stream,
                    tail=tail,
                )
        finally:
            remaining[0] -= 1
            if remaining[0] == 0:
                drained.set()

    for pipe, level, stream, tail in (
        (process.stdout, logging.INFO, "stdout", None),
        (process.stderr, logging.WARNING, "stderr", child.stderr_tail),
    ):
        if pipe is not None:
            remaining[0] += 1
            service.start_soon(pump, pipe, level, stream, tail)
    if remaining[0] == 0:
        drained.set()
    return drained


async def _pump_then_set(
    router: Router, route: Route, done: trio.Event, scope: trio.CancelScope
) -> None:
    try:
        with scope:
            await router.pump(route)
    finally:
        done.set()


async def _first_of(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return as soon as any of *waits* returns; cancel the others."""
    async with trio.open_nursery() as nursery:

        async def run(fn: Callable[[], Awaitable[object]]) -> None:
            await fn()
            nursery.cancel_scope.cancel()

        for fn in waits:
            nursery.start_soon(run, fn)


@asynccontextmanager
async def open_supervisor(
    *,
    policy: Policy | None = None,
    siblings_may_talk: bool = True,
    spawner: Callable[..., Awaitable[Spawned]] | None = None,
    max_restarts: int = 3,
    restart_window: float = 5.0,
) -> AsyncIterator[Supervisor]:
    """Open a supervisor: every child started in it is shut down and reaped before
    the block exits.

    Args:
        policy: default timing and limits for the children (see :class:`Policy`).
        siblings_may_talk: if ``False``, this process's router refuses messages
            between its children's subtrees (only up and down the tree).
        spawner: how to start a child process (default: a fresh Python
            interpreter). Tests pass :func:`nursery_procs.testing.fake_spawner`.
        max_restarts: restart intensity: at most this many restarts (of children
            started with ``restart="permanent"`` or ``"transient"``) ...
        restart_window: ... within this many seconds; one more makes the
            supervisor fail with :class:`SupervisorError`, closing every child.

    **Cancellation / errors:** however the block exits (normally, by an exception,
    by cancellation or Ctrl-C), every child gets SHUTDOWN, its grace period, then
    SIGTERM and SIGKILL as needed, and is reaped. Children are closed concurrently.
    An exception from the block propagates as itself, not wrapped in a group.
    """
    router = current_router()
    if not siblings_may_talk:
        router.siblings_may_talk = False
    with unwrap_sole_exception():
        async with trio.open_nursery() as nursery:
            supervisor = Supervisor(
                nursery,
                router,
                policy or Policy(),
                spawner or spawn,
                max_restarts=max_restarts,
                restart_window=restart_window,
            )
            supervisor._service = await nursery.start(supervisor._host_services)
            try:
                yield supervisor
            finally:
                with trio.CancelScope(shield=True):
                    await supervisor._close_all()
                supervisor._closed = True
                supervisor._service_done.set()
