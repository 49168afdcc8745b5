"""Floods: one client sending far more than the others must not get them
disconnected; limits on rates and awareness states close only the offender."""

from __future__ import annotations

import contextlib
from pathlib import Path

import trio
import trio_websocket
from pycrdt import Doc, Text, create_awareness_message, create_update_message, write_var_uint

from examples.collab.clients import CLOSE_POLICY_VIOLATION, REASON_TOO_FAST
from examples.collab.document import REASON_TOO_MANY_AWARENESS

from .servers import TIMEOUT, check_works, closed_with, running, ws_url
from .yclient import connect

FLOOD = 20_000


def tiny_updates(count: int) -> tuple[list[bytes], str]:
    """*count* one-character edits as y-websocket messages, and the text they make."""
    doc: Doc[Text] = Doc()
    text = doc.get("text", type=Text)
    messages = []
    for i in range(count):
        before = doc.get_state()
        text += "abcdefghij"[i % 10]
        messages.append(create_update_message(doc.get_update(before)))
    return messages, str(text)


async def test_a_flood_of_tiny_updates_disconnects_nobody_else(tmp_path: Path) -> None:
    messages, flooded = tiny_updates(FLOOD)
    # No rate limit here: every update goes through, so the sender is slowed by
    # backpressure alone, and the readers get merged updates.
    async with running(tmp_path, max_messages_per_second=0) as server:
        with trio.fail_after(TIMEOUT * 4):
            async with (
                connect(ws_url(server, "flooded")) as flooder,
                connect(ws_url(server, "flooded")) as reader,
                connect(ws_url(server, "flooded")) as late_reader,
                connect(ws_url(server, "quiet")) as elsewhere,
                connect(ws_url(server, "quiet")) as elsewhere_peer,
            ):
                for client in (flooder, reader, late_reader, elsewhere, elsewhere_peer):
                    await client.synced.wait()
                for message in messages:
                    await flooder.ws.send_message(message)
                # Another document is served meanwhile.
                await elsewhere.append("<q:0>")
                await elsewhere_peer.wait_until(lambda: "<q:0>" in elsewhere_peer.content())
                for client in (reader, late_reader):
                    await client.wait_until(lambda c=client: c.content() == flooded)  # type: ignore[misc]
                for client in (flooder, reader, late_reader, elsewhere, elsewhere_peer):
                    assert not client.closed.is_set()
            await check_works(server)


async def test_a_client_over_its_rate_limit_is_closed_alone(tmp_path: Path) -> None:
    messages, flooded = tiny_updates(FLOOD)
    async with running(tmp_path, max_messages_per_second=100, message_burst=500) as server:
        with trio.fail_after(TIMEOUT * 2):
            async with (
                connect(ws_url(server, "limited")) as flooder,
                connect(ws_url(server, "limited")) as reader,
            ):
                await flooder.synced.wait()
                await reader.synced.wait()
                async with trio.open_nursery() as nursery:

                    async def flood() -> None:
                        with contextlib.suppress(trio_websocket.ConnectionClosed):
                            for message in messages:
                                await flooder.ws.send_message(message)

                    nursery.start_soon(flood)
                    assert await closed_with(flooder) == (CLOSE_POLICY_VIOLATION, REASON_TOO_FAST)
                    nursery.cancel_scope.cancel()
                # What was accepted (the burst, less the flooder's own sync and
                # awareness messages, plus what the rate refilled) reached the reader,
                # in order, and the reader stays connected.
                await reader.wait_until(lambda: len(reader.content()) >= 490)
                assert flooded.startswith(reader.content())
                assert not reader.closed.is_set()
            await check_works(server, "limited")


def many_awareness_states(count: int) -> bytes:
    body = write_var_uint(count)
    for awareness_id in range(1, count + 1):
        state = b'{"user":{"name":"x"}}'
        body += write_var_uint(awareness_id) + write_var_uint(1)
        body += write_var_uint(len(state)) + state
    return create_awareness_message(body)


async def test_five_thousand_awareness_states_are_refused(tmp_path: Path) -> None:
    async with running(tmp_path) as server:
        with trio.fail_after(TIMEOUT):
            async with (
                connect(ws_url(server, "aware"), user="Ann") as ann,
                connect(ws_url(server, "aware")) as bomber,
            ):
                await ann.synced.wait()
                await bomber.synced.wait()
                await bomber.ws.send_message(many_awareness_states(5000))
                assert await closed_with(bomber) == (
                    CLOSE_POLICY_VIOLATION,
                    REASON_TOO_MANY_AWARENESS,
                )
                # None of them was kept or broadcast: Ann sees only herself.
                await ann.append("<ann:0>")
                async with connect(ws_url(server, "aware")) as probe:
                    await probe.wait_until(lambda: "<ann:0>" in probe.content())
                    assert len(probe.awareness.states) <= 2
                assert not ann.closed.is_set()
            await check_works(server)
