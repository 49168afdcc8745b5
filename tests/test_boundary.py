"""The process boundary behaves like a nursery boundary: cancellation reaches the
work, exceptions keep their type, sync functions do not stall the child."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import boundary_targets as bt
import pytest
import trio

import nursery_procs
from nursery_procs import Policy, RemoteError, RemoteTraceback, State


async def _started(ctx: nursery_procs.Context, tag: str) -> None:
    with trio.fail_after(30):
        assert await ctx.receive() == (tag, "started")


async def test_cancelling_a_call_cancels_the_remote_task() -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ctx.call, bt.wait_until_cancelled, "a")
            await _started(ctx, "a")
            start = trio.current_time()
            nursery.cancel_scope.cancel()
        took = trio.current_time() - start
        # The child ran its finally block before it acknowledged: its message is here.
        assert ctx.receive_nowait() == ("a", "cancelled")
        assert took < 1.0
        # The child is fine, and a late reply warned nobody.
        assert await ctx.call(bt.release) == "released"
        assert ctx.state is State.READY


async def test_cancellation_reaches_through_an_intermediary() -> None:
    async with nursery_procs.open_supervisor() as sup:
        top = await sup.start_child("targets:tree_node", 1, 1, None, name="n")
        with trio.fail_after(60):
            assert await top.receive() == ("ready", 2)
        grandchild = sup.context_by_name("n.0")
        assert grandchild is not None and grandchild.parent_id == top.id
        async with trio.open_nursery() as nursery:
            nursery.start_soon(grandchild.call, bt.wait_until_cancelled, "deep")
            await _started(grandchild, "deep")
            nursery.cancel_scope.cancel()
        assert grandchild.receive_nowait() == ("deep", "cancelled")


async def test_a_child_that_ignores_a_cancellation_is_shut_down_as_hung() -> None:
    policy = Policy(cancel_timeout=0.5, grace_period=0.5, kill_after=0.5)
    async with nursery_procs.open_supervisor(policy=policy) as sup:
        ctx = await sup.start_child(None, name="hung", raise_on_crash=False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ctx.call, bt.ignore_cancellation, "h")
            await _started(ctx, "h")
            start = trio.current_time()
            nursery.cancel_scope.cancel()
        waited = trio.current_time() - start
        assert 0.4 < waited < 5.0  # bounded by cancel_timeout
        await ctx.wait_exited()
        assert ctx.state is State.EXITED
        assert sup.statistics().crashed_total == 1


async def test_a_sync_call_does_not_stall_the_child() -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(None)
        async with trio.open_nursery() as nursery:
            results: list[str] = []

            async def blocked() -> None:
                results.append(await ctx.call(bt.block_until_released, "s"))

            nursery.start_soon(blocked)
            await _started(ctx, "s")
            # While the sync function blocks its thread, the child serves this call.
            assert await ctx.call(bt.release) == "released"
        assert results == ["s released"]


async def test_cancelling_a_sync_call_waits_for_it() -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(None)
        order: list[str] = []

        async def cancelled_caller(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                await ctx.call(bt.block_until_released, "w")
            order.append("caller returned")

        async with trio.open_nursery() as nursery:
            scope = await nursery.start(cancelled_caller)
            await _started(ctx, "w")
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            order.append("releasing")
            assert await ctx.call(bt.release) == "released"
        assert order == ["releasing", "caller returned"]
        assert ctx.state is State.READY


async def test_kill_on_cancel_kills_the_child_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nursery_procs.child")
    address = str(tmp_path / "started.sock")
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(None, name="killed")
        with trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM) as started:
            await started.bind(address)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: ctx.call(bt.block_the_loop, address, kill_on_cancel=True)
                )
                # The sync function runs on the child's loop, so it says so over a socket.
                assert await started.recv(16) == b"started"
                start = trio.current_time()
                nursery.cancel_scope.cancel()
        assert trio.current_time() - start < 1.0
        assert await ctx.wait_exited() == -signal.SIGKILL
        assert sup.statistics().crashed_total == 1
    # A kill asked for is said once, without alarm.
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name.endswith(".killed")]
    assert said == [("INFO", "child killed: a call was cancelled with kill_on_cancel")]


async def test_kill_on_cancel_needs_an_owned_child() -> None:
    async with nursery_procs.open_supervisor() as sup:
        top = await sup.start_child("targets:tree_node", 1, 1, None, name="n")
        with trio.fail_after(60):
            assert await top.receive() == ("ready", 2)
        grandchild = sup.context_by_name("n.0")
        assert grandchild is not None
        with pytest.raises(ValueError, match="kill_on_cancel"):
            await grandchild.call(bt.release, kill_on_cancel=True)


async def test_exceptions_keep_their_type_and_carry_the_remote_traceback() -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(None)
        with pytest.raises(bt._LocalError, match="keeps its type") as info:
            await ctx.call(bt.raise_custom)
        cause = info.value.__cause__
        assert isinstance(cause, RemoteTraceback)
        assert "in raise_custom" in cause.text and "boundary_targets.py" in cause.text
        with pytest.raises(ExceptionGroup) as group:
            await ctx.call(bt.raise_group)
        assert [type(e) for e in group.value.exceptions] == [ValueError, KeyError]


async def test_exceptions_that_cannot_be_rebuilt_arrive_as_remote_errors(
    tmp_path: Path,
) -> None:
    (tmp_path / "ghostmodule.py").write_text("class GhostError(Exception):\n    pass\n")
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(None)
        with pytest.raises(RemoteError) as info:
            await ctx.call(bt.raise_from_module_only_here, str(tmp_path))
        assert info.value.remote_type == "ghostmodule.GhostError"
        assert info.value.remote_message == "boo"
        with pytest.raises(RemoteError) as info:
            await ctx.call(bt.raise_unpicklable)
        assert info.value.remote_type.endswith("Unpicklable")
        assert "made in the child" in info.value.remote_traceback


async def test_cancelling_a_request_cancels_the_handler() -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child("targets:serve_slow_requests")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ctx.request, "r")
            await _started(ctx, "r")
            nursery.cancel_scope.cancel()
        assert ctx.receive_nowait() == ("r", "cancelled")
        assert await ctx.request("quick") == "quick"


async def test_cancelling_a_call_on_the_childs_loop_waits_for_it(tmp_path: Path) -> None:
    # A sync function on the child's loop cannot acknowledge a cancellation: the
    # caller waits for it (as for one in a thread), and the child is not taken for
    # hung although the wait is longer than cancel_timeout.
    address = str(tmp_path / "started.sock")
    policy = Policy(cancel_timeout=0.2)
    async with nursery_procs.open_supervisor(policy=policy) as sup:
        ctx = await sup.start_child(None)
        with trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM) as started:
            await started.bind(address)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: ctx.call(bt.sleep_on_the_loop, address, 1.0, in_thread=False)
                )
                assert await started.recv(16) == b"started"
                start = trio.current_time()
                nursery.cancel_scope.cancel()
        assert trio.current_time() - start > 0.5
        assert ctx.state is State.READY
        assert await ctx.call(bt.release) == "released"
