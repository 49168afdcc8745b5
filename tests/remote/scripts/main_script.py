"""A script whose child, on another host, runs functions defined in the script.

Run as ``python main_script.py VIA_JSON``: prints what the remote child answered.
"""

from __future__ import annotations

import json
import os
import sys

import trio

import nursery_procs

GREETING = "hello from the script"


def greet(name: str) -> str:
    return f"{GREETING}, {name}, in {os.getpid()}"


async def serve() -> None:
    await nursery_procs.parent().send(greet("target"))
    await trio.sleep_forever()


async def main(settings: dict[str, object]) -> None:
    destination = str(settings.pop("destination"))
    via = nursery_procs.ssh(destination, **settings)  # type: ignore[arg-type]
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(serve, name="scripted", via=via)
        print(await ctx.receive())
        print(await ctx.call(greet, "call"))
        await ctx.aclose()


if __name__ == "__main__":
    trio.run(main, json.loads(sys.argv[1]))
