"""The public API's types, checked by mypy --strict: correct code passes, and
wrong argument or result types are errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

api = pytest.importorskip("mypy.api")

HERE = Path(__file__).resolve().parent / "typing"
ROOT = HERE.parent.parent


def _mypy(path: Path) -> list[str]:
    stdout, stderr, _status = api.run(
        ["--strict", "--no-error-summary", "--show-error-codes", "--config-file", "", str(path)]
    )
    assert not stderr, stderr
    return [line for line in stdout.splitlines() if ": error:" in line]


def test_correct_calls_type_check() -> None:
    assert _mypy(HERE / "good.py") == []


def test_wrong_calls_are_errors() -> None:
    source = (HERE / "bad.py").read_text().splitlines()
    expected = {
        number: match.group(1)
        for number, line in enumerate(source, start=1)
        if (match := re.search(r"# E: ([a-z-]+)", line))
    }
    found: dict[int, set[str]] = {}
    for line in _mypy(HERE / "bad.py"):
        match = re.match(r".*bad\.py:(\d+): error: .*\[([a-z-]+)\]$", line)
        assert match, line
        found.setdefault(int(match.group(1)), set()).add(match.group(2))
    assert set(found) == set(expected), found
    for number, code in expected.items():
        assert code in found[number], (number, found[number])


def test_the_readme_example_type_checks(tmp_path: Path) -> None:
    """The first example a user reads passes mypy --strict as it stands."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"```python\n(.*?)```", readme, re.S)
    assert match, "README.md has no python example"
    example = tmp_path / "readme_example.py"
    example.write_text(match.group(1))
    assert _mypy(example) == []
