"""Developer sessions: ``nox -s tests lint typecheck docs bench``."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.reuse_existing_virtualenvs = True
# Test on whichever of the listed Pythons this machine has.
nox.options.error_on_missing_interpreters = False

PYTHON = ["3.11", "3.12", "3.13"]
SOURCES = ["nursery_procs", "tests", "examples", "benchmarks", "scripts", "noxfile.py", "docs"]


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite (real child processes; browser tests need Chromium)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def wheel(session: nox.Session) -> None:
    """Build the sdist and the wheel, install the wheel (not editable) into a fresh
    venv, and run a small user project's tests against it."""
    session.install("build")
    dist = Path(tempfile.mkdtemp(prefix="nursery-procs-dist-"))
    session.run("python", "-m", "build", "--outdir", str(dist), ".")
    (wheel_file,) = dist.glob("*.whl")
    assert len(list(dist.glob("*.tar.gz"))) == 1, "no sdist was built"
    session.install(str(wheel_file), "pytest>=8", "pytest-trio>=0.8")
    project = Path(tempfile.mkdtemp(prefix="nursery-procs-user-"))
    shutil.copytree("tests/userproject", project, dirs_exist_ok=True)
    shutil.copy("README.md", project / "README.md")
    with session.chdir(project):
        session.run("nursery-procs", "--version")
        session.run("python", "-m", "pytest", "-p", "no:cacheprovider", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (with the ASYNC and complexity rules), format check, the import layers,
    and no class over 350 lines."""
    session.install("ruff", "import-linter", "-e", ".")
    session.run("ruff", "check", *SOURCES)
    session.run("ruff", "format", "--check", *SOURCES)
    session.run("lint-imports")
    session.run("python", "scripts/check_class_sizes.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the library."""
    session.install("-e", ".[test]", "mypy")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation, offline; any warning (an unresolved reference included)
    is an error. Needs Debian's python3-doc for Python's inventory (see docs/conf.py)."""
    session.install("-e", ".[docs]")
    session.run(
        "sphinx-build", "-W", "--keep-going", "-E", "-b", "html", "docs", "docs/_build/html"
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Every benchmark, each reporting ratios to a baseline measured in the same run."""
    session.install("-e", ".[test]")
    for script in ("bench_core.py", "bench_tree.py", "bench_pool.py", "bench_collab.py"):
        session.run("python", f"benchmarks/{script}", *session.posargs)
