"""Real child processes: starting, talking, calling, closing, and every fault."""

from __future__ import annotations

import functools
import logging
import os
import signal
from pathlib import Path

import pytest
import targets
import trio

import nursery_procs
from nursery_procs import (
    ChildStartError,
    ContextDied,
    MessageUndeliverable,
    Policy,
    State,
)
from nursery_procs._wire import Handle

FAST = Policy(grace_period=2.0, kill_after=2.0)


@pytest.fixture(autouse=True, params=["exec", "forkserver"])
def start_method(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs with each start method (as the supervisors' default)."""
    monkeypatch.setenv(nursery_procs.START_METHOD_ENV, request.param)
    return str(request.param)


async def test_start_call_and_close() -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(None, name="worker")
        assert ctx.state is State.READY
        assert ctx.name == "worker"
        assert ctx.id > 0
        assert ctx.pid == await ctx.call(targets.getpid)
        assert ctx.pid != os.getpid()
        assert await ctx.call(targets.add, 2, 3) == 5
        assert await ctx.call(functools.partial(targets.async_add, 2, b=5)) == 7
        assert await ctx.call("operator:mul", 6, 7) == 42
        assert sup.children == [ctx]
        await ctx.aclose()
        assert ctx.state is State.EXITED
        assert ctx.returncode == 0
        assert sup.children == []
        stats = sup.statistics()
        assert (stats.started_total, stats.exited_total, stats.crashed_total) == (1, 1, 0)


async def test_remote_exception_carries_type_message_and_traceback() -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(None)
        with pytest.raises(ValueError, match=r"^bad things$") as info:
            await ctx.call(targets.fail, "bad things")
        remote = info.value.__cause__
        assert isinstance(remote, nursery_procs.RemoteTraceback)
        assert "targets.py" in remote.text
        assert "in fail" in remote.text
        # The child is still fine after a failed call.
        assert await ctx.call(targets.add, 1, 1) == 2


async def test_request_reply_and_messages() -> None:
    async with nursery_procs.open_supervisor() as sup:
        async with sup.open_child(targets.serve_echo, name="echo") as ctx:
            assert await ctx.request({"a": [1, 2]}) == {"a": [1, 2]}
            assert await ctx.request(b"raw bytes") == b"raw bytes"
        assert ctx.state is State.EXITED
        async with sup.open_child(targets.echo_messages) as echo:
            for i in range(5):
                await echo.send(("msg", i))
            assert [await echo.receive() for _ in range(5)] == [("msg", i) for i in range(5)]


async def test_target_result_and_target_error() -> None:
    async with nursery_procs.open_supervisor() as sup:
        ok = await sup.start_child(targets.returns, {"answer": 42})
        assert await ok.wait() == {"answer": 42}
        assert ok.returncode == 0
        bad = await sup.start_child(targets.raises_in_target, "target broke", raise_on_crash=False)
        with pytest.raises(RuntimeError, match="target broke"):
            await bad.wait()
        assert bad.returncode == 1


async def test_iteration_ends_when_the_child_finishes() -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(targets.send_to_parent, "last words")
        received = [msg async for msg in ctx]
        assert received == ["last words"]


async def test_crash_mid_request_raises_context_died_at_once() -> None:
    async with nursery_procs.open_supervisor(policy=FAST) as sup:
        ctx = await sup.start_child(
            targets.serve_dying_requests, name="fragile", raise_on_crash=False
        )
        assert await ctx.request("hello") == "hello"
        with trio.fail_after(5):
            with pytest.raises(ContextDied) as info:
                await ctx.request("die")
        assert info.value.returncode == 7
        assert "about to die mid-request" in info.value.stderr_tail
        assert "about to die mid-request" in str(info.value)
        assert ctx.state is State.EXITED
        # Explicit calls on a dead child raise a clear error too.
        with pytest.raises(ContextDied):
            await ctx.send("anyone?")
        with pytest.raises(ContextDied):
            await ctx.call(targets.add, 1, 2)


async def test_crash_mid_call_by_sigkill() -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(None, raise_on_crash=False)
        with trio.fail_after(5), pytest.raises(ContextDied) as info:
            await ctx.call(targets.kill_self)
        assert info.value.returncode == -signal.SIGKILL
        assert sup.statistics().crashed_total == 1


async def test_a_child_failing_to_boot_raises_with_its_stderr() -> None:
    async with nursery_procs.open_supervisor() as sup:
        with pytest.raises(ChildStartError) as info:
            await sup.start_child("tests_no_such_module:main", name="broken")
        assert info.value.returncode == 1
        assert any(
            "No module named 'tests_no_such_module'" in line for line in info.value.stderr_tail
        )
        assert sup.statistics().failed_starts == 1
        assert sup.children == []


async def test_unpicklable_target_fails_before_spawning() -> None:
    async with nursery_procs.open_supervisor() as sup:
        with pytest.raises(nursery_procs.WireError, match="importable"):
            await sup.start_child(lambda: None)
        assert sup.statistics().started_total == 0


async def test_sigterm_escalation_for_a_blocked_child() -> None:
    policy = Policy(grace_period=0.2, kill_after=5.0)
    async with nursery_procs.open_supervisor(policy=policy) as sup:
        ctx = await sup.start_child(targets.block_forever, name="stuck")
        await ctx.aclose()
        assert ctx.returncode == -signal.SIGTERM


async def test_sigkill_escalation_for_a_child_ignoring_sigterm() -> None:
    policy = Policy(grace_period=0.1, kill_after=0.1)
    async with nursery_procs.open_supervisor(policy=policy) as sup:
        ctx = await sup.start_child(targets.ignore_sigterm_and_block, name="stubborn")
        await ctx.aclose()
        assert ctx.returncode == -signal.SIGKILL


async def test_finally_blocks_run_on_graceful_shutdown(tmp_path: Path) -> None:
    marker = tmp_path / "cleanup"
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(targets.record_cleanup, str(marker))
    assert marker.read_text() == f"clean {ctx.pid}\n"
    assert ctx.returncode == 0


async def test_cancelled_scope_shuts_children_down_gracefully(tmp_path: Path) -> None:
    with trio.CancelScope() as scope:
        async with nursery_procs.open_supervisor() as sup:
            ctxs = [
                await sup.start_child(targets.record_cleanup, str(tmp_path / f"c{i}"))
                for i in range(3)
            ]
            scope.cancel()
            await trio.sleep_forever()
    for i, ctx in enumerate(ctxs):
        assert (tmp_path / f"c{i}").read_text() == f"clean {ctx.pid}\n"
        assert ctx.returncode == 0


async def test_an_error_in_the_block_propagates_as_itself(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="boom"):
        async with nursery_procs.open_supervisor() as sup:
            ctx = await sup.start_child(targets.record_cleanup, str(tmp_path / "c"))
            raise KeyError("boom")
    assert ctx.state is State.EXITED
    assert (tmp_path / "c").exists()


async def test_logs_reach_the_parent_under_the_child_name(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nursery_procs.child.talker")
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(targets.chatter, 50, name="talker")
        assert await ctx.wait() == "done"
        pid = ctx.pid
    records = [r for r in caplog.records if r.name == "nursery_procs.child.talker"]
    by_stream: dict[str, list[str]] = {}
    for record in records:
        assert record.process == pid
        by_stream.setdefault(record.child_stream, []).append(record.getMessage())  # type: ignore[attr-defined]
    # Nothing lost though the child exited right after writing.
    assert by_stream["stdout"] == [f"stdout line {i}" for i in range(50)]
    assert by_stream["stderr"] == [f"stderr line {i}" for i in range(50)]
    assert by_stream["logging"] == [f"log record {i}" for i in range(50)]
    logged = [r for r in records if r.child_stream == "logging"]  # type: ignore[attr-defined]
    assert {r.child_logger for r in logged} == {"chatter"}  # type: ignore[attr-defined]
    assert all(r.levelno == logging.WARNING for r in logged)


async def test_debug_sleep_logs_the_pid_and_the_child_still_starts(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="nursery_procs.child.slow")
    monkeypatch.setenv(nursery_procs.DEBUG_SLEEP_ENV, "0.2")
    async with nursery_procs.open_supervisor(policy=Policy(ready_timeout=30)) as sup:
        ctx = await sup.start_child(None, name="slow")
        assert await ctx.call(targets.add, 1, 2) == 3
    messages = [r.getMessage() for r in caplog.records if r.name == "nursery_procs.child.slow"]
    assert any(f"pid {ctx.pid} sleeping 0.2 s for a debugger" in m for m in messages)


async def test_message_to_an_unknown_handle_gets_a_dead_reply() -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(None)
        router = nursery_procs.current_router()
        with trio.fail_after(5), pytest.raises(MessageUndeliverable) as info:
            await router.asking.request(ctx.id, 555, "anyone?")
        assert info.value.reason == f"no handle 555 in context {ctx.id} ({ctx.name})"
        # The child is undisturbed.
        assert await ctx.call(targets.add, 2, 2) == 4


async def test_message_to_an_unknown_context_gets_a_dead_reply() -> None:
    async with nursery_procs.open_supervisor() as sup:
        router = nursery_procs.current_router()
        with pytest.raises(MessageUndeliverable, match=r"no route to context 4242 \(from 0\)"):
            await router.asking.request(4242, Handle.REQUEST, "hello")
        ctx = await sup.start_child(None)
        # From a child, the message goes up to the root, which answers dead.
        reason = await ctx.call(targets.request_unknown_context, 4343)
        assert reason == "no route to context 4343 (from 0)"


async def test_malformed_frame_closes_only_that_link(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with nursery_procs.open_supervisor(policy=FAST) as sup:
        bystander = await sup.start_child(None, name="bystander")
        bad = await sup.start_child(None, name="garbler", raise_on_crash=False)
        # Reserved bits set: a protocol error.
        with pytest.raises(ContextDied):
            await bad.call(targets.write_raw, b"\xf2\x80\x00\x00\x00\x00")
        await bad.wait_exited()
        assert bad.state is State.EXITED
        assert await bystander.call(targets.add, 20, 22) == 42
    messages = [r.getMessage() for r in caplog.records if r.name == "nursery_procs.child.garbler"]
    assert any("code 1002" in m for m in messages)


async def test_oversized_message_closes_the_link_with_1009(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    policy = Policy(max_message_size=64 * 1024, grace_period=2.0)
    async with nursery_procs.open_supervisor(policy=policy) as sup:
        bystander = await sup.start_child(None, name="calm")
        big = await sup.start_child(None, name="bigmouth", raise_on_crash=False)
        # A masked binary frame declaring 2**40 bytes: refused before reading it.
        header = b"\x82\xff" + (1 << 40).to_bytes(8, "big") + b"\x00\x00\x00\x00"
        with pytest.raises(ContextDied):
            await big.call(targets.write_raw, header)
        assert await bystander.call(targets.add, 1, 2) == 3
        # Sending too much from the parent is refused here with a clear error.
        with pytest.raises(nursery_procs.WireError, match="over the link's limit"):
            await bystander.send(b"x" * (65 * 1024))
        assert await bystander.call(targets.add, 2, 2) == 4
    messages = [r.getMessage() for r in caplog.records if r.name == "nursery_procs.child.bigmouth"]
    assert any("code 1009" in m for m in messages)


async def test_forward_ends_quietly_when_a_side_goes_away() -> None:
    async with nursery_procs.open_supervisor() as sup:
        echo = await sup.start_child(targets.forward_between, 3)
        send, receive = trio.open_memory_channel[object](10)
        out_send, out_receive = trio.open_memory_channel[object](10)
        for i in range(3):
            send.send_nowait(i)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(nursery_procs.forward, receive, echo)
            nursery.start_soon(nursery_procs.forward, echo, out_send)
            # The child echoes three messages and exits: the forward reading from it
            # ends, and the one writing to it ends at its next write.
            assert [await out_receive.receive() for _ in range(3)] == [0, 1, 2]
            assert await echo.wait() == 3
            send.send_nowait(3)
        # Both forwards ended quietly (the nursery exited without an error).
        assert echo.state is State.EXITED


async def test_sibling_children_are_independent() -> None:
    async with nursery_procs.open_supervisor() as sup:
        a = await sup.start_child(None, name="a", raise_on_crash=False)
        b = await sup.start_child(None, name="b")
        with pytest.raises(ContextDied):
            await a.call(targets.kill_self)
        assert await b.call(targets.add, 3, 4) == 7
        assert sup.children == [b]


async def test_every_lookup_returns_the_handle_start_child_returned() -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(None, name="looked-up")
        assert sup.context_by_name("looked-up") is ctx
        assert nursery_procs.context_by_id(ctx.id) is ctx
        await ctx.aclose()
        # Once it is gone, only a messaging handle is left, and it says so.
        assert sup.context_by_name("looked-up") is None
        gone = nursery_procs.context_by_id(ctx.id)
        assert gone is not ctx
        assert gone.state is nursery_procs.State.EXITED
        with pytest.raises(RuntimeError, match="not started by this process"):
            await gone.wait()


async def test_a_context_is_a_trio_channel_and_async_resource() -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(targets.echo_messages)
        assert isinstance(ctx, trio.abc.Channel)
        async with ctx:
            await ctx.send("ping")
            assert await ctx.receive() == "ping"
        assert ctx.state is State.EXITED
        with pytest.raises(trio.ClosedResourceError):
            await ctx.send("after close")
        with pytest.raises(trio.ClosedResourceError):
            await ctx.call(targets.add, 1, 2)


@pytest.mark.parametrize("members", [1, 2])
async def test_a_users_exception_group_passes_through_unchanged(members: int) -> None:
    mine = ExceptionGroup("mine", [ValueError(str(i)) for i in range(members)])
    with pytest.raises(ExceptionGroup) as info:
        async with nursery_procs.open_supervisor() as sup:
            await sup.start_child(None)
            raise mine
    # The same group: its message and its very members, with no layer added or removed.
    assert info.value.message == "mine"
    assert list(info.value.exceptions) == list(mine.exceptions)


async def test_a_crash_nobody_awaits_cancels_the_supervisor_block() -> None:
    cancelled = False
    with pytest.raises(ContextDied) as info:
        async with nursery_procs.open_supervisor() as sup:
            ctx = await sup.start_child(None, name="crasher")
            bystander = await sup.start_child(None, name="bystander")
            with trio.CancelScope(shield=True):
                os.kill(ctx.pid or 0, signal.SIGKILL)
                await ctx.wait_exited()
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                cancelled = True
                raise
    assert cancelled
    assert info.value.name == "crasher"
    assert info.value.returncode == -signal.SIGKILL
    assert "it crashed (SIGKILL)" in str(info.value)
    # The other child was shut down gracefully, as when any task fails a nursery.
    assert bystander.returncode == 0


async def test_a_crash_is_only_logged_when_the_child_opted_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(None, name="tolerated", raise_on_crash=False)
        os.kill(ctx.pid or 0, signal.SIGKILL)
        assert await ctx.wait_exited() == -signal.SIGKILL
        assert sup.statistics().crashed_total == 1
    assert "child exited: SIGKILL" in caplog.text


async def test_serve_requests_can_be_started() -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(targets.request_parent, "ping")
        async with trio.open_nursery() as nursery:
            await nursery.start(ctx.serve_requests, str.upper)
            assert await ctx.wait() == "PING"
            nursery.cancel_scope.cancel()
