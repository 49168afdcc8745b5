"""Contexts on another host, reached through a real OpenSSH server, with a
Python that has neither nursery_procs nor trio."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest
import trio
from programs import run_script

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


async def test_more_contexts_than_a_connection_allows_get_another(sshd: SSHServer) -> None:
    # The server allows 10 sessions per connection (OpenSSH's default); say 4,
    # as a stricter server would: 2 contexts per connection.
    async with nursery_procs.open_supervisor(via=sshd.via(max_sessions=4)) as sup:
        contexts = [await sup.start_child(targets.serve_echo, name=f"c{i}") for i in range(5)]
        for ctx in contexts:
            assert await ctx.request(ctx.name) == ctx.name
        assert len(sshd.connection_pids()) == 3
        # A session freed is used again.
        await contexts[0].aclose()
        again = await sup.start_child(targets.serve_echo, name="again")
        assert await again.request("again") == "again"
        assert len(sshd.connection_pids()) == 3


async def test_modules_are_served_only_to_shipped_children_and_by_name(
    sshd: SSHServer,
) -> None:
    async with nursery_procs.open_supervisor() as sup:
        far = await sup.start_child(None, name="far", via=sshd.via())
        local = await sup.start_child(None, name="here", start_method="exec")
        answer = await local.call(targets.ask_parent_for_module, "json")
        assert answer.startswith("MessageUndeliverable: context 0 serves modules only to its")
        assert await far.call(targets.ask_parent_for_module, 123) == (
            "ValueError: a module name is a string, not 123"
        )
        assert await far.call(targets.ask_parent_for_module, "remote.unused_helper") == (
            "1 records"
        )
        # Sent once per link: asked again, nothing new.
        assert await far.call(targets.ask_parent_for_module, "remote.unused_helper") == (
            "0 records"
        )


async def test_a_scripts_own_functions_run_on_the_other_host(sshd: SSHServer) -> None:
    script = Path(__file__).parent / "scripts" / "main_script.py"
    async with run_script(script, json.dumps(sshd.settings())) as (process, stdout):
        with trio.fail_after(60):
            first, second = await stdout.line(), await stdout.line()
            assert await process.wait() == 0
    assert first.startswith(b"hello from the script, target, in ")
    assert second.startswith(b"hello from the script, call, in ")
    assert first.rsplit(b" ", 1)[1] != str(process.pid).encode()
