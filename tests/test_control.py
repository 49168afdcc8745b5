"""The control socket: its HTTP API (through real curl), atomic creation, errors, the CLI."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import h11
import pytest
import trio

import nursery_procs
from nursery_procs import ControlSocketBusy, _cli, _cli_format, _control_client, _control_views
from nursery_procs._control import open_control, serve_control
from nursery_procs._pool import open_pool

CURL = shutil.which("curl") or "/usr/bin/curl"
needs_curl = pytest.mark.skipif(not os.path.exists(CURL), reason="curl is not installed")


async def nest(name: str) -> None:
    """Run in a child: start a grandchild called *name*, then wait to be shut down."""
    async with nursery_procs.open_supervisor() as sup:
        await sup.start_child(None, name=name)
        await trio.sleep_forever()


# -- helpers -------------------------------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[str]:
    """A short private directory (Unix socket paths are limited to 107 bytes)."""
    directory = tempfile.mkdtemp(prefix="npctl", dir="/tmp")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def sock_path(sock_dir: str) -> str:
    return os.path.join(sock_dir, "control.sock")


class Answer(NamedTuple):
    status: int
    headers: dict[str, str]
    body: Any


def parse_http(data: bytes) -> Answer:
    """Parse a raw HTTP/1.1 answer (skipping 1xx ones) with a JSON body."""
    while True:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if 100 <= status < 200:
            data = rest
            continue
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        return Answer(status, headers, json.loads(rest) if rest else None)


async def curl(path: str, target: str, *args: str) -> Answer:
    """``curl --unix-socket path http://localhost<target>`` with extra *args*."""
    result = await trio.run_process(
        [
            CURL,
            "-s",
            "-i",
            "--max-time",
            "20",
            "--unix-socket",
            path,
            *args,
            f"http://localhost{target}",
        ],
        capture_stdout=True,
        check=False,
    )
    assert result.returncode == 0, f"curl failed with {result.returncode}"
    return parse_http(result.stdout)


async def raw(path: str, data: bytes) -> Answer:
    """Send *data* as it is, read the answer until the server closes."""
    stream = await trio.open_unix_socket(path)
    async with stream:
        await stream.send_all(data)
        received = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                received += chunk
    return parse_http(received)


async def ask(path: str, method: str = "GET", target: str = "/status", body: Any = None) -> Any:
    """The blocking client in a thread, so that a server in this process can answer."""
    return await trio.to_thread.run_sync(
        functools.partial(_control_client.request, path, method, target, body, timeout=10)
    )


async def wait_for(predicate: Any, seconds: float = 15.0) -> None:
    with trio.fail_after(seconds):
        while True:
            if predicate():
                return
            await trio.sleep(0.02)


def exists(path: str) -> bool:
    return os.path.lexists(path)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


@asynccontextmanager
async def serving(path: str, **options: Any) -> AsyncIterator[nursery_procs.Supervisor]:
    async with nursery_procs.open_supervisor() as sup, open_control(sup, path, **options):
        yield sup


async def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "nursery_procs", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=env,
    )


def walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node["children"]:
        yield from walk(child)


# -- the API through curl ------------------------------------------------------


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
        editor = await sup.start_child(nest, "doc/notes", name="editor")

        def grandchild() -> Any:
            return next((i for i in sup.router.directory.values() if i.name == "doc/notes"), None)

        await wait_for(lambda: grandchild() is not None)
        info = grandchild()

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
        await wait_for(lambda: grandchild() is None)
        assert (await curl(sock_path, "/contexts/doc%2Fnotes")).status == 404
        assert editor.state is nursery_procs.State.READY

        stop = await curl(sock_path, "/contexts/editor", "-X", "DELETE")
        assert stop.status == 202
        with trio.fail_after(15):
            await editor.wait_exited()
        assert sup.children == []
        assert (await curl(sock_path, "/contexts")).body["children"] == []


async def test_keep_alive_serves_several_requests_on_one_connection(sock_path: str) -> None:
    async with serving(sock_path):
        stream = await trio.open_unix_socket(sock_path)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            for target in ("/status", "/pools", "/contexts"):
                request = h11.Request(method="GET", target=target, headers=[("Host", "x")])
                await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
                body = b""
                status = 0
                with trio.fail_after(10):
                    while True:
                        event = conn.next_event()
                        if event is h11.NEED_DATA:
                            conn.receive_data(await stream.receive_some(65536))
                        elif isinstance(event, h11.Response):
                            status = event.status_code
                        elif isinstance(event, h11.Data):
                            body += event.data
                        elif isinstance(event, h11.EndOfMessage):
                            break
                assert status == 200
                json.loads(body)
                conn.start_next_cycle()


# -- the socket file -------------------------------------------------------------


def _connect_when_it_appears(path: str, stop: threading.Event) -> str:
    """In a thread: spin until *path* exists, then connect and ask at once."""
    while not os.path.exists(path):
        if stop.is_set():
            return "never appeared"
    try:
        status, _ = _control_client.request(path, "GET", "/status", timeout=10)
    except _control_client.ClientError as exc:
        return f"failed: {exc.message}"
    return f"status {status}"


async def test_a_client_connecting_the_moment_the_file_appears_succeeds(sock_dir: str) -> None:
    async with nursery_procs.open_supervisor() as sup:
        for attempt in range(20):
            path = os.path.join(sock_dir, f"race{attempt}.sock")
            stop = threading.Event()
            outcome: list[str] = []

            async def watch(
                path: str = path, stop: threading.Event = stop, outcome: list[str] = outcome
            ) -> None:
                outcome.append(await trio.to_thread.run_sync(_connect_when_it_appears, path, stop))

            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch)
                    await trio.sleep(0.002)
                    async with open_control(sup, path):
                        await wait_for(functools.partial(bool, outcome))
            finally:
                stop.set()
            assert outcome == ["status 200"], f"attempt {attempt}: {outcome}"
            assert not exists(path)
        assert os.listdir(sock_dir) == []  # no temporary files left behind


HELPER = """
import sys, trio, nursery_procs
from nursery_procs._control import serve_control

async def main(path):
    async with nursery_procs.open_supervisor() as sup:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, sup, path)
            print("ready", flush=True)
            await trio.sleep_forever()

trio.run(main, sys.argv[1])
"""


@asynccontextmanager
async def helper_server(path: str) -> AsyncIterator[trio.Process]:
    """Another process serving a control socket at *path*; killed (if alive) on exit."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", HELPER, path], stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        seen = b""
        with trio.fail_after(20):
            while b"ready" not in seen:
                chunk = await process.stdout.receive_some(1024)
                assert chunk, "the helper exited before serving"
                seen += chunk
        yield process
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            assert process.stdout is not None
            await process.stdout.aclose()


async def test_a_live_socket_is_not_stolen_and_a_stale_one_is_replaced(sock_path: str) -> None:
    async with nursery_procs.open_supervisor() as sup, helper_server(sock_path) as helper:
        assert _control_client.request(sock_path, "GET", "/status")[1]["pid"] == helper.pid
        inode = os.stat(sock_path).st_ino

        with pytest.raises(ControlSocketBusy, match="in use") as caught:
            async with open_control(sup, sock_path):
                pytest.fail("served on a live server's socket")  # pragma: no cover
        assert caught.value.path == sock_path
        # Untouched, and the live server still answers.
        assert os.stat(sock_path).st_ino == inode
        assert _control_client.request(sock_path, "GET", "/status")[1]["pid"] == helper.pid
        assert sorted(os.listdir(os.path.dirname(sock_path))) == ["control.sock"]

        helper.send_signal(signal.SIGKILL)
        await helper.wait()
        # A stale file is left: it exists and refuses connections.
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
        with pytest.raises(_control_client.ClientError) as refused:
            _control_client.request(sock_path, "GET", "/status")
        assert refused.value.exit_code == _control_client.EXIT_REFUSED

        async with open_control(sup, sock_path):
            assert os.stat(sock_path).st_ino != inode
            assert (await ask(sock_path))[1]["pid"] == os.getpid()
        assert not exists(sock_path)


async def test_mode_0600_started_path_and_removal_on_exit(sock_path: str) -> None:
    async with nursery_procs.open_supervisor() as sup:
        async with trio.open_nursery() as nursery:
            started = await nursery.start(serve_control, sup, sock_path)
            assert started == sock_path
            st = os.lstat(sock_path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600
            assert st.st_uid == os.getuid()
            assert os.listdir(os.path.dirname(sock_path)) == ["control.sock"]
            nursery.cancel_scope.cancel()
        assert not exists(sock_path)

        # Removed on an error from the block too.
        with pytest.raises(KeyError):
            async with open_control(sup, sock_path):
                raise KeyError("boom")
        assert not exists(sock_path)


async def test_a_socket_replaced_by_another_server_is_left_alone(
    sock_path: str, sock_dir: str
) -> None:
    other = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with other:
        async with serving(sock_path):
            # Another server wins the path meanwhile (as when two start together).
            temp = os.path.join(sock_dir, "other.tmp")
            await other.bind(temp)
            other.listen(1)
            os.rename(temp, sock_path)
            theirs = os.lstat(sock_path).st_ino
        assert os.lstat(sock_path).st_ino == theirs
    os.unlink(sock_path)


async def test_two_servers_starting_together(sock_path: str) -> None:
    async with nursery_procs.open_supervisor() as sup:
        outcomes: list[str] = []

        async def one(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                async with open_control(sup, sock_path):
                    outcomes.append("serving")
                    task_status.started()
                    await trio.sleep_forever()
            except ControlSocketBusy:
                outcomes.append("busy")
                task_status.started()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            nursery.start_soon(one)
            await wait_for(lambda: len(outcomes) == 2)
            assert "serving" in outcomes
            # Whoever owns the path answers.
            assert (await ask(sock_path))[0] == 200
            nursery.cancel_scope.cancel()
        assert not exists(sock_path)


async def test_a_file_that_is_not_a_socket_is_not_replaced(sock_path: str) -> None:
    write_bytes(sock_path, b"precious")
    async with nursery_procs.open_supervisor() as sup:
        with pytest.raises(FileExistsError, match="not a socket"):
            async with open_control(sup, sock_path):
                pytest.fail("replaced a regular file")  # pragma: no cover
    assert read_bytes(sock_path) == b"precious"
    assert os.listdir(os.path.dirname(sock_path)) == ["control.sock"]


async def test_a_path_too_long_is_refused(sock_dir: str) -> None:
    async with nursery_procs.open_supervisor() as sup:
        with pytest.raises(ValueError, match="107 bytes"):
            async with open_control(sup, os.path.join(sock_dir, "x" * 120)):
                pass  # pragma: no cover


# -- bad requests ----------------------------------------------------------------


async def test_malformed_requests_get_400_and_the_server_keeps_going(sock_path: str) -> None:
    async with serving(sock_path) as sup:
        child = await sup.start_child(None, name="survivor")
        garbage = await raw(sock_path, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
        assert garbage.status == 400
        assert "malformed HTTP request" in garbage.body["error"]

        bad_header = await raw(
            sock_path, b"GET /status HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n"
        )
        assert bad_header.status == 400
        assert "error" in bad_header.body

        bad_length = await raw(
            sock_path, b"PUT /pools/x HTTP/1.1\r\nHost: x\r\nContent-Length: many\r\n\r\n"
        )
        assert bad_length.status == 400

        huge = await raw(
            sock_path, b"GET /status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n"
        )
        assert huge.status == 431

        bad_escape = await raw(
            sock_path, b"GET /contexts/%ff%fe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert bad_escape.status == 400

        ok = await raw(sock_path, b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert ok.status == 200
        assert child.state is nursery_procs.State.READY


@needs_curl
async def test_error_answers_are_json_and_the_server_keeps_going(
    sock_path: str, sock_dir: str
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

            big = os.path.join(sock_dir, "big.json")
            write_bytes(big, b" " * (70 * 1024) + b"{}")
            too_large = await curl(
                sock_path, "/pools/worker", "-X", "PUT", "--data-binary", f"@{big}"
            )
            assert too_large.status == 413
            assert "65536" in too_large.body["error"]
            chunked = await curl(
                sock_path,
                "/pools/worker",
                "-X",
                "PUT",
                "-H",
                "Transfer-Encoding: chunked",
                "--data-binary",
                f"@{big}",
            )
            assert chunked.status == 413

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


async def test_a_silent_client_is_disconnected(sock_path: str) -> None:
    async with serving(sock_path, read_timeout=0.3):
        for opening in (b"", b"GET /status HTTP/1.1\r\nHo"):
            stream = await trio.open_unix_socket(sock_path)
            async with stream:
                await stream.send_all(opening)
                with trio.fail_after(5):
                    assert await stream.receive_some(1024) == b""
        # A client dripping a byte now and then is cut off too.
        stream = await trio.open_unix_socket(sock_path)
        async with stream:
            start = trio.current_time()
            with trio.fail_after(5):
                try:
                    for byte in b"GET /status HTTP/1.1\r\nHost: xxxxxxxxxxxxxxxxxxxxxxxx":
                        await stream.send_all(bytes([byte]))
                        await trio.sleep(0.05)
                except trio.BrokenResourceError:
                    pass
                else:  # pragma: no cover - the server would have waited 2 s
                    pytest.fail("the server kept a dripping client")
            assert trio.current_time() - start < 1.0
        assert (await ask(sock_path))[0] == 200


async def test_connections_over_the_limit_get_503(sock_path: str) -> None:
    async with serving(sock_path, max_connections=1):
        held = await trio.open_unix_socket(sock_path)
        async with held:
            await trio.sleep(0.05)
            over = await raw(sock_path, b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
            assert over.status == 503
        assert (await ask(sock_path))[0] == 200


# -- the command line ------------------------------------------------------------


async def test_cli_against_a_live_server(sock_path: str, sock_dir: str) -> None:
    async with serving(sock_path) as sup:
        notes = await sup.start_child(None, name="doc/notes")
        async with open_pool(sup, None, name="worker", spare=1, max=3) as pool:
            await pool.wait_idle()

            status = await cli("--socket", sock_path, "status")
            assert status.returncode == 0, status.stderr
            assert f"pid {os.getpid()}" in status.stdout.decode()
            assert "2 ready" in status.stdout.decode()

            as_json = await cli("--socket", sock_path, "--json", "status")
            assert json.loads(as_json.stdout)["pid"] == os.getpid()
            # Options after the command work too, and the environment gives the default.
            env = dict(os.environ, NURSERY_PROCS_CONTROL=sock_path)
            assert json.loads((await cli("status", "--json", env=env)).stdout)["pid"] == os.getpid()

            tree = await cli("--socket", sock_path, "tree")
            assert tree.returncode == 0, tree.stderr
            lines = tree.stdout.decode().splitlines()
            assert lines[0].startswith(f"root (id 0, pid {os.getpid()}, ready")
            assert any(
                line.startswith(("├── doc/notes", "└── doc/notes")) and f"pid {notes.pid}" in line
                for line in lines[1:]
            ), lines
            assert any("worker-1" in line for line in lines)
            tree_json = json.loads((await cli("--socket", sock_path, "--json", "tree")).stdout)
            assert {c["name"] for c in tree_json["children"]} == {"doc/notes", "worker-1"}

            pools = await cli("--socket", sock_path, "pools")
            assert pools.returncode == 0
            header, row = pools.stdout.decode().splitlines()
            assert header.split()[:3] == ["name", "spare", "max"]
            assert row.split()[:3] == ["worker", "1", "3"]
            assert (
                json.loads((await cli("--socket", sock_path, "--json", "pools")).stdout)["pools"][
                    0
                ]["name"]
                == "worker"
            )

            resize = await cli(
                "--socket",
                sock_path,
                "resize",
                "worker",
                "--spare",
                "2",
                "--max",
                "3",
                "--idle-timeout",
                "60",
            )
            assert resize.returncode == 0, resize.stderr
            assert "spare: 2" in resize.stdout.decode()
            assert (pool.statistics().spare, pool.statistics().idle_timeout) == (2, 60)
            resized = await cli(
                "--socket", sock_path, "--json", "resize", "worker", "--idle-timeout", "none"
            )
            assert json.loads(resized.stdout)["statistics"]["idle_timeout"] is None

            invalid = await cli("--socket", sock_path, "resize", "worker", "--spare", "-1")
            assert invalid.returncode == 1
            assert b"spare must be >= 0" in invalid.stderr
            unknown = await cli("--socket", sock_path, "resize", "ghost", "--max", "2")
            assert (unknown.returncode, b"no pool named 'ghost'" in unknown.stderr) == (1, True)
            assert (await cli("--socket", sock_path, "resize", "worker")).returncode == 2

            stop = await cli("--socket", sock_path, "stop", "doc/notes")
            assert stop.returncode == 0, stop.stderr
            assert stop.stdout.decode().startswith("stopping doc/notes")
            with trio.fail_after(15):
                await notes.wait_exited()
            again = await cli("--socket", sock_path, "stop", "doc/notes")
            assert again.returncode == 1
            assert b"no context named 'doc/notes'" in again.stderr

    missing = await cli("--socket", sock_path, "status")
    assert missing.returncode == 3
    assert b"no control socket at" in missing.stderr
    assert missing.stdout == b""

    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()  # a socket file nobody listens on
    refused = await cli("--socket", sock_path, "--json", "status")
    assert refused.returncode == 4
    assert b"refuses connections" in refused.stderr

    usage = await cli("--socket", sock_path, "frobnicate")
    assert usage.returncode == 2


def test_cli_main_in_process(sock_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = os.path.join(sock_dir, "absent.sock")
    assert _cli.main(["--socket", path, "pools"]) == 3
    assert "no control socket" in capsys.readouterr().err
    assert _cli.main(["--help"]) == 0
    assert "resize" in capsys.readouterr().out


def test_format_tree_draws_branches() -> None:
    def node(name: str, *children: dict[str, Any]) -> dict[str, Any]:
        return {"id": 1, "name": name, "pid": 9, "state": "ready", "children": list(children)}

    text = _cli_format.format_tree(node("root", node("a", node("a1")), node("b")))
    assert text.splitlines()[1:] == [
        "├── a (id 1, pid 9, ready)",
        "│   └── a1 (id 1, pid 9, ready)",
        "└── b (id 1, pid 9, ready)",
    ]


# -- process titles ----------------------------------------------------------------


async def test_children_have_a_process_title() -> None:
    pytest.importorskip("setproctitle", reason="setproctitle is not installed (optional)")
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(None, name="title-check")
        assert ctx.pid is not None
        cmdline = read_bytes(f"/proc/{ctx.pid}/cmdline")
        title = cmdline.replace(b"\0", b" ").strip()
        assert title == b"nursery_procs: title-check", cmdline
        await ctx.aclose()
