"""Every code block in ``docs/`` and ``README.md`` is run as written, checked, or marked
as a fragment; a block that is none of these fails here.

The blocks are found the way readers see them: Sphinx reads ``docs/`` (its doctrees hold
every ``.. code-block::``, ``::`` block, ``literalinclude`` and the changelog's Markdown
fences), and markdown-it, the parser MyST uses, reads ``README.md``. Blocks in docstrings
belong to the reference and are not collected.

The rules, also in the contributor notes at the top of ``docs/conf.py``:

* every block says its language (``.. code-block:: python``; no bare ``::`` blocks);
* a Python block with an ``if __name__ == "__main__":`` guard is a complete program: it is
  written to a file and run as a script, and must exit 0 without a traceback;
* any other Python block, and any shell command, is a fragment and must say so: the
  option ``:class: fragment`` on the block (in ``README.md`` a ``<!-- fragment -->`` line
  right above the fence). A Python fragment must still compile as the body of an async
  function (so a stray indent or a typo fails);
* ``toml`` and ``json`` blocks must parse; ``text`` blocks (output, diagrams) are not code.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
import textwrap
import tomllib
import warnings
from pathlib import Path

import attrs
import pytest
from docutils import nodes
from markdown_it import MarkdownIt
from sphinx.application import Sphinx

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"

GUARD = 'if __name__ == "__main__":'
FRAGMENT = "fragment"
README_FRAGMENT = "<!-- fragment -->"
#: What Sphinx calls the language of a block that did not say (``::``), in this test only.
UNTAGGED = "untagged"

PYTHON = {"python", "python3", "py"}
SHELL = {"console", "shell", "bash", "sh"}
NOT_CODE = {"text", "none"}


@attrs.frozen
class Block:
    where: str
    language: str
    text: str
    fragment: bool


def _location(node: nodes.Element) -> tuple[Path | None, int]:
    """The file a block was written in and its line, or ``None`` for a docstring."""
    source, line = node.source, node.line
    if source is None or ":docstring of " in source:
        return None, 0
    return Path(source).resolve(), line or 0


def _sphinx_blocks() -> list[Block]:
    blocks = []
    with tempfile.TemporaryDirectory(prefix="docs-examples-") as work, warnings.catch_warnings():
        # Sphinx's own extensions still call APIs Sphinx deprecates: its business, not a
        # fault in these docs (the docs build itself runs with -W).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        app = Sphinx(
            srcdir=DOCS,
            confdir=DOCS,
            outdir=Path(work) / "out",
            doctreedir=Path(work) / "doctrees",
            buildername="dummy",
            status=None,
            warning=io.StringIO(),
            freshenv=True,
            confoverrides={"highlight_language": UNTAGGED},
        )
        app.build()
        for docname in sorted(app.env.found_docs):
            for node in app.env.get_doctree(docname).findall(nodes.literal_block):
                path, line = _location(node)
                if path is None:
                    continue
                where = f"{path.relative_to(ROOT)}:{line}"
                if "source" in node:  # a literalinclude: name the included file too
                    where += f" ({Path(node['source']).resolve().relative_to(ROOT)})"
                language = node.get("language", UNTAGGED)
                text = node.astext()
                blocks.append(Block(where, language, text, FRAGMENT in node["classes"]))
    return blocks


def _readme_blocks() -> list[Block]:
    blocks = []
    tokens = MarkdownIt("commonmark").parse(README.read_text())
    for index, token in enumerate(tokens):
        if token.type != "fence":
            continue
        previous = tokens[index - 1] if index else None
        fragment = previous is not None and previous.type == "html_block"
        fragment = fragment and previous.content.strip() == README_FRAGMENT
        language = token.info.split()[0] if token.info.strip() else UNTAGGED
        line = token.map[0] + 1 if token.map else 0
        blocks.append(Block(f"README.md:{line}", language, token.content, fragment))
    return blocks


BLOCKS = [*_readme_blocks(), *_sphinx_blocks()]
CODE = [block for block in BLOCKS if block.language not in NOT_CODE]


def test_the_docs_have_blocks_of_every_kind() -> None:
    """The collection itself works: a broken parser would find nothing to check."""
    complete = [b for b in CODE if b.language in PYTHON and GUARD in b.text]
    assert len(complete) >= 5, [b.where for b in complete]
    assert any(b.where.startswith("README.md") for b in complete)
    assert any(b.fragment and b.language in PYTHON for b in CODE)
    assert any(b.language in SHELL for b in CODE)
    assert any(b.language in NOT_CODE for b in BLOCKS)
    assert any("(examples/" in b.where for b in CODE), "a literalinclude was not seen"


def run_script(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(block.text)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{block.where} failed:\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, f"{block.where}:\n{done.stderr}"


def check_fragment(block: Block) -> None:
    if block.language in PYTHON:
        # A fragment stands for the body of an async function: it may await, return, or
        # use names defined elsewhere, but it must be Python.
        body = textwrap.indent(block.text, "    ") if block.text.strip() else "    pass"
        compile(f"async def fragment():\n{body}\n", block.where, "exec")


@pytest.mark.parametrize("block", CODE, ids=[block.where for block in CODE])
def test_block(block: Block, tmp_path: Path) -> None:
    if block.language == UNTAGGED:
        pytest.fail(f"{block.where}: say the block's language (.. code-block:: python, text, ...)")
    if block.fragment:
        check_fragment(block)
    elif block.language in PYTHON and GUARD in block.text:
        run_script(block, tmp_path)
    elif block.language == "toml":
        tomllib.loads(block.text)
    elif block.language == "json":
        json.loads(block.text)
    else:
        pytest.fail(
            f"{block.where}: a {block.language} block that no test runs; make it a complete "
            f"program (imports and {GUARD!r}) or mark it ':class: fragment' "
            f"(README: {README_FRAGMENT!r} above the fence)"
        )
