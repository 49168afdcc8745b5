"""Functions the remote tests run on the "remote" side, where this module (and
whatever it imports) is shipped: that Python has neither nursery_procs nor trio."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

import trio

import nursery_procs


def where() -> dict[str, Any]:
    """Where this runs, and where its trio came from."""
    return {
        "pid": os.getpid(),
        "pgid": os.getpgid(0),
        "isolated": sys.flags.isolated,
        "no_site": sys.flags.no_site,
        "trio_loader": type(trio.__loader__).__name__,
        "nursery_procs_loader": type(nursery_procs.__loader__).__name__,
        "this_loader": type(sys.modules[__name__].__loader__).__name__,
    }


async def serve_echo() -> None:
    """Answer every context's requests with what they sent."""
    await nursery_procs.serve_requests(lambda obj: obj)


def import_here(name: str) -> str:
    """Import *name* (a sync call: in a worker thread, where a missing module can
    be fetched from the parent); say where it came from."""
    module = importlib.import_module(name)
    return type(module.__loader__).__name__


async def import_on_the_loop(name: str) -> str:
    """Import *name* on the event loop's thread."""
    module = importlib.import_module(name)
    return type(module.__loader__).__name__


def chatter(text: str) -> None:
    print(f"stdout: {text}")
    print(f"stderr: {text}", file=sys.stderr)
    logging.getLogger("remote.chatter").warning("logged: %s", text)


async def nest(start_method: str | None = None) -> None:
    """Start a grandchild on this host (its runtime shipped from here), tell the
    parent its id, then wait to be shut down."""
    async with nursery_procs.open_supervisor(start_method=start_method) as sup:
        grandchild = await sup.start_child(serve_echo, name="grandchild")
        await nursery_procs.parent().send(grandchild.id)
        await trio.sleep_forever()


async def tell(context_id: int, obj: Any) -> str:
    """Send *obj* to any context, by id."""
    await nursery_procs.context_by_id(context_id).send(obj)
    return "sent"


def shipped_here(name: str) -> bool:
    """Whether this runtime holds *name* among the modules shipped to it."""
    from nursery_procs import _importer

    hook = _importer.installed()
    return hook is not None and name in hook.records


async def serve_never() -> None:
    """Take requests and never answer them."""

    async def hold(obj: Any) -> Any:
        await trio.sleep_forever()

    await nursery_procs.serve_requests(hold)


def block_the_loop() -> None:
    """A sync target: it runs on the event loop's thread and never returns, so
    SHUTDOWN is never read."""
    import time

    time.sleep(3600)


def ignore_sigterm_and_block() -> None:
    import signal
    import time

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(3600)


async def crash_once(marker: str) -> None:
    """Exit with status 3 the first time (no *marker* file yet), then serve."""
    path = trio.Path(marker)
    if not await path.exists():
        await path.write_text("crashed")
        raise SystemExit(3)
    await trio.sleep_forever()


async def ask_parent_for_module(name: object) -> str:
    """Ask the parent for a module by hand; say how that went."""
    from nursery_procs._wire import Handle

    router = nursery_procs.current_router()
    try:
        assert router.parent_route is not None
        parent_id = router.parent_route.peer_id
        got = await router.asking.request(parent_id, Handle.GET_MODULE, name, data=True)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return f"{len(got)} records"
