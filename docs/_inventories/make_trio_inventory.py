"""Regenerate ``trio.inv``, the intersphinx inventory of Trio's documentation.

The docs build never touches the network, so intersphinx reads inventories from files.
Trio's is made here from Trio's own documentation sources, which its sdist on PyPI
carries (``docs/source``), for the Trio version installed beside this script's Python::

    python docs/_inventories/make_trio_inventory.py            # the installed trio
    python docs/_inventories/make_trio_inventory.py 0.35.0     # or a given version

It downloads the sdist, makes a throwaway virtualenv with the documentation requirements
Trio lists in it (``docs-requirements.in``: a package index may lack the exact pins of
``docs-requirements.txt``), builds the HTML docs with Trio's own
``conf.py`` (intersphinx emptied, so the build stays offline) and keeps the
``objects.inv`` it writes. That file maps every documented name to its page and anchor
exactly as Trio's published build does; ``docs/conf.py`` resolves them against
https://trio.readthedocs.io/en/stable/. Run it after upgrading trio, then commit
``trio.inv``.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Trio's conf.py is executed as written, then what needs other projects' inventories (and
# so the network) is switched off: intersphinx gets no projects, the hook that patches
# Python's inventory does nothing, references to type variables are not redirected to
# Python's docs, and code blocks are not auto-linked. None of these changes which names
# Trio documents, or where.
OFFLINE_CONF = """\
from pathlib import Path

exec(compile(Path(__file__).with_name("upstream_conf.py").read_text(), "upstream_conf.py", "exec"))
intersphinx_mapping = {}
extensions = [name for name in extensions if name not in ("sphinx_codeautolink", "typevars")]


def add_intersphinx(app):
    pass
"""


def run(*command: str | Path, cwd: Path | None = None) -> None:
    print("+", " ".join(map(str, command)), flush=True)
    subprocess.run([str(part) for part in command], cwd=cwd, check=True)


def build_inventory(version: str, work: Path) -> Path:
    download = ("download", "--quiet", "--no-binary", ":all:", "--no-deps", "--dest", work)
    run(sys.executable, "-m", "pip", *download, f"trio=={version}")
    (sdist,) = work.glob("trio-*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(work, filter="data")
    tree = work / f"trio-{version}"
    venv = work / "venv"
    run(sys.executable, "-m", "venv", venv)
    pip = (venv / "bin" / "pip", "install", "--quiet")
    run(*pip, "-r", tree / "docs-requirements.in")
    run(*pip, "--no-deps", f"trio=={version}")
    source = tree / "docs" / "source"
    (source / "conf.py").rename(source / "upstream_conf.py")
    (source / "conf.py").write_text(OFFLINE_CONF)
    out = work / "html"
    run(venv / "bin" / "sphinx-build", "-q", "-b", "html", source, out, cwd=source)
    return out / "objects.inv"


def main() -> None:
    version = sys.argv[1] if len(sys.argv) > 1 else importlib.metadata.version("trio")
    with tempfile.TemporaryDirectory(prefix="trio-inventory-") as work:
        inventory = build_inventory(version, Path(work))
        shutil.copyfile(inventory, HERE / "trio.inv")
    print(f"wrote {HERE / 'trio.inv'} (trio {version})")


if __name__ == "__main__":
    main()
