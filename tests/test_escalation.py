"""Shutdown timing policy on a fake clock, with fake processes and in-memory links."""

from __future__ import annotations

import signal

import pytest
import trio
import trio.testing

from nursery_procs import ChildStartError, Policy, State
from nursery_procs._process import escalate
from nursery_procs.testing import FakeBehaviour, FakeProcess, open_fake_supervisor

POLICY = Policy(grace_period=5.0, kill_after=3.0, ready_timeout=10.0)


@pytest.mark.parametrize(
    ("behaviour", "returncode", "signals", "elapsed"),
    [
        (FakeBehaviour.OBEY, 0, [], 0.0),
        (FakeBehaviour.IGNORE_SHUTDOWN, -signal.SIGTERM, [(signal.SIGTERM, 5.0)], 5.0),
        (
            FakeBehaviour.IGNORE_SIGTERM,
            -signal.SIGKILL,
            [(signal.SIGTERM, 5.0), (signal.SIGKILL, 8.0)],
            8.0,
        ),
    ],
)
async def test_aclose_escalates_on_schedule(
    autojump_clock: trio.testing.MockClock,
    behaviour: FakeBehaviour,
    returncode: int,
    signals: list[tuple[int, float]],
    elapsed: float,
) -> None:
    async with open_fake_supervisor(behaviour, policy=POLICY) as (sup, processes):
        ctx = await sup.start_child(None, name="fake")
        assert ctx.state is State.READY
        start = trio.current_time()
        await ctx.aclose()
        assert trio.current_time() - start == elapsed
        assert ctx.state is State.EXITED
        assert ctx.returncode == returncode
        assert [(sig, t - start) for sig, t in processes[0].signals] == signals
        await ctx.aclose()  # idempotent: nothing more happens
        assert len(processes[0].signals) == len(signals)


async def test_aclose_completes_when_the_caller_is_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_fake_supervisor(FakeBehaviour.IGNORE_SIGTERM, policy=POLICY) as (
        sup,
        _processes,
    ):
        ctx = await sup.start_child(None)
        start = trio.current_time()
        with trio.move_on_after(1.0) as scope:
            await ctx.aclose()
        # Cancelled after 1 s, aclose still took the whole escalation, shielded.
        assert not scope.cancelled_caught
        assert trio.current_time() - start == 8.0
        assert ctx.returncode == -signal.SIGKILL


async def test_concurrent_aclose_calls_share_one_escalation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_fake_supervisor(FakeBehaviour.IGNORE_SHUTDOWN, policy=POLICY) as (
        sup,
        processes,
    ):
        ctx = await sup.start_child(None)
        async with trio.open_nursery() as closers:
            for _ in range(3):
                closers.start_soon(ctx.aclose)
        assert [sig for sig, _ in processes[0].signals] == [signal.SIGTERM]


async def test_leaving_the_supervisor_escalates_every_child_concurrently(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_fake_supervisor(FakeBehaviour.IGNORE_SIGTERM, policy=POLICY) as (
        sup,
        processes,
    ):
        for i in range(5):
            await sup.start_child(None, name=f"stubborn-{i}")
        start = trio.current_time()
    # Five children, each needing 8 s, were escalated side by side.
    assert trio.current_time() - start == 8.0
    assert all(p.returncode == -signal.SIGKILL for p in processes)


async def test_cancelling_the_supervisor_scope_still_shuts_children_down_gracefully(
    autojump_clock: trio.testing.MockClock,
) -> None:
    processes: list[FakeProcess] = []
    with trio.move_on_after(1.0):
        async with open_fake_supervisor(FakeBehaviour.OBEY, policy=POLICY) as (sup, processes):
            for _ in range(3):
                await sup.start_child(None)
            await trio.sleep_forever()
    assert [p.returncode for p in processes] == [0, 0, 0]
    assert all(p.signals == [] for p in processes)


async def test_ready_timeout_kills_a_hung_child(autojump_clock: trio.testing.MockClock) -> None:
    async with open_fake_supervisor(FakeBehaviour.HANG_ON_BOOT, policy=POLICY) as (sup, _processes):
        start = trio.current_time()
        with pytest.raises(ChildStartError, match=r"not ready within 10\.0 s") as info:
            await sup.start_child(None, name="hung")
        assert trio.current_time() - start == 10.0
        assert info.value.returncode == -signal.SIGKILL
        assert sup.statistics().failed_starts == 1


async def test_debug_sleep_extends_the_ready_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_fake_supervisor(FakeBehaviour.HANG_ON_BOOT, policy=POLICY) as (sup, _processes):
        start = trio.current_time()
        with pytest.raises(ChildStartError, match=r"not ready within 40\.0 s"):
            await sup.start_child(None, debug_sleep=30.0)
        assert trio.current_time() - start == 40.0


async def test_escalate_returns_at_once_for_a_process_that_exits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    process = FakeProcess(FakeBehaviour.OBEY)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 0)

        async def exit_later() -> None:
            await trio.sleep(2.0)
            process.exit(3)

        nursery.start_soon(exit_later)
        start = trio.current_time()
        assert await escalate(process, grace_period=5.0, kill_after=3.0) == 3
        assert trio.current_time() - start == 2.0
        assert process.signals == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("grace_period", -1.0),
        ("kill_after", -0.5),
        ("ready_timeout", -2.0),
        ("max_message_size", 10),
    ],
)
def test_policy_rejects_bad_values(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        Policy(**{field: value})
