"""The document kernel, driven by real pycrdt clients speaking y-websocket."""

from __future__ import annotations

import json
import random
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pycrdt import (
    Awareness,
    Doc,
    Text,
    create_awareness_message,
    create_sync_message,
    create_update_message,
    handle_sync_message,
    read_message,
    write_var_uint,
)

from examples.collab.document import (
    CLOSE_POLICY_VIOLATION,
    CLOSE_UNSUPPORTED_DATA,
    MAX_AWARENESS_PER_CLIENT,
    REASON_TOO_MANY_AWARENESS,
    DocumentKernel,
    Outgoing,
    ProtocolError,
    UnknownClientError,
    _rehearse_in,
    process_batch,
    rehearse,
    validate_name,
)
from examples.collab.journal import Journal
from examples.collab.protocol import (
    ALL,
    JOIN,
    MSG,
    RESYNC,
    RESYNCED,
)

# -- a tiny in-memory deployment ------------------------------------------------------------


class Client:
    """A browser stand-in: a pycrdt Doc with awareness, speaking y-websocket."""

    def __init__(self, connection_id: int) -> None:
        self.connection_id = connection_id
        self.doc: Doc[Text] = Doc()
        self.text = self.doc.get("text", type=Text)
        self.awareness = Awareness(self.doc)
        self.received: list[bytes] = []

    def handle(self, payload: bytes) -> list[bytes]:
        """Process a message from the server; return the replies."""
        self.received.append(payload)
        if payload[0] == 0:
            reply = handle_sync_message(payload[1:], self.doc)
            return [reply] if reply is not None else []
        if payload[0] == 1:
            self.awareness.apply_awareness_update(read_message(payload[1:]), "remote")
            return []
        raise AssertionError(f"unexpected message from the server: {payload!r}")

    def edit(self, change: Callable[[Text], None]) -> bytes:
        """Make a local edit; return the update message a provider would send."""
        before = self.doc.get_state()
        change(self.text)
        return create_update_message(self.doc.get_update(before))

    def set_user(self, name: str) -> bytes:
        self.awareness.set_local_state({"user": {"name": name}})
        update = self.awareness.encode_awareness_update([self.doc.client_id])
        return create_awareness_message(update)


class Hub:
    """Routes messages between clients and the kernel, journaling before delivering."""

    def __init__(self, data_dir: Path, name: str = "notes") -> None:
        self.data_dir = data_dir
        self.name = name
        self.journal = Journal.open(data_dir, name)
        self.kernel = DocumentKernel(name, self.journal)
        self.clients: dict[int, Client] = {}

    def close(self) -> None:
        self.journal.close()

    def connect(self, connection_id: int) -> Client:
        client = Client(connection_id)
        self.clients[connection_id] = client
        self.pump(self.kernel.join(connection_id))
        # The provider's own sync step 1 on open.
        self.send(connection_id, create_sync_message(client.doc))
        return client

    def disconnect(self, connection_id: int) -> None:
        del self.clients[connection_id]
        self.pump(self.kernel.leave(connection_id))

    def send(self, connection_id: int, payload: bytes) -> None:
        """A client sends *payload*; run the conversation until it settles."""
        self.run([(connection_id, payload)])

    def pump(self, outgoing: list[Outgoing]) -> None:
        """Deliver *outgoing*, then run the clients' replies until it settles."""
        self.run(self.deliver(outgoing))

    def run(self, messages: list[tuple[int, bytes]]) -> None:
        queue: deque[tuple[int, bytes]] = deque(messages)
        while queue:
            sender, message = queue.popleft()
            reply = self.kernel.receive(sender, message)
            self.journal.append(reply.durable)
            queue.extend(self.deliver(reply.outgoing))

    def deliver(self, outgoing: list[Outgoing]) -> list[tuple[int, bytes]]:
        replies: list[tuple[int, bytes]] = []
        for message in outgoing:
            if message.to is not None:
                targets = [message.to] if message.to in self.clients else []
            else:
                targets = [cid for cid in self.clients if cid != message.exclude]
            for target in targets:
                for reply in self.clients[target].handle(message.payload):
                    replies.append((target, reply))
        return replies


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    hub = Hub(tmp_path)
    yield hub
    hub.close()


def insert(index: int, text: str) -> Callable[[Text], None]:
    def change(shared: Text) -> None:
        shared.insert(index, text)

    return change


def append(text: str) -> Callable[[Text], None]:
    def change(shared: Text) -> None:
        shared += text

    return change


# -- editing ----------------------------------------------------------------------------------


def test_edit_reaches_the_other_clients(hub: Hub) -> None:
    a, b, c = hub.connect(1), hub.connect(2), hub.connect(3)
    hub.send(1, a.edit(append("hello")))
    assert hub.kernel.text() == "hello"
    assert str(b.text) == "hello"
    assert str(c.text) == "hello"

    hub.send(2, b.edit(append(" world")))
    hub.send(3, c.edit(insert(0, ">> ")))
    for client in (a, b, c):
        assert str(client.text) == ">> hello world"
    assert hub.kernel.text() == ">> hello world"


def test_update_is_durable_and_broadcast_to_others_only(hub: Hub) -> None:
    a = hub.connect(1)
    hub.connect(2)
    message = a.edit(append("x"))
    reply = hub.kernel.receive(1, message)
    assert len(reply.durable) == 1
    assert [(o.to, o.exclude) for o in reply.outgoing] == [(None, 1)]
    # The broadcast carries exactly the journaled update.
    assert reply.outgoing[0].payload == create_update_message(reply.durable[0])
    # Sending it again changes nothing: nothing to store, nothing to send.
    assert hub.kernel.receive(1, message) == ([], [])


def test_concurrent_edits_converge(hub: Hub) -> None:
    a, b = hub.connect(1), hub.connect(2)
    hub.send(1, a.edit(append("base")))
    # Both edit before seeing each other's change.
    from_a = a.edit(insert(0, "A"))
    from_b = b.edit(insert(4, "B"))
    hub.send(2, from_b)
    hub.send(1, from_a)
    assert str(a.text) == str(b.text) == hub.kernel.text()
    assert sorted(hub.kernel.text()) == sorted("AbaseB")


def test_late_joiner_gets_the_document(hub: Hub) -> None:
    a = hub.connect(1)
    hub.send(1, a.edit(append("written before you came")))
    late = hub.connect(2)
    assert str(late.text) == "written before you came"


def test_offline_edits_are_merged_on_connect(hub: Hub) -> None:
    a = hub.connect(1)
    hub.send(1, a.edit(append("server side")))
    # A client that already has content (edited offline) connects: the server's
    # sync step 1 makes it send what the server lacks.
    offline = Client(2)
    offline.text += "offline "
    hub.clients[2] = offline
    hub.pump(hub.kernel.join(2))
    hub.send(2, create_sync_message(offline.doc))
    assert str(offline.text) == str(a.text) == hub.kernel.text()
    assert "offline " in hub.kernel.text()
    assert "server side" in hub.kernel.text()


def test_join_greeting_is_sync_step1(hub: Hub) -> None:
    greeting = hub.kernel.join(7)
    assert len(greeting) == 1  # nobody present: no awareness message
    assert greeting[0].to == 7
    assert greeting[0].payload[:2] == b"\x00\x00"
    with pytest.raises(ValueError):
        hub.kernel.join(7)


def test_unknown_client(hub: Hub) -> None:
    with pytest.raises(UnknownClientError):
        hub.kernel.receive(99, b"\x03")
    assert hub.kernel.leave(99) == []


# -- persistence ------------------------------------------------------------------------------


def test_restore_by_journal_replay(tmp_path: Path) -> None:
    hub = Hub(tmp_path)
    a = hub.connect(1)
    hub.send(1, a.edit(append("hello")))
    hub.send(1, a.edit(insert(0, "well, ")))
    hub.close()
    assert not (tmp_path / "notes.snapshot").exists()

    with Journal.open(tmp_path, "notes") as journal:
        assert len(journal.recovered) == 2
        assert DocumentKernel("notes", journal).text() == "well, hello"


def test_restore_after_compaction(tmp_path: Path) -> None:
    hub = Hub(tmp_path)
    a = hub.connect(1)
    hub.send(1, a.edit(append("hello")))
    hub.journal.compact(hub.kernel.full_state())
    hub.send(1, a.edit(append(" again")))
    hub.close()

    with Journal.open(tmp_path, "notes") as journal:
        assert len(journal.recovered) == 2  # the snapshot, then one record
        kernel = DocumentKernel("notes", journal)
        assert kernel.text() == "hello again"
        journal.compact(kernel.full_state())
    with Journal.open(tmp_path, "notes") as journal:
        assert len(journal.recovered) == 1
        assert DocumentKernel("notes", journal).text() == "hello again"


def test_restored_kernel_syncs_reconnecting_clients(tmp_path: Path) -> None:
    hub = Hub(tmp_path)
    a = hub.connect(1)
    hub.send(1, a.edit(append("kept")))
    hub.close()

    hub = Hub(tmp_path)
    try:
        # The same browser tab reconnects, with an edit the server never saw.
        hub.clients[1] = a
        a.text += "!"
        hub.pump(hub.kernel.join(1))
        hub.send(1, create_sync_message(a.doc))
        fresh = hub.connect(2)
        assert str(fresh.text) == "kept!"
    finally:
        hub.close()


def test_torn_tail_loses_only_the_unfinished_update(tmp_path: Path) -> None:
    hub = Hub(tmp_path)
    a = hub.connect(1)
    hub.send(1, a.edit(append("safe")))
    hub.close()
    with (tmp_path / "notes.journal").open("ab") as f:
        f.write(b"\x00\x00\x00\x40\x12\x34")  # a header cut short by a crash

    with Journal.open(tmp_path, "notes") as journal:
        assert DocumentKernel("notes", journal).text() == "safe"


def test_unreadable_stored_update_is_skipped_and_reported(tmp_path: Path) -> None:
    hub = Hub(tmp_path)
    a = hub.connect(1)
    hub.send(1, a.edit(append("kept")))
    hub.journal.append([b"not an update"])
    hub.close()
    with Journal.open(tmp_path, "notes") as journal:
        kernel = DocumentKernel("notes", journal)
        assert kernel.text() == "kept"
        [(index, _reason)] = kernel.rejected
        assert journal.recovered[index] == b"not an update"


# -- invalid input ----------------------------------------------------------------------------


def _random_messages() -> list[bytes]:
    rng = random.Random(20240601)
    return [rng.randbytes(rng.randint(2, 64)) for _ in range(50)]


def _awareness(entries: list[tuple[int, int, str]]) -> bytes:
    body = write_var_uint(len(entries))
    for client_id, clock, state in entries:
        raw = state.encode("utf-8")
        body += write_var_uint(client_id) + write_var_uint(clock) + write_var_uint(len(raw)) + raw
    return create_awareness_message(body)


BAD_MESSAGES = {
    "empty": b"",
    "truncated varint": b"\x80",
    "truncated sync type": b"\x00\x80",
    "truncated length": b"\x00\x02",
    "truncated payload": b"\x00\x02\x05ab",
    "unknown type 99": b"\x63",
    "unknown sync type": b"\x00\x07\x00",
    "auth": b"\x02\x00",
    "varint too long": b"\x80\x80\x80\x80\x80\x80\x80\x80\x00",
    "varint over 53 bits": b"\xff\xff\xff\xff\xff\xff\xff\x7f",
    "garbage update": create_update_message(b"\x01\x02garbage!"),
    "garbage step 2": b"\x00\x01" + write_var_uint(5) + b"\xff\xff\xff\xff\xff",
    "bad state vector": b"\x00\x00\x02\x05\x80",
    "state vector trailing bytes": b"\x00\x00\x04\x01\x05\x03\x00",
    "trailing bytes": create_update_message(b"\x00\x00") + b"\x00",
    "query with payload": b"\x03\x00",
    "awareness truncated": b"\x01\x05\x01\x01",
    "awareness not json": _awareness([(5, 1, "{nope")]),
    "awareness NaN": _awareness([(5, 1, '{"x": NaN}')]),
    "awareness infinity": _awareness([(5, 1, '{"x": 1e999}')]),
    "awareness list": _awareness([(5, 1, "[1, 2]")]),
    "awareness empty state": _awareness([(5, 1, "")]),
    "awareness bad utf-8": create_awareness_message(b"\x01\x05\x01\x02\xff\xfe"),
    "awareness half valid": _awareness([(5, 1, '{"ok": true}'), (6, 1, "oops")]),
    **{f"random {i}": message for i, message in enumerate(_random_messages())},
}


@pytest.mark.parametrize("payload", BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
def test_bad_bytes_are_rejected_and_change_nothing(hub: Hub, payload: bytes) -> None:
    a, b = hub.connect(1), hub.connect(2)
    hub.send(1, a.edit(append("precious")))
    hub.send(2, b.set_user("bob"))
    state = hub.kernel.full_state()
    awareness = hub.kernel.awareness_states()
    journal_size = hub.journal.size

    with pytest.raises(ProtocolError) as info:
        hub.kernel.receive(1, payload)

    error = info.value
    assert error.close_code == CLOSE_UNSUPPORTED_DATA
    assert error.reply == ([], [])
    assert 0 < len(error.reason.encode()) <= 123
    assert hub.kernel.full_state() == state
    assert hub.kernel.text() == "precious"
    assert hub.kernel.awareness_states() == awareness
    assert hub.journal.size == journal_size
    # The document still works afterwards.
    hub.send(1, a.edit(append("!")))
    assert str(b.text) == "precious!"


def test_empty_update_is_ignored(hub: Hub) -> None:
    hub.connect(1)
    assert hub.kernel.receive(1, create_update_message(b"\x00\x00")) == ([], [])


# -- awareness --------------------------------------------------------------------------------


def _states(client: Client) -> dict[int, Any]:
    return {
        cid: state for cid, state in client.awareness.states.items() if cid != client.doc.client_id
    }


def test_awareness_join_and_leave(hub: Hub) -> None:
    a, b = hub.connect(1), hub.connect(2)
    hub.send(1, a.set_user("alice"))
    assert _states(b) == {a.doc.client_id: {"user": {"name": "alice"}}}
    assert hub.kernel.awareness_owner(a.doc.client_id) == 1

    # A newcomer is greeted with everyone present.
    c = hub.connect(3)
    assert _states(c) == {a.doc.client_id: {"user": {"name": "alice"}}}
    hub.send(3, c.set_user("carol"))
    assert c.doc.client_id in _states(a)
    assert c.doc.client_id in _states(b)

    hub.disconnect(1)
    assert a.doc.client_id not in _states(b)
    assert a.doc.client_id not in _states(c)
    assert a.doc.client_id not in hub.kernel.awareness_states()
    assert hub.kernel.awareness_owner(a.doc.client_id) is None
    assert c.doc.client_id in _states(b)


def test_awareness_broadcast_reaches_everyone_and_skips_stale_updates(hub: Hub) -> None:
    a = hub.connect(1)
    hub.connect(2)
    message = a.set_user("alice")
    reply = hub.kernel.receive(1, message)
    # The sender gets its own update back: y-websocket clients count it as a sign of life.
    assert [(o.to, o.exclude) for o in reply.outgoing] == [(None, None)]
    assert reply.durable == []
    # The same clock again is not news.
    assert hub.kernel.receive(1, message) == ([], [])


def test_awareness_removal_by_client(hub: Hub) -> None:
    a, b = hub.connect(1), hub.connect(2)
    hub.send(1, a.set_user("alice"))
    a.awareness.set_local_state(None)
    hub.send(1, create_awareness_message(a.awareness.encode_awareness_update([a.doc.client_id])))
    assert _states(b) == {}
    assert hub.kernel.awareness_owner(a.doc.client_id) is None
    # Leaving afterwards has nothing more to announce.
    assert hub.kernel.leave(1) == []


def test_awareness_moves_to_the_newest_connection(hub: Hub) -> None:
    a, b = hub.connect(1), hub.connect(2)
    hub.send(1, a.set_user("alice"))
    # The same tab reconnects on a new connection before the old one is noticed gone.
    hub.clients[3] = a
    hub.pump(hub.kernel.join(3))
    hub.send(3, a.set_user("alice again"))
    assert hub.kernel.awareness_owner(a.doc.client_id) == 3
    hub.kernel.leave(1)
    assert _states(b) == {a.doc.client_id: {"user": {"name": "alice again"}}}


def test_awareness_states_per_client_are_limited(hub: Hub) -> None:
    hub.connect(1)
    states = [(awareness_id, 1, '{"user":{"name":"x"}}') for awareness_id in range(5000)]
    with pytest.raises(ProtocolError) as refused:
        hub.kernel.receive(1, _awareness(states))
    assert refused.value.close_code == CLOSE_POLICY_VIOLATION
    assert refused.value.reason == REASON_TOO_MANY_AWARENESS
    assert hub.kernel.awareness_states() == {}  # nothing was kept
    allowed = states[:MAX_AWARENESS_PER_CLIENT]
    hub.kernel.receive(1, _awareness(allowed))
    assert len(hub.kernel.awareness_states()) == MAX_AWARENESS_PER_CLIENT
    # Removing states (null) is always allowed; a new one over the limit is not.
    with pytest.raises(ProtocolError):
        hub.kernel.receive(1, _awareness([(10**6, 1, "{}")]))


def test_a_flood_of_updates_is_merged_into_one_broadcast(tmp_path: Path) -> None:
    with Journal.open(tmp_path, "notes") as journal:
        kernel = DocumentKernel("notes", journal)
        a = Client(1)
        process_batch(kernel, [(JOIN, 1, b""), (JOIN, 2, b"")])
        flood = [(MSG, 1, a.edit(append(f"<{i}>"))) for i in range(200)]
        durable, outgoing = process_batch(kernel, flood)
        assert len(durable) == 200  # every update journaled
        [(kind, exclude, payload)] = outgoing
        assert (kind, exclude) == (ALL, 1)
        b = Client(2)
        b.handle(payload)
        assert str(b.text) == str(a.text)


def test_a_client_that_fell_behind_gets_the_document(tmp_path: Path) -> None:
    with Journal.open(tmp_path, "notes") as journal:
        kernel = DocumentKernel("notes", journal)
        a = Client(1)
        process_batch(kernel, [(JOIN, 1, b""), (JOIN, 2, b""), (MSG, 1, a.edit(append("x")))])
        _, [(kind, client_id, payload)] = process_batch(kernel, [(RESYNC, 2, b"")])
        assert (kind, client_id) == (RESYNCED, 2)
        b = Client(2)
        b.handle(payload)
        assert str(b.text) == "x"


def test_query_awareness(hub: Hub) -> None:
    a = hub.connect(1)
    hub.connect(2)
    hub.send(1, a.set_user("alice"))
    reply = hub.kernel.receive(2, b"\x03")
    assert reply.durable == []
    [answer] = reply.outgoing
    assert answer.to == 2
    probe = Awareness(Doc())
    probe.apply_awareness_update(read_message(answer.payload[1:]), "test")
    assert probe.states[a.doc.client_id] == {"user": {"name": "alice"}}


def test_awareness_state_is_rebroadcast_as_strict_json(hub: Hub) -> None:
    hub.connect(1)
    b = hub.connect(2)
    hub.send(1, _awareness([(42, 1, '{"name": "Zoë", "n": 1.5}')]))
    raw = b.received[-1]
    decoded = read_message(raw[1:])
    # count, client id, clock, then the JSON string
    text = decoded[4:].decode("utf-8")
    assert json.loads(text) == {"name": "Zoë", "n": 1.5}


# -- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", "../x", "/etc/passwd", "a/b", "a\\b", "a\x00b", ".", "..", ".hidden", "x" * 101,
     "tab\there", "new\nline", "\u200bzero-width", "é" * 101, "\U0001f600" * 51],
)  # fmt: skip
def test_invalid_names(name: str) -> None:
    with pytest.raises(ValueError, match="document name"):
        validate_name(name)


@pytest.mark.parametrize("name", ["notes", "Café 2", "x" * 100, "a.b", "Ünïcödé", "2024-06 plan"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


def test_names_are_normalized() -> None:
    assert validate_name("Cafe\u0301") == "Café"


# -- the fork server's rehearsal --------------------------------------------------------------


def test_a_rehearsal_serves_a_document_through_the_real_code(tmp_path: Path) -> None:
    _rehearse_in(tmp_path)
    # Both clients' edits were applied, made durable and compacted: neither was kicked.
    journal = Journal.open(tmp_path, "rehearsal")
    try:
        doc: Doc[Text] = Doc()
        for update in journal.recovered:
            doc.apply_update(update)
        assert journal.record_count == 0  # compacted into the snapshot
    finally:
        journal.close()
    text = str(doc.get("text", type=Text))
    assert text.count("edit 3 ") == 2
    assert len(text) == 2 * len("edit 0 edit 1 edit 2 edit 3 ")


def test_a_rehearsal_without_usable_storage_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "missing"))
    rehearse()
    assert "document rehearsal skipped" in caplog.text
    assert list(tmp_path.iterdir()) == []
