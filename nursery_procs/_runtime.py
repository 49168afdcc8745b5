"""The child's side: bootstrap from the inherited socket, run the target, obey SHUTDOWN.

Run as ``python -m nursery_procs._child FD PARENT_PID``, or forked by a fork
server (:mod:`nursery_procs._forkserver`), which then runs :data:`FORKED`. The
life of a child, from the moment it has its link (:func:`run_child`):

1. connect the WebSocket link over fd ``FD`` (the child is the client);
2. read the bootstrap spec (id, name, ``sys.path``, target, log level);
3. forward :mod:`logging` to the parent, set the process title, watch the parent;
4. optionally sleep for a debugger, then say READY and run the target inside a
   nursery, serving CALLs from the parent meanwhile;
5. on SHUTDOWN, on the link closing, or when the target returns: cancel, run
   ``finally`` blocks (which close this child's own children), report the
   outcome, close the link with 1000, flush, and ``os._exit``.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final, NoReturn

import trio

from . import _importer, _wire
from ._context import _PARENT, parent_context
from ._errors import HandshakeError, LinkClosed, WireError
from ._forkserver import exercise_link, receive_assignment
from ._isolation import PID1_SIGTERM_STATUS, Isolation, isolate
from ._link import CLOSE_NORMAL, Link, accept_link, connect_link
from ._module_server import attach_runtime
from ._process import DEBUG_SLEEP_ENV
from ._proctree import become_subreaper, end_descendants, kill_tree, reap_children
from ._remote import failed
from ._router import _ROUTER, Route, Router
from ._spec import Bootstrap, dump_target, load_main_module, resolve
from ._stdio import ForwardingHandler
from ._wire import DEFAULT_MAX_MESSAGE_SIZE, Handle, Message

log = logging.getLogger("nursery_procs.runtime")

#: After the parent dies, how long the child's Trio side has to finish cleanly
#: before the watchdog thread ends the process.
ORPHAN_GRACE = 0.5
#: When a child ends, how long the processes it started have, after SIGTERM,
#: before the rest of its process tree is killed.
DESCENDANT_GRACE = 1.0

#: The exit status this child is ending with, once its Trio run is over.
_ending_with: int | None = None


def child_main(argv: list[str]) -> NoReturn:
    """Entry point of an exec'd child
    (``python -m nursery_procs._child FD PARENT_PID [ISOLATION_JSON]``)."""
    try:
        fd = int(argv[1])
        parent_pid = int(argv[2])
        watched = [parent_pidfd(parent_pid)]
        if len(argv) > 3:
            isolate(Isolation.from_json(json.loads(argv[3])))
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    run_child(fd, watched)


class _Forked:
    """How a fork server's new child runs the runtime (see
    :class:`nursery_procs._forkserver.ChildEntry`), once the fork server has made
    the process clean.

    Its parent is the fork server; its context-tree parent is the master, of which
    it inherited the pidfd *master_pidfd*. It watches both.
    """

    @staticmethod
    def run(link_fd: int, master_pidfd: int, isolation: dict[str, Any] | None) -> NoReturn:
        watched = _watch_forked(master_pidfd)
        if isolation is not None:
            try:
                isolate(Isolation.from_json(isolation))
            except BaseException:
                traceback.print_exc()
                os._exit(1)
        run_child(link_fd, watched)

    @staticmethod
    def run_spare(channel_fd: int, master_pidfd: int) -> NoReturn:
        """Start Trio now and wait for a request: the slow part of a child's start
        is done before anyone asks for it."""
        run_child(channel_fd, _watch_forked(master_pidfd), spare=True)

    @staticmethod
    def rehearse() -> None:
        """Run :data:`REHEARSALS` whole child sessions in the fork server (see
        :func:`rehearsal`)."""
        if _importer.installed() is not None:
            return  # a shipped runtime: its importer must not learn a rehearsal's router
        for _ in range(REHEARSALS):
            trio.run(rehearsal)


FORKED: Final = _Forked()


def _watch_forked(master_pidfd: int) -> list[int]:
    try:
        return [master_pidfd, parent_pidfd(os.getppid())]
    except BaseException:
        traceback.print_exc()
        os._exit(1)


def parent_pidfd(parent_pid: int) -> int:
    """A pidfd on this process's parent; ends the process if the parent is gone.

    The second look at the parent pid closes the race where the parent died (and
    its pid was reused) before the pidfd was opened.
    """
    try:
        pidfd = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        os._exit(70)
    if os.getppid() != parent_pid:
        os._exit(70)
    return pidfd


def run_child(fd: int, watched: list[int], *, spare: bool = False) -> NoReturn:
    """Run the child's side on its link, fd *fd*, then ``os._exit``; never returns.

    Everything a child does once it has its link is here, whether it was exec'd
    or forked. *watched* are pidfds of processes whose death orphans this one.
    A *spare* (forked ahead by a fork server) first waits on channel *fd* for its
    link.

    No process this child starts outlives it: it adopts their orphans (child
    subreaper), and ends them all however it ends itself (its run is over,
    SIGTERM, or its parent died).
    """

    def main() -> int:
        os.set_inheritable(fd, False)
        if spare:
            return trio.run(_run_spare, fd, watched)
        _start_orphan_watchdog(watched)
        return trio.run(_run, fd)

    run_process(main)


def run_process(main: Callable[[], int]) -> NoReturn:
    """Run *main* (a child's Trio run, returning its exit status) as every child
    runs, however it got its link: a child subreaper whose SIGTERM ends its
    descendants first, output flushed, and every descendant ended before it
    exits. Never returns."""
    code = 1
    try:
        become_subreaper()
        signal.signal(signal.SIGTERM, _on_sigterm)
        for stream in (sys.stdout, sys.stderr):
            reconfigure = getattr(stream, "reconfigure", None)
            if reconfigure is not None:
                reconfigure(line_buffering=True)
        code = main()
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        _flush()
    _end(code)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _end(code: int) -> NoReturn:
    """End every descendant, then this process with *code*."""
    global _ending_with
    _ending_with = code
    try:
        end_descendants(DESCENDANT_GRACE)
    except BaseException:
        traceback.print_exc()
    # Skip interpreter teardown: the work is done and it costs ~20 ms per child.
    os._exit(code)


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM: end the descendants, then die of SIGTERM as without this handler
    (or, if the run was already over, hurry: kill them and exit as planned)."""
    if _ending_with is not None:
        kill_tree(os.getpid(), include_root=False)
        reap_children(block=True)
        os._exit(_ending_with)
    end_descendants(DESCENDANT_GRACE)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    # Only pid 1 of a PID namespace gets here (it ignores signals it sends itself):
    # its relay turns this status back into death by SIGTERM.
    os._exit(PID1_SIGTERM_STATUS)


def _start_orphan_watchdog(watched: list[int]) -> None:
    """End this process if a watched process dies (the master, or the fork server
    that forked it), even if the Trio thread is stuck.

    Not ``PR_SET_PDEATHSIG``: it fires when the *thread* that spawned us exits, and
    Trio spawns from worker threads that come and go. Pidfds watch processes.
    """
    start_watchdog(lambda: select.select(watched, [], []))


def start_watchdog(orphaned: Callable[[], object]) -> None:
    """End this process :data:`ORPHAN_GRACE` seconds after *orphaned* (run in a
    thread of its own) returns, even if the Trio thread is stuck."""

    def watch() -> None:
        orphaned()
        time.sleep(ORPHAN_GRACE)
        # Whatever the Trio side did not finish, nothing this child started
        # survives it: freeze and kill the whole tree below, then this process.
        kill_tree(os.getpid(), include_root=False)
        os.kill(os.getpid(), signal.SIGKILL)
        os._exit(128 + signal.SIGKILL)  # pid 1 of a namespace ignores its own SIGKILL

    threading.Thread(target=watch, name="nursery_procs orphan watchdog", daemon=True).start()


async def _run_spare(channel_fd: int, watched: list[int]) -> int:
    # Everything that does not depend on the request is done before it comes:
    # the watchdog, and a first use of the link's code, whose pages this process
    # copies from the fork server's now rather than when someone waits.
    _start_orphan_watchdog(watched)
    _set_title("(spare)")
    await exercise_link()
    link_fd = await receive_assignment(channel_fd)
    if link_fd is None:
        return 0  # the fork server closed before this spare was needed
    return await _run(link_fd)


#: How many sessions the fork server rehearses. Python 3.11 specialises a function's
#: code in place once it has run a few times; code specialised in the fork server
#: stays shared, code a child specialises is copied into it (measured: a forked
#: child's idle USS falls with the count and stops falling at about ten).
REHEARSALS: Final = 10


async def rehearsal() -> None:
    """One child session within this process: the child's side as every child runs
    it (:func:`serve_stream`) on one end of a socket pair, and on the other end the
    parent's messages: the bootstrap of a child with no target, three calls
    answered on the loop, SHUTDOWN, and the close.

    Calls run on the loop, so that no thread is started. What the child's side
    sets for the whole process (logging, the process title) is put back.
    """
    ours, theirs = trio.socket.socketpair()
    with _process_state_restored():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_stream, trio.SocketStream(theirs))
            link, _resource = await accept_link(trio.SocketStream(ours))
            await _play_parent(link)


async def _play_parent(link: Link) -> None:
    boot = Bootstrap(
        context_id=1,
        name="rehearsal",
        parent_id=0,
        parent_name="fork server",
        sys_path=tuple(sys.path),
        target_blob=dump_target(None, ()),
        log_level=logging.WARNING,
        debug_sleep=0.0,
        max_message_size=DEFAULT_MAX_MESSAGE_SIZE,
        siblings_may_talk=False,
    )
    await link.send(_wire.pack(_wire.make(1, 0, Handle.BOOTSTRAP, boot)))
    ready = _wire.unpack(await link.receive())
    if ready.handle != Handle.READY:
        raise WireError(f"rehearsal: expected READY, got handle {ready.handle}")
    for reply_to in range(100, 103):
        call: tuple[object, ...] = (int, (reply_to,), {}, True)
        await link.send(_wire.pack(_wire.make(1, 0, Handle.CALL, call, reply_to)))
        answer = _wire.decode(_wire.unpack(await link.receive()))
        if answer != (True, reply_to):
            raise WireError(f"rehearsal: a call was answered {answer!r}")
    await link.send(_wire.pack(_wire.make_data(1, 0, Handle.SHUTDOWN, None)))
    try:
        while True:
            await link.receive()  # the outcome, then the close
    except LinkClosed:
        pass


@contextmanager
def _process_state_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level, last_resort = list(root.handlers), root.level, logging.lastResort
    title = _title()
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        logging.lastResort = last_resort
        if title is not None:
            _set_title(title, prefix="")


async def _run(fd: int) -> int:
    sock = socket.socket(fileno=fd)
    return await serve_stream(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))


async def serve_stream(stream: trio.abc.Stream) -> int:
    """Be a child over *stream* (its link to the parent): read the bootstrap, run
    the target, and return the exit status once the link is closed."""
    try:
        link = await connect_link(stream, resource="/nursery-procs/child")
    except HandshakeError as exc:
        # Most often the parent gave this start up (a closing pool, a cancelled
        # start) and hung up: one line says so, no traceback.
        print(f"nursery_procs child: no link to the parent: {exc}", file=sys.stderr)
        await trio.aclose_forcefully(stream)
        return 1
    try:
        first = _wire.unpack(await link.receive())
        if first.handle != Handle.BOOTSTRAP:
            raise WireError(f"expected BOOTSTRAP, got handle {first.handle}")
        boot: Bootstrap = _wire.decode(first)
    except (LinkClosed, WireError) as exc:
        print(f"nursery_procs child: bad bootstrap: {exc}", file=sys.stderr)
        await link.aclose(1002, "bad bootstrap")
        return 1
    return await _serve(link, boot)


def _adopt_sys_path(paths: tuple[str, ...]) -> None:
    # The parent's path first, so targets import the same modules as there.
    sys.path[:] = list(dict.fromkeys([*paths, *sys.path]))


def _install_logging(boot: Bootstrap) -> ForwardingHandler:
    handler = ForwardingHandler(trio.lowlevel.current_trio_token())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(boot.log_level)
    logging.lastResort = None
    return handler


def _set_title(name: str, *, prefix: str = "nursery_procs: ") -> None:
    try:
        import setproctitle  # optional dependency: names children in ps and top
    except ImportError:
        return
    setproctitle.setproctitle(f"{prefix}{name}")


def _title() -> str | None:
    try:
        import setproctitle
    except ImportError:
        return None
    return setproctitle.getproctitle()


async def _send_logs(
    router: Router, parent_id: int, handler: ForwardingHandler, done: trio.Event
) -> None:
    """The one task that sends log records, in order; it ends after ``handler.closing``."""
    try:
        while True:
            await handler.wakeup.wait()
            handler.wakeup = trio.Event()
            while handler.queue:
                record = handler.queue[0]
                if not await router.send_or_drop(
                    _wire.make_data(parent_id, router.id, Handle.LOG, record)
                ):
                    handler.queue.clear()
                    return
                handler.queue.popleft()
            if handler.closing:
                return
    finally:
        done.set()


async def _close_logs(handler: ForwardingHandler, done: trio.Event) -> None:
    handler.closing = True
    handler.wakeup.set()
    await done.wait()


async def _serve(link: Link, boot: Bootstrap) -> int:
    _adopt_sys_path(boot.sys_path)
    link.max_message_size = boot.max_message_size
    router = Router(boot.context_id, boot.name, siblings_may_talk=boot.siblings_may_talk)
    router.data_only = not boot.trusted
    _ROUTER.set(router)
    route = router.set_parent(link, boot.parent_id)
    _PARENT.set(parent_context(router, boot.parent_id, boot.parent_name))
    handler = _install_logging(boot)
    _set_title(boot.name)
    main_scope = trio.CancelScope()
    exit_code = 0
    outcome: tuple[bool, Any] = (True, None)

    async with trio.open_nursery() as nursery:

        def on_shutdown(msg: Message, from_route: Route | None) -> None:
            if from_route is route:
                main_scope.cancel()

        def on_call(msg: Message, from_route: Route | None) -> Awaitable[None]:
            if from_route is not route:
                return router.send_dead(msg, "calls are only accepted from the parent")
            return _answer_call(router, msg, nursery)

        router.add_handler(Handle.SHUTDOWN, on_shutdown)
        router.add_handler(Handle.CALL, on_call)
        attach_runtime(router, route, nursery, boot.modules)

        async def pump_parent() -> None:
            await router.pump(route)
            # The parent is gone or closed the link: stop everything here too.
            main_scope.cancel()

        nursery.start_soon(pump_parent)
        logs_done = trio.Event()
        nursery.start_soon(_send_logs, router, boot.parent_id, handler, logs_done)

        with main_scope:
            target, args = _load_target(boot)
            if boot.debug_sleep > 0:
                message = (
                    f"child {boot.name!r} pid {os.getpid()} sleeping {boot.debug_sleep} s "
                    f"for a debugger ({DEBUG_SLEEP_ENV})"
                )
                print(message, file=sys.stderr, flush=True)
                await trio.sleep(boot.debug_sleep)
            await router.send(_wire.make_data(boot.parent_id, router.id, Handle.READY, os.getpid()))
            try:
                if target is None:
                    await trio.sleep_forever()
                result = target(*args)
                if hasattr(result, "__await__"):
                    result = await result
                outcome = (True, result)
            except Exception as exc:
                logging.getLogger("nursery_procs.runtime").error(
                    "target %r raised", getattr(target, "__qualname__", target), exc_info=True
                )
                outcome = failed(exc, data_only=router.data_only)
                exit_code = 1
        # Report and close, under a shield: a shutdown must not lose the tail.
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + 2.0
            await _close_logs(handler, logs_done)
            await _report(router, boot.parent_id, outcome)
            await link.aclose(CLOSE_NORMAL, "child exiting")
        nursery.cancel_scope.cancel()
    return exit_code


async def _report(router: Router, parent_id: int, outcome: tuple[bool, Any]) -> None:
    """Send the target's outcome (or why it cannot be sent) to the parent."""
    data_only = router.data_only
    try:
        msg = _wire.make(parent_id, router.id, Handle.RESULT, outcome, data_only=data_only)
    except WireError as exc:
        failure = failed(exc, data_only=data_only)
        msg = _wire.make(parent_id, router.id, Handle.RESULT, failure, data_only=data_only)
    if not await router.send_or_drop(msg):
        log.debug("the outcome could not be sent: the parent is gone")


def _load_target(boot: Bootstrap) -> tuple[Any, tuple[Any, ...]]:
    main_module = boot.main_module
    if main_module is not None:
        _wire.set_main_loader(lambda: load_main_module(main_module))
    target, args = _wire.loads(boot.target_blob)
    if target is not None:
        target = resolve(target)
    return target, tuple(args)


async def _answer_call(router: Router, msg: Message, nursery: trio.Nursery) -> None:
    try:
        fn, args, kwargs, *options = _wire.decode(msg)
        function = resolve(fn)
    except Exception as exc:
        await router.answering.reply(msg, failed(exc, data_only=router.data_only))
        return
    inline = bool(options and options[0])
    await router.answering.answer_soon(
        msg, function, nursery, (tuple(args), dict(kwargs)), inline=inline
    )
