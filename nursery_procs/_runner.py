"""One incarnation of a child, from spawning to reaping: the supervisor's runner.

The :class:`Runner` starts the process (by its start method, or through a
spawner the caller gave), boots it over its link, waits while it runs, and winds
it down however its life ends: SHUTDOWN, grace period, SIGTERM, SIGKILL, reap,
then the link and pipes. Every fact about the incarnation goes into its
:class:`~nursery_procs.State`-carrying :class:`Lifecycle`.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import attrs
import trio

from . import _wire
from ._context import Context, OwnedChild
from ._errors import (
    ChildStartError,
    ContextDied,
    ForkServerError,
    HandshakeError,
    LinkClosed,
    SSHError,
    WireError,
)
from ._forkserver import ForkServers
from ._isolation import Isolation, limit_reached, observe
from ._lifecycle import Lifecycle, State
from ._link import accept_link
from ._module_server import ShippedSpawn, Shipping, local_shipping
from ._process import (
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
from ._router import ContextInfo, Route, Router
from ._spec import Bootstrap, main_module_spec
from ._ssh_connections import SSHConnections
from ._stdio import child_logger, emit, pump_lines
from ._wire import Handle, Message


@attrs.define(eq=False)
class Incarnation:
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


class Runner:
    """Runs the incarnations of a supervisor's children, and counts how they end.

    Args:
        router: this process's router.
        service: the shielded nursery where children's pipes and links are read.
        forkservers: the supervisor's fork servers.
        spawner: a spawner given by the caller (fakes); ``None``: the start methods.
        policy: the supervisor's policy (for its connections to other hosts).
    """

    def __init__(
        self,
        router: Router,
        service: trio.Nursery,
        forkservers: ForkServers,
        spawner: Callable[..., Awaitable[Spawned]] | None,
        policy: Policy,
    ) -> None:
        self.router = router
        self.service = service
        self.forkservers = forkservers
        self.spawner = spawner
        self.policy = policy
        #: Connections to other hosts, made when a child first needs one.
        self.connections: SSHConnections | None = None
        #: Children that failed to start.
        self.failed_starts = 0
        #: Children that exited after being ready ...
        self.exited_total = 0
        #: ... and among them, those whose exit was not clean.
        self.crashed_total = 0

    async def run(
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
        run = Incarnation(child.life, start.isolation)
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
                drained = _start_pipes(self.service, run, process)
                self.service.start_soon(_watch_exit, process, life)
                route = await self._boot(ctx, run, spawned, blob)
            except _BootFailed as exc:
                boot_failure = exc
            else:
                if self.spawner is None:
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
        run: Incarnation,
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
                    self.failed_starts += 1
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
            if self.connections is None:
                self.connections = SSHConnections(self.service, self.policy)
            return await self.connections.spawn(
                start.via, router=self.router, preload=start.preload
            )
        if start.method == "forkserver":
            return await self.forkservers.spawn(
                start.preload, debug_sleep=debug_sleep, isolation=start.isolation
            )
        return await spawn(debug_sleep=debug_sleep, isolation=start.isolation)

    async def _spawn_process(self, life: Lifecycle, start: StartOptions) -> Spawned:
        debug_sleep = life.debug_sleep or None
        if self.spawner is not None:
            return await self.spawner(debug_sleep=debug_sleep)
        try:
            return await self._launch(debug_sleep=debug_sleep, start=start)
        except ForkServerError as exc:
            self.failed_starts += 1
            raise _BootFailed(f"its fork server failed: {exc.detail}") from exc
        except SSHError as exc:
            self.failed_starts += 1
            raise _BootFailed(f"its host could not be reached: {exc.detail}") from exc

    async def _boot(self, ctx: Context, run: Incarnation, spawned: Spawned, blob: bytes) -> Route:
        life = run.life
        policy = life.policy
        router = self.router
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
                self.service.start_soon(_pump, router, route, life, run.pump_scope())
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
        if self.spawner is None:
            return local_shipping(self.router)
        return None

    async def aclose_connections(self) -> None:
        """Close the connections to other hosts (their children are gone)."""
        if self.connections is not None:
            await self.connections.aclose()

    @staticmethod
    def _note_link_fault(run: Incarnation) -> None:
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

    async def _finish(self, run: Incarnation, route: Route | None) -> None:
        life = run.life
        if route is not None:
            await self.router.remove_route(
                route,
                lambda context_id: ContextDied(
                    life.name, context_id, life.returncode, tuple(life.stderr_tail)
                ),
            )
        life.advance(State.EXITED)
        extra = {"child_name": life.name, "child_pid": life.pid}
        if life.said_ready:
            self.exited_total += 1
            if life.crashed:
                self.crashed_total += 1
                if life.kill_requested:  # asked for (kill_on_cancel): no alarm
                    run.logger.info("child %s", life.fault, extra=extra)
                elif not life.shutdown_sent or life.returncode not in (0, None):
                    run.logger.warning(
                        "child exited: %s", describe_exit(life.returncode), extra=extra
                    )
        if life.target_failed:
            assert life.outcome is not None
            run.logger.error("target raised %s", life.outcome[1], extra=extra)


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


def _start_pipes(service: trio.Nursery, run: Incarnation, process: ChildProcess) -> trio.Event:
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
