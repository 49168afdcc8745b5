"""Functions the benchmarks run in workers (importable by every contender's workers)."""

from __future__ import annotations

from typing import Any


def echo(obj: Any) -> Any:
    return obj


async def async_echo(obj: Any) -> Any:
    return obj


async def serve_echo() -> None:
    import nursery_procs

    await nursery_procs.parent().serve_requests(echo)
