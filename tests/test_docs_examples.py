"""Every complete example in the README and the docs runs as written.

A complete example is a Python block with an ``if __name__ == "__main__":``
guard; it is written to a file and run as a script, which must exit 0. Blocks
without the guard are fragments of a larger program.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUARD = 'if __name__ == "__main__":'


def _rst_blocks(text: str) -> list[str]:
    blocks: list[str] = []
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if not re.match(r"\s*\.\. code-block:: python\s*$", line):
            continue
        indent = len(line) - len(line.lstrip())
        body: list[str] = []
        for following in lines[index + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following)
        code = [b for b in body if not b.strip().startswith(":")]
        width = min(len(b) - len(b.lstrip()) for b in code if b.strip())
        blocks.append("\n".join(b[width:] for b in code).strip() + "\n")
    return blocks


def _examples() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    readme = (ROOT / "README.md").read_text()
    for number, block in enumerate(re.findall(r"```python\n(.*?)```", readme, re.S)):
        found.append((f"README.md#{number}", block))
    for page in sorted((ROOT / "docs").glob("*.rst")):
        for number, block in enumerate(_rst_blocks(page.read_text())):
            found.append((f"{page.name}#{number}", block))
    return [(name, block) for name, block in found if GUARD in block]


EXAMPLES = _examples()


def test_the_docs_have_complete_examples() -> None:
    assert len(EXAMPLES) >= 2, [name for name, _ in EXAMPLES]


@pytest.mark.parametrize(("name", "code"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
def test_example_runs_as_written(name: str, code: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
