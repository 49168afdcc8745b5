"""A tree across hosts: this process, a context on the other host, and its own
child there (started with the runtime it was shipped)."""

from __future__ import annotations

import pytest
import trio

import nursery_procs

from . import far_module, targets
from .sshd import SSHServer


@pytest.mark.parametrize("start_method", ["exec", "forkserver"])
async def test_a_remote_grandchild_is_routed_both_ways(sshd: SSHServer, start_method: str) -> None:
    async with nursery_procs.open_supervisor() as sup:
        middle = await sup.start_child(targets.nest, start_method, name="middle", via=sshd.via())
        with trio.fail_after(60):
            grandchild_id = await middle.receive()
        grandchild = nursery_procs.context_by_id(grandchild_id)
        assert grandchild.name == "grandchild" and grandchild.parent_id == middle.id
        there = await grandchild.call(targets.where)
        here = await middle.call(targets.where)
        assert there["pid"] != here["pid"]
        assert there["trio_loader"] == "Importer"
        assert (there["isolated"], there["no_site"]) == (1, 1)
        # Down the tree: a request routed through the middle context.
        assert await grandchild.request(["deep", 1]) == ["deep", 1]
        # Up the tree: the grandchild messages this process by id.
        assert await grandchild.call(targets.tell, 0, "from afar") == "sent"
        assert await nursery_procs.context_by_id(grandchild.id).receive() == "from afar"
        # A module only this process has: pushed to the middle context ahead
        # of the call, and from there to the grandchild.
        assert await grandchild.call(far_module.double, 21) == 42
        assert await middle.call(targets.shipped_here, far_module.__name__)
        # A module fetched at run time: the grandchild asks the middle context,
        # which asks this process, and keeps it.
        assert not await middle.call(targets.shipped_here, "remote.unused_helper2")
        assert await grandchild.call(targets.import_here, "remote.unused_helper2") == "Importer"
        assert await middle.call(targets.shipped_here, "remote.unused_helper2")
