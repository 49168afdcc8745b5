"""Preload functions (``"forkserver_prepare:prepare"``) for the fork server tests."""

from __future__ import annotations

import os

#: The pid of each process that ran :func:`prepare`.
PREPARED_IN: list[int] = []
#: What :func:`prepare` made: a table every child shares with the fork server.
TABLE: dict[int, int] = {}
NOT_CALLABLE = 3


def prepare() -> None:
    PREPARED_IN.append(os.getpid())
    TABLE.update((n, n * n) for n in range(1000))


class Holder:
    @staticmethod
    def prepare() -> None:
        prepare()


def what_was_prepared() -> tuple[list[int], int]:
    return list(PREPARED_IN), sum(TABLE.values())


def fail() -> None:
    raise RuntimeError("preparing failed on purpose")


async def asynchronous() -> None:
    raise AssertionError("never awaited")  # pragma: no cover
