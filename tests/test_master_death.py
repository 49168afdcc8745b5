"""The master dies or is interrupted: no child is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from nursery_procs.testing import wait_process_gone

MASTER = Path(__file__).parent / "scripts" / "master.py"


async def _start_master(tmp_path: Path, count: int) -> tuple[trio.Process, list[int], bytes]:
    process = await trio.lowlevel.open_process(
        [sys.executable, str(MASTER), str(tmp_path), str(count)],
        stdout=subprocess.PIPE,
        process_group=0,  # as a terminal's foreground job
    )
    assert process.stdout is not None
    buffer = b""
    with trio.fail_after(30):
        while b"\n" not in buffer:
            chunk = await process.stdout.receive_some()
            assert chunk, "the master exited before its children were ready"
            buffer += chunk
    line, _, rest = buffer.partition(b"\n")
    words = line.decode().split()
    assert words[0] == "ready"
    return process, [int(w) for w in words[1:]], rest


async def _reap(process: trio.Process) -> None:
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.kill()
        await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()


async def test_children_exit_within_a_second_of_a_sigkilled_master(tmp_path: Path) -> None:
    master, pids, _ = await _start_master(tmp_path, 3)
    try:
        master.kill()
        await master.wait()
        # By design they are gone within about a second (link EOF, or the watchdog
        # 0.5 s after the parent's death); the bound leaves room for a loaded machine.
        with trio.fail_after(5):
            for pid in pids:
                await wait_process_gone(pid)
    finally:
        await _reap(master)
    # They noticed the closed link and cleaned up (finally blocks ran).
    for i, pid in enumerate(pids):
        assert (tmp_path / f"child-{i}").read_text() == f"clean {pid}\n"


async def test_ctrl_c_shuts_children_down_in_order(tmp_path: Path) -> None:
    master, pids, _ = await _start_master(tmp_path, 3)
    try:
        assert master.stdout is not None
        # The terminal sends SIGINT to the foreground process group: the master's
        # own. Children live in groups of their own, so only the master gets it.
        for pid in pids:
            assert os.getpgid(pid) != master.pid
        os.killpg(master.pid, signal.SIGINT)
        output = b""
        with trio.fail_after(15):
            while chunk := await master.stdout.receive_some():
                output += chunk
            assert await master.wait() == 130
    finally:
        await _reap(master)
    assert b"interrupted" in output
    for i, pid in enumerate(pids):
        assert (tmp_path / f"child-{i}").read_text() == f"clean {pid}\n"
        await wait_process_gone(pid)
