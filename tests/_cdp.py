"""A small Chrome DevTools Protocol client for Trio, for browser tests.

It starts a headless Chromium in a process group of its own, talks CDP over the browser's
WebSocket with trio-websocket, and on exit takes the whole group down (SIGTERM, a bounded
wait, then SIGKILL) so no renderer, zygote or crash handler outlives the test.

Only what the tests need is here: open pages, evaluate JavaScript, wait for a condition,
collect JavaScript errors, take screenshots.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import attrs
import trio
import trio_websocket

from nursery_procs._groups import unwrap_sole_exception
from nursery_procs.testing import wait_process_gone

DEFAULT_CHROMIUM = "/usr/bin/chromium"

#: How long Chromium gets to exit after SIGTERM before the group is SIGKILLed.
TERMINATE_GRACE = 5.0

_DEVTOOLS_LINE = re.compile(rb"DevTools listening on (ws://\S+)")
_MAX_MESSAGE = 64 * 1024 * 1024  # screenshots come back base64-encoded in one message
#: What an evaluation says when the document it ran in went away under it.
_NAVIGATION_RACES = (
    "Execution context was destroyed",
    "Cannot find default execution context",
    "Inspected target navigated or closed",
)


class CDPError(Exception):
    """A DevTools call failed, or the browser went away."""


class JavaScriptError(CDPError):
    """An evaluated expression threw (or its promise rejected)."""


Params = dict[str, Any]
EventHandler = Callable[[str, Params], None]


@attrs.define(eq=False)
class _Call:
    done: trio.Event = attrs.Factory(trio.Event)
    result: Params | None = None
    error: str | None = None


@attrs.define(eq=False)
class _Connection:
    """One CDP WebSocket: numbered calls, and events routed by session id."""

    ws: trio_websocket.WebSocketConnection
    _ids: itertools.count[int] = attrs.Factory(lambda: itertools.count(1))
    _pending: dict[int, _Call] = attrs.Factory(dict)
    _handlers: dict[str | None, EventHandler] = attrs.Factory(dict)
    _closed: bool = False

    async def call(
        self, method: str, params: Params | None = None, *, session_id: str | None = None
    ) -> Params:
        if self._closed:
            raise CDPError(f"{method}: the browser connection is closed")
        call_id = next(self._ids)
        message: Params = {"id": call_id, "method": method, "params": params or {}}
        if session_id is not None:
            message["sessionId"] = session_id
        pending = self._pending[call_id] = _Call()
        try:
            try:
                await self.ws.send_message(json.dumps(message))
            except trio_websocket.ConnectionClosed as exc:
                raise CDPError(f"{method}: the browser connection is closed") from exc
            await pending.done.wait()
        finally:
            del self._pending[call_id]
        if pending.error is not None:
            raise CDPError(f"{method}: {pending.error}")
        assert pending.result is not None
        return pending.result

    def listen(self, session_id: str, handler: EventHandler) -> None:
        """Send the events of *session_id* to *handler* (called in the reader task)."""
        self._handlers[session_id] = handler

    def forget(self, session_id: str) -> None:
        self._handlers.pop(session_id, None)

    async def run(self) -> None:
        """Read messages until the socket closes; then fail whatever is still waiting."""
        try:
            while True:
                raw = await self.ws.get_message()
                self._dispatch(json.loads(raw))
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            self._closed = True
            for pending in self._pending.values():
                pending.error = "the browser connection closed"
                pending.done.set()

    def _dispatch(self, message: Params) -> None:
        if "id" in message:
            pending = self._pending.get(message["id"])
            if pending is None:
                return  # the caller was cancelled
            if "error" in message:
                error = message["error"]
                pending.error = f"{error.get('message')} ({error.get('code')})"
            else:
                pending.result = message.get("result", {})
            pending.done.set()
        else:
            handler = self._handlers.get(message.get("sessionId"))
            if handler is not None:
                handler(message["method"], message.get("params", {}))


class Browser:
    """A running headless Chromium. Get one from :func:`open_browser`."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    async def version(self) -> str:
        """The browser's product string, e.g. ``Chrome/126.0.6478.126``."""
        info = await self._connection.call("Browser.getVersion")
        return str(info["product"])

    async def new_page(self, url: str) -> Page:
        """Open a new tab, load *url* and wait for its ``load`` event.

        The tab's JavaScript errors are collected from the start, so errors thrown while
        the page loads end up in :attr:`Page.console_errors` too.

        Raises:
            CDPError: if the navigation fails (e.g. the connection was refused).
        """
        created = await self._connection.call("Target.createTarget", {"url": "about:blank"})
        target_id = str(created["targetId"])
        attached = await self._connection.call(
            "Target.attachToTarget", {"targetId": target_id, "flatten": True}
        )
        page = Page(self._connection, target_id, str(attached["sessionId"]))
        await page._setup()
        await page.goto(url)
        return page


class Page:
    """One tab, driven over a flattened CDP session."""

    def __init__(self, connection: _Connection, target_id: str, session_id: str) -> None:
        self._connection = connection
        self.target_id = target_id
        self.session_id = session_id
        #: Uncaught exceptions, unhandled rejections and ``console.error`` / ``assert`` calls.
        self.console_errors: list[str] = []
        #: Errors the browser itself logs for the page, e.g. a failed WebSocket connection
        #: or a resource that answered 404. Not JavaScript faults, so kept apart.
        self.log_errors: list[str] = []
        self._loaded = trio.Event()
        self._closed = False
        connection.listen(session_id, self._on_event)

    async def _call(self, method: str, params: Params | None = None) -> Params:
        if self._closed:
            raise CDPError(f"{method}: the page is closed")
        return await self._connection.call(method, params, session_id=self.session_id)

    async def _setup(self) -> None:
        for domain in ("Page", "Runtime", "Log"):
            await self._call(f"{domain}.enable")
        # Every tab behaves as the focused one (document.hasFocus(), focus events), so pages
        # opened side by side all act like a user is looking at them.
        await self._call("Emulation.setFocusEmulationEnabled", {"enabled": True})

    def _on_event(self, method: str, params: Params) -> None:
        if method == "Page.loadEventFired":
            self._loaded.set()
        elif method == "Runtime.exceptionThrown":
            self.console_errors.append(_describe_exception(params["exceptionDetails"]))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = params.get("args", [])
            self.console_errors.append(" ".join(_describe_remote(arg) for arg in args))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            where = f" ({entry['url']})" if entry.get("url") else ""
            self.log_errors.append(f"{entry.get('text', '')}{where}")
        elif method == "Inspector.detached":
            self._closed = True

    async def goto(self, url: str) -> None:
        """Load *url* in this tab and wait for its ``load`` event."""
        self._loaded = trio.Event()
        result = await self._call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CDPError(f"cannot load {url}: {result['errorText']}")
        await self._loaded.wait()

    async def evaluate(self, expression: str) -> Any:
        """Evaluate *expression* in the page and return its value as JSON would carry it.

        A promise is awaited. ``undefined`` comes back as ``None``; so do values that do not
        survive JSON (functions, DOM nodes).

        Raises:
            JavaScriptError: if the expression throws or its promise rejects.
        """
        reply = await self._call(
            "Runtime.evaluate",
            {
                "expression": expression,
                "returnByValue": True,
                "awaitPromise": True,
                "userGesture": True,
            },
        )
        details = reply.get("exceptionDetails")
        if details is not None:
            raise JavaScriptError(f"{expression!r} threw: {_describe_exception(details)}")
        return reply.get("result", {}).get("value")

    async def wait_for(self, expression: str, *, poll: float = 0.02) -> Any:
        """Evaluate *expression* until it is truthy and return that value.

        There is no timeout here: bound the wait with :func:`trio.fail_after`. A page that
        is navigating meanwhile is fine: evaluations that lose their document are retried.
        """
        while True:
            try:
                value = await self.evaluate(expression)
            except CDPError as exc:
                if not any(marker in str(exc) for marker in _NAVIGATION_RACES):
                    raise
            else:
                if value:
                    return value
            await trio.sleep(poll)

    async def screenshot(self) -> bytes:
        """A PNG of the tab's viewport."""
        reply = await self._call("Page.captureScreenshot", {"format": "png"})
        return base64.b64decode(reply["data"])

    async def close(self) -> None:
        """Close the tab. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._connection.forget(self.session_id)
        await self._connection.call("Target.closeTarget", {"targetId": self.target_id})


def _describe_remote(obj: Params) -> str:
    if "value" in obj:
        return str(obj["value"])
    return str(obj.get("description") or obj.get("unserializableValue") or obj.get("type"))


def _describe_exception(details: Params) -> str:
    exception = details.get("exception")
    text = str(exception.get("description")) if exception else str(details.get("text"))
    if details.get("url"):
        text += f" at {details['url']}:{details.get('lineNumber', 0) + 1}"
    return text


class _Lines:
    """Line reader over a byte stream, keeping the last few lines for error messages."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self.tail: list[bytes] = []

    async def next(self) -> bytes | None:
        """The next line without its newline, or ``None`` at the end of the stream."""
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some()
            if not chunk:
                if not self._buffer:
                    return None
                self._buffer += b"\n"  # an unterminated last line
                break
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        self.tail = [*self.tail[-19:], line]
        return line


async def _devtools_url(lines: _Lines) -> str:
    while (line := await lines.next()) is not None:
        match = _DEVTOOLS_LINE.search(line)
        if match:
            return match.group(1).decode()
    tail = b"\n".join(lines.tail).decode(errors="replace")
    raise CDPError(f"Chromium exited before opening DevTools; its stderr ended with:\n{tail}")


async def _discard(lines: _Lines) -> None:
    while await lines.next() is not None:
        pass


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with suppress(ProcessLookupError):  # the whole group is gone already
        os.killpg(pgid, signum)


def _strays(marker: str) -> list[int]:
    """Live processes whose command line mentions *marker* (our fresh profile directory)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as file:
                cmdline = file.read()
            with open(f"/proc/{entry.name}/stat", "rb") as file:
                state = file.read().rpartition(b")")[2].split()[0]
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if marker.encode() in cmdline and state != b"Z":
            found.append(int(entry.name))
    return found


async def _terminate(process: trio.Process, marker: str) -> None:
    """SIGTERM the group, wait a bounded time, SIGKILL whatever is left, reap.

    Crashpad's handler leaves the group (it daemonizes), so anything else still running
    with our profile directory on its command line is killed too.
    """
    with trio.CancelScope(shield=True):
        _signal_group(process.pid, signal.SIGTERM)
        with trio.move_on_after(TERMINATE_GRACE):
            await process.wait()
        # Helpers that outlived the leader still carry its pid as their group id.
        _signal_group(process.pid, signal.SIGKILL)
        await process.wait()
        with trio.move_on_after(TERMINATE_GRACE):
            for pid in _strays(marker):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                await wait_process_gone(pid)


def chromium_args(chromium: str, profile_dir: str) -> list[str]:
    return [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1280,800",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile_dir}",
        "about:blank",
    ]


@asynccontextmanager
async def open_browser(*, chromium: str = DEFAULT_CHROMIUM) -> AsyncIterator[Browser]:
    """Start a headless Chromium with a fresh profile and yield a :class:`Browser`.

    **Resource handling:** on exit, normal or not, the DevTools socket is closed, the
    browser's whole process group gets SIGTERM, then SIGKILL after
    :data:`TERMINATE_GRACE` seconds if anything is left, the browser is reaped and the
    profile directory is removed. Cancelling the caller does not skip any of that.

    Raises:
        CDPError: if Chromium exits before it prints its DevTools address.
    """
    profile_dir = tempfile.mkdtemp(prefix="cdp-profile-")
    # Keep the crash database and caches out of the real home, in our throwaway directory.
    env = {
        **os.environ,
        "XDG_CONFIG_HOME": os.path.join(profile_dir, "config"),
        "XDG_CACHE_HOME": os.path.join(profile_dir, "cache"),
    }
    try:
        process = await trio.lowlevel.open_process(
            chromium_args(chromium, profile_dir),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            process_group=0,
        )
        try:
            assert process.stderr is not None
            lines = _Lines(process.stderr)
            ws_url = await _devtools_url(lines)
            with unwrap_sole_exception():
                async with trio.open_nursery() as nursery:
                    # the pipe must keep draining, or a chatty browser blocks on a full pipe
                    nursery.start_soon(_discard, lines)
                    try:
                        async with trio_websocket.open_websocket_url(
                            ws_url,
                            max_message_size=_MAX_MESSAGE,
                            connect_timeout=10,
                            disconnect_timeout=2,
                        ) as ws:
                            connection = _Connection(ws)
                            nursery.start_soon(connection.run)
                            yield Browser(connection)
                    finally:
                        nursery.cancel_scope.cancel()
        finally:
            await _terminate(process, profile_dir)
    finally:
        shutil.rmtree(profile_dir, ignore_errors=True)
