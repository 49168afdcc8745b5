"""Fail if a class in nursery_procs is longer than the limit (350 lines): one
that grows past it holds more than one concern and should be split."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LIMIT = 350
PACKAGE = Path(__file__).resolve().parent.parent / "nursery_procs"


def main() -> int:
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > LIMIT:
                    too_long.append(
                        f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: "
                        f"class {node.name} has {size} lines (limit {LIMIT})"
                    )
    print("\n".join(too_long) or f"no class over {LIMIT} lines")
    return 1 if too_long else 0


if __name__ == "__main__":
    sys.exit(main())
