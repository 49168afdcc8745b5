"""A fake child process for fake-clock tests of timing policy.

The "child" runs as a task of the test's own Trio run and speaks the real link
protocol over :func:`trio.testing.memory_stream_pair`, so the supervisor code
under test is the real one; only the operating system's process is faked.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import itertools
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import trio.testing

from .. import _wire
from .._errors import HandshakeError, LinkClosed
from .._groups import unwrap_sole_exception
from .._link import CLOSE_NORMAL, Link, connect_link
from .._process import Spawned
from .._remote import failed
from .._supervisor import Supervisor, open_supervisor
from .._wire import Handle, Message

_pids = itertools.count(900_000)


class FakeBehaviour(enum.Enum):
    """How a fake child reacts to being stopped."""

    #: Exits with status 0 on SHUTDOWN.
    OBEY = "obey"
    #: Ignores SHUTDOWN; dies on SIGTERM.
    IGNORE_SHUTDOWN = "ignore-shutdown"
    #: Ignores SHUTDOWN and SIGTERM; dies on SIGKILL.
    IGNORE_SIGTERM = "ignore-sigterm"
    #: Exits with status 1 before saying READY.
    CRASH_ON_BOOT = "crash-on-boot"
    #: Never says READY (and ignores everything but SIGKILL).
    HANG_ON_BOOT = "hang-on-boot"
    #: Says READY, then after ``lifetime`` seconds exits with status 1.
    CRASH_AFTER_READY = "crash-after-ready"
    #: Says READY, then after ``lifetime`` seconds reports a result and exits 0.
    EXIT_AFTER_READY = "exit-after-ready"


@attrs.define(eq=False)
class FakeProcess:
    """Stands in for :class:`trio.Process`: records signals with their (fake) times."""

    behaviour: FakeBehaviour
    pid: int = attrs.field(factory=lambda: next(_pids))
    returncode: int | None = None
    #: ``(signal number, trio.current_time())`` for every signal sent.
    signals: list[tuple[int, float]] = attrs.field(factory=list)
    lifetime: float = 0.0
    #: ``trio.current_time()`` when the spawner made this process.
    spawned_at: float = attrs.field(factory=trio.current_time)
    stdout: None = None
    stderr: None = None
    exited: trio.Event = attrs.field(factory=trio.Event)

    async def wait(self) -> int:
        await self.exited.wait()
        assert self.returncode is not None
        return self.returncode

    def exit(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
            self.exited.set()

    def terminate(self) -> None:
        self.signals.append((signal.SIGTERM, trio.current_time()))
        if self.behaviour is not FakeBehaviour.IGNORE_SIGTERM and (
            self.behaviour is not FakeBehaviour.HANG_ON_BOOT
        ):
            self.exit(-signal.SIGTERM)

    def kill(self) -> None:
        self.signals.append((signal.SIGKILL, trio.current_time()))
        self.exit(-signal.SIGKILL)

    def poll_exited(self) -> bool:
        return self.returncode is not None


Spawner = Callable[..., Awaitable[Spawned]]
#: How a fake child answers ``ctx.call(fn, *args)``: called with ``fn`` (a function
#: or a ``"module:function"`` string) and the arguments; may be async.
CallAnswer = Callable[[Any, tuple[Any, ...]], Any]
#: How a fake child answers ``ctx.request(obj)``: called with ``obj``; may be async.
RequestAnswer = Callable[[Any], Any]


@attrs.frozen
class FakeAnswers:
    """How fake children answer calls and requests (``None``: they refuse them)."""

    call: CallAnswer | None = None
    request: RequestAnswer | None = None


def fake_spawner(
    nursery: trio.Nursery,
    behaviour: FakeBehaviour = FakeBehaviour.OBEY,
    processes: list[FakeProcess] | None = None,
    lifetime: float = 0.0,
    answers: FakeAnswers | None = None,
    boot_delay: float = 0.0,
) -> Spawner:
    """A ``spawner`` for :func:`open_supervisor` that starts fake children in *nursery*.

    Every :class:`FakeProcess` made is appended to *processes* if given.
    *lifetime* is how long a ``CRASH_AFTER_READY`` or ``EXIT_AFTER_READY`` child
    lives after READY. *answers* says how the children answer calls and requests
    (in this Trio run, so on its clock); a cancelled call cancels its answer.
    *boot_delay* is how long each spawn takes before the child exists, as a real
    interpreter's start-up and imports do.
    """

    async def spawn(*, debug_sleep: float | None = None) -> Spawned:
        process = FakeProcess(behaviour, lifetime=lifetime)
        if boot_delay:
            await trio.sleep(boot_delay)
        ours, theirs = trio.testing.memory_stream_pair()
        if processes is not None:
            processes.append(process)
        nursery.start_soon(_run_fake_child, theirs, process, answers or FakeAnswers())
        return Spawned(process, ours)

    return spawn


async def _run_fake_child(
    stream: trio.abc.Stream, process: FakeProcess, answers: FakeAnswers
) -> None:
    async with trio.open_nursery() as nursery:

        async def die_with_process() -> None:
            await process.exited.wait()
            # A dead process's socket closes: so does the fake's stream.
            await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()

        nursery.start_soon(die_with_process)
        try:
            await _fake_child_protocol(stream, process, answers)
        except (LinkClosed, HandshakeError):
            pass
        if process.behaviour in (FakeBehaviour.OBEY, FakeBehaviour.CRASH_ON_BOOT):
            process.exit(0 if process.behaviour is FakeBehaviour.OBEY else 1)
        await process.exited.wait()


async def _fake_child_protocol(
    stream: trio.abc.Stream, process: FakeProcess, answers: FakeAnswers
) -> None:
    link = await connect_link(stream)
    boot = _wire.decode(_wire.unpack(await link.receive()))
    if process.behaviour is FakeBehaviour.CRASH_ON_BOOT:
        await link.aclose()
        return
    if process.behaviour is FakeBehaviour.HANG_ON_BOOT:
        await trio.sleep_forever()
    me, parent = boot.context_id, boot.parent_id
    await link.send(_wire.pack(_wire.make(parent, me, Handle.READY, process.pid)))
    if process.behaviour in (FakeBehaviour.CRASH_AFTER_READY, FakeBehaviour.EXIT_AFTER_READY):
        await trio.sleep(process.lifetime)
        if process.behaviour is FakeBehaviour.EXIT_AFTER_READY:
            await link.send(_wire.pack(_wire.make(parent, me, Handle.RESULT, (True, None))))
            await link.aclose(CLOSE_NORMAL, "fake child done")
            process.exit(0)
        else:
            process.exit(1)
        return
    async with trio.open_nursery() as work:
        answering: dict[int, trio.CancelScope] = {}
        while True:
            try:
                msg = _wire.unpack(await link.receive())
            except LinkClosed:
                work.cancel_scope.cancel()
                return
            if msg.handle == Handle.SHUTDOWN and process.behaviour is FakeBehaviour.OBEY:
                work.cancel_scope.cancel()
                await link.send(_wire.pack(_wire.make(parent, me, Handle.RESULT, (True, None))))
                await link.aclose(CLOSE_NORMAL, "fake child exiting")
                return
            if msg.handle in (Handle.CALL, Handle.REQUEST):
                work.start_soon(_answer, link, msg, answers, answering)
            elif msg.handle == Handle.CANCEL:
                scope = answering.get(int(_wire.decode(msg)))
                if scope is not None:
                    scope.cancel()


async def _answer(
    link: Link, msg: Message, answers: FakeAnswers, answering: dict[int, trio.CancelScope]
) -> None:
    """Answer one call or request the way the test said, as a real child would."""
    outcome: tuple[Any, Any] = (None, "cancelled")
    with trio.CancelScope() as scope:
        answering[msg.reply_to] = scope
        try:
            payload = _wire.decode(msg)
            if msg.handle == Handle.CALL:
                if answers.call is None:
                    raise RuntimeError("this fake child was given no answer for calls")
                result = answers.call(payload[0], tuple(payload[1]))
            else:
                if answers.request is None:
                    raise RuntimeError("this fake child was given no answer for requests")
                result = answers.request(payload)
            if inspect.isawaitable(result):
                result = await result
            outcome = (True, result)
        except Exception as exc:
            outcome = failed(exc)
        finally:
            del answering[msg.reply_to]
    reply = _wire.make(msg.src_id, msg.dst_id, msg.reply_to, outcome)
    with contextlib.suppress(LinkClosed):
        await link.send(_wire.pack(reply))


@asynccontextmanager
async def open_fake_supervisor(
    behaviour: FakeBehaviour = FakeBehaviour.OBEY,
    *,
    lifetime: float = 0.0,
    boot_delay: float = 0.0,
    call: CallAnswer | None = None,
    request: RequestAnswer | None = None,
    **options: Any,
) -> AsyncIterator[tuple[Supervisor, list[FakeProcess]]]:
    """:func:`open_supervisor` whose children are fakes, and the list of their processes.

    *call* and *request* say how the fake children answer ``ctx.call(fn, *args)``
    (``call(fn, args)``) and ``ctx.request(obj)`` (``request(obj)``); either may
    be async, and runs on the test's clock, so a test can check its own timeouts
    and cancellations. Exceptions they raise reach the caller as from a real
    child. *lifetime* and *boot_delay* are those of :func:`fake_spawner`.
    *options* go to :func:`open_supervisor` (``policy``, ``max_restarts``, ...).
    Meant for ``autojump_clock`` tests of timing policy. An exception from the
    block (or from the supervisor) propagates as itself.
    """
    processes: list[FakeProcess] = []
    done = trio.Event()

    async def host(*, task_status: trio.TaskStatus[trio.Nursery]) -> None:
        # Like real processes, fakes are not cancelled by the test's scopes: the
        # supervisor has to shut them down.
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as fakes:
                task_status.started(fakes)
                await done.wait()

    with unwrap_sole_exception():
        async with trio.open_nursery() as outer:
            fakes: trio.Nursery = await outer.start(host)
            try:
                spawner = fake_spawner(
                    fakes,
                    behaviour,
                    processes,
                    lifetime=lifetime,
                    answers=FakeAnswers(call=call, request=request),
                    boot_delay=boot_delay,
                )
                async with open_supervisor(spawner=spawner, **options) as supervisor:
                    yield supervisor, processes
            finally:
                done.set()
