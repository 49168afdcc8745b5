"""Untrusted children: nothing they send is unpickled; values cross as plain data."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trust_targets as tt

import nursery_procs
from nursery_procs import RemoteError, RemoteTraceback, State


async def test_crafted_pickles_from_an_untrusted_child_never_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    canary = tmp_path / "canary"
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(tt.send_crafted_pickles, str(canary), trusted=False)

        async def answer(obj: object) -> object:
            raise AssertionError(f"a refused request reached its handler: {obj!r}")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ctx.serve_requests, answer)
            with trio.fail_after(30):
                assert await ctx.receive() == "done"
            nursery.cancel_scope.cancel()
        assert ctx.state is State.READY  # refused, not crashed
    assert not canary.exists()
    refusals = [
        r
        for r in caplog.records
        if r.name == "nursery_procs.router" and "may send only data" in r.getMessage()
    ]
    assert len(refusals) == 6  # one for each way up
    # The bomb hidden in a data payload (a failure's "pickled exception") was not
    # unpickled either: the canary check above covers it.


async def test_an_untrusted_childs_failure_is_rebuilt_without_unpickling(tmp_path: Path) -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(None, trusted=False)
        with pytest.raises(ValueError) as info:
            await ctx.call(tt.raises_value_error, "bad input")
        assert info.value.args == ("bad input", 42)
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "raises_value_error" in info.value.__cause__.text


async def test_a_non_data_result_from_an_untrusted_child_is_a_clear_error() -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(None, trusted=False)
        with pytest.raises(RemoteError) as info:
            await ctx.call(tt.returns_an_object)
        assert info.value.remote_type == "nursery_procs._errors.WireError"
        assert "not plain data" in info.value.remote_message
        assert "can not serialize 'Opaque' object" in info.value.remote_message
        # The child is fine and answers the next call.
        assert await ctx.call(tt.returns_containers) == {
            "tuple": [1, "two"],
            "list": [b"three"],
            "nested": {"n": None},
        }


async def test_calls_into_an_untrusted_child_may_carry_pickles() -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(None, trusted=False)
        assert await ctx.call(tt.type_name, Path("/x")) == "pathlib.PosixPath"


async def test_messages_from_an_untrusted_child_arrive_as_data() -> None:
    async with nursery_procs.open_supervisor(trusted=False) as sup:
        ctx = await sup.start_child(tt.echo_requests)
        await ctx.send(("a", 1))  # into the child: pickled, fine
        reply = await ctx.request(("ping", (2, 3)))
        assert reply == ["ping", [2, 3]]  # back out: plain data, tuples as lists
        assert await ctx.request(b"raw bytes") == b"raw bytes"


async def test_an_untrusted_childs_own_children_are_untrusted_too() -> None:
    async with nursery_procs.open_supervisor() as sup:
        top = await sup.start_child("targets:tree_node", 1, 1, None, name="n", trusted=False)
        with trio.fail_after(60):
            assert await top.receive() == ["ready", 2]
        grandchild = sup.context_by_name("n.0")
        assert grandchild is not None
        # The grandchild answers through the untrusted child, so it must answer as
        # data (a pickle would be refused there): the tuple it returns is a list.
        reply = await grandchild.request("whoami")
        assert reply == [grandchild.id, "n.0", grandchild.pid]


async def test_a_pool_of_untrusted_children() -> None:
    async with (
        nursery_procs.open_supervisor() as sup,
        nursery_procs.open_pool(sup, tt.echo_requests, spare=1, trusted=False) as pool,
        pool.take() as ctx,
    ):
        assert await ctx.request(("a", 1)) == ["a", 1]  # as data: the tuple is a list
