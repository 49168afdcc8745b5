"""The queues of user messages waiting to be read: one per sender and handle."""

from __future__ import annotations

import math

import trio

from ._wire import Handle, Message

_USER_HANDLES = (Handle.CHANNEL, Handle.REQUEST)


class Inboxes:
    """Messages from each context for a user handle (CHANNEL or REQUEST).

    They are unbounded on purpose: a reader that stopped reading must never stop
    the link's pump, or replies and SHUTDOWN behind it would never arrive.
    """

    def __init__(self) -> None:
        self._queues: dict[
            tuple[int, int],
            tuple[trio.MemorySendChannel[Message], trio.MemoryReceiveChannel[Message]],
        ] = {}

    def _pair(
        self, src_id: int, handle: int
    ) -> tuple[trio.MemorySendChannel[Message], trio.MemoryReceiveChannel[Message]]:
        pair = self._queues.get((src_id, handle))
        if pair is None:
            pair = trio.open_memory_channel[Message](math.inf)
            self._queues[(src_id, handle)] = pair
        return pair

    def inbox(
        self, src_id: int, handle: int = Handle.CHANNEL
    ) -> trio.MemoryReceiveChannel[Message]:
        """The queue of messages from *src_id* for *handle*."""
        return self._pair(src_id, handle)[1]

    def put(self, msg: Message) -> None:
        """Queue *msg* for its sender and handle."""
        self._pair(msg.src_id, msg.handle)[0].send_nowait(msg)

    def close(self, src_id: int) -> None:
        """*src_id* is gone: its readers get the end of the channel once it is empty."""
        for handle in _USER_HANDLES:
            pair = self._queues.pop((src_id, handle), None)
            if pair is not None:
                pair[0].close()

    def take_all(self, handle: int) -> list[Message]:
        """Take every message queued so far for *handle*, from every context."""
        taken: list[Message] = []
        for (_, each), (_, receive) in list(self._queues.items()):
            if each != handle:
                continue
            while True:
                try:
                    taken.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
        return taken
