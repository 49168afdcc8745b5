"""Trees of real contexts: ids and names, routing, dead replies, cascading shutdown."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest
import targets
import trio
import trio.testing

import nursery_procs
from nursery_procs import MessageUndeliverable, State
from nursery_procs._wire import Handle
from nursery_procs.testing import wait_process_gone


async def _start_tree(
    sup: nursery_procs.Supervisor, depth: int, fanout: int, marker_dir: Path | None = None
) -> nursery_procs.Context:
    top = await sup.start_child(
        targets.tree_node, depth, fanout, str(marker_dir) if marker_dir else None, name="n"
    )
    with trio.fail_after(60):
        assert await top.receive() == ("ready", sum(fanout**i for i in range(depth + 1)))
    return top


async def test_a_depth_3_chain_is_known_and_routed_from_the_root() -> None:
    async with nursery_procs.open_supervisor() as sup:
        top = await _start_tree(sup, depth=3, fanout=1)
        names = ["n", "n.0", "n.0.0", "n.0.0.0"]
        contexts = [sup.context_by_name(name) for name in names]
        assert all(ctx is not None for ctx in contexts)
        ids = [ctx.id for ctx in contexts if ctx is not None]
        assert len(set(ids)) == 4 and 0 not in ids
        for ctx, parent_id in zip(contexts, [0, *ids[:-1]], strict=True):
            assert ctx is not None
            assert ctx.parent_id == parent_id
            assert ctx.state is State.READY
            # Routed through the intermediaries and answered by the right process.
            context_id, name, pid = await ctx.request("whoami")
            assert (context_id, name, pid) == (ctx.id, ctx.name, ctx.pid)
        deepest = nursery_procs.context_by_id(ids[-1])
        assert deepest is not None and deepest.name == "n.0.0.0"
        assert top is contexts[0]


async def test_any_context_can_message_any_other_by_id() -> None:
    async with nursery_procs.open_supervisor() as sup:
        await _start_tree(sup, depth=2, fanout=2)
        a = sup.context_by_name("n.0.0")
        b = sup.context_by_name("n.1.1")
        assert a is not None and b is not None
        # A grandchild messages the root, through its parent and grandparent.
        assert await a.call(targets.message_context, 0, "up the tree") == "sent"
        root_view = nursery_procs.context_by_id(a.id)
        assert await root_view.receive() == "up the tree"
        # A grandchild messages a cousin in the other subtree (through the root):
        # the cousin has no such handle, and says so.
        reason = await a.call(targets.message_context, b.id, "hello", 555)
        assert reason == f"no handle 555 in context {b.id} (n.1.1)"


async def test_policy_refuses_messages_between_subtrees() -> None:
    async with nursery_procs.open_supervisor(siblings_may_talk=False) as sup:
        await _start_tree(sup, depth=1, fanout=2)
        a = sup.context_by_name("n.0")
        b = sup.context_by_name("n.1")
        assert a is not None and b is not None
        reason = await a.call(targets.message_context, b.id, "psst", 555)
        assert reason.startswith(f"policy: context {a.id} may not message {b.id}")
        # Up and down the tree is still fine.
        assert await a.call(targets.message_context, 0, "to the root") == "sent"
        assert await nursery_procs.context_by_id(a.id).receive() == "to the root"


async def test_unknown_context_from_deep_in_the_tree_gets_a_dead_reply() -> None:
    async with nursery_procs.open_supervisor() as sup:
        await _start_tree(sup, depth=2, fanout=1)
        deep = sup.context_by_name("n.0.0")
        assert deep is not None
        reason = await deep.call(targets.message_context, 4242, "anyone?", 10)
        assert reason == "no route to context 4242 (from 0)"
        with pytest.raises(MessageUndeliverable, match=r"no route to context 4343 \(from 0\)"):
            await nursery_procs.context_by_id(4343).request("hello")


async def test_closing_an_intermediary_closes_its_subtree_depth_first(tmp_path: Path) -> None:
    async with nursery_procs.open_supervisor() as sup:
        await _start_tree(sup, depth=2, fanout=2, marker_dir=tmp_path)
        left = sup.context_by_name("n.0")
        right = sup.context_by_name("n.1")
        assert left is not None and right is not None
        doomed = {name: sup.context_by_name(name) for name in ("n.0", "n.0.0", "n.0.1")}
        await left.aclose()
        # The left subtree is gone: every process reaped, every route withdrawn.
        for name, ctx in doomed.items():
            assert ctx is not None
            assert (tmp_path / name).exists()
            assert sup.context_by_name(name) is None
        times = {p.name: float(p.read_text().split()[1]) for p in tmp_path.iterdir()}  # noqa: ASYNC240
        assert times["n.0"] > max(times["n.0.0"], times["n.0.1"])
        # The right subtree is undisturbed.
        for name in ("n.1", "n.1.0", "n.1.1"):
            ctx = sup.context_by_name(name)
            assert ctx is not None
            assert await ctx.request(name) == name
        assert right.state is State.READY


async def test_shutdown_of_a_grandchild_leaves_its_parent_running() -> None:
    async with nursery_procs.open_supervisor() as sup:
        await _start_tree(sup, depth=2, fanout=1)
        middle = sup.context_by_name("n.0")
        leaf = sup.context_by_name("n.0.0")
        assert middle is not None and leaf is not None
        leaf_pid = leaf.pid
        assert leaf_pid is not None
        await leaf.aclose()
        await wait_process_gone(leaf_pid)
        assert sup.context_by_name("n.0.0") is None
        assert await middle.request("still here") == "still here"


async def test_sigkill_of_an_intermediary_fails_requests_and_leaves_no_orphan() -> None:
    async with nursery_procs.open_supervisor() as sup:
        await _start_tree(sup, depth=2, fanout=2)
        middle = sup.context_by_name("n.0")
        leaves = [sup.context_by_name(n) for n in ("n.0.0", "n.0.1")]
        assert middle is not None and middle.pid is not None
        leaf_pids = [leaf.pid for leaf in leaves if leaf is not None and leaf.pid is not None]
        assert len(leaf_pids) == 2
        async with trio.open_nursery() as nursery:
            failures: list[BaseException] = []

            async def pending_request() -> None:
                leaf = leaves[0]
                assert leaf is not None
                try:
                    await leaf.request("block")
                # ContextDied once the route is withdrawn, or a dead reply if the
                # request was still on its way when the intermediary died.
                except nursery_procs.ContextError as exc:
                    failures.append(exc)

            nursery.start_soon(pending_request)
            await trio.testing.wait_all_tasks_blocked()
            os.kill(middle.pid, signal.SIGKILL)
        assert len(failures) == 1
        with trio.fail_after(10):  # about a second by design; room for a loaded machine
            for pid in leaf_pids:
                await wait_process_gone(pid)
            await middle.wait_exited()  # its route (and those below it) withdrawn
        assert all(sup.context_by_name(n) is None for n in ("n.0", "n.0.0", "n.0.1"))
        other = sup.context_by_name("n.1.1")
        assert other is not None and await other.request("ok") == "ok"


async def test_spoofed_source_is_dropped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nursery_procs.router")
    async with nursery_procs.open_supervisor() as sup:
        liar = await sup.start_child(None, name="liar")
        honest = await sup.start_child(None, name="honest")
        await liar.call(targets.send_spoofed, honest.id, Handle.CHANNEL, "I am honest")
        # The link stays up, and the next honest message shows the lie was dropped.
        await liar.call(targets.send_to_parent, "truth")
        assert await liar.receive() == "truth"
        with pytest.raises(trio.WouldBlock):
            honest.receive_nowait()
    assert any(
        f"source {honest.id} cannot be behind this link" in r.getMessage() for r in caplog.records
    )


async def test_add_route_from_a_grandchild_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nursery_procs.router")
    async with nursery_procs.open_supervisor() as sup:
        await _start_tree(sup, depth=1, fanout=1)
        child = sup.context_by_name("n.0")
        assert child is not None
        await child.call(targets.post, 0, Handle.ADD_ROUTE, (999, "intruder", child.id, 1))
        assert await child.request("still up") == "still up"
        assert nursery_procs.context_by_id(999).state is nursery_procs.State.EXITED
        assert sup.context_by_name("intruder") is None
    assert any("not an immediate child" in r.getMessage() for r in caplog.records)


async def test_a_message_too_big_for_the_next_link_gets_a_dead_reply() -> None:
    # The root's links take 64 KiB; the intermediary's own link to its child is
    # bigger, so a grandchild can hand it a message the root would refuse.
    policy = nursery_procs.Policy(max_message_size=64 * 1024)
    async with nursery_procs.open_supervisor(policy=policy) as sup:
        await _start_tree(sup, depth=1, fanout=1)
        middle = sup.context_by_name("n")
        leaf = sup.context_by_name("n.0")
        assert middle is not None and leaf is not None
        reason = await leaf.call(targets.request_with_payload, 0, 200 * 1024)
        assert reason.startswith(f"could not forward to 0 at {middle.id}")
        assert "over the link's limit" in reason
        # Nothing else was disturbed.
        assert await leaf.request("small") == "small"
        assert await middle.request("fine") == "fine"


async def test_closing_a_grandchild_that_ignores_shutdown_is_bounded_by_the_policy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import boundary_targets

    quick = nursery_procs.Policy(grace_period=0.2, kill_after=0.2)
    async with nursery_procs.open_supervisor(policy=quick) as sup:
        middle = await sup.start_child(boundary_targets.host_stubborn_child, name="middle")
        assert await middle.receive() == "ready"
        grandchild = sup.context_by_name("middle.stubborn")
        assert grandchild is not None
        started = trio.current_time()
        with trio.CancelScope() as caller:
            caller.cancel()  # the close is shielded: a cancelled caller still waits, bounded
            await grandchild.aclose()
        waited = trio.current_time() - started
        assert quick.close_deadline <= waited < quick.close_deadline + 2.0
        # Its own parent (patient: 60 s of grace) is still escalating.
        assert grandchild.state is State.READY
    assert "was not gone 2.4 s after SHUTDOWN" in caplog.text
