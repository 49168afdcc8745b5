"""Restart policies and restart intensity (fake clock), and a real restart."""

from __future__ import annotations

import os

import pytest
import targets
import trio
import trio.testing

import nursery_procs
from nursery_procs import Policy, Restart, State, SupervisorError
from nursery_procs.testing import FakeBehaviour, FakeProcess, open_fake_supervisor

POLICY = Policy(grace_period=5.0, kill_after=3.0, ready_timeout=10.0)


async def test_permanent_child_is_restarted_until_the_intensity_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = trio.current_time()
    processes: list[FakeProcess] = []
    with pytest.raises(SupervisorError, match=r"after 3 restarts within 5\.0 s: giving up"):
        async with open_fake_supervisor(
            FakeBehaviour.CRASH_AFTER_READY,
            lifetime=1.0,
            policy=POLICY,
            max_restarts=3,
            restart_window=5.0,
        ) as (sup, processes):
            await sup.start_child(None, name="flaky", restart="permanent")
            await trio.sleep_forever()
    # Crashes at 1, 2, 3 s were restarted; the one at 4 s was one too many.
    assert trio.current_time() - start == 4.0
    assert len(processes) == 4
    assert all(p.returncode == 1 for p in processes)


async def test_restarts_spread_out_in_time_go_on(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_supervisor(
        FakeBehaviour.CRASH_AFTER_READY,
        lifetime=3.0,
        policy=POLICY,
        max_restarts=1,
        restart_window=2.0,
    ) as (sup, processes):
        ctx = await sup.start_child(None, name="slow-crasher", restart=Restart.PERMANENT)
        first_id = ctx.id
        await trio.sleep(10.0)
        # One restart per 3 s never exceeds one per 2 s.
        assert sup.statistics().restarts_total == 3
        assert ctx.id == first_id
        assert ctx.state is State.READY
    assert len(processes) == 4


async def test_transient_child_is_not_restarted_after_a_normal_exit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_fake_supervisor(
        FakeBehaviour.EXIT_AFTER_READY, lifetime=1.0, policy=POLICY
    ) as (sup, processes):
        ctx = await sup.start_child(None, restart="transient")
        assert await ctx.wait_exited() == 0
        with pytest.raises(nursery_procs.ContextDied, match="will not be restarted"):
            await ctx.wait_ready()
        await trio.sleep(5.0)
        assert len(processes) == 1
        assert sup.statistics().restarts_total == 0


async def test_transient_child_is_restarted_after_a_crash(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_fake_supervisor(
        FakeBehaviour.CRASH_AFTER_READY, lifetime=2.0, policy=POLICY, max_restarts=10
    ) as (sup, _processes):
        await sup.start_child(None, restart="transient")
        await trio.sleep(5.0)
        assert sup.statistics().restarts_total == 2


async def test_a_child_shut_down_on_purpose_is_not_restarted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_fake_supervisor(FakeBehaviour.OBEY, policy=POLICY) as (sup, processes):
        ctx = await sup.start_child(None, restart="permanent")
        await ctx.aclose()
        await trio.sleep(5.0)
        assert len(processes) == 1
        assert ctx.state is State.EXITED


@pytest.mark.parametrize(("value", "setting"), [(-1, "max_restarts"), (0.0, "restart_window")])
async def test_bad_intensity_settings(value: float, setting: str) -> None:
    with pytest.raises(ValueError, match=setting):
        async with nursery_procs.open_supervisor(**{setting: value}):
            pass


async def test_bad_restart_value() -> None:
    async with nursery_procs.open_supervisor() as sup:
        with pytest.raises(ValueError, match="sometimes"):
            await sup.start_child(None, restart="sometimes")


@pytest.mark.parametrize("start_method", ["exec", "forkserver"])
async def test_a_real_permanent_child_comes_back_after_sigkill(start_method: str) -> None:
    async with nursery_procs.open_supervisor(start_method=start_method) as sup:
        ctx = await sup.start_child(targets.serve_echo, name="phoenix", restart="permanent")
        old_pid = ctx.pid
        assert old_pid is not None
        with trio.fail_after(5), pytest.raises(nursery_procs.ContextDied):
            await ctx.call(targets.kill_self)
        # The same handle now talks to the new incarnation.
        with trio.fail_after(30):
            await ctx.wait_ready()
        assert ctx.pid != old_pid
        assert await ctx.request("again") == "again"
        assert await ctx.call(os.getpid) == ctx.pid
        assert sup.statistics().restarts_total == 1
