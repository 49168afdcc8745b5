"""The documentation's runnable examples run and say what the docs say."""

from __future__ import annotations

import subprocess
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


UNGUARDED = """
import trio
import nursery_procs


def work() -> int:
    return 42


async def main() -> None:
    async with nursery_procs.open_supervisor() as sup:
        child = await sup.start_child(work)
        print(await child.wait())


trio.run(main)  # no __main__ guard: each child would run this again
"""


def test_a_script_without_a_main_guard_is_told_how_to_fix_it(tmp_path: Path) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 1
    # The error itself says what happened and how to fix it.
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("nursery_procs.")]
    assert error.startswith("nursery_procs._errors.ChildStartError: ")
    assert "MainModuleError: the child could not import the parent's main module" in error
    assert "RuntimeError: Attempted to call run() from inside a run()" in error
    assert 'put the entry point under `if __name__ == "__main__":`' in error
