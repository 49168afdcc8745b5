"""Calls that type-check: mypy infers each result's type from the function."""

from __future__ import annotations

import functools

import nursery_procs


def square(x: int) -> int:
    return x * x


async def greet(name: str, punctuation: str = "!") -> str:
    return f"hello {name}{punctuation}"


async def main(ctx: nursery_procs.Context) -> None:
    squared: int = await ctx.call(square, 3)
    greeting: str = await ctx.call(greet, "you")
    shouted: str = await ctx.call(functools.partial(greet, punctuation="!!"), "you")
    killed: int = await ctx.call(square, 4, kill_on_cancel=True)
    anything = await ctx.call("operator:mul", 6, 7)
    print(squared, greeting, shouted, killed, anything)
