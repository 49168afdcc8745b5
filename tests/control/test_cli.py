"""The ``nursery-procs`` command against real servers, and its exit statuses."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import pytest
import trio

from nursery_procs import _cli, _cli_format
from nursery_procs._pool import open_pool

from .conftest import cli, serving


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


async def test_exit_statuses_without_a_server(sock_path: str) -> None:
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
