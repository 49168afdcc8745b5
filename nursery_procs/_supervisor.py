"""``open_supervisor()``: the nursery that owns child processes."""

from __future__ import annotations

import collections
import enum
import functools
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypedDict, TypeVarTuple

import attrs
import trio

from . import _wire
from ._context import Context, OwnedChild, handle_for, owned_context, owned_contexts
from ._errors import (
    ChildStartError,
    ContextDied,
    ForkServerError,
    HandshakeError,
    LinkClosed,
    SSHError,
    SupervisorError,
    WireError,
)
from ._forkserver import ForkServers
from ._groups import unwrap_sole_exception
from ._isolation import Isolation, limit_reached, observe
from ._lifecycle import Lifecycle, Lineage, State
from ._link import accept_link
from ._module_server import ShippedSpawn, Shipping, local_shipping
from ._process import (
    DEBUG_SLEEP_ENV,
    ChildProcess,
    Policy,
    Spawned,
    StartOptions,
    describe_exit,
    escalate,
    kill_and_reap,
    spawn,
)
from ._remote import rebuild
from ._router import ContextInfo, Route, Router, current_router
from ._spec import Bootstrap, dump_target, main_module_spec
from ._ssh import SSH
from ._ssh_connections import SSHConnections
from ._stdio import child_logger, emit, pump_lines
from ._wire import Handle, Message

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


@attrs.define(eq=False)
class _Incarnation:
    """The runner's side of one incarnation: it reads the child's control messages
    into the :class:`Lifecycle` and owns the scopes of the tasks reading its pipes
    and link."""

    life: Lifecycle
    #: The isolation asked for this incarnation.
    isolation: Isolation = attrs.field(factory=Isolation)
    pump_scopes: list[trio.CancelScope] = attrs.field(factory=list)
    pumps_cancelled: bool = False

    @property
    def logger(self) -> logging.Logger:
        return child_logger(self.life.name)

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

    def handle_control(self, msg: Message) -> None:
        life = self.life
        if msg.handle == Handle.READY:
            life.note(said_ready=True)
        elif msg.handle == Handle.RESULT:
            try:
                ok, value = _wire.decode(msg)
            except (WireError, ValueError, TypeError) as exc:
                life.note(outcome=(False, WireError(f"malformed result: {exc}")))
            else:
                failure = None if ok else rebuild(value, trusted=msg.is_pickle)
                life.note(outcome=(True, value) if ok else (False, failure))
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
                pid=life.pid,
                name=life.name,
                stream="logging",
                created=float(created),
                exc_text=exc_text,
                extra={"child_logger": logger_name},
            )


class Supervisor:
    """Owns child processes; made by :func:`open_supervisor`."""

    def __init__(
        self,
        nursery: trio.Nursery,
        router: Router,
        policy: Policy,
        spawner: Callable[..., Awaitable[Spawned]] | None = None,
        max_restarts: int = 3,
        restart_window: float = 5.0,
        trusted: bool = True,
        start: StartOptions | None = None,
    ) -> None:
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, not {max_restarts!r}")
        if not restart_window > 0:
            raise ValueError(f"restart_window must be > 0, not {restart_window!r}")
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        #: Whether children are trusted unless :meth:`start_child` says otherwise.
        self.trusted = trusted
        self._restart_times: collections.deque[float] = collections.deque()
        self._restarts_total = 0
        self._nursery = nursery
        #: A spawner given by the caller (fakes); ``None``: the start methods here.
        self._spawner = spawner
        #: How children start unless told otherwise (see :meth:`start_child`).
        self.start_options = start or StartOptions()
        self._service: trio.Nursery = nursery  # replaced by the shielded one on open
        self._forkservers = ForkServers(nursery, policy)  # replaced on open, as above
        #: Connections to other hosts, made when a child first needs one.
        self._ssh: SSHConnections | None = None
        self._service_done = trio.Event()
        self._router = router
        self.policy = policy
        self._children: dict[int, tuple[Context, OwnedChild]] = {}
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
        return [ctx for ctx, _ in self._children.values()]

    def statistics(self) -> SupervisorStatistics:
        states = [child.state for _, child in self._children.values()]
        return SupervisorStatistics(
            starting=sum(s in (State.SPAWNING, State.CREATED) for s in states),
            running=states.count(State.READY),
            stopping=states.count(State.STOPPING),
            started_total=self._started_total,
            failed_starts=self._failed_starts,
            exited_total=self._exited_total,
            crashed_total=self._crashed_total,
            restarts_total=self._restarts_total,
            fork_servers_started=self._forkservers.started_total,
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
                imported before forking (children with different lists come
                from different fork servers); for a child on another host, the
                modules sent to it ahead of its target. Default the supervisor's.
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
            await self._run_child(ctx, child, blob, start, task_status=task_status)
            while self._should_restart(child.life, restart):
                self._count_restart(child.life)
                child.lineage.renew()
                ctx.reopen_inboxes()
                try:
                    await self._run_child(
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

    # -- one child's life ------------------------------------------------

    async def _run_child(
        self,
        ctx: Context,
        child: OwnedChild,
        blob: bytes,
        start: StartOptions,
        *,
        task_status: trio.TaskStatus[Context],
    ) -> None:
        """Run one incarnation of a child, in the supervisor's nursery.

        Its pipes, link and exit are watched by tasks in the supervisor's shielded
        service nursery, so that however this task ends (even cancelled) the
        child's last logs and result are still read while it is wound down here.
        """
        run = _Incarnation(child.life, start.isolation)
        life = run.life
        life.started_at = trio.current_time()
        route: Route | None = None
        process: ChildProcess | None = None
        drained: trio.Event | None = None
        boot_failure: _BootFailed | None = None
        try:
            try:
                spawned = await self._spawn_process(life, start)
                process = spawned.process
                life.note(pid=process.pid, process=process)
                drained = _start_pipes(self._service, run, process)
                self._service.start_soon(_watch_exit, process, life)
                route = await self._boot(ctx, run, spawned, blob)
            except _BootFailed as exc:
                boot_failure = exc
            else:
                if self._spawner is None:
                    life.note(isolation=observe(process.pid, start.isolation))
                life.advance(State.READY)
                task_status.started(ctx)
                await life.wait_until(lambda: life.must_stop)
        finally:
            with trio.CancelScope(shield=True):
                await self._wind_down(child, run, process, drained)
                await self._finish(run, route)
        if boot_failure is not None:
            detail = boot_failure.detail
            last_error = _last_error_line(life.stderr_tail)
            if last_error:
                detail += f"; it said: {last_error}"
            raise ChildStartError(
                life.name, ctx.id, life.returncode, tuple(life.stderr_tail), detail
            ) from boot_failure.__cause__

    async def _wind_down(
        self,
        child: OwnedChild,
        run: _Incarnation,
        process: ChildProcess | None,
        drained: trio.Event | None,
    ) -> None:
        """Stop the process (gracefully if it booted), reap it, close its link and pipes."""
        life = run.life
        if process is not None:
            if life.said_ready and process.returncode is None and not life.kill_requested:
                life.advance(State.STOPPING)
                self._note_link_fault(run)
                await child.send_shutdown()
                returncode = await escalate(
                    process,
                    grace_period=life.policy.grace_period,
                    kill_after=life.policy.kill_after,
                )
            else:
                if life.said_ready:
                    life.advance(State.STOPPING)
                else:
                    self._failed_starts += 1
                    life.shutdown_sent = True
                returncode = await kill_and_reap(process)
            life.note(returncode=returncode)
            error = life.outcome[1] if life.outcome and life.target_failed else None
            reached = limit_reached(run.isolation, returncode, error)
            if reached is not None:
                life.note(fault=reached)
        if life.link is not None:
            if life.said_ready:
                # What the child sent before it exited (its result, its last log
                # records) may still be in the socket: let the reader take it first.
                with trio.move_on_after(life.policy.drain_timeout):
                    await life.wait_until(lambda: life.link_done)
            await life.link.aclose()
        if drained is not None:
            with trio.move_on_after(life.policy.drain_timeout):
                await drained.wait()
        # A process the child started may still hold its pipes: stop reading them.
        run.cancel_pumps()

    async def _launch(self, *, debug_sleep: float | None, start: StartOptions) -> Spawned:
        """The default spawner: a fresh interpreter (here or on another host), or a
        fork from a fork server."""
        if start.via is not None:
            if self._ssh is None:
                self._ssh = SSHConnections(self._service, self.policy)
            return await self._ssh.spawn(start.via, router=self._router, preload=start.preload)
        if start.method == "forkserver":
            return await self._forkservers.spawn(
                start.preload, debug_sleep=debug_sleep, isolation=start.isolation
            )
        return await spawn(debug_sleep=debug_sleep, isolation=start.isolation)

    async def _spawn_process(self, life: Lifecycle, start: StartOptions) -> Spawned:
        debug_sleep = life.debug_sleep or None
        if self._spawner is not None:
            return await self._spawner(debug_sleep=debug_sleep)
        try:
            return await self._launch(debug_sleep=debug_sleep, start=start)
        except ForkServerError as exc:
            self._failed_starts += 1
            raise _BootFailed(f"its fork server failed: {exc.detail}") from exc
        except SSHError as exc:
            self._failed_starts += 1
            raise _BootFailed(f"its host could not be reached: {exc.detail}") from exc

    async def _boot(self, ctx: Context, run: _Incarnation, spawned: Spawned, blob: bytes) -> Route:
        life = run.life
        policy = life.policy
        router = self._router
        shipping = self._shipping(spawned)
        try:
            with trio.fail_after(policy.ready_timeout + life.debug_sleep):
                if shipping is not None:
                    await shipping.before_link()
                link, _resource = await accept_link(
                    spawned.stream, max_message_size=policy.max_message_size
                )
                life.link = link
                info = ContextInfo(ctx.id, life.name, router.id, life.pid or 0)
                route = await router.add_child_route(link, info, run, trusted=life.trusted)
                life.advance(State.CREATED)
                boot: Bootstrap = Bootstrap(
                    context_id=ctx.id,
                    name=life.name,
                    parent_id=router.id,
                    parent_name=router.name,
                    sys_path=tuple(sys.path),
                    target_blob=blob,
                    log_level=run.logger.getEffectiveLevel(),
                    debug_sleep=life.debug_sleep,
                    max_message_size=policy.max_message_size,
                    siblings_may_talk=router.siblings_may_talk,
                    main_module=main_module_spec(),
                    trusted=life.trusted,
                )
                if shipping is not None:
                    boot = _ship(shipping, boot, route)
                await link.send(_wire.pack(_wire.make(ctx.id, router.id, Handle.BOOTSTRAP, boot)))
                self._service.start_soon(_pump, router, route, life, run.pump_scope())
                await life.wait_until(
                    lambda: life.said_ready or life.link_done or life.stop_requested
                )
        except trio.TooSlowError:
            await _drop_unlinked_stream(life, spawned)
            raise _BootFailed(
                f"not ready within {policy.ready_timeout + life.debug_sleep} s"
            ) from None
        except (HandshakeError, LinkClosed) as exc:
            await _drop_unlinked_stream(life, spawned)
            raise _BootFailed(f"it broke its link while starting: {exc}") from exc
        except BaseException:
            await _drop_unlinked_stream(life, spawned)
            raise
        if life.said_ready:
            return route
        if life.stop_requested:
            raise _BootFailed("it was stopped while starting")
        raise _BootFailed(f"it exited while starting (link closed with code {link.close_code})")

    def _shipping(self, spawned: Spawned) -> Shipping | None:
        """For a child whose runtime is shipped to it: what its parent does for it."""
        if isinstance(spawned, ShippedSpawn):
            return spawned.shipping
        if self._spawner is None:
            return local_shipping(self._router)
        return None

    @staticmethod
    def _note_link_fault(run: _Incarnation) -> None:
        life = run.life
        link = life.link
        if link is None or not link.closed or life.shutdown_sent:
            return
        if link.close_code in (1002, 1003, 1007, 1009):
            run.logger.warning(
                "link closed with code %d (%s); shutting the child down",
                link.close_code,
                link.close_reason,
                extra={"child_name": life.name, "child_pid": life.pid},
            )
            life.note(fault=f"link closed with code {link.close_code}")

    async def _finish(self, run: _Incarnation, route: Route | None) -> None:
        life = run.life
        if route is not None:
            await self._router.remove_route(
                route,
                lambda context_id: ContextDied(
                    life.name, context_id, life.returncode, tuple(life.stderr_tail)
                ),
            )
        life.advance(State.EXITED)
        extra = {"child_name": life.name, "child_pid": life.pid}
        if life.said_ready:
            self._exited_total += 1
            if life.crashed:
                self._crashed_total += 1
                if not life.shutdown_sent or life.returncode not in (0, None):
                    run.logger.warning(
                        "child exited: %s", describe_exit(life.returncode), extra=extra
                    )
        if life.target_failed:
            assert life.outcome is not None
            run.logger.error("target raised %s", life.outcome[1], extra=extra)

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
            for _, child in list(self._children.values()):
                nursery.start_soon(child.aclose)


@asynccontextmanager
async def _closing(start: Callable[[], Awaitable[Context]]) -> AsyncIterator[Context]:
    """Start a context and close it when the block ends."""
    ctx = await start()
    try:
        yield ctx
    finally:
        await ctx.aclose()


def _ship(shipping: Shipping, boot: Bootstrap, route: Route) -> Bootstrap:
    """A shipped child's bootstrap; its link set to send modules ahead of pickles."""
    shipping.attach(route)
    return shipping.bootstrap(boot)


class _BootFailed(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


_ERROR_LINE = re.compile(r"^[\s|]*((?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception)\b.*)$")


def _last_error_line(tail: Iterable[str]) -> str | None:
    """The last ``SomeError: message`` line a child wrote to stderr, if any."""
    found = None
    for line in tail:
        match = _ERROR_LINE.match(line)
        if match:
            found = match.group(1)
    return found


async def _drop_unlinked_stream(life: Lifecycle, spawned: Spawned) -> None:
    # Before the handshake completes, the link does not own the stream yet.
    if life.link is None:
        await trio.aclose_forcefully(spawned.stream)


async def _watch_exit(process: ChildProcess, life: Lifecycle) -> None:
    """Note when the process exits (the runner reaps it)."""
    await process.wait()
    life.note(process_exited=True)


def _start_pipes(service: trio.Nursery, run: _Incarnation, process: ChildProcess) -> trio.Event:
    """Log the child's stdout and stderr; the event is set when both reach EOF."""
    drained = trio.Event()
    remaining = [0]

    async def pump(pipe: trio.abc.ReceiveStream, level: int, stream: str, tail: Any) -> None:
        try:
            with run.pump_scope():
                await pump_lines(
                    pipe,
                    logger=run.logger,
                    level=level,
                    name=run.life.name,
                    pid=run.life.pid,
                    stream=stream,
                    tail=tail,
                )
        finally:
            remaining[0] -= 1
            if remaining[0] == 0:
                drained.set()

    for pipe, level, stream, tail in (
        (process.stdout, logging.INFO, "stdout", None),
        (process.stderr, logging.WARNING, "stderr", run.life.stderr_tail),
    ):
        if pipe is not None:
            remaining[0] += 1
            service.start_soon(pump, pipe, level, stream, tail)
    if remaining[0] == 0:
        drained.set()
    return drained


async def _pump(router: Router, route: Route, life: Lifecycle, scope: trio.CancelScope) -> None:
    try:
        with scope:
            await router.pump(route)
    finally:
        life.note(link_done=True)


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
            for the main script or module); the server starts at once, so that
            one that fails to import fails here.
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
    router = current_router()
    if not siblings_may_talk:
        router.siblings_may_talk = False
    with unwrap_sole_exception():
        async with trio.open_nursery() as nursery:
            supervisor = Supervisor(
                nursery,
                router,
                policy or Policy(),
                spawner,
                max_restarts=max_restarts,
                restart_window=restart_window,
                trusted=not router.data_only if trusted is None else trusted,
                start=start,
            )
            supervisor._service = await nursery.start(supervisor._host_services)
            supervisor._forkservers = ForkServers(supervisor._service, supervisor.policy)
            try:
                if (
                    start.method == "forkserver"
                    and start.preload
                    and start.via is None
                    and spawner is None
                ):
                    # Now, so that a preload that fails to import fails here.
                    await supervisor._forkservers.get(start.preload)
                yield supervisor
            finally:
                with trio.CancelScope(shield=True):
                    await supervisor._close_all()
                    await supervisor._forkservers.aclose()
                    if supervisor._ssh is not None:
                        await supervisor._ssh.aclose()
                supervisor._closed = True
                supervisor._service_done.set()
