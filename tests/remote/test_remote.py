"""Contexts on another host, reached through a real OpenSSH server, with a
Python that has neither nursery_procs nor trio."""

from __future__ import annotations

import logging
import subprocess

import pytest
import trio

import nursery_procs
from nursery_procs import State
from nursery_procs.testing import wait_process_gone

from . import targets
from .sshd import REMOTE_PYTHON, SSHServer


def test_the_remote_python_cannot_import_the_runtime(sshd: SSHServer) -> None:
    """The premise of the other tests: what runs there must have been shipped."""
    for module in ("trio", "nursery_procs", "tests", "remote"):
        result = subprocess.run(
            sshd.ssh_argv(f"{REMOTE_PYTHON} -c 'import {module}'"),
            capture_output=True,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert result.returncode == 1
        assert f"No module named '{module}'".encode() in result.stderr


async def test_a_remote_child_answers_calls_and_requests(sshd: SSHServer) -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(targets.serve_echo, name="far", via=sshd.via())
        assert ctx.state is State.READY
        facts = await ctx.call(targets.where)
        # Isolated, no site-packages: the runtime, trio and this module came
        # through the import hook.
        assert (facts["isolated"], facts["no_site"]) == (1, 1)
        assert facts["trio_loader"] == "Importer"
        assert facts["nursery_procs_loader"] == "Importer"
        assert facts["this_loader"] == "Importer"
        assert await ctx.request({"hello": [1, 2.5, b"bytes"]}) == {"hello": [1, 2.5, b"bytes"]}
        payload = bytes(range(256)) * 4096
        assert await ctx.request(payload) == payload
        await ctx.aclose()
        assert ctx.returncode == 0


async def test_a_remote_child_logs_under_its_name(
    sshd: SSHServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nursery_procs.child")
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(None, name="talker", via=sshd.via())
        await ctx.call(targets.chatter, "hi there")
        await ctx.aclose()
    texts = {
        (r.name, r.getMessage()) for r in caplog.records if r.name == "nursery_procs.child.talker"
    }
    assert ("nursery_procs.child.talker", "stdout: hi there") in texts
    assert ("nursery_procs.child.talker", "stderr: hi there") in texts
    assert ("nursery_procs.child.talker", "logged: hi there") in texts


async def test_an_extension_module_missing_there_is_named(sshd: SSHServer) -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(None, name="ext", via=sshd.via())
        # pycrdt's package is pure Python; its core is a compiled extension.
        with pytest.raises(ModuleNotFoundError, match=r"pycrdt\._pycrdt") as caught:
            await ctx.call(targets.import_here, "pycrdt")
        assert "extension module" in str(caught.value)
        assert "install it on that host" in str(caught.value)


async def test_a_module_is_fetched_from_the_parent_in_a_worker_thread(sshd: SSHServer) -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(None, name="fetch", via=sshd.via())
        assert await ctx.call(targets.import_here, "remote.unused_helper") == "Importer"


async def test_a_run_time_import_on_the_event_loop_says_to_preload(sshd: SSHServer) -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(None, name="loop", via=sshd.via())
        with pytest.raises(ModuleNotFoundError, match="preload"):
            await ctx.call(targets.import_on_the_loop, "remote.unused_helper")


async def test_preloaded_modules_are_there_for_run_time_imports(sshd: SSHServer) -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(
            None, name="ahead", via=sshd.via(), preload=["remote.unused_helper"]
        )
        assert await ctx.call(targets.import_on_the_loop, "remote.unused_helper") == "Importer"


async def test_contexts_on_one_host_share_one_connection(sshd: SSHServer) -> None:
    async with nursery_procs.open_supervisor(via=sshd.via()) as sup:
        first = await sup.start_child(targets.serve_echo, name="first")
        async with sup.open_child(targets.serve_echo, name="second") as second:
            third = await sup.start_child(targets.serve_echo, name="third")
            for ctx in (first, second, third):
                assert await ctx.request(ctx.name) == ctx.name
            (connection,) = sshd.connection_pids()
        assert second.state is State.EXITED
    # Closed with the supervisor.
    with trio.fail_after(10):
        await wait_process_gone(connection)


async def test_an_untrusted_remote_child_is_sent_modules_but_not_served_on_request(
    sshd: SSHServer,
) -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(targets.serve_echo, name="wary", via=sshd.via(), trusted=False)
        # What its parent sends (its target's module, a call's) it has.
        assert (await ctx.call(targets.where))["this_loader"] == "Importer"
        assert await ctx.request([1, "two"]) == [1, "two"]
        with pytest.raises(ModuleNotFoundError, match="not served to untrusted contexts"):
            await ctx.call(targets.import_here, "remote.unused_helper")
