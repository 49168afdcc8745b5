"""Running a Python script as a real program of its own, in tests."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio


class ScriptOutput:
    """Reads a program's standard output line by line."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def line(self) -> bytes:
        """The next line, without its newline; ``b""`` at end of file."""
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some()
            if not chunk:
                line, self._buffer = self._buffer, b""
                return line
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    async def rest(self) -> bytes:
        """Everything up to end of file."""
        data, self._buffer = self._buffer, b""
        while chunk := await self._stream.receive_some():
            data += chunk
        return data


@asynccontextmanager
async def run_script(
    script: Path, *args: str, cwd: Path | None = None
) -> AsyncIterator[tuple[trio.Process, ScriptOutput]]:
    """Run *script* as a program of its own process group (as a terminal's
    foreground job). However the block ends, the program is killed if still
    running, reaped, and its pipes closed."""
    process = await trio.lowlevel.open_process(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        process_group=0,
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        yield process, ScriptOutput(process.stdout)
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            await process.stdout.aclose()
            await process.stderr.aclose()
