"""Calls that must not type-check; each line marked ``# E:`` is an error."""

from __future__ import annotations

import nursery_procs


def square(x: int) -> int:
    return x * x


async def greet(name: str) -> str:
    return f"hello {name}"


async def main(ctx: nursery_procs.Context, sup: nursery_procs.Supervisor) -> None:
    await ctx.call(square, "not an int")  # E: arg-type
    await ctx.call(greet, 1)  # E: arg-type
    await ctx.call(square)  # E: arg-type
    text: str = await ctx.call(square, 2)  # E: arg-type
    print(text)
    await sup.start_child(None, nmae="typo")  # E: call-arg
    await sup.start_child(square, "not an int")  # E: arg-type
    async with sup.open_child(greet, 2, name="x"):  # E: arg-type
        pass
    async with nursery_procs.open_pool(sup, None, size=2):  # E: call-arg
        pass


async def pools(sup: nursery_procs.Supervisor) -> None:
    async with nursery_procs.open_pool(None, spare=2):  # E: arg-type
        pass
    async with nursery_procs.open_pool(sup, square, "not an int"):  # E: arg-type
        pass
    async with nursery_procs.open_worker_pool(sup, limit="4"):  # E: arg-type
        pass
    async with nursery_procs.open_worker_pool(sup) as workers:
        await workers.run(square, "not an int")  # E: arg-type
        wrong: str = await workers.run(square, 2)  # E: arg-type
        print(wrong)
        await workers.run(square, 2, timeout=3)  # E: call-overload
    async with nursery_procs.open_pool(sup) as pool:
        pool.resize(spare="2")  # E: arg-type
