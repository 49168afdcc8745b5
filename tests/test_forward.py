"""forward: pumping from a source to one sink or several, with real channels, real
socket streams (links, WebSockets) and real children; every way a side can go."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import targets
import trio
import trio_websocket

import nursery_procs
from nursery_procs import ContextDied, Forwarded, LinkClosed, MessageUndeliverable, WireError

TIMEOUT = 20


def channel(
    size: float = 100,
) -> tuple[trio.MemorySendChannel[Any], trio.MemoryReceiveChannel[Any]]:
    return trio.open_memory_channel[Any](size)


def queued(*values: Any, close: bool = True) -> trio.MemoryReceiveChannel[Any]:
    """A source holding *values* (and then ending, if *close*)."""
    send, receive = channel(len(values) + 1)
    for value in values:
        send.send_nowait(value)
    if close:
        send.close()
    return receive


def drain(receive: trio.MemoryReceiveChannel[Any]) -> list[Any]:
    values = []
    while True:
        try:
            values.append(receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return values


def socket_stream_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    left, right = trio.socket.socketpair()
    return trio.SocketStream(left), trio.SocketStream(right)


@attrs.frozen
class WebSocketEnd:
    """A trio-websocket connection shaped as a source and a sink."""

    ws: trio_websocket.WebSocketConnection

    async def receive(self) -> bytes | str:
        return await self.ws.get_message()

    async def send(self, message: bytes | str) -> None:
        await self.ws.send_message(message)


@asynccontextmanager
async def websocket_pair() -> AsyncIterator[tuple[WebSocketEnd, WebSocketEnd]]:
    """A client and a server WebSocket over a real socket pair."""
    client_stream, server_stream = socket_stream_pair()
    async with trio.open_nursery() as nursery:
        accepted: list[trio_websocket.WebSocketConnection] = []

        async def accept() -> None:
            request = await trio_websocket.wrap_server_stream(nursery, server_stream)
            accepted.append(await request.accept())

        nursery.start_soon(accept)
        client = await trio_websocket.wrap_client_stream(nursery, client_stream, "localhost", "/")
        await trio.testing.wait_all_tasks_blocked()
        (server,) = accepted
        try:
            yield WebSocketEnd(client), WebSocketEnd(server)
        finally:
            await client.aclose()
            await server.aclose()
            nursery.cancel_scope.cancel()


# -- one sink: in order, until a side goes ------------------------------------------------------


async def test_forwards_everything_in_order_until_the_source_ends() -> None:
    out, collected = channel()
    result = await nursery_procs.forward(queued(*range(5)), out)
    assert drain(collected) == [0, 1, 2, 3, 4]
    assert (result.received, result.sent, result.dropped, result.gone) == (5, 5, 0, "source")
    assert isinstance(result.reason, trio.EndOfChannel)


async def test_source_closed_while_waiting() -> None:
    send, receive = channel()
    out, collected = channel()
    async with trio.open_nursery() as nursery:
        results: list[Forwarded] = []

        async def run() -> None:
            results.append(await nursery_procs.forward(receive, out))

        nursery.start_soon(run)
        await send.send("one")
        await trio.testing.wait_all_tasks_blocked()
        await receive.aclose()
    (result,) = results
    assert drain(collected) == ["one"]
    assert (result.gone, result.received) == ("source", 1)
    assert isinstance(result.reason, trio.ClosedResourceError)


async def test_sink_whose_reader_has_gone() -> None:
    source = queued("a", "b", "c")
    out, collected = channel(1)
    await collected.aclose()
    result = await nursery_procs.forward(source, out)
    assert (result.gone, result.received, result.sent, result.dropped) == ("sink", 1, 0, 1)
    assert isinstance(result.reason, trio.BrokenResourceError)
    # It stopped at once: what it had not taken is still in the source.
    assert drain(source) == ["b", "c"]


async def test_sink_closed_by_its_owner() -> None:
    out, _collected = channel()
    await out.aclose()
    result = await nursery_procs.forward(queued(1, 2), out)
    assert result.gone == "sink"
    assert isinstance(result.reason, trio.ClosedResourceError)


async def test_link_over_a_socket_pair_either_side_gone() -> None:
    with trio.fail_after(TIMEOUT):
        near, far = socket_stream_pair()
        ours, theirs = (
            nursery_procs.Link(near, client=True),
            nursery_procs.Link(far, client=False),
        )
        out, collected = channel()
        async with trio.open_nursery() as nursery:
            results: list[Forwarded] = []

            async def run() -> None:
                results.append(await nursery_procs.forward(ours, out))

            nursery.start_soon(run)
            await theirs.send(b"hello")
            await theirs.aclose(4001, "bye")
        (result,) = results
        assert drain(collected) == [b"hello"]
        assert result.gone == "source"
        assert isinstance(result.reason, LinkClosed) and result.reason.code == 4001
        await ours.aclose()

        # As a sink: the peer's socket is closed, the write fails.
        near, far = socket_stream_pair()
        link = nursery_procs.Link(near, client=True)
        await far.aclose()
        result = await nursery_procs.forward(queued(b"x" * 100_000, b"y"), link)
        assert (result.gone, result.sent) == ("sink", 0)
        assert isinstance(result.reason, LinkClosed)
        await link.aclose()


async def test_websocket_source_closed_by_the_peer() -> None:
    with trio.fail_after(TIMEOUT):
        async with websocket_pair() as (client, server):
            out, collected = channel()
            async with trio.open_nursery() as nursery:
                results: list[Forwarded] = []

                async def run() -> None:
                    results.append(await nursery_procs.forward(server, out))

                nursery.start_soon(run)
                await client.send(b"one")
                await client.send("two")
                await client.ws.aclose(4000, "done")
            (result,) = results
            assert drain(collected) == [b"one", "two"]
            assert result.gone == "source"
            assert isinstance(result.reason, trio_websocket.ConnectionClosed)
            assert result.reason.reason is not None and result.reason.reason.code == 4000


async def test_websocket_sink_closed_by_the_peer() -> None:
    with trio.fail_after(TIMEOUT):
        async with websocket_pair() as (client, server):
            await client.ws.aclose()
            result = await nursery_procs.forward(queued(b"late"), server)
            assert (result.gone, result.sent) == ("sink", 0)
            assert isinstance(result.reason, trio_websocket.ConnectionClosed)


# -- a real child as the source or the sink ---------------------------------------------------


async def test_child_source_that_finishes() -> None:
    with trio.fail_after(TIMEOUT):
        async with nursery_procs.open_supervisor() as sup:
            echo = await sup.start_child(targets.forward_between, 2)
            await echo.send("a")
            await echo.send("b")
            out, collected = channel()
            result = await nursery_procs.forward(echo, out)
            assert drain(collected) == ["a", "b"]
            assert (result.gone, result.received) == ("source", 2)
            assert type(result.reason) is trio.EndOfChannel
            assert await echo.wait() == 2


async def test_child_source_that_dies() -> None:
    with trio.fail_after(TIMEOUT):
        async with nursery_procs.open_supervisor() as sup:
            echo = await sup.start_child(targets.echo_messages, raise_on_crash=False)
            out, collected = channel()
            async with trio.open_nursery() as nursery:
                results: list[Forwarded] = []

                async def run() -> None:
                    results.append(await nursery_procs.forward(echo, out))

                nursery.start_soon(run)
                await echo.send("before")
                assert await collected.receive() == "before"
                assert echo.pid is not None
                os.kill(echo.pid, signal.SIGKILL)
            (result,) = results
            assert result.gone == "source"
            assert isinstance(result.reason, ContextDied)
            assert result.reason.returncode == -signal.SIGKILL


async def test_child_sink_that_has_exited_or_was_closed() -> None:
    with trio.fail_after(TIMEOUT):
        async with nursery_procs.open_supervisor() as sup:
            once = await sup.start_child(targets.forward_between, 1)
            await once.send("ping")
            assert await once.receive() == "ping"
            assert await once.wait() == 1
            result = await nursery_procs.forward(queued("too late"), once)
            assert result.gone == "sink"
            assert isinstance(result.reason, ContextDied)

            closed = await sup.start_child(targets.echo_messages)
            await closed.aclose()
            result = await nursery_procs.forward(queued("too late"), closed)
            assert result.gone == "sink"
            assert isinstance(result.reason, trio.ClosedResourceError)


async def test_sink_with_no_route() -> None:
    async with nursery_procs.open_supervisor():
        nowhere = nursery_procs.context_by_id(4242)
        result = await nursery_procs.forward(queued("lost"), nowhere)
        assert result.gone == "sink"
        assert isinstance(result.reason, MessageUndeliverable)
        assert "no route to context 4242" in str(result.reason)


async def test_drop_on_skips_a_message_over_the_link_limit() -> None:
    with trio.fail_after(TIMEOUT):
        policy = nursery_procs.Policy(max_message_size=64 * 1024)
        async with nursery_procs.open_supervisor(policy=policy) as sup:
            echo = await sup.start_child(targets.echo_messages)
            big = b"x" * (65 * 1024)
            result = await nursery_procs.forward(
                queued(b"small", big, b"after"), echo, drop_on=(WireError,)
            )
            assert (result.received, result.sent, result.dropped) == (3, 2, 1)
            assert result.gone == "source"
            # The link is intact: the child got the two others, in order.
            assert [await echo.receive(), await echo.receive()] == [b"small", b"after"]

            # Without drop_on, the same error is not "gone": it propagates.
            with pytest.raises(WireError, match="over the link's limit"):
                await nursery_procs.forward(queued(big), echo)


# -- cancellation -------------------------------------------------------------------------------


async def test_cancelled_while_waiting_for_the_source_loses_nothing() -> None:
    send, receive = channel()
    out, collected = channel()
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(nursery_procs.forward, receive, out)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
    assert scope.cancelled_caught
    await send.send("later")
    assert receive.receive_nowait() == "later"
    assert drain(collected) == []


async def test_cancelled_while_the_sink_blocks() -> None:
    source = queued("held", "kept")
    out, collected = channel(0)  # nobody reads: the send blocks
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(nursery_procs.forward, source, out)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
    assert scope.cancelled_caught
    # The value in hand was lost (as documented); the rest is still in the source.
    assert drain(source) == ["kept"]
    assert drain(collected) == []


async def test_cancelled_with_a_child_sink_leaves_the_link_usable() -> None:
    with trio.fail_after(TIMEOUT):
        async with nursery_procs.open_supervisor() as sup:
            echo = await sup.start_child(targets.echo_messages)
            send, receive = channel()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(nursery_procs.forward, receive, echo)
                await send.send("one")
                assert await echo.receive() == "one"
                nursery.cancel_scope.cancel()
            await echo.send("two")
            assert await echo.receive() == "two"


# -- transform, filter, errors ---------------------------------------------------------------------


async def test_transform_tags_and_filters() -> None:
    out, collected = channel()

    def tag_even(value: int) -> tuple[str, int] | None:
        return ("client-7", value) if value % 2 == 0 else None

    result = await nursery_procs.forward(queued(0, 1, 2, 3, 4), out, transform=tag_even)
    assert drain(collected) == [("client-7", 0), ("client-7", 2), ("client-7", 4)]
    assert (result.received, result.sent, result.dropped) == (5, 3, 2)


async def test_an_error_from_transform_propagates_and_stops() -> None:
    source = queued("ok", 5, "never")
    out, collected = channel()
    with pytest.raises(TypeError):
        await nursery_procs.forward(source, out, transform=str.upper)
    assert drain(collected) == ["OK"]
    assert drain(source) == ["never"]


async def test_drop_on_an_error_from_transform() -> None:
    out, collected = channel()
    result = await nursery_procs.forward(
        queued("1", "x", "3"), out, transform=int, drop_on=(ValueError,)
    )
    assert drain(collected) == [1, 3]
    assert (result.received, result.sent, result.dropped, result.gone) == (3, 2, 1, "source")


async def test_other_errors_from_a_sink_propagate() -> None:
    class Refuses:
        async def send(self, value: object) -> None:
            raise RuntimeError(f"no {value}")

    with pytest.raises(RuntimeError, match="no 1"):
        await nursery_procs.forward(queued(1), Refuses())


async def test_sink_or_fan_out_exactly_one() -> None:
    source = queued(1)
    out, _ = channel()
    with pytest.raises(TypeError, match="either a sink or fan_out"):
        await nursery_procs.forward(source)
    with pytest.raises(TypeError, match="either a sink or fan_out"):
        await nursery_procs.forward(source, out, fan_out=lambda value: [out])
    assert drain(source) == [1]  # nothing was taken


# -- fan-out --------------------------------------------------------------------------------------


async def test_fan_out_routes_each_value_and_transforms_it_once() -> None:
    sinks = {name: channel() for name in ("a", "b", "c")}
    transformed: list[Any] = []

    def route(message: tuple[str, ...]) -> list[trio.MemorySendChannel[Any]]:
        return [sinks[name][0] for name in message[1:]]

    def encode(message: tuple[str, ...]) -> bytes:
        frame = message[0].encode()
        transformed.append(frame)
        return frame

    messages = [("all", "a", "b", "c"), ("one", "b"), ("none",), ("two", "a", "c")]
    result = await nursery_procs.forward(queued(*messages), fan_out=route, transform=encode)

    received = {name: drain(receive) for name, (_, receive) in sinks.items()}
    assert received == {"a": [b"all", b"two"], "b": [b"all", b"one"], "c": [b"all", b"two"]}
    # One transform per value, and every sink got that very object.
    assert len(transformed) == 4
    assert received["a"][0] is received["b"][0] is received["c"][0] is transformed[0]
    assert (result.received, result.sent, result.dropped, result.gone) == (4, 6, 1, "source")


async def test_fan_out_skips_sinks_that_have_gone() -> None:
    with trio.fail_after(TIMEOUT):
        async with nursery_procs.open_supervisor() as sup:
            dead = await sup.start_child(targets.echo_messages, raise_on_crash=False)
            assert dead.pid is not None
            os.kill(dead.pid, signal.SIGKILL)
            await dead.wait_exited()
            live, live_out = channel()
            broken, broken_out = channel()
            await broken_out.aclose()
            everyone: list[Any] = [dead, broken, live]
            result = await nursery_procs.forward(queued(1, 2, 3), fan_out=lambda _: everyone)
            assert drain(live_out) == [1, 2, 3]
            assert (result.received, result.sent, result.dropped) == (3, 3, 0)
            # Only sinks that had gone: the value is counted as dropped, and it goes on.
            result = await nursery_procs.forward(queued(4, 5), fan_out=lambda _: [dead, broken])
            assert (result.received, result.sent, result.dropped, result.gone) == (
                2,
                0,
                2,
                "source",
            )


async def test_fan_out_ends_only_with_its_source() -> None:
    send, receive = channel()
    one, one_out = channel()
    sinks: list[Any] = [one]
    async with trio.open_nursery() as nursery:
        results: list[Forwarded] = []

        async def run() -> None:
            results.append(await nursery_procs.forward(receive, fan_out=lambda _: sinks))

        nursery.start_soon(run)
        await send.send("first")
        assert await one_out.receive() == "first"
        await one_out.aclose()
        await send.send("nobody hears this")
        await trio.testing.wait_all_tasks_blocked()
        assert not results  # still running with no live sink
        two, two_out = channel()
        sinks[:] = [two]
        await send.send("second")
        assert await two_out.receive() == "second"
        await send.aclose()
    (result,) = results
    assert (result.gone, result.received, result.sent, result.dropped) == ("source", 3, 2, 1)


async def test_fan_out_errors_from_the_router_propagate_or_drop() -> None:
    out, collected = channel()

    def route(value: int) -> list[trio.MemorySendChannel[Any]]:
        if value < 0:
            raise KeyError(value)
        return [out]

    result = await nursery_procs.forward(queued(1, -1, 2), fan_out=route, drop_on=(KeyError,))
    assert drain(collected) == [1, 2]
    assert result.dropped == 1
    with pytest.raises(KeyError):
        await nursery_procs.forward(queued(-1), fan_out=route)


def test_forwarded_is_a_frozen_value() -> None:
    result = Forwarded(1, 1, 0, "source", trio.EndOfChannel())
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        result.sent = 2  # type: ignore[misc]
