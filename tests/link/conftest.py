"""Fixtures shared by the link tests."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["socket", "memory"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["client", "server"])
def our_role(request: pytest.FixtureRequest) -> str:
    """Which side of the connection is ours; the other side is the test's peer."""
    return str(request.param)
