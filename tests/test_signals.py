"""open_signal_shutdown: SIGTERM, SIGINT and SIGHUP end a real program gracefully."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio
from programs import ScriptOutput, run_script

from nursery_procs.testing import wait_process_gone

PROGRAM = """
import sys

import trio

import nursery_procs


async def main() -> None:
    async with nursery_procs.open_signal_shutdown() as stop:
        async with nursery_procs.open_supervisor() as sup:
            async with nursery_procs.open_control(sup, sys.argv[1]):
                child = await sup.start_child(None, name="worker")
                print(child.pid, flush=True)
                await trio.sleep_forever()
    assert stop.received is not None
    print("stopped by", stop.received.name, flush=True)


if __name__ == "__main__":
    trio.run(main)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
async def test_a_signal_shuts_the_program_down_gracefully(
    signum: signal.Signals, tmp_path: Path
) -> None:
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    sock = tmp_path / "control.sock"
    async with run_script(script, str(sock), cwd=tmp_path) as (process, stdout):
        with trio.fail_after(60):
            child_pid = int(await stdout.line())
        assert sock.exists()
        os.kill(process.pid, signum)
        with trio.fail_after(30):
            rest = await stdout.line()
            returncode = await process.wait()
        assert process.stderr is not None
        errors = await ScriptOutput(process.stderr).rest()
    assert returncode == 0, errors.decode()
    assert rest.decode().strip() == f"stopped by {signum.name}"
    assert not sock.exists()
    await wait_process_gone(child_pid)
