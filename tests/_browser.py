"""Headless Chromium for the browser tests, driven by Playwright.

Playwright's Python package drives Debian's Chromium (:data:`CHROMIUM`) through
``executable_path``: no browser is downloaded. Playwright has no Trio API, and its sync
API belongs to the thread that started it, so each browser gets one worker thread that
makes every Playwright call, while Trio code awaits the results (:meth:`_Worker.run`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import attrs
import pytest
import trio
from playwright.sync_api import BrowserContext, ConsoleMessage, sync_playwright
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page as PlaywrightPage

CHROMIUM = "/usr/bin/chromium"

#: As root, Chromium runs only without its sandbox; the rest keeps a test browser off the
#: network (no updates, sync, first-run pages or QUIC probes).
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
)

#: What an evaluation says when the document it ran in went away under it.
_NAVIGATION_RACES = (
    "Execution context was destroyed",
    "Cannot find context with specified id",
)

T = TypeVar("T")


def browser_tests() -> list[pytest.MarkDecorator]:
    """The marks of a browser test module: run wherever Chromium is installed, and in CI
    always (there a missing Chromium fails the tests instead of skipping them)."""
    missing = not os.access(CHROMIUM, os.X_OK) and not os.environ.get("CI")
    return [
        pytest.mark.browser,
        pytest.mark.skipif(missing, reason=f"browser test: no Chromium at {CHROMIUM}"),
    ]


class _Worker:
    """The one thread that makes a browser's Playwright calls."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="playwright")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the worker thread and return (or raise) what it did.

        Cancelling the caller stops the wait, not the call: Playwright calls cannot be
        interrupted from outside their thread.
        """
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        future = self._executor.submit(fn, *args)
        future.add_done_callback(lambda _: token.run_sync_soon(done.set))
        await done.wait()
        return future.result()

    async def aclose(self) -> None:
        """Let the queued calls finish and the thread end."""
        await trio.to_thread.run_sync(self._executor.shutdown)


@attrs.define(eq=False)
class Page:
    """One tab. JavaScript errors are collected from before it loads."""

    _worker: _Worker
    _page: PlaywrightPage
    #: Uncaught exceptions, unhandled rejections and ``console.error`` / ``assert`` calls.
    _errors: list[str] = attrs.Factory(list)

    async def console_errors(self) -> list[str]:
        """The JavaScript errors so far, including any that happened just before this call
        (events reach Python only while a Playwright call runs, so this makes one)."""
        await self._worker.run(self._page.evaluate, "undefined")
        return list(self._errors)

    async def evaluate(self, expression: str) -> Any:
        """Evaluate *expression* in the page and return its value as JSON would carry it.

        A promise is awaited; ``undefined`` comes back as ``None``.

        Raises:
            playwright.sync_api.Error: if the expression throws or its promise rejects.
        """
        return await self._worker.run(self._page.evaluate, expression)

    async def wait_for(self, expression: str, *, poll: float = 0.02) -> Any:
        """Evaluate *expression* until it is truthy and return that value.

        There is no timeout here: bound the wait with :func:`trio.fail_after`. A page that
        is navigating meanwhile is fine: evaluations that lose their document are retried.
        """
        while True:
            try:
                value = await self.evaluate(expression)
            except PlaywrightError as exc:
                if not any(marker in exc.message for marker in _NAVIGATION_RACES):
                    raise
            else:
                if value:
                    return value
            await trio.sleep(poll)

    async def close(self) -> None:
        """Close the tab. Idempotent."""
        await self._worker.run(self._page.close)


@attrs.define(eq=False)
class Browser:
    """A running headless Chromium; its tabs share one profile. Get one from
    :func:`open_browser`."""

    _worker: _Worker
    _context: BrowserContext

    def _open(self, url: str) -> Page:  # on the worker thread
        page = Page(self._worker, self._context.new_page())

        # Playwright calls these on the worker thread, and writes attributes on them: they
        # are plain functions, not methods of a slotted class.
        def on_console(message: ConsoleMessage) -> None:
            # A console call carries the values it logged. The browser's own log entries
            # (a refused WebSocket, a 404) carry none: they are not JavaScript faults.
            if message.type in ("error", "assert") and message.args:
                page._errors.append(message.text)

        def on_page_error(error: PlaywrightError) -> None:
            page._errors.append(error.stack or f"{error.name}: {error.message}")

        page._page.on("console", on_console)
        page._page.on("pageerror", on_page_error)
        page._page.goto(url)
        return page

    async def new_page(self, url: str) -> Page:
        """Open a new tab, load *url* and wait for its ``load`` event.

        Raises:
            playwright.sync_api.Error: if the navigation fails (e.g. the connection was
                refused).
        """
        return await self._worker.run(self._open, url)


@asynccontextmanager
async def open_browser(*, chromium: str = CHROMIUM) -> AsyncIterator[Browser]:
    """Start a headless Chromium with a fresh profile and yield a :class:`Browser`.

    **Resource handling:** on exit, normal or not, the browser is closed (Playwright ends
    its processes), Playwright's driver is stopped, the worker thread ends and the
    profile directory is removed. Cancelling the caller does not skip any of that.
    """
    profile = tempfile.mkdtemp(prefix="playwright-profile-")
    worker = _Worker()
    async with AsyncExitStack() as stack:
        stack.push_async_callback(_shielded, trio.to_thread.run_sync, shutil.rmtree, profile)
        stack.push_async_callback(_shielded, worker.aclose)
        playwright = await worker.run(lambda: sync_playwright().start())
        stack.push_async_callback(_shielded, worker.run, playwright.stop)
        launch = partial(
            playwright.chromium.launch_persistent_context,
            profile,
            executable_path=chromium,
            headless=True,
            args=list(CHROMIUM_ARGS),
            # Keep the crash database and caches out of the real home.
            env={
                **os.environ,
                "XDG_CONFIG_HOME": os.path.join(profile, "config"),
                "XDG_CACHE_HOME": os.path.join(profile, "cache"),
            },
        )
        context = await worker.run(launch)
        stack.push_async_callback(_shielded, worker.run, context.close)
        yield Browser(worker, context)


async def _shielded(fn: Callable[..., Any], *args: Any) -> None:
    with trio.CancelScope(shield=True):
        await fn(*args)
