"""No process a child starts outlives it: grandchildren, and daemons that
double-forked into a session of their own, on every way a child can end."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import process_targets
import pytest
import trio
from programs import run_script

import nursery_procs
from nursery_procs import Policy

SCRIPTS = Path(__file__).parent / "scripts"

pytestmark = pytest.mark.parametrize("start_method", ["exec", "forkserver"])


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _parent_of(pid: int) -> int:
    return int(_stat(pid)[1])


def _session_of(pid: int) -> int:
    return int(_stat(pid)[3])


@asynccontextmanager
async def watching(pids: list[int]) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Pidfds on *pids*, taken while they run; the function waits until every one
    has exited (a pidfd cannot be fooled by a reused pid)."""
    pidfds = [os.pidfd_open(pid) for pid in pids]

    async def all_gone() -> None:
        # By design they are gone at once; the bound leaves room for a loaded machine.
        with trio.fail_after(10):
            for fd in pidfds:
                await trio.lowlevel.wait_readable(fd)

    try:
        yield all_gone
    finally:
        for fd in pidfds:
            os.close(fd)


def _check_family(child: int, grandchild: int, daemon: int) -> None:
    """The grandchild's parent is the child; the daemon, orphaned in a session of
    its own, was adopted by the child (a subreaper)."""
    assert _parent_of(grandchild) == child
    assert _parent_of(daemon) == child
    assert _session_of(daemon) != _session_of(child)


async def test_graceful_close_ends_every_descendant(start_method: str) -> None:
    async with nursery_procs.open_supervisor(start_method=start_method) as sup:
        ctx = await sup.start_child(None)
        pids = await ctx.call(process_targets.start_descendants)
        _check_family(ctx.pid or 0, *pids)
        async with watching([*pids]) as all_gone:
            await ctx.aclose()
            await all_gone()
        assert ctx.returncode == 0


async def test_a_target_that_returns_ends_its_descendants(start_method: str) -> None:
    async with nursery_procs.open_supervisor(start_method=start_method) as sup:
        ctx = await sup.start_child(process_targets.descendants_then_return)
        pids = await ctx.receive()
        async with watching([*pids]) as all_gone:
            await ctx.send("return now")
            assert await ctx.wait() == pids
            await all_gone()
        assert ctx.returncode == 0


async def test_sigterm_ends_every_descendant(start_method: str) -> None:
    policy = Policy(grace_period=0.2, kill_after=30.0)
    async with nursery_procs.open_supervisor(start_method=start_method, policy=policy) as sup:
        ctx = await sup.start_child(process_targets.descendants_then_block)
        pids = await ctx.receive()
        async with watching([*pids]) as all_gone:
            await ctx.aclose()
            await all_gone()
        # The child's handler ended its descendants, then it died of SIGTERM.
        assert ctx.returncode == -signal.SIGTERM


async def test_sigkill_escalation_kills_the_whole_tree(start_method: str) -> None:
    policy = Policy(grace_period=0.1, kill_after=0.1)
    async with nursery_procs.open_supervisor(start_method=start_method, policy=policy) as sup:
        ctx = await sup.start_child(process_targets.descendants_then_block, True)
        pids = await ctx.receive()
        async with watching([*pids]) as all_gone:
            await ctx.aclose()
            await all_gone()
        assert ctx.returncode == -signal.SIGKILL


async def test_the_end_of_the_supervisor_block_ends_every_descendant(start_method: str) -> None:
    async with AsyncExitStack() as stack:
        async with nursery_procs.open_supervisor(start_method=start_method) as sup:
            pids: list[int] = []
            for _ in range(2):
                ctx = await sup.start_child(process_targets.descendants_then_wait)
                pids.extend(await ctx.receive())
            all_gone = await stack.enter_async_context(watching(pids))
        await all_gone()


async def test_a_child_that_crashes_takes_its_process_group_along(start_method: str) -> None:
    async with nursery_procs.open_supervisor(start_method=start_method) as sup:
        ctx = await sup.start_child(None, raise_on_crash=False)
        grandchild, daemon = await ctx.call(process_targets.start_descendants)
        # The fork server is a subreaper too: it adopts the orphans of a child that
        # died and kills them. An exec'd child's parent is the master, which is no
        # subreaper: a daemon of a crashed exec'd child escapes, as
        # docs/start_methods.rst says.
        caught = [grandchild, daemon] if start_method == "forkserver" else [grandchild]
        async with watching(caught) as all_gone:
            # SIGKILL: the child can clean nothing up itself.
            with pytest.raises(nursery_procs.ContextDied):
                await ctx.call(process_targets.die_now)
            await all_gone()
        if start_method == "exec":
            assert _parent_of(daemon) != ctx.pid
            os.kill(daemon, signal.SIGKILL)


async def test_a_sigkilled_master_leaves_no_descendant(start_method: str) -> None:
    script = SCRIPTS / "descendants_master.py"
    async with run_script(script, start_method) as (master, stdout):
        with trio.fail_after(60):
            words = (await stdout.line()).decode().split()
        assert words[0] == "ready", "the master exited before its children were ready"
        pids = [int(word) for word in words[1:]]
        servers = {_parent_of(pid) for pid in pids[:2]} - {master.pid}
        async with watching([*pids, *servers]) as all_gone:
            master.kill()
            await master.wait()
            # The waiting child sees its link close; the blocked one is ended by
            # its watchdog; each ends its descendants first.
            await all_gone()
