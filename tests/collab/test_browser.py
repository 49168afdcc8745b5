"""The collab page in a real headless Chromium against the real server: two tabs on one
document type into each other and see each other in the list of who is here."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import trio
from _browser import Page, browser_tests, open_browser

from examples.collab.document import CLOSE_DOCUMENT_UNAVAILABLE, REASON_UNAVAILABLE
from examples.collab.storage_format import SNAPSHOT_MAGIC

from .servers import running, ws_url
from .yclient import connect

pytestmark = browser_tests()


async def open_editor(browser_page: Page) -> None:
    await browser_page.wait_for("window.collab !== undefined")
    await browser_page.wait_for("collab.state() === 'connected' && collab.synced()")


async def test_two_tabs_edit_together(tmp_path: Path) -> None:
    async with running(tmp_path, spare=1) as server, open_browser() as browser:
        with trio.fail_after(60):
            url = f"{server.url}/d/team%20notes"
            ann = await browser.new_page(f"{url}?user=Ann")
            bob = await browser.new_page(f"{url}?user=Bob")
            for page in (ann, bob):
                await open_editor(page)
                assert await page.evaluate("collab.docName") == "team notes"

            # Both tabs are on one document, in one child process.
            assert list(server.documents()) == ["team notes"]
            assert server.clients_of("team notes") == 2

            await ann.evaluate("collab.insert(0, 'hello from Ann. ')")
            await bob.wait_for("collab.text().includes('hello from Ann. ')")
            await bob.evaluate("collab.insert(collab.text().length, 'Bob was here.')")
            await ann.wait_for("collab.text().includes('Bob was here.')")
            assert await ann.evaluate("collab.text()") == await bob.evaluate("collab.text()")
            # The editor shows it too, not only the shared text.
            await ann.wait_for(
                "document.querySelector('.cm-content').textContent.includes('Bob was here.')"
            )

            # Presence: each tab lists the other user (and not itself).
            await ann.wait_for("JSON.stringify(collab.peers()).includes('Bob')")
            await bob.wait_for("JSON.stringify(collab.peers()).includes('Ann')")
            assert "Ann" not in str(await ann.evaluate("collab.peers()"))
            await ann.wait_for("document.getElementById('peer-list').textContent.includes('Bob')")

            # Bob leaves: Ann's list empties.
            assert await bob.console_errors() == []
            await bob.close()
            await ann.wait_for("collab.peers().length === 0")

            assert await ann.console_errors() == []
            await ann.close()


async def test_invalid_name_stops_the_page(tmp_path: Path) -> None:
    async with running(tmp_path, spare=1) as server, open_browser() as browser:
        with trio.fail_after(60):
            page = await browser.new_page(f"{server.url}/d/%2Eprivate")
            await page.wait_for("window.collab !== undefined")
            close = await page.wait_for("collab.lastClose()")
            assert close["code"] == 4400
            assert close["reason"].startswith("invalid document name")
            # 44xx: the page does not retry, and offers a Reconnect button.
            await page.wait_for("!document.getElementById('reconnect').hidden")
            assert server.documents() == {}
            await page.close()


async def test_page_recovers_when_the_document_process_dies(tmp_path: Path) -> None:
    async with running(tmp_path, spare=1) as server, open_browser() as browser:
        with trio.fail_after(60):
            page = await browser.new_page(f"{server.url}/d/phoenix")
            await open_editor(page)
            await page.evaluate("collab.insert(0, 'written before the crash')")
            # Once another client has it, it is on disk (the child journals before it
            # broadcasts).
            async with connect(ws_url(server, "phoenix")) as witness:
                await witness.wait_until(lambda: "before the crash" in witness.content())
                victim = server.documents()["phoenix"]
                assert victim.pid is not None
                os.kill(victim.pid, signal.SIGKILL)
                await witness.closed.wait()
                assert witness.close_code == 1011

            close = await page.wait_for("collab.lastClose()")
            assert close == {"code": 1011, "reason": "document process died; reconnecting"}
            # The page reconnects by itself, to a fresh process restored from the journal.
            await page.wait_for("collab.state() === 'connected' && collab.synced()")
            await page.evaluate("collab.insert(collab.text().length, ' and after it')")
            async with connect(ws_url(server, "phoenix")) as reader:
                await reader.wait_until(
                    lambda: reader.content() == "written before the crash and after it"
                )
            assert server.documents()["phoenix"].pid != victim.pid
            assert await page.console_errors() == []
            await page.close()


async def test_unopenable_document_stops_the_page_with_a_notice(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "wreck.snapshot").write_bytes(SNAPSHOT_MAGIC + os.urandom(64))
    (data / "wreck.journal").write_bytes(os.urandom(200).replace(b"\x1eYJR", b""))
    async with running(tmp_path, spare=1, linger=60) as server, open_browser() as browser:
        with trio.fail_after(60):
            page = await browser.new_page(f"{server.url}/d/wreck")
            await page.wait_for("window.collab !== undefined")
            await page.wait_for("collab.stopped()")
            close = await page.evaluate("collab.lastClose()")
            assert close == {"code": CLOSE_DOCUMENT_UNAVAILABLE, "reason": REASON_UNAVAILABLE}
            # The provider will not reconnect by itself (its timer checks shouldConnect),
            # the user is told why, and the editor takes no typing.
            assert await page.evaluate("collab.provider.shouldConnect") is False
            assert await page.evaluate("collab.provider.wsUnsuccessfulReconnects") == 1
            notice = await page.evaluate("collab.notice()")
            assert "cannot be opened" in notice
            assert (
                await page.evaluate("getComputedStyle(document.getElementById('notice')).display")
                != "none"
            )
            assert await page.evaluate("collab.editable()") is False
            assert (
                await page.evaluate(
                    "document.querySelector('.cm-content').getAttribute('contenteditable')"
                )
                == "false"
            )
            await page.wait_for("!document.getElementById('reconnect').hidden")

            # Reconnect asks once more, and is refused the same way.
            await page.evaluate("document.getElementById('reconnect').click()")
            await page.wait_for("collab.provider.wsUnsuccessfulReconnects === 2")
            await page.wait_for("collab.stopped()")
            assert (await page.evaluate("collab.lastClose()"))["code"] == CLOSE_DOCUMENT_UNAVAILABLE
            assert await page.evaluate("collab.provider.shouldConnect") is False
            assert await page.console_errors() == []
            await page.close()
