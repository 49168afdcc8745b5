"""The collab server end to end: real document children, real WebSockets, y-websocket
clients made of pycrdt documents (see :mod:`yclient`)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket
from pycrdt import Doc, create_update_message

from examples.collab.clients import (
    CLOSE_DOCUMENT_DIED,
    CLOSE_INVALID_NAME,
    CLOSE_SERVICE_RESTART,
    CLOSE_TRY_AGAIN,
    REASON_BUSY,
    REASON_DIED,
    REASON_STOPPED,
    REASON_TEXT,
    REASON_TOO_MANY,
    REASON_TOO_MANY_HERE,
)
from examples.collab.websocket import CLOSE_MESSAGE_TOO_BIG

from .servers import TIMEOUT, check_works, closed_with, running, ws_url
from .yclient import YClient, connect, open_socket, tokens

__all__ = ["running", "ws_url"]  # test_browser imports them from here


# -- editing and isolation ---------------------------------------------------------------------


async def test_two_clients_edit_one_document_others_see_nothing(tmp_path: Path) -> None:
    async with running(tmp_path, spare=2) as server:
        with trio.fail_after(TIMEOUT):
            async with (
                connect(ws_url(server, "shared notes"), user="Ann") as ann,
                connect(ws_url(server, "shared notes"), user="Bob") as bob,
                connect(ws_url(server, "elsewhere"), user="Cid") as cid,
            ):
                for client in (ann, bob, cid):
                    await client.synced.wait()

                await ann.append("<ann:0>")
                await bob.wait_until(lambda: "<ann:0>" in bob.content())
                await bob.append("<bob:0>")
                await ann.wait_until(lambda: "<bob:0>" in ann.content())
                assert ann.content() == bob.content() == "<ann:0><bob:0>"
                assert ann.seen_broadcast == {"<bob:0>"}
                assert bob.seen_broadcast == {"<ann:0>"}
                # presence: each sees the other, not the third
                await ann.wait_until(lambda: ann.peers() == ["Bob"])
                await bob.wait_until(lambda: bob.peers() == ["Ann"])

                # The third client's document went on by itself: an edit there reaches
                # a newcomer to that document, and nothing of the other one did.
                await cid.append("<cid:0>")
                async with connect(ws_url(server, "elsewhere")) as dan:
                    await dan.wait_until(lambda: "<cid:0>" in dan.content())
                    assert dan.content() == "<cid:0>"
                assert cid.content() == "<cid:0>"
                assert cid.seen_broadcast == set()
                assert cid.peers() == []
                assert "<cid:0>" not in ann.content()

                documents = server.documents()
                assert set(documents) == {"shared notes", "elsewhere"}
                pids = {name: ctx.pid for name, ctx in documents.items()}
                assert pids["shared notes"] != pids["elsewhere"]
                assert os.getpid() not in pids.values()
                assert server.supervisor is not None
                children = {ctx.pid for ctx in server.supervisor.children}
                assert set(pids.values()) <= children
                assert server.clients_of("shared notes") == 2


async def test_document_is_saved_and_restored(tmp_path: Path) -> None:
    async with running(tmp_path, linger=0.05) as server:
        with trio.fail_after(TIMEOUT):
            url = ws_url(server, "keep me")
            async with connect(url) as one, connect(url) as two:
                await one.synced.wait()
                await two.synced.wait()
                await one.append("<one:0>")
                await two.append("<two:0>")
                await one.wait_until(lambda: "<two:0>" in one.content())
                await two.wait_until(lambda: "<one:0>" in two.content())
                text = one.content()
                ctx = server.documents()["keep me"]
            # Everyone left: after the linger time the child is shut down, gracefully.
            assert await ctx.wait_exited() == 0
            await server.wait_until(lambda: "keep me" not in server.documents())
            assert (tmp_path / "data" / "keep me.snapshot").is_file()

            async with connect(url) as again:
                await again.synced.wait()
                assert again.content() == text
                assert server.documents()["keep me"].pid != ctx.pid


# -- a document child killed under load -------------------------------------------------------


async def keep_editing(me: YClient, tag: str, other: str) -> None:
    """Append ``<tag:n>`` for n = 0, 1, ...; before each next edit, wait for the other
    client's previous one, so both go at the pace of the server. Stop when closed."""
    n = 0
    while not me.closed.is_set():
        try:
            await me.append(f"<{tag}:{n}>")
        except trio_websocket.ConnectionClosed:
            return
        expected = f"<{other}:{n}>"
        await me.wait_until(lambda: me.closed.is_set() or expected in me.content())  # noqa: B023
        n += 1


async def test_sigkilled_document_child(tmp_path: Path) -> None:
    async with running(tmp_path, spare=1) as server:
        with trio.fail_after(TIMEOUT):
            url = ws_url(server, "fragile")
            doc_a: Doc[Any] = Doc()
            doc_b: Doc[Any] = Doc()
            async with connect(url, doc=doc_a) as a, connect(url, doc=doc_b) as b:
                await a.synced.wait()
                await b.synced.wait()
                victim = server.documents()["fragile"]
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(keep_editing, a, "a", "b")
                    nursery.start_soon(keep_editing, b, "b", "a")
                    await a.wait_until(lambda: len(a.seen_broadcast) >= 30)
                    await b.wait_until(lambda: len(b.seen_broadcast) >= 30)
                    assert victim.pid is not None
                    os.kill(victim.pid, signal.SIGKILL)
                # Both editors were told, and stopped at that point.
                assert await closed_with(a) == (CLOSE_DOCUMENT_DIED, REASON_DIED)
                assert await closed_with(b) == (CLOSE_DOCUMENT_DIED, REASON_DIED)
            seen = a.seen_broadcast | b.seen_broadcast
            assert await victim.wait_exited() == -signal.SIGKILL

            # A newcomer, before the editors come back: the document as the journal kept
            # it holds every edit that any client saw broadcast.
            async with connect(url) as observer:
                await observer.synced.wait()
                restored = tokens(observer.content())
                missing = seen - restored
                assert not missing, f"broadcast edits lost in the crash: {sorted(missing)}"
                assert server.documents()["fragile"].pid != victim.pid

                # The editors reconnect with their documents; everything converges.
                async with connect(url, doc=doc_a) as a2, connect(url, doc=doc_b) as b2:
                    await a2.synced.wait()
                    await b2.synced.wait()
                    await a2.append("<a:9999>")
                    await b2.append("<b:9999>")
                    everything = tokens(str(a2.text)) | tokens(str(b2.text))
                    everything |= {"<a:9999>", "<b:9999>"}
                    for client in (observer, a2, b2):
                        await client.wait_until(
                            lambda c=client: everything <= tokens(c.content())  # type: ignore[misc]
                        )
                    assert observer.content() == a2.content() == b2.content()


async def test_document_child_stopped_under_its_clients(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        with trio.fail_after(TIMEOUT):
            url = ws_url(server, "stopped")
            async with connect(url) as one, connect(url) as two:
                await one.synced.wait()
                await two.synced.wait()
                await one.append("<one:0>")
                await two.wait_until(lambda: "<one:0>" in two.content())
                ctx = server.documents()["stopped"]
                await ctx.aclose()  # as the control socket would
                for client in (one, two):
                    assert await closed_with(client) == (CLOSE_SERVICE_RESTART, REASON_STOPPED)
            assert ctx.returncode == 0
            # It saved the document on its way out; the next client gets a fresh child.
            async with connect(url) as again:
                await again.synced.wait()
                assert again.content() == "<one:0>"
                assert server.documents()["stopped"].pid != ctx.pid


# -- bad input ------------------------------------------------------------------------------------

BAD_NAMES = [
    "../x",  # a relative path, as sent
    "%2E%2E%2Fx",  # the same, percent-encoded
    "/etc/passwd",  # absolute
    "%2Fetc%2Fpasswd",
    "a%00b",  # NUL
    "%2E",
    ".hidden",
    "",  # empty
    "x" * 101,  # too long
    "%C3%A9" * 101,  # too long in characters after decoding
    "%FF%FE",  # not UTF-8
    "tab%09here",  # not printable
]


async def test_invalid_document_names(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        with trio.fail_after(TIMEOUT):
            for name in BAD_NAMES:
                async with connect(ws_url(server, name, raw=True)) as client:
                    code, reason = await closed_with(client)
                    assert code == CLOSE_INVALID_NAME, name
                    assert reason is not None and reason.startswith("invalid document name: ")
                    assert len(reason.encode()) <= 123
            assert server.documents() == {}
            await check_works(server)


async def test_bytes_that_are_not_yjs(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        with trio.fail_after(TIMEOUT):
            url = ws_url(server, "doc")
            async with connect(url) as good:
                await good.synced.wait()
                for garbage in (b"\xff\xff\xff", b"hello", b"\x00\x09\x01"):
                    async with connect(url, sync=False) as bad:
                        await bad.send(garbage)
                        code, reason = await closed_with(bad)
                        assert code == 1003
                        assert reason
                # The document and its other client did not notice.
                await good.append("<good:0>")
                async with connect(url) as other:
                    await other.wait_until(lambda: "<good:0>" in other.content())
                assert not good.closed.is_set()
            await check_works(server)


async def test_text_frame(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        with trio.fail_after(TIMEOUT):
            url = ws_url(server, "doc")
            async with connect(url) as good, connect(url) as bad:
                await good.synced.wait()
                await bad.synced.wait()
                await bad.send("hello")
                assert await closed_with(bad) == (1003, REASON_TEXT)
                await good.append("<good:0>")
                async with connect(url) as other:
                    await other.wait_until(lambda: "<good:0>" in other.content())
                assert not good.closed.is_set()
            await check_works(server)


async def test_oversized_message(tmp_path: Path) -> None:
    limit = 64 * 1024
    async with running(tmp_path, max_message_size=limit) as server:
        with trio.fail_after(TIMEOUT):
            url = ws_url(server, "doc")
            async with connect(url) as good, connect(url) as big:
                await good.synced.wait()
                await big.synced.wait()
                # A valid update, just too big.
                before = big.doc.get_state()
                big.text += "y" * (2 * limit)
                await big.send(create_update_message(big.doc.get_update(before)))
                code, reason = await closed_with(big)
                assert code == CLOSE_MESSAGE_TOO_BIG == 4413  # y-websocket does not retry
                assert reason and str(limit) in reason
                await good.append("<good:0>")
                async with connect(url) as other:
                    await other.wait_until(lambda: "<good:0>" in other.content())
                    assert "y" not in other.content()
            await check_works(server)


async def test_client_limits(tmp_path: Path) -> None:
    async with running(tmp_path, spare=2, max_clients=3, max_clients_per_doc=2) as server:
        with trio.fail_after(TIMEOUT):
            async with connect(ws_url(server, "a")) as a1, connect(ws_url(server, "a")) as a2:
                await a1.synced.wait()
                await a2.synced.wait()
                async with connect(ws_url(server, "a")) as a3:
                    assert await closed_with(a3) == (CLOSE_TRY_AGAIN, REASON_TOO_MANY_HERE)
                async with connect(ws_url(server, "b")) as b1:
                    await b1.synced.wait()
                    async with connect(ws_url(server, "b")) as b2:
                        assert await closed_with(b2) == (CLOSE_TRY_AGAIN, REASON_TOO_MANY)
                await server.wait_until(lambda: server.client_count == 2)
                # One left: there is room again.
                async with connect(ws_url(server, "b")) as b3:
                    await b3.synced.wait()
                    await b3.append("<b3:0>")
                    await a1.append("<a1:0>")
                    await a2.wait_until(lambda: "<a1:0>" in a2.content())
            await server.wait_until(lambda: server.client_count == 0)
            await check_works(server)


async def test_start_timeout(tmp_path: Path) -> None:
    # No spare child: the first client has to wait for one, longer than it may.
    async with running(tmp_path, spare=0, start_timeout=0.001) as server:
        with trio.fail_after(TIMEOUT):
            async with connect(ws_url(server, "slow")) as client:
                assert await closed_with(client) == (CLOSE_TRY_AGAIN, REASON_BUSY)
            # The child started for it is kept; the next client gets it at once.
            assert server.pool is not None
            await server.pool.wait_idle(1)
            async with connect(ws_url(server, "slow")) as again:
                await again.synced.wait()
                await again.append("<again:0>")


async def test_slow_client_does_not_stall_others(tmp_path: Path) -> None:
    async with running(tmp_path, client_queue=8, close_timeout=0.5) as server:
        with trio.fail_after(TIMEOUT):
            url = ws_url(server, "busy")
            async with (
                open_socket(url) as sleeper,
                connect(url) as writer,
                connect(url) as reader,
            ):
                # The sleeper never reads: what the server sends it piles up.
                await writer.synced.wait()
                await reader.synced.wait()
                assert server.clients_of("busy") == 3
                chunk = "z" * 60_000
                n = 0
                while server.clients_of("busy") == 3:
                    await writer.append(f"<w:{n}>{chunk}")
                    expected = f"<w:{n}>"
                    await reader.wait_until(lambda: expected in reader.content())  # noqa: B023
                    n += 1
                # The sleeper was dropped; the others went on at their own pace.
                assert server.clients_of("busy") == 2
                assert not reader.closed.is_set() and not writer.closed.is_set()
                with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                    while True:
                        await sleeper.get_message()
                assert closed.value.reason is not None
                assert closed.value.reason.code in (CLOSE_TRY_AGAIN, 1006)
