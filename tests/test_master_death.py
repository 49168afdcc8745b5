"""The master dies or is interrupted: no child is left behind."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio
from programs import ScriptOutput, run_script

import nursery_procs
from nursery_procs.testing import wait_process_gone

MASTER = Path(__file__).parent / "scripts" / "master.py"


@pytest.fixture(autouse=True, params=["exec", "forkserver"])
def start_method(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The master script starts its children with each start method in turn."""
    monkeypatch.setenv(nursery_procs.START_METHOD_ENV, request.param)
    return str(request.param)


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


async def _children(stdout: ScriptOutput) -> list[int]:
    """The pids the master prints once its children are ready."""
    with trio.fail_after(30):
        words = (await stdout.line()).decode().split()
    assert words and words[0] == "ready", "the master exited before its children were ready"
    return [int(w) for w in words[1:]]


async def test_children_exit_within_a_second_of_a_sigkilled_master(
    tmp_path: Path, start_method: str
) -> None:
    async with run_script(MASTER, str(tmp_path), "3") as (master, stdout):
        pids = await _children(stdout)
        # Forked children's parent is the fork server: it must go too.
        servers = {_parent_of(pid) for pid in pids} - {master.pid}
        assert len(servers) == (start_method == "forkserver")
        master.kill()
        await master.wait()
        # By design they are gone within about a second (link EOF, or the watchdog
        # 0.5 s after the parent's death); the bound leaves room for a loaded machine.
        with trio.fail_after(5):
            for pid in [*pids, *servers]:
                await wait_process_gone(pid)
    # They noticed the closed link and cleaned up (finally blocks ran).
    for i, pid in enumerate(pids):
        assert (tmp_path / f"child-{i}").read_text() == f"clean {pid}\n"


async def test_ctrl_c_shuts_children_down_in_order(tmp_path: Path) -> None:
    async with run_script(MASTER, str(tmp_path), "3") as (master, stdout):
        pids = await _children(stdout)
        # The terminal sends SIGINT to the foreground process group: the master's
        # own. Children live in groups of their own, so only the master gets it.
        for pid in pids:
            assert os.getpgid(pid) != master.pid
        os.killpg(master.pid, signal.SIGINT)
        errors = bytearray()

        async def read_errors() -> None:
            # Read as it comes: a program blocked on a full stderr pipe never exits.
            assert master.stderr is not None
            while chunk := await master.stderr.receive_some():
                errors.extend(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_errors)
            with trio.move_on_after(15) as waiting:
                output = await stdout.rest()
                status = await master.wait()
            nursery.cancel_scope.cancel()
        assert not waiting.cancelled_caught, f"no exit within 15 s; stderr: {errors[-3000:]!r}"
        assert status == 130, bytes(errors[-3000:])
    assert b"interrupted" in output
    for i, pid in enumerate(pids):
        assert (tmp_path / f"child-{i}").read_text() == f"clean {pid}\n"
        await wait_process_gone(pid)
