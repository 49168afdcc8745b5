"""A pytest plugin: every test must leave no child process, zombie, fd or thread.

Enable it with ``-p nursery_procs.testing.pytest_plugin`` (or in ``addopts``).
A test that leaks fails with a list of what it left; leftover processes are then
killed so that the next test starts clean. Mark a test with
``@pytest.mark.allow_leaks`` to skip the check.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from ._leaks import MARKER_ENV, LeakReport, Snapshot

# Processes that are exiting need a moment to disappear from /proc after their
# parent reaped them; leaks are looked for again over this window before failing.
_SETTLE_SECONDS = 2.0


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault(MARKER_ENV, f"pytest-{os.getpid()}")
    config.addinivalue_line("markers", "allow_leaks: do not check this test for leaks")


def _settled(snapshot: Snapshot) -> LeakReport:
    deadline = time.monotonic() + _SETTLE_SECONDS
    report = snapshot.leaks()
    while report and time.monotonic() < deadline:
        time.sleep(0.02)
        report = snapshot.leaks()
    return report


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves processes, zombies, fds or threads behind."""
    if request.node.get_closest_marker("allow_leaks"):
        yield
        return
    snapshot = Snapshot.take(os.environ[MARKER_ENV])
    yield
    report = _settled(snapshot)
    if not report:
        return
    for pid in report.processes:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in report.zombies:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    pytest.fail(f"the test left things behind:\n{report.describe()}", pytrace=False)
