"""Prespawned pools: fake-clock tests of the timing, real-children tests of the plumbing."""

from __future__ import annotations

import math
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import targets
import trio
import trio.testing
from dead import wait_until_dead_unreaped

import nursery_procs
from nursery_procs import (
    ContextDied,
    Policy,
    Pool,
    PoolClosed,
    PoolEmpty,
    PoolSettings,
    State,
    open_pool,
)
from nursery_procs.testing import FakeBehaviour, FakeProcess, open_fake_supervisor

FAKE_POLICY = Policy(grace_period=5, kill_after=3, ready_timeout=10)


@asynccontextmanager
async def fake_pool(
    behaviour: FakeBehaviour = FakeBehaviour.OBEY,
    *,
    boot_delay: float = 0.0,
    lifetime: float = 0.0,
    **options: Any,
) -> AsyncIterator[tuple[Pool, list[FakeProcess]]]:
    """A pool of fake children (for a fake clock), and the list of their processes.

    *boot_delay* slows every spawn; an exception from the block (or from opening
    the pool) propagates as itself.
    """
    async with (
        open_fake_supervisor(
            behaviour, boot_delay=boot_delay, lifetime=lifetime, policy=FAKE_POLICY
        ) as (sup, processes),
        open_pool(sup, None, **options) as pool,
    ):
        yield pool, processes


def spawn_times(processes: list[FakeProcess], since: float) -> list[float]:
    return [process.spawned_at - since for process in processes]


async def settle() -> None:
    """Let every task that can run at the current (fake) time run."""
    await trio.testing.wait_all_tasks_blocked()


# -- fake clock --------------------------------------------------------------


async def test_take_hands_an_idle_child_and_refills(autojump_clock: trio.abc.Clock) -> None:
    async with fake_pool(spare=2, max=8) as (pool, _):
        await pool.wait_idle()
        first = pool.idle_children[0]
        async with pool.take() as ctx:
            assert ctx is first
            assert ctx.state is State.READY
            stats = pool.statistics()
            assert (stats.busy, stats.takes) == (1, 1)
            await pool.wait_idle(2)
            assert pool.statistics().total_spawned == 3
        assert ctx.has_exited
        stats = pool.statistics()
        assert (stats.idle, stats.busy, stats.stopping) == (2, 0, 0)
        assert stats.take_latency_median == 0.0


async def test_idle_timeout_retires_extras_at_exactly_idle_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with fake_pool(spare=1, max=4, idle_timeout=10, boot_delay=1) as (pool, _):
        t0 = trio.current_time()
        await pool.wait_idle(1)
        assert trio.current_time() == t0 + 1
        async with pool.take():
            # A second taker gives up while its child is starting: that child and
            # the first one's replacement both end up idle, one above spare.
            with trio.move_on_after(0.5):
                async with pool.take():
                    pytest.fail("nothing should be ready yet")
            await pool.wait_idle(2)
            assert trio.current_time() == t0 + 2
            extra, kept = pool.idle_children
            await trio.sleep_until(t0 + 2 + 10 - 0.001)
            await settle()
            assert pool.statistics().idle == 2
            await trio.sleep_until(t0 + 2 + 10)
            await settle()
            assert trio.current_time() == t0 + 12
            assert pool.idle_children == (kept,)
            assert extra.has_exited
            assert pool.statistics().total_spawned == 3
            # Spare children are never retired.
            await trio.sleep(100)
            assert pool.idle_children == (kept,)


async def test_no_idle_timeout_keeps_extras(autojump_clock: trio.abc.Clock) -> None:
    async with fake_pool(spare=1, max=4, boot_delay=1) as (pool, _):
        await pool.wait_idle(1)
        async with pool.take():
            with trio.move_on_after(0.5):
                async with pool.take():
                    pytest.fail("nothing should be ready yet")
            await pool.wait_idle(2)
            await trio.sleep(1000)
            assert pool.statistics().idle == 2


async def test_boot_failures_back_off_exponentially(autojump_clock: trio.abc.Clock) -> None:
    async with fake_pool(FakeBehaviour.CRASH_ON_BOOT, spare=2, max=4) as (pool, processes):
        t0 = trio.current_time()
        await trio.sleep(3.2)
        times = spawn_times(processes, t0)
        # Both spare slots try at once; after that, one attempt at a time.
        assert times == pytest.approx([0, 0, 0.1, 0.3, 0.7, 1.5, 3.1])
        stats = pool.statistics()
        assert stats.spawn_failures == 7
        assert (stats.total_spawned, stats.idle, stats.starting) == (0, 0, 0)


async def test_backoff_is_capped(autojump_clock: trio.abc.Clock) -> None:
    options = {"spare": 1, "max": 2, "backoff_initial": 0.1, "backoff_max": 0.4}
    async with fake_pool(FakeBehaviour.CRASH_ON_BOOT, **options) as (pool, processes):
        t0 = trio.current_time()
        await trio.sleep(1.2)
        assert spawn_times(processes, t0) == pytest.approx([0, 0.1, 0.3, 0.7, 1.1])
        assert pool.statistics().total_spawned == 0


async def test_backoff_is_reset_by_a_success(autojump_clock: trio.abc.Clock) -> None:
    # Each child starts fine, then dies after 1 s: an idle death, so a failure.
    # Every start succeeds, so every delay is backoff_initial again (without the
    # reset: 0.1, 0.2, 0.4).
    async with fake_pool(
        FakeBehaviour.CRASH_AFTER_READY, lifetime=1, spare=1, backoff_initial=0.1
    ) as (pool, processes):
        t0 = trio.current_time()
        await trio.sleep(3.4)
        assert spawn_times(processes, t0) == pytest.approx([0, 1.1, 2.2, 3.3])
        stats = pool.statistics()
        assert (stats.total_spawned, stats.idle_deaths, stats.spawn_failures) == (4, 3, 0)


async def test_hung_boot_counts_as_a_failure(autojump_clock: trio.abc.Clock) -> None:
    async with fake_pool(FakeBehaviour.HANG_ON_BOOT, spare=1) as (pool, processes):
        t0 = trio.current_time()
        await trio.sleep(10.15)
        assert spawn_times(processes, t0) == pytest.approx([0, 10.1])
        assert pool.statistics().spawn_failures == 1


async def test_idle_child_death_is_replaced(autojump_clock: trio.abc.Clock) -> None:
    async with fake_pool(spare=2) as (pool, processes):
        await pool.wait_idle()
        victim = pool.idle_children[0]
        process = next(p for p in processes if p.pid == victim.pid)
        process.kill()
        await victim.wait_exited()
        await pool.wait_idle()
        assert victim not in pool.idle_children
        stats = pool.statistics()
        assert (stats.idle, stats.idle_deaths, stats.total_spawned) == (2, 1, 3)


async def test_take_waits_while_max_is_reached(autojump_clock: trio.abc.Clock) -> None:
    async with fake_pool(spare=1, max=2) as (pool, _):
        got: list[tuple[float, nursery_procs.Context]] = []

        async def third_taker() -> None:
            async with pool.take() as ctx:
                got.append((trio.current_time(), ctx))

        async with trio.open_nursery() as nursery, pool.take() as a:
            async with pool.take() as b:
                assert a is not b
                t0 = trio.current_time()
                nursery.start_soon(third_taker)
                await trio.sleep(10)
                stats = pool.statistics()
                assert (stats.busy, stats.idle, stats.starting, stats.waiting) == (2, 0, 0, 1)
                assert got == []
                with pytest.raises(trio.TooSlowError), trio.fail_after(1):
                    async with pool.take():
                        pass  # pragma: no cover
                assert pool.statistics().waiting == 1
            # b came back at t0 + 11: the waiter gets a fresh child at once.
            await trio.sleep(5)
            assert len(got) == 1
            assert got[0][0] == t0 + 11
            assert got[0][1] not in (a, b)
            assert got[0][1].has_exited


async def test_latency_median_counts_waiting(autojump_clock: trio.abc.Clock) -> None:
    async with fake_pool(spare=0, max=4, boot_delay=2) as (pool, _):
        for _ in range(3):
            async with pool.take():  # nothing idle: waits 2 s for a start
                pass
        stats = pool.statistics()
        assert stats.takes == 3
        assert stats.take_latency_median == 2.0
        pool.resize(spare=1)
        for _ in range(4):
            await pool.wait_idle(1)
            async with pool.take():  # instant
                pass
        stats = pool.statistics()
        assert stats.takes == 7
        assert stats.take_latency_median == 0.0  # of [2, 2, 2, 0, 0, 0, 0]


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"spare": 5, "max": 4}, "spare"),
        ({"spare": 0, "max": 0}, "max"),
        ({"spare": -1}, "spare"),
        ({"idle_timeout": -1}, "idle_timeout"),
        ({"linger": -0.5}, "linger"),
        ({"backoff_initial": -1}, "backoff_initial"),
        ({"backoff_max": -1}, "backoff_max"),
        ({"backoff_initial": 2, "backoff_max": 1}, "backoff_max"),
        ({"linger": math.nan}, "linger"),
    ],
)
async def test_invalid_settings(
    autojump_clock: trio.abc.Clock, options: dict[str, Any], setting: str
) -> None:
    with pytest.raises(ValueError, match=setting):
        async with fake_pool(**options):
            pytest.fail("the pool should not open")  # pragma: no cover


async def test_invalid_resize_changes_nothing(autojump_clock: trio.abc.Clock) -> None:
    async with fake_pool(spare=1, max=4) as (pool, _):
        with pytest.raises(ValueError, match="spare"):
            pool.resize(spare=5)
        with pytest.raises(ValueError, match="max"):
            pool.resize(max=0)
        with pytest.raises(ValueError, match="idle_timeout"):
            pool.resize(idle_timeout=-2)
        stats = pool.statistics()
        assert (stats.spare, stats.max, stats.idle_timeout) == (1, 4, None)


async def test_resize_grows_and_shrinks(autojump_clock: trio.abc.Clock) -> None:
    async with fake_pool(spare=1, max=4) as (pool, _):
        await pool.wait_idle(1)
        pool.resize(spare=3, idle_timeout=60)
        await pool.wait_idle(3)
        assert pool.statistics().total_spawned == 3
        pool.resize(spare=1)
        assert pool.statistics().idle == 1
        await settle()
        stats = pool.statistics()
        assert (stats.idle, stats.stopping, stats.spare, stats.idle_timeout) == (1, 0, 1, 60)
        async with pool.take(), pool.take():
            await pool.wait_idle(1)
            # Two busy + one idle; max 2 retires the idle one and starts none.
            pool.resize(max=2)
            await settle()
            stats = pool.statistics()
            assert (stats.idle, stats.busy, stats.starting, stats.max) == (0, 2, 0, 2)
        await pool.wait_idle(1)
        pool.resize(idle_timeout=math.inf)
        assert pool.statistics().idle_timeout is None


async def test_shrinking_max_retires_children_started_before(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with fake_pool(spare=1, max=3, boot_delay=1) as (pool, _):
        await pool.wait_idle()
        async with pool.take():
            await settle()
            stats = pool.statistics()
            assert (stats.busy, stats.starting) == (1, 1)
            pool.resize(max=1)
            await trio.sleep(1)  # the start in progress completes...
            await settle()
            stats = pool.statistics()  # ...and its child is retired at once
            assert (stats.idle, stats.starting, stats.stopping, stats.total_spawned) == (0, 0, 0, 2)
        await pool.wait_idle()
        assert pool.statistics().total_spawned == 3


async def test_take_from_a_closed_pool(autojump_clock: trio.abc.Clock) -> None:
    async with fake_pool(spare=1) as (pool, _):
        await pool.wait_idle()
    assert pool.closed
    with pytest.raises(PoolClosed):
        async with pool.take():
            pass  # pragma: no cover
    with pytest.raises(PoolClosed):
        async with pool.take_nowait():
            pass  # pragma: no cover
    with pytest.raises(PoolClosed):
        async with pool.session("doc"):
            pass  # pragma: no cover
    with pytest.raises(PoolClosed):
        await pool.wait_idle()
    with pytest.raises(PoolClosed):
        pool.resize(spare=0)


async def test_waiters_get_pool_closed_when_the_pool_closes(
    autojump_clock: trio.abc.Clock,
) -> None:
    errors: list[BaseException] = []

    async def wait_for(pool: Pool, what: str) -> None:
        try:
            if what == "take":
                async with pool.take():
                    pass  # pragma: no cover
            else:
                async with pool.session(what):
                    pass  # pragma: no cover
        except PoolClosed as exc:
            errors.append(exc)

    async with trio.open_nursery() as outer:
        async with fake_pool(FakeBehaviour.HANG_ON_BOOT, spare=1) as (pool, processes):
            for what in ("take", "doc", "doc"):
                outer.start_soon(wait_for, pool, what)
            await trio.sleep(1)
            assert pool.statistics().waiting == 2  # one take, one session opener
        assert all(p.returncode is not None for p in processes)
    assert len(errors) == 3


async def test_take_nowait(autojump_clock: trio.abc.Clock) -> None:
    async with fake_pool(spare=0, max=2) as (pool, _):
        with pytest.raises(PoolEmpty):
            async with pool.take_nowait():
                pass  # pragma: no cover
        pool.resize(spare=1)
        await pool.wait_idle()
        async with pool.take_nowait() as ctx:
            assert ctx.state is State.READY
            pool.resize(spare=0)
            with pytest.raises(PoolEmpty):
                async with pool.take_nowait():
                    pass  # pragma: no cover
        assert ctx.has_exited


async def test_pool_exit_closes_every_child(autojump_clock: trio.abc.Clock) -> None:
    taken: list[nursery_procs.Context] = []
    async with trio.open_nursery() as outer:
        async with fake_pool(spare=2, linger=100) as (pool, processes):
            async with pool.session("doc") as doc:
                pass  # lingering
            await pool.wait_idle()

            async def hold(*, task_status: trio.TaskStatus[None]) -> None:
                async with pool.take() as ctx:
                    taken.append(ctx)
                    task_status.started()
                    await trio.sleep_forever()

            await outer.start(hold)
            outer.cancel_scope.deadline = trio.current_time() + 50
            t0 = trio.current_time()
        assert trio.current_time() == t0  # closed concurrently, without waiting
        assert doc.has_exited and taken[0].has_exited
        assert doc.returncode == 0 and taken[0].returncode == 0
        assert all(p.returncode is not None for p in processes)


async def test_exception_from_the_block_propagates_as_itself(
    autojump_clock: trio.abc.Clock,
) -> None:
    with pytest.raises(KeyError):
        async with fake_pool(spare=1) as (pool, _):
            await pool.wait_idle()
            raise KeyError("boom")


async def test_session_users_share_a_child(autojump_clock: trio.abc.Clock) -> None:
    async with (
        fake_pool(spare=2, linger=1) as (pool, _),
        pool.session("doc") as a,
        pool.session("doc") as b,
        pool.session("x") as c,
    ):
        assert a is b
        assert c is not a
        assert pool.sessions() == {"doc": a, "x": c}
        stats = pool.statistics()
        assert (stats.sessions, stats.busy, stats.takes) == (2, 2, 2)


async def test_session_linger_timing(autojump_clock: trio.abc.Clock) -> None:
    async with fake_pool(spare=1, linger=5) as (pool, _):
        await pool.wait_idle()
        async with pool.session("doc") as first:
            t0 = trio.current_time()
            await trio.sleep(1)
        # Back within the linger time: the same child.
        await trio.sleep(4.9)
        async with pool.session("doc") as again:
            assert again is first
            await trio.sleep(2)
        left = trio.current_time()
        assert left == pytest.approx(t0 + 7.9)
        await trio.sleep_until(left + 5 - 0.001)
        await settle()
        assert pool.sessions() == {"doc": first}
        await trio.sleep_until(left + 5)
        await settle()
        assert first.has_exited
        assert pool.sessions() == {}
        assert pool.statistics().busy == 0
        async with pool.session("doc") as fresh:
            assert fresh is not first


async def test_session_zero_linger_closes_at_once(autojump_clock: trio.abc.Clock) -> None:
    async with fake_pool(spare=1) as (pool, _):
        async with pool.session("doc") as ctx:
            pass
        await settle()
        assert ctx.has_exited
        assert pool.sessions() == {}


async def test_session_arrival_during_shutdown_gets_a_fresh_child(
    autojump_clock: trio.abc.Clock,
) -> None:
    # These children ignore SHUTDOWN: each takes its grace period (5 s) to stop.
    async with fake_pool(FakeBehaviour.IGNORE_SHUTDOWN, spare=1) as (pool, _):
        async with pool.session("doc") as old:
            pass
        t0 = trio.current_time()
        await trio.sleep(1)
        assert old.state is State.STOPPING
        assert pool.sessions() == {}
        async with pool.session("doc") as new:
            assert trio.current_time() == t0 + 5
            assert old.has_exited
            assert new is not old
            assert new.state is State.READY


async def test_session_creator_cancelled_hands_over(autojump_clock: trio.abc.Clock) -> None:
    async with fake_pool(spare=0, max=2, boot_delay=1) as (pool, _):
        got: list[nursery_procs.Context] = []

        async def patient() -> None:
            async with pool.session("doc") as ctx:
                got.append(ctx)

        async with trio.open_nursery() as nursery:
            with trio.move_on_after(0.5):
                async with trio.open_nursery() as inner:
                    inner.start_soon(patient)  # cancelled with the opener below
                    async with pool.session("doc"):
                        pytest.fail("not ready yet")  # pragma: no cover
            nursery.start_soon(patient)
        assert len(got) == 1


async def test_session_child_death(autojump_clock: trio.abc.Clock) -> None:
    async with fake_pool(spare=1, linger=10) as (pool, processes):
        async with pool.session("doc") as ctx:
            process = next(p for p in processes if p.pid == ctx.pid)
            process.kill()
            await ctx.wait_exited()
            with pytest.raises(ContextDied):
                await ctx.call("os:getpid")
            await settle()
            assert pool.sessions() == {}
            async with pool.session("doc") as fresh:
                assert fresh is not ctx
        assert pool.statistics().idle_deaths == 0


# -- real children -------------------------------------------------------------


async def test_real_take_and_refill() -> None:
    async with (
        nursery_procs.open_supervisor() as sup,
        open_pool(sup, None, spare=2, max=4, name="real") as pool,
    ):
        with trio.fail_after(60):
            await pool.wait_idle()
            async with pool.take() as ctx:
                assert ctx.state is State.READY
                assert await ctx.call("os:getpid") == ctx.pid
                await pool.wait_idle()
                stats = pool.statistics()
                assert (stats.idle, stats.busy, stats.total_spawned) == (2, 1, 3)
            assert ctx.has_exited
            assert ctx.returncode == 0


async def test_real_sessions_share_by_key() -> None:
    async with (
        nursery_procs.open_supervisor() as sup,
        open_pool(sup, None, spare=2, max=6, name="docs") as pool,
    ):
        pids: dict[str, list[int]] = {"doc": [], "other": []}
        all_in = trio.Event()
        entered = 0

        async def user(key: str) -> None:
            nonlocal entered
            async with pool.session(key) as ctx:
                pids[key].append(await ctx.call("os:getpid"))
                entered += 1
                if entered == 3:
                    all_in.set()
                await all_in.wait()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(user, "doc")
                nursery.start_soon(user, "doc")
                nursery.start_soon(user, "other")
        assert len(pids["doc"]) == 2
        assert pids["doc"][0] == pids["doc"][1]
        assert pids["other"][0] != pids["doc"][0]


async def test_real_session_child_killed() -> None:
    async with (
        nursery_procs.open_supervisor() as sup,
        open_pool(sup, None, spare=1, max=4, linger=30) as pool,
    ):
        with trio.fail_after(60):
            async with pool.session("doc") as ctx:
                pid = ctx.pid
                assert pid is not None
                errors: list[BaseException] = []

                async def pending_call() -> None:
                    try:
                        await ctx.call("trio:sleep", 30)
                    except ContextDied as exc:
                        errors.append(exc)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pending_call)
                    await trio.testing.wait_all_tasks_blocked()
                    os.kill(pid, signal.SIGKILL)
                assert len(errors) == 1
                assert ctx.returncode == -signal.SIGKILL
            async with pool.session("doc") as fresh:
                assert fresh.pid != pid
                assert await fresh.call("os:getpid") == fresh.pid


async def test_real_idle_child_killed_is_replaced() -> None:
    async with nursery_procs.open_supervisor() as sup, open_pool(sup, None, spare=2, max=4) as pool:
        with trio.fail_after(60):
            await pool.wait_idle()
            victim = pool.idle_children[0]
            assert victim.pid is not None
            os.kill(victim.pid, signal.SIGKILL)
            assert await victim.wait_exited() == -signal.SIGKILL
            await pool.wait_idle()
        assert victim not in pool.idle_children
        stats = pool.statistics()
        assert (stats.idle, stats.idle_deaths, stats.total_spawned) == (2, 1, 3)


async def test_real_close_while_starting() -> None:
    async with nursery_procs.open_supervisor() as sup, open_pool(sup, None, spare=2, max=4) as pool:
        assert pool.statistics().starting == 2
    stats = pool.statistics()
    assert stats.total_spawned == 0


# -- settings ------------------------------------------------------------------


def test_settings_are_one_frozen_value() -> None:
    settings = PoolSettings()
    assert settings == PoolSettings(
        spare=2, max=32, idle_timeout=None, linger=0.0, backoff_initial=0.1, backoff_max=30.0
    )
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        settings.spare = 3  # type: ignore[misc]
    assert PoolSettings(idle_timeout=math.inf).idle_timeout is None
    assert attrs.evolve(settings, spare=0, max=1) == PoolSettings(spare=0, max=1)


@pytest.mark.parametrize(
    ("changes", "error", "setting"),
    [
        ({"spare": "3"}, TypeError, "spare"),
        ({"spare": True}, TypeError, "spare"),
        ({"max": 2.0}, TypeError, "max"),
        ({"idle_timeout": "10"}, TypeError, "idle_timeout"),
        ({"linger": None}, TypeError, "linger"),
        ({"backoff_initial": -math.inf}, ValueError, "backoff_initial"),
        ({"idle_timeout": -math.inf}, ValueError, "idle_timeout"),
        ({"spare": 40}, ValueError, "spare"),
    ],
)
def test_settings_errors_name_the_setting(
    changes: dict[str, Any], error: type[Exception], setting: str
) -> None:
    with pytest.raises(error, match=f"^{setting}"):
        attrs.evolve(PoolSettings(), **changes)


async def test_resize_evolves_the_settings(autojump_clock: trio.abc.Clock) -> None:
    async with fake_pool(spare=1, max=4, linger=2) as (pool, _):
        before = pool.settings
        after = pool.resize(spare=2, linger=5, backoff_max=60)
        assert after == attrs.evolve(before, spare=2, linger=5, backoff_max=60)
        assert pool.settings is after
        await pool.wait_idle(2)
        # The control API passes the fields it was given as keywords.
        fields: dict[str, Any] = {"spare": 1, "idle_timeout": 30}
        assert pool.resize(**fields) == attrs.evolve(after, spare=1, idle_timeout=30)
        assert pool.statistics().idle == 1


@pytest.mark.parametrize(
    ("fields", "error", "named"),
    [
        ({"spare": "2"}, TypeError, "spare"),
        ({"max": 1.5}, TypeError, "max"),
        ({"sprae": 2}, TypeError, "sprae"),
        ({"idle_timeout": math.nan}, ValueError, "idle_timeout"),
        ({"backoff_initial": 60}, ValueError, "backoff_max"),
    ],
)
async def test_invalid_resize_names_the_field(
    autojump_clock: trio.abc.Clock, fields: dict[str, Any], error: type[Exception], named: str
) -> None:
    async with fake_pool(spare=1, max=4) as (pool, _):
        await pool.wait_idle()
        before = pool.settings
        with pytest.raises(error, match=named):
            pool.resize(**fields)
        assert pool.settings is before
        await settle()
        assert pool.statistics().idle == 1


def test_pool_closed_is_a_closed_resource_error() -> None:
    assert issubclass(PoolClosed, trio.ClosedResourceError)
    assert issubclass(PoolClosed, nursery_procs.NurseryProcsError)


async def test_open_pool_rejects_what_is_not_a_supervisor() -> None:
    with pytest.raises(TypeError, match="supervisor"):
        async with open_pool(None, None):  # type: ignore[arg-type]
            pass  # pragma: no cover


# -- statistics from the slots -------------------------------------------------


async def test_statistics_count_every_child_once(autojump_clock: trio.abc.Clock) -> None:
    async with (
        open_fake_supervisor(FakeBehaviour.IGNORE_SHUTDOWN, boot_delay=1, policy=FAKE_POLICY) as (
            sup,
            _,
        ),
        open_pool(sup, None, spare=2, max=6, linger=100) as pool,
    ):

        def counts() -> tuple[int, int, int, int]:
            stats = pool.statistics()
            return (stats.idle, stats.busy, stats.starting, stats.stopping)

        def living() -> int:
            return sum(not child.has_exited for child in sup.children)

        assert counts() == (0, 0, 2, 0)
        await pool.wait_idle()
        assert counts() == (2, 0, 0, 0)
        release = trio.Event()

        async def hold(*, task_status: trio.TaskStatus[None]) -> None:
            async with pool.take():
                task_status.started()
                await release.wait()

        async with trio.open_nursery() as nursery, pool.session("doc"):
            await nursery.start(hold)
            assert counts() == (0, 2, 2, 0)
            await pool.wait_idle()
            assert counts() == (2, 2, 0, 0) and living() == 4
            # The taken child ignores SHUTDOWN: it stops for its grace period (5 s).
            release.set()
            await settle()
            assert counts() == (2, 1, 0, 1)
            await trio.sleep(5)
            await settle()
            assert counts() == (2, 1, 0, 0) and living() == 3
            assert pool.statistics().sessions == 1


# -- sessions never hand out a dead child ----------------------------------------


async def test_real_session_child_killed_between_two_users() -> None:
    async with (
        nursery_procs.open_supervisor() as sup,
        open_pool(sup, None, spare=1, max=4, linger=30) as pool,
    ):
        with trio.fail_after(60):
            async with pool.session("doc") as first:
                pid = first.pid
                assert pid is not None
            os.kill(pid, signal.SIGKILL)
            wait_until_dead_unreaped(pid)
            # Nothing in this process has noticed yet: the child still looks ready.
            assert first.state is State.READY
            async with pool.session("doc") as second:
                assert second is not first
                assert await second.call(os.getpid) == second.pid != pid
            assert await first.wait_exited() == -signal.SIGKILL


async def test_real_session_child_killed_while_held() -> None:
    async with (
        nursery_procs.open_supervisor() as sup,
        open_pool(sup, None, spare=1, max=4, linger=30) as pool,
    ):
        with trio.fail_after(60):
            async with pool.session("doc") as first:
                pid = first.pid
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                wait_until_dead_unreaped(pid)
                async with pool.session("doc") as second:
                    assert second is not first
                    assert await second.call(os.getpid) == second.pid
                with pytest.raises(ContextDied):
                    await first.call(os.getpid)
            async with pool.session("doc") as third:
                assert third is second


async def test_real_take_skips_an_idle_child_killed_a_moment_ago() -> None:
    async with nursery_procs.open_supervisor() as sup, open_pool(sup, None, spare=1, max=4) as pool:
        with trio.fail_after(60):
            await pool.wait_idle()
            (victim,) = pool.idle_children
            assert victim.pid is not None
            os.kill(victim.pid, signal.SIGKILL)
            wait_until_dead_unreaped(victim.pid)
            async with pool.take() as ctx:
                assert ctx is not victim
                assert await ctx.call(os.getpid) == ctx.pid
            assert pool.statistics().idle_deaths == 1


async def test_a_pool_passes_its_child_options_to_every_child() -> None:
    isolation = nursery_procs.Isolation(network=True, allow_fallback=True)
    async with (
        nursery_procs.open_supervisor() as sup,
        nursery_procs.open_pool(
            sup, None, spare=1, start_method="exec", isolation=isolation, trusted=False
        ) as pool,
        pool.take() as ctx,
    ):
        # trusted=False: what the child sends arrives as data (a tuple as a list).
        assert await ctx.call(targets.returns, (1, 2)) == [1, 2]
        assert ctx.statistics().isolation is not None
        assert ctx.statistics().isolation.network
