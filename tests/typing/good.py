"""Calls that type-check: mypy infers each result's type from the function."""

from __future__ import annotations

import functools

import nursery_procs


def square(x: int) -> int:
    return x * x


async def greet(name: str, punctuation: str = "!") -> str:
    return f"hello {name}{punctuation}"


def serve(name: str, port: int) -> None:
    print(name, port)


async def main(ctx: nursery_procs.Context, sup: nursery_procs.Supervisor) -> None:
    started: nursery_procs.Context = await sup.start_child(serve, "web", 8080, name="web")
    by_name: nursery_procs.Context = await sup.start_child("http.server:test", 1, 2)
    async with sup.open_child(serve, "api", 8081) as opened:
        print(started, by_name, opened)
    squared: int = await ctx.call(square, 3)
    greeting: str = await ctx.call(greet, "you")
    shouted: str = await ctx.call(functools.partial(greet, punctuation="!!"), "you")
    killed: int = await ctx.call(square, 4, kill_on_cancel=True)
    anything = await ctx.call("operator:mul", 6, 7)
    print(squared, greeting, shouted, killed, anything)


async def pools(sup: nursery_procs.Supervisor) -> None:
    async with nursery_procs.open_pool(sup, None, spare=1, max=4) as pool:
        settings: nursery_procs.PoolSettings = pool.resize(spare=2)
        print(settings.spare + 1)
    async with nursery_procs.open_pool(sup, square, 3, name="squares"):
        pass
    async with nursery_procs.open_pool(sup, "operator:mul", 6, 7):
        pass
    async with nursery_procs.open_worker_pool(sup, limit=2, max_uses=10) as workers:
        run_squared: int = await workers.run(square, 3)
        run_greeting: str = await workers.run(greet, "you", kill_on_cancel=True)
        print(run_squared, run_greeting)
