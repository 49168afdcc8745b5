"""The API's views through real curl: what each path shows and changes."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import pytest
import trio

import nursery_procs
from nursery_procs import _control_views
from nursery_procs._pool import open_pool

from . import targets
from .conftest import Answer, ask, curl, needs_curl, read_bytes, serving


@needs_curl
async def test_status_contexts_and_pools_with_curl(sock_path: str) -> None:
    async with serving(sock_path) as sup:
        notes = await sup.start_child(None, name="doc/notes")
        async with open_pool(sup, None, name="worker", spare=1, max=4) as pool:
            await pool.wait_idle()

            status = await curl(sock_path, "/status")
            assert status.status == 200
            assert status.headers["content-type"] == "application/json"
            assert status.body["pid"] == os.getpid()
            assert status.body["context_id"] == 0
            assert status.body["uptime"] >= 0
            assert status.body["counts"]["contexts"]["ready"] == 2
            assert status.body["counts"]["contexts_total"] == 2
            assert status.body["counts"]["pools"] == 1
            assert status.body["statistics"]["running"] == 2
            assert status.body["statistics"]["started_total"] == 2

            tree = (await curl(sock_path, "/contexts")).body
            assert (tree["id"], tree["pid"], tree["parent_id"]) == (0, os.getpid(), None)
            names = {child["name"]: child for child in tree["children"]}
            assert set(names) == {"doc/notes", "worker-1"}
            node = names["doc/notes"]
            assert node["id"] == notes.id
            assert node["pid"] == notes.pid
            assert node["parent_id"] == 0
            assert node["state"] == "ready"
            assert node["direct"] is True
            assert node["uptime"] > 0
            assert node["rss_bytes"] > 1024 * 1024
            # A child's proportional share is some of its resident memory.
            assert 0 < node["pss_bytes"] <= node["rss_bytes"]
            assert node["merged_bytes"] is None or node["merged_bytes"] >= 0
            assert node["messages_in"] >= 1 and node["messages_out"] >= 1
            assert node["children"] == []

            one = await curl(sock_path, "/contexts/doc%2Fnotes")
            assert one.status == 200
            assert (one.body["name"], one.body["id"]) == ("doc/notes", notes.id)

            pools = (await curl(sock_path, "/pools")).body["pools"]
            assert [p["name"] for p in pools] == ["worker"]
            assert pools[0]["statistics"]["spare"] == 1
            assert pools[0]["statistics"]["idle"] == 1
            single = await curl(sock_path, "/pools/worker")
            assert single.body == pools[0] | {"statistics": single.body["statistics"]}

            resized = await curl(
                sock_path,
                "/pools/worker",
                "-X",
                "PUT",
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                '{"spare": 2, "max": 3, "idle_timeout": 30}',
            )
            assert resized.status == 200
            stats = resized.body["statistics"]
            assert (stats["spare"], stats["max"], stats["idle_timeout"]) == (2, 3, 30)
            assert pool.statistics().spare == 2
            with trio.fail_after(15):
                await pool.wait_idle(2)
            forever = await curl(
                sock_path, "/pools/worker", "-X", "PUT", "--data-binary", '{"idle_timeout": null}'
            )
            assert forever.status == 200
            assert forever.body["statistics"]["idle_timeout"] is None

            stop = await curl(sock_path, "/contexts/doc%2Fnotes", "-X", "DELETE")
            assert stop.status == 202
            assert (stop.body["name"], stop.body["state"]) == ("doc/notes", "stopping")
            with trio.fail_after(15):
                assert await notes.wait_exited() == 0
            assert (await curl(sock_path, "/contexts/doc%2Fnotes")).status == 404
            assert (await curl(sock_path, "/status")).body["counts"]["pools"] == 1


@needs_curl
async def test_deeper_contexts_are_nested_and_can_be_stopped(sock_path: str) -> None:
    async with serving(sock_path) as sup:
        editor = await sup.start_child(targets.nest, "doc/notes", name="editor")
        with trio.fail_after(15):
            deep_id = await editor.receive()  # the grandchild is up and announced
        info = sup.router.directory[deep_id]

        tree = (await curl(sock_path, "/contexts")).body
        [editor_node] = tree["children"]
        assert editor_node["name"] == "editor"
        [deep] = editor_node["children"]
        assert deep["name"] == "doc/notes"
        assert (deep["id"], deep["parent_id"], deep["pid"]) == (info.id, editor.id, info.pid)
        assert deep["state"] == "ready"
        assert deep["direct"] is False
        assert deep["pid"] != editor.pid

        one = await curl(sock_path, "/contexts/doc%2Fnotes")
        assert one.status == 200 and one.body["id"] == info.id
        # The subtree comes with a context.
        subtree = (await curl(sock_path, "/contexts/editor")).body
        assert [c["name"] for c in subtree["children"]] == ["doc/notes"]

        stop = await curl(sock_path, "/contexts/doc%2Fnotes", "-X", "DELETE")
        assert stop.status == 202
        with trio.fail_after(15):
            await sup.router.wait_gone(deep_id)
        assert (await curl(sock_path, "/contexts/doc%2Fnotes")).status == 404
        assert editor.state is nursery_procs.State.READY

        stop = await curl(sock_path, "/contexts/editor", "-X", "DELETE")
        assert stop.status == 202
        with trio.fail_after(15):
            await editor.wait_exited()
        assert sup.children == []
        assert (await curl(sock_path, "/contexts")).body["children"] == []


@needs_curl
async def test_wrong_paths_methods_and_values_are_answered_and_change_nothing(
    sock_path: str,
) -> None:
    async with serving(sock_path) as sup:
        ctx = await sup.start_child(None, name="survivor")
        async with open_pool(sup, None, name="worker", spare=0, max=2) as pool:
            unknown = await curl(sock_path, "/nope")
            assert unknown.status == 404
            assert unknown.body == {"error": "unknown path '/nope'"}
            assert (await curl(sock_path, "/status/extra")).status == 404
            nested = await curl(sock_path, "/contexts/doc/notes")
            assert nested.status == 404 and "%2F" in nested.body["error"]

            wrong = await curl(sock_path, "/status", "-X", "POST", "--data-binary", "{}")
            assert wrong.status == 405
            assert wrong.headers["allow"] == "GET"
            assert "POST" in wrong.body["error"]
            wrong = await curl(sock_path, "/pools/worker", "-X", "DELETE")
            assert (wrong.status, wrong.headers["allow"]) == (405, "GET, PUT")
            wrong = await curl(sock_path, "/contexts/survivor", "-X", "PUT")
            assert (wrong.status, wrong.headers["allow"]) == (405, "GET, DELETE")

            async def put(body: str) -> Answer:
                return await curl(sock_path, "/pools/worker", "-X", "PUT", "--data-binary", body)

            not_json = await put("spare=3")
            assert not_json.status == 400 and "not JSON" in not_json.body["error"]
            assert (await put("NaN")).status == 400
            not_object = await put("[1, 2]")
            assert not_object.status == 400 and "JSON object" in not_object.body["error"]
            negative = await put('{"spare": -1}')
            assert negative.status == 400 and "spare" in negative.body["error"]
            too_many = await put('{"spare": 5}')
            assert too_many.status == 400 and "spare" in too_many.body["error"]
            # The pool's own validation decides (Pool.resize); the server only maps
            # its ValueError or TypeError to 400.
            wrong_type = await put('{"max": "4"}')
            assert wrong_type.status == 400 and wrong_type.body["error"]
            assert (await put('{"idle_timeout": -2}')).status == 400
            assert (await put('{"idle_timeout": "x"}')).status == 400
            extra = await put('{"spare": 1, "colour": "red"}')
            assert extra.status == 400 and "colour" in extra.body["error"]
            assert (await put("{}")).status == 400
            # Nothing was changed by the refused requests.
            assert (pool.statistics().spare, pool.statistics().max) == (0, 2)

            missing = await curl(sock_path, "/contexts/ghost")
            assert missing.status == 404 and "ghost" in missing.body["error"]
            assert (await curl(sock_path, "/contexts/ghost", "-X", "DELETE")).status == 404
            assert (await curl(sock_path, "/pools/ghost")).status == 404
            missing = await curl(
                sock_path, "/pools/ghost", "-X", "PUT", "--data-binary", '{"spare": 1}'
            )
            assert missing.status == 404 and "ghost" in missing.body["error"]

            after = await curl(sock_path, "/status")
            assert after.status == 200
            assert after.body["counts"]["contexts"]["ready"] == 1
            assert ctx.state is nursery_procs.State.READY


async def test_an_internal_error_is_500_without_details(
    sock_path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(supervisor: Any) -> Any:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(_control_views, "_status", broken)
    async with serving(sock_path):
        with caplog.at_level(logging.ERROR, logger="nursery_procs.control"):
            status, body = await ask(sock_path)
        assert status == 500
        assert "secret" not in json.dumps(body) and "Traceback" not in json.dumps(body)
        assert "secret detail" in caplog.text
        assert (await ask(sock_path, "GET", "/pools"))[0] == 200


async def test_children_have_a_process_title() -> None:
    pytest.importorskip("setproctitle", reason="setproctitle is not installed (optional)")
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(None, name="title-check")
        assert ctx.pid is not None
        cmdline = read_bytes(f"/proc/{ctx.pid}/cmdline")
        title = cmdline.replace(b"\0", b" ").strip()
        assert title == b"nursery_procs: title-check", cmdline
        await ctx.aclose()
