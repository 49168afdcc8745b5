"""The remote tests' SSH server: one per test session (see :mod:`.sshd`)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from nursery_procs.testing._leaks import MARKER_ENV

from .sshd import SSHServer, available, running_sshd


@pytest.fixture(scope="session")
def sshd() -> Iterator[SSHServer]:
    """A real OpenSSH server on 127.0.0.1 (skips the test without OpenSSH)."""
    if not available():
        pytest.skip("OpenSSH (server and client) is not installed")
    with running_sshd(os.environ[MARKER_ENV]) as server:
        yield server
