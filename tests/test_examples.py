"""The documentation's runnable examples run and say what the docs say."""

from __future__ import annotations

import sys
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent


async def test_quickstart_example_runs() -> None:
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, str(ROOT / "examples" / "quickstart.py")],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    answers = sorted(line.split(" says ")[1] for line in lines if " says " in line)
    assert answers == ["1.414", "1.732", "2.000"]
    assert "HELLO FROM THE PARENT" in lines
    assert "the child raised ValueError: math domain error" in lines
    assert "3 workers still running" in lines
    assert lines[-1] == "all children reaped: True"
