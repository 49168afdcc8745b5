"""The master dies or is interrupted: no child is left behind."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import trio
from programs import ScriptOutput, run_script

from nursery_procs.testing import wait_process_gone

MASTER = Path(__file__).parent / "scripts" / "master.py"


async def _children(stdout: ScriptOutput) -> list[int]:
    """The pids the master prints once its children are ready."""
    with trio.fail_after(30):
        words = (await stdout.line()).decode().split()
    assert words and words[0] == "ready", "the master exited before its children were ready"
    return [int(w) for w in words[1:]]


async def test_children_exit_within_a_second_of_a_sigkilled_master(tmp_path: Path) -> None:
    async with run_script(MASTER, str(tmp_path), "3") as (master, stdout):
        pids = await _children(stdout)
        master.kill()
        await master.wait()
        # By design they are gone within about a second (link EOF, or the watchdog
        # 0.5 s after the parent's death); the bound leaves room for a loaded machine.
        with trio.fail_after(5):
            for pid in pids:
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
        with trio.fail_after(15):
            output = await stdout.rest()
            assert await master.wait() == 130
    assert b"interrupted" in output
    for i, pid in enumerate(pids):
        assert (tmp_path / f"child-{i}").read_text() == f"clean {pid}\n"
        await wait_process_gone(pid)
