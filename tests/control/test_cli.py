"""The ``nursery-procs`` command against real servers, and its exit statuses."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from nursery_procs import _cli, _cli_format
from nursery_procs._pool import open_pool

from . import targets
from .conftest import cli, serving, write_bytes


async def test_cli_against_a_live_server(sock_path: str) -> None:
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
            pools_json = json.loads((await cli("--socket", sock_path, "--json", "pools")).stdout)
            assert pools_json["pools"][0]["name"] == "worker"

            resize = await cli(
                *("--socket", sock_path, "resize", "worker"),
                *("--spare", "2", "--max", "3", "--idle-timeout", "60"),
            )
            assert resize.returncode == 0, resize.stderr
            # The pools table, with this pool only, in human units.
            header, row = resize.stdout.decode().splitlines()
            assert header.split() == [
                *("name", "spare", "max", "idle", "busy", "starting", "stopping", "waiting"),
                *("sessions", "idle_timeout", "take_median"),
            ]
            assert row.split()[:3] == ["worker", "2", "3"]
            assert row.split()[-3] == "1m00s"
            assert row.split()[-1] in ("µs", "ms")
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


async def test_tree_shows_the_session_each_pooled_child_serves(sock_path: str) -> None:
    async with (
        serving(sock_path) as sup,
        open_pool(sup, None, name="docs", spare=0, max=2) as pool,
        pool.session("notes.md") as child,
    ):
        tree = await cli("--socket", sock_path, "tree")
        assert tree.returncode == 0, tree.stderr
        [line] = [line for line in tree.stdout.decode().splitlines() if child.name in line]
        assert f"pid {child.pid}, ready, session 'notes.md'" in line
        as_json = json.loads((await cli("--socket", sock_path, "--json", "tree")).stdout)
        [node] = as_json["children"]
        assert (node["id"], node["session"]) == (child.id, "notes.md")


@pytest.mark.parametrize(
    ("make", "status", "message"),
    [
        pytest.param(None, 3, b"is the supervisor running", id="nothing"),
        pytest.param("no-folder", 3, b"does not exist", id="no-folder"),
        pytest.param("file", 6, b"is a regular file, not a socket", id="file"),
        pytest.param("folder", 6, b"is a folder, not a socket", id="folder"),
        pytest.param("stale", 4, b"is stale: nobody listens on it", id="stale"),
    ],
)
async def test_each_way_of_finding_no_server_has_its_own_status(
    sock_dir: str, make: str | None, status: int, message: bytes
) -> None:
    path = os.path.join(sock_dir, "control.sock")
    if make == "no-folder":
        path = os.path.join(sock_dir, "gone", "control.sock")
    elif make == "file":
        write_bytes(path, b"{}")
    elif make == "folder":
        os.mkdir(path)
    elif make == "stale":
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()  # a socket file nobody listens on
    done = await cli("--socket", path, "--json", "status")
    assert done.returncode == status, done.stderr
    assert message in done.stderr
    assert done.stdout == b""
    assert _cli.EXIT_STATUSES[status]


async def test_a_usage_error_is_2(sock_path: str) -> None:
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


# -- the JSON output, as documented ----------------------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs" / "control.rst"


def _documented_json() -> dict[str, Any]:
    """The ``.. code-block:: json`` blocks of docs/control.rst named ``json-<command>``."""
    found = {}
    pattern = r"\.\. code-block:: json\n   :name: json-(\w+)\n\n((?:   .*\n|\n)+)"
    for command, body in re.findall(pattern, DOCS.read_text()):
        found[command] = json.loads(body)
    return found


def _shape_differences(documented: Any, actual: Any, where: str = "") -> list[str]:
    """Where *actual* has other fields or other types than *documented*.

    Values may differ (pids, times); ``null`` in the docs matches anything. In
    lists, an item is compared with the item of the same ``name``, else the first.
    """
    if documented is None:
        return []
    if isinstance(documented, dict):
        if not isinstance(actual, dict):
            return [f"{where}: {actual!r} is not an object"]
        if set(documented) != set(actual):
            return [f"{where}: fields {sorted(actual)}, documented {sorted(documented)}"]
        return [
            problem
            for key in documented
            for problem in _shape_differences(documented[key], actual[key], f"{where}.{key}")
        ]
    if isinstance(documented, list):
        if not isinstance(actual, list) or len(actual) != len(documented):
            return [f"{where}: {actual!r} is not a list of {len(documented)}"]
        problems = []
        for index, item in enumerate(documented):
            named = [a for a in actual if isinstance(a, dict) and a.get("name") == item.get("name")]
            counterpart = named[0] if named else actual[index]
            problems += _shape_differences(item, counterpart, f"{where}[{index}]")
        return problems
    number = (int, float)
    same = isinstance(actual, number) if isinstance(documented, number) else False
    if not same and type(documented) is not type(actual):
        return [f"{where}: {actual!r} is not like {documented!r}"]
    return []


async def test_json_output_is_as_documented(sock_path: str) -> None:
    documented = _documented_json()
    assert set(documented) == {"status", "tree", "pools", "resize", "stop"}
    async with serving(sock_path) as sup:
        editor = await sup.start_child(targets.nest, "doc/notes", name="editor")
        with trio.fail_after(15):
            await editor.receive()  # doc/notes is up
        async with open_pool(sup, None, name="docs", spare=1, max=4) as pool:
            await pool.wait_idle()  # docs-1, which the session takes
            async with pool.session("notes.md"):
                await pool.wait_idle()  # docs-2
                await _check_each_command(sock_path, documented)


async def _check_each_command(sock_path: str, documented: dict[str, Any]) -> None:
    commands = {
        "status": ["status"],
        "tree": ["tree"],
        "pools": ["pools"],
        "resize": ["resize", "docs", "--spare", "2"],
        "stop": ["stop", "editor"],  # last: it stops editor
    }
    for name, args in commands.items():
        done = await cli("--socket", sock_path, "--json", *args)
        assert done.returncode == 0, done.stderr
        actual = json.loads(done.stdout)
        assert _shape_differences(documented[name], actual) == [], name
