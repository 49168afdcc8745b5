"""Smoke tests of the collab example's web page in headless Chromium.

The page is served by a tiny static HTTP server in this module; there is no document
server behind ``/doc/``, so the page must load cleanly and report that it cannot connect.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import attrs
import trio
from _browser import Page, browser_tests, open_browser

STATIC_DIR = Path(__file__).resolve().parent.parent / "examples" / "collab" / "static"

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}

pytestmark = browser_tests()


@attrs.define(eq=False)
class StaticServer:
    """Serves the page like the collab server does: ``/``, ``/d/<name>``, ``/static/*``."""

    port: int = 0
    #: Paths of WebSocket upgrade requests, which this server refuses with 404.
    upgrades: list[str] = attrs.Factory(list)
    upgrade_seen: trio.Event = attrs.Factory(trio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def route(self, path: str) -> Path | None:
        if path == "/" or path.startswith("/d/"):
            return STATIC_DIR / "index.html"
        if path.startswith("/static/"):
            name = path.removeprefix("/static/")
            if name and "/" not in name and not name.startswith("."):
                return STATIC_DIR / name
        return None

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some()
                if not chunk or len(head) > 65536:
                    return
                head += chunk
            path, headers = parse_request_head(head.partition(b"\r\n\r\n")[0])
            if headers.get("upgrade", "").lower() == "websocket":
                self.upgrades.append(path)
                self.upgrade_seen.set()
            file = self.route(path)
            if file is not None and file.is_file():
                body = await trio.Path(file).read_bytes()
                status = "200 OK"
                content_type = CONTENT_TYPES.get(file.suffix, "application/octet-stream")
            else:
                body, status, content_type = b"not found\n", "404 Not Found", "text/plain"
            response = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                "Connection: close\r\n\r\n"
            )
            await stream.send_all(response.encode("latin-1") + body)


def parse_request_head(head: bytes) -> tuple[str, dict[str, str]]:
    """The path (without query) and the lower-cased headers of an HTTP request head."""
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    path = request_line.split(" ")[1].partition("?")[0]
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return path, headers


@asynccontextmanager
async def serve_static() -> AsyncIterator[StaticServer]:
    server = StaticServer()
    async with trio.open_nursery() as nursery:
        serve = partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        server.port = listeners[0].socket.getsockname()[1]
        yield server
        nursery.cancel_scope.cancel()


async def check_page_without_backend(page: Page, server: StaticServer, doc_name: str) -> None:
    await page.wait_for("window.collab !== undefined")
    assert await page.evaluate("document.getElementById('doc-name').textContent") == doc_name
    assert await page.evaluate("document.title") == f"{doc_name} · collab"
    assert await page.evaluate("collab.docName") == doc_name

    # The provider did try its socket, at /doc/<the name, URL-encoded as one segment>.
    await server.upgrade_seen.wait()
    encoded = doc_name.replace("/", "%2F")
    assert f"/doc/{encoded}" in server.upgrades

    # ... which failed; the page says so and keeps retrying.
    close = await page.wait_for("collab.lastClose()")
    assert close["code"] == 1006
    assert await page.evaluate("collab.state()") in ("connecting", "disconnected")
    assert await page.evaluate("collab.synced()") is False
    assert await page.evaluate("collab.peers()") == []
    assert "1006" in await page.evaluate("document.getElementById('status').textContent")

    # The editor works offline on the shared text.
    await page.evaluate("collab.insert(0, 'hello')")
    assert await page.evaluate("collab.text()") == "hello"
    await page.wait_for("document.querySelector('.cm-content').textContent === 'hello'")

    assert await page.console_errors() == []


async def test_page_opens_named_document() -> None:
    async with serve_static() as server, open_browser() as browser:
        with trio.fail_after(30):
            page = await browser.new_page(f"{server.url}/d/team%2Fnotes")
            await check_page_without_backend(page, server, "team/notes")
            await page.close()


async def test_page_defaults_to_welcome() -> None:
    async with serve_static() as server, open_browser() as browser:
        with trio.fail_after(30):
            page = await browser.new_page(f"{server.url}/")
            await check_page_without_backend(page, server, "welcome")
            # the switch form holds the current name and navigates to /d/<name>
            assert await page.evaluate("document.getElementById('doc-input').value") == "welcome"
            await page.evaluate(
                "document.getElementById('doc-input').value = 'a b';"
                "document.getElementById('doc-form').requestSubmit()"
            )
            await page.wait_for("location.pathname === '/d/a%20b'")
            await page.wait_for("window.collab && collab.docName === 'a b'")
            assert await page.console_errors() == []
            await page.close()
