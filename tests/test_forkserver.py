"""Children forked from a fork server: what they do not inherit, and every fault."""

from __future__ import annotations

import collections
import logging
import os
import signal
import threading
from pathlib import Path

import forkserver_prepare
import process_targets
import pytest
import setproctitle
import targets
import trio
import trio.testing
from programs import run_script

import nursery_procs
from nursery_procs import ChildStartError, ContextDied, ForkServerError, Policy, State, _runtime
from nursery_procs.testing import wait_process_gone

SCRIPTS = Path(__file__).parent / "scripts"
FORK = {"start_method": "forkserver"}
EXEC = {"start_method": "exec"}
PRELOAD = ["forkserver_preload"]


def _kind(target: str) -> str:
    for kind in ("pipe", "socket", "pidfd"):
        if target.startswith(kind):
            return kind
    return target


def _title_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()


def _children_of(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


# -- what a forked child does not inherit ----------------------------------


async def test_a_forked_child_holds_only_its_own_descriptors() -> None:
    async with nursery_procs.open_supervisor(**EXEC) as sup:
        exec_child = await sup.start_child(None, name="exec")
        exec_fds = await exec_child.call(process_targets.fd_table)
        # Other children first, so that the fork server has held their link ends,
        # pipes and pidfds; and a preload module that keeps a file open.
        others = [
            await sup.start_child(None, start_method="forkserver", preload=PRELOAD)
            for _ in range(2)
        ]
        forked = await sup.start_child(None, start_method="forkserver", preload=PRELOAD)
        forked_fds = await forked.call(process_targets.fd_table)
        server_pid = await forked.call(process_targets.parent_pid)
        assert server_pid not in (os.getpid(), *[o.pid for o in others])
    # The same kinds of descriptor as an exec'd child, and one pidfd more: the
    # fork server, which it watches as well as the master.
    exec_kinds = collections.Counter(_kind(t) for t in exec_fds.values())
    forked_kinds = collections.Counter(_kind(t) for t in forked_fds.values())
    assert forked_kinds == exec_kinds + collections.Counter({"pidfd": 1})
    pidfds = sorted(t for t in forked_fds.values() if t.startswith("pidfd"))
    assert pidfds == sorted([f"pidfd {os.getpid()}", f"pidfd {server_pid}"])
    assert forked_fds[0] == "/dev/null"
    assert not any("forkserver_preload" in t for t in forked_fds.values())


async def test_forked_children_get_fresh_random_state() -> None:
    async with nursery_procs.open_supervisor(**FORK) as sup:
        first = await sup.start_child(None)
        second = await sup.start_child(None)
        a = await first.call(process_targets.random_numbers)
        b = await second.call(process_targets.random_numbers)
    assert a != b


async def test_signal_handlers_and_mask_are_those_of_an_exec_child() -> None:
    async with nursery_procs.open_supervisor(**EXEC) as sup:
        exec_child = await sup.start_child(None)
        forked = await sup.start_child(None, start_method="forkserver", preload=PRELOAD)
        expected = await exec_child.call(process_targets.signal_state)
        handlers, blocked = await forked.call(process_targets.signal_state)
    # The preload module set SIGUSR1's handler, ignored SIGHUP, blocked SIGUSR2.
    assert handlers[signal.SIGUSR1] == "default"
    assert handlers[signal.SIGHUP] == "default"
    assert signal.SIGUSR2 not in blocked
    assert (handlers, blocked) == expected


async def test_logging_handlers_and_locks_are_reset(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nursery_procs.child.logger")
    async with nursery_procs.open_supervisor(**FORK, preload=PRELOAD) as sup:
        ctx = await sup.start_child(None, name="logger")
        root, preloaded, lock_free = await ctx.call(process_targets.logging_state)
    # Only the runtime's own handler; the preloaded module's are gone; the lock
    # the preload module held in the fork server is free in the child.
    assert root == ["ForwardingHandler"]
    assert preloaded == 0
    assert lock_free
    assert "logged from a forked child" in caplog.text


async def test_a_forked_child_sees_none_of_its_siblings(tmp_path: Path) -> None:
    async with nursery_procs.open_supervisor(**FORK) as sup:
        first = await sup.start_child(targets.record_cleanup, str(tmp_path / "first"))
        second = await sup.start_child(None)
        first_fds = await second.call(process_targets.fd_table)
        # The first child's link and pipes live only in the master and in it:
        # closing it ends it at once, though its sibling is still running.
        await first.aclose()
        assert (tmp_path / "first").read_text() == f"clean {first.pid}\n"
        assert first.returncode == 0
        assert await second.call(process_targets.fd_table) == first_fds


async def test_the_rehearsals_in_the_fork_server_leave_nothing_there() -> None:
    async with nursery_procs.open_supervisor(**FORK) as sup:
        ctx = await sup.start_child(None)
        server = await ctx.call(process_targets.parent_pid)
        (_spare,) = set(_children_of(server)) - {ctx.pid}
        kinds = collections.Counter(
            _kind(os.readlink(f"/proc/{server}/fd/{fd}")) for fd in os.listdir(f"/proc/{server}/fd")
        )
        threads = os.listdir(f"/proc/{server}/task")
    # Its control socket and its spare's channel: no socket of a rehearsal is left.
    sockets = sum(n for kind, n in kinds.items() if kind.startswith("socket"))
    assert sockets == 2
    assert len(threads) == 1


async def test_a_rehearsal_puts_back_what_it_changed_in_its_process() -> None:
    root = logging.getLogger()
    before = (list(root.handlers), root.level, logging.lastResort)
    title = setproctitle.getproctitle()
    threads = threading.active_count()
    await _runtime.rehearsal()
    assert (list(root.handlers), root.level, logging.lastResort) == before
    assert setproctitle.getproctitle() == title
    assert threading.active_count() == threads  # calls ran on the loop


# -- same guarantees as exec'd children --------------------------------------


async def test_titles_name_the_children_and_the_fork_server() -> None:
    async with nursery_procs.open_supervisor(**FORK) as sup:
        ctx = await sup.start_child(None, name="titled")
        assert await ctx.call(process_targets.title) == "nursery_procs: titled"
        server = await ctx.call(process_targets.parent_pid)
        assert _title_of(server) == "nursery_procs: fork server"


async def test_the_fork_server_lives_as_long_as_its_supervisor() -> None:
    async with nursery_procs.open_supervisor(**FORK) as sup:
        ctx = await sup.start_child(None)
        server = await ctx.call(process_targets.parent_pid)
        assert sup.statistics().fork_servers_started == 1
        await ctx.aclose()
        # One spare child is forked ahead, waiting for the next request.
        (spare,) = _children_of(server)
    with trio.fail_after(5):
        await wait_process_gone(server)
        await wait_process_gone(spare)


async def test_grandchildren_of_a_forked_child() -> None:
    async with nursery_procs.open_supervisor(**FORK) as sup:
        ctx = await sup.start_child(None)
        assert await ctx.call(process_targets.run_a_program) == "grandchild says hi\n"
        assert await ctx.call(process_targets.fork_and_wait) == 7
        pid, parent = await ctx.call(process_targets.nested_forkserver_child)
        assert pid != parent != ctx.pid


# -- faults -----------------------------------------------------------------


async def test_a_preload_that_fails_to_import_fails_the_supervisor_start() -> None:
    with pytest.raises(ForkServerError) as info:
        async with nursery_procs.open_supervisor(**FORK, preload=["tests_no_such_module"]):
            pytest.fail("the supervisor opened")  # pragma: no cover
    assert "No module named 'tests_no_such_module'" in info.value.detail
    assert info.value.returncode == 1
    assert any("ModuleNotFoundError" in line for line in info.value.stderr_tail)
    # Nothing is left running: the leak check after this test says so.


async def test_a_preload_that_fails_fails_only_the_children_that_need_it() -> None:
    async with nursery_procs.open_supervisor(**EXEC) as sup:
        with pytest.raises(ChildStartError, match="its fork server failed") as info:
            await sup.start_child(None, start_method="forkserver", preload=["tests_no_such"])
        assert isinstance(info.value.__cause__, ForkServerError)
        assert sup.statistics().failed_starts == 1
        ctx = await sup.start_child(None, start_method="forkserver")
        assert await ctx.call(targets.add, 1, 2) == 3


async def test_a_preload_function_runs_once_in_the_fork_server() -> None:
    squares = sum(n * n for n in range(1000))
    for entry in ("forkserver_prepare:prepare", "forkserver_prepare:Holder.prepare"):
        async with nursery_procs.open_supervisor(**FORK, preload=[entry]) as sup:
            first = await sup.start_child(None)
            second = await sup.start_child(None)
            server = await first.call(process_targets.parent_pid)
            assert await first.call(forkserver_prepare.what_was_prepared) == ([server], squares)
            assert await second.call(forkserver_prepare.what_was_prepared) == ([server], squares)
            # Children of another fork server (no preload) did not get it.
            other = await sup.start_child(None, preload=[])
            assert await other.call(forkserver_prepare.what_was_prepared) == ([], 0)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("forkserver_prepare:fail", "RuntimeError: preparing failed on purpose"),
        ("forkserver_prepare:asynchronous", "'forkserver_prepare:asynchronous' is async"),
        ("forkserver_prepare:NOT_CALLABLE", "'forkserver_prepare:NOT_CALLABLE' is not callable"),
        ("forkserver_prepare:missing", "AttributeError: module 'forkserver_prepare'"),
    ],
)
async def test_a_preload_function_that_fails_fails_the_supervisor_start(
    entry: str, message: str
) -> None:
    with pytest.raises(ForkServerError) as info:
        async with nursery_procs.open_supervisor(**FORK, preload=[entry]):
            pytest.fail("the supervisor opened")  # pragma: no cover
    assert message in info.value.detail
    assert info.value.returncode == 1


async def test_a_preload_that_starts_a_thread_is_refused() -> None:
    with pytest.raises(ForkServerError, match="preloading started a thread"):
        async with nursery_procs.open_supervisor(**FORK, preload=["forkserver_threads"]):
            pass  # pragma: no cover


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"start_method": "spawn"}, ValueError, "start_method must be one of"),
        ({"preload": "pycrdt"}, TypeError, "not the string"),
        ({"preload": ["not a module"]}, ValueError, "module names"),
        ({"preload": [3]}, ValueError, "module names"),
        ({"preload": ["mod:"]}, ValueError, "'package.module:function'"),
        ({"preload": [":prepare"]}, ValueError, "'package.module:function'"),
        ({"preload": ["mod:1x"]}, ValueError, "'package.module:function'"),
        ({"preload": ["mod:a:b"]}, ValueError, "'package.module:function'"),
    ],
)
async def test_bad_start_options_are_refused_before_anything_starts(
    options: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        async with nursery_procs.open_supervisor(**options):  # type: ignore[arg-type]
            pass  # pragma: no cover
    async with nursery_procs.open_supervisor(**EXEC) as sup:
        with pytest.raises(error, match=message):
            await sup.start_child(None, **options)  # type: ignore[arg-type]
        assert sup.statistics().started_total == 0


async def test_a_forked_child_that_fails_to_boot_raises_with_its_stderr() -> None:
    async with nursery_procs.open_supervisor(**FORK) as sup:
        with pytest.raises(ChildStartError) as info:
            await sup.start_child("tests_no_such_module:main", name="broken")
        assert info.value.returncode == 1
        assert any("No module named" in line for line in info.value.stderr_tail)
        # The fork server is unharmed.
        ctx = await sup.start_child(None)
        assert await ctx.call(targets.add, 2, 2) == 4


async def test_a_dead_spare_is_replaced_by_a_fork_on_request() -> None:
    async with nursery_procs.open_supervisor(**FORK) as sup:
        first = await sup.start_child(None)
        server = await first.call(process_targets.parent_pid)
        (spare,) = set(_children_of(server)) - {first.pid}
        os.kill(spare, signal.SIGKILL)
        await wait_process_gone(spare)
        second = await sup.start_child(None)
        assert second.pid != spare
        assert await second.call(targets.add, 3, 4) == 7


async def test_sigkill_of_the_fork_server_kills_its_children_and_it_restarts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with nursery_procs.open_supervisor(**FORK) as sup:
        kids = [await sup.start_child(None, raise_on_crash=False) for _ in range(2)]
        server = await kids[0].call(process_targets.parent_pid)
        os.kill(server, signal.SIGKILL)
        with trio.fail_after(10):
            for kid in kids:
                assert await kid.wait_exited() == -signal.SIGKILL
        assert f"fork server (pid {server}) died; killing its 2 children" in caplog.text
        # The next child comes from a new fork server.
        fresh = await sup.start_child(None)
        assert await fresh.call(process_targets.parent_pid) != server
        assert sup.statistics().fork_servers_started == 2


async def test_a_crash_of_the_fork_server_fails_the_supervisor_like_any_crash() -> None:
    with pytest.raises(ContextDied, match="SIGKILL"):
        async with nursery_procs.open_supervisor(**FORK) as sup:
            ctx = await sup.start_child(None, name="orphaned")
            os.kill(await ctx.call(process_targets.parent_pid), signal.SIGKILL)
            await trio.sleep_forever()


async def _start_all(sup: nursery_procs.Supervisor, count: int) -> list[BaseException | int]:
    outcomes: list[BaseException | int] = []

    async def start() -> None:
        try:
            ctx = await sup.start_child(None, raise_on_crash=False)
        except ChildStartError as exc:
            outcomes.append(exc)
        else:
            outcomes.append(await ctx.call(process_targets.parent_pid))

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(start)
    return outcomes


async def test_spawns_pending_when_the_fork_server_dies_fail_clearly_and_it_restarts() -> None:
    async with nursery_procs.open_supervisor(**FORK) as sup:
        first = await sup.start_child(None, raise_on_crash=False)
        server = await first.call(process_targets.parent_pid)
        os.kill(server, signal.SIGSTOP)
        async with trio.open_nursery() as nursery:
            outcomes: list[BaseException | int] = []

            async def start_while_stopped() -> None:
                outcomes.extend(await _start_all(sup, 5))

            nursery.start_soon(start_while_stopped)
            # Every request is written and waits for a reply that cannot come.
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            os.kill(server, signal.SIGKILL)
        assert len(outcomes) == 5
        for outcome in outcomes:
            assert isinstance(outcome, ChildStartError)
            assert isinstance(outcome.__cause__, ForkServerError)
            assert "died while forking" in str(outcome)
        assert await first.wait_exited() == -signal.SIGKILL
        # Under load again: one new server serves every concurrent start.
        parents = await _start_all(sup, 6)
        assert len(set(parents)) == 1
        assert parents[0] not in (server, os.getpid())
        assert sup.statistics().fork_servers_started == 2


async def test_a_cancelled_spawn_leaves_nothing_behind() -> None:
    async with nursery_procs.open_supervisor(**FORK) as sup:
        first = await sup.start_child(None)
        server = await first.call(process_targets.parent_pid)
        os.kill(server, signal.SIGSTOP)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sup.start_child, None)
                await trio.testing.wait_all_tasks_blocked(cushion=0.05)
                scope.cancel()
        os.kill(server, signal.SIGCONT)
        # The child forked for the cancelled request is killed and reaped; the
        # server goes on serving.
        second = await sup.start_child(None)
        assert await second.call(targets.add, 1, 1) == 2
        assert sup.statistics().fork_servers_started == 1


async def test_escalation_reaches_a_forked_child_through_its_pidfd() -> None:
    policy = Policy(grace_period=0.1, kill_after=0.1)
    async with nursery_procs.open_supervisor(**FORK, policy=policy) as sup:
        stuck = await sup.start_child(targets.block_forever)
        stubborn = await sup.start_child(targets.ignore_sigterm_and_block)
        await stuck.aclose()
        await stubborn.aclose()
        assert stuck.returncode == -signal.SIGTERM
        assert stubborn.returncode == -signal.SIGKILL
        assert stubborn.state is State.EXITED


async def test_children_get_the_masters_environment_and_directory_of_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NURSERY_PROCS_TEST_GONE", "1")
    async with nursery_procs.open_supervisor(**FORK) as sup:
        before = await sup.start_child(None)  # the fork server has started
        monkeypatch.setenv("NURSERY_PROCS_TEST_SET", "after the server started")
        monkeypatch.delenv("NURSERY_PROCS_TEST_GONE")
        monkeypatch.chdir(tmp_path)
        after = await sup.start_child(None)
        assert await after.call(process_targets.environment, "NURSERY_PROCS_TEST_SET") == (
            "after the server started"
        )
        assert await after.call(process_targets.environment, "NURSERY_PROCS_TEST_GONE") is None
        assert await after.call(process_targets.working_directory) == str(tmp_path)
        assert await before.call(process_targets.environment, "NURSERY_PROCS_TEST_GONE") == "1"


@pytest.mark.parametrize("start_method", ["exec", "forkserver"])
async def test_preloading_main_imports_the_script_once_for_every_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_method: str
) -> None:
    log = tmp_path / "imports"
    monkeypatch.setenv("PRELOAD_MAIN_LOG", str(log))
    async with run_script(SCRIPTS / "preload_main.py", start_method) as (program, stdout):
        with trio.fail_after(60):
            words = (await stdout.line()).decode().split()
            assert await program.wait() == 0
    assert words[0] == "pids"
    master, *children, parent = (int(word) for word in words[1:])
    imports = log.read_text().splitlines()
    if start_method == "forkserver":
        # The script ran in the master and once in the fork server; not in children.
        assert imports == [f"__main__ {master}", f"__mp_main__ {parent}"]
    else:
        # Each exec'd child imported it again to find the function it runs.
        assert imports[0] == f"__main__ {master}"
        assert sorted(imports[1:]) == sorted(f"__mp_main__ {pid}" for pid in children)
