"""Developer sessions: ``nox -s tests lint typecheck docs bench``."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.reuse_existing_virtualenvs = True
# Test on whichever of the listed Pythons this machine has.
nox.options.error_on_missing_interpreters = False

PYTHON = ["3.11", "3.12", "3.13"]
SOURCES = ["nursery_procs", "tests", "examples", "benchmarks", "noxfile.py", "docs/conf.py"]


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite (real child processes; browser tests need Chromium)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint (with the ASYNC rules) and format check."""
    session.install("ruff")
    session.run("ruff", "check", *SOURCES)
    session.run("ruff", "format", "--check", *SOURCES)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the library."""
    session.install("-e", ".[test]", "mypy")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation; any warning is an error."""
    session.install("-e", ".", "sphinx")
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")


@nox.session
def bench(session: nox.Session) -> None:
    """Every benchmark, each reporting ratios to a baseline measured in the same run."""
    session.install("-e", ".[test]")
    for script in ("bench_core.py", "bench_tree.py", "bench_pool.py", "bench_collab.py"):
        session.run("python", f"benchmarks/{script}", *session.posargs)
