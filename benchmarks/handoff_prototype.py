"""An experiment, not a server: the collab data path with each client's connection
handed to its document's process, measured by ``bench_collab.py``.

Run: ``python benchmarks/bench_collab.py --servers nursery_procs,handoff-prototype,node``.

The master reads the opening handshake, answers it, and passes the connection's socket
to the process of the document the URL names (``SCM_RIGHTS`` over a ``SOCK_SEQPACKET``
pair made when that process starts, with any bytes read past the handshake); then it
is out of that connection's path. Each document process reads its clients' frames
itself, applies them with the collab server's own :class:`DocumentKernel`, appends the
updates to the same journal with an ``fdatasync``, and writes each answer, framed once,
to every client it is for. It runs on plain processes and none of the runtime.

What the collab server does and this does not: rate and size limits beyond the frame
size, slow clients, the close handshake, 1011 when a document's process dies, a drain
on SIGTERM, supervision, isolation, the control socket. It exists to measure what the
hand-off would save (see docs/collab.rst, "Where the time goes"), nothing more.
"""

from __future__ import annotations

import argparse
import array
import itertools
import socket
import sys
import urllib.parse
from collections.abc import Iterable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.collab.document import (
    DocumentKernel,
    check_old_snapshot,
    process_batch,
)
from examples.collab.front import accept_token
from examples.collab.journal import Journal
from examples.collab.protocol import ALL, JOIN, KICK, LEAVE, MSG, TO, Record, decode_kick
from examples.collab.websocket import ClientSocket, WebSocketError, binary_frame

MAX_MESSAGE_SIZE = 1 << 24


class DocumentProcess:
    """One document, served to the clients handed to this process."""

    def __init__(self, name: str, data_dir: str) -> None:
        self.journal = Journal.open(data_dir, name, check_old=check_old_snapshot)
        self.kernel = DocumentKernel(name, self.journal)
        self.clients: dict[int, ClientSocket] = {}
        self.ids = itertools.count(1)

    def step(self, records: list[Record]) -> None:
        durable, outgoing = process_batch(self.kernel, records)
        if durable:
            self.journal.append(durable)
        self.deliver(outgoing)

    def deliver(self, records: Iterable[Record]) -> None:
        for kind, client_id, payload in records:
            if kind == ALL:
                frame = binary_frame(payload)
                for other, client in self.clients.items():
                    if other != client_id:
                        client.offer(frame)
            elif kind in (TO, KICK) and client_id in self.clients:
                client = self.clients[client_id]
                if kind == TO:
                    client.offer(binary_frame(payload))
                else:
                    client.queue_close(*decode_kick(payload))

    async def serve_client(self, sock: socket.socket, initial: bytes) -> None:
        client_id = next(self.ids)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        client = ClientSocket(stream, max_message_size=MAX_MESSAGE_SIZE, initial=initial)
        self.clients[client_id] = client
        self.step([(JOIN, client_id, b"")])
        async with trio.open_nursery() as tasks:
            tasks.start_soon(client.write_pending)
            try:
                while True:
                    self.step([(MSG, client_id, await client.receive())])
            except (trio.EndOfChannel, WebSocketError, OSError):
                pass
            del self.clients[client_id]
            self.step([(LEAVE, client_id, b"")])
            tasks.cancel_scope.cancel()
        await client.aclose()

    async def run(self, control_fd: int) -> None:
        control = trio.socket.from_stdlib_socket(socket.socket(fileno=control_fd))
        async with trio.open_nursery() as nursery:
            while True:
                data, ancillary, _flags, _address = await control.recvmsg(
                    1 << 16, socket.CMSG_SPACE(4)
                )
                if not ancillary:
                    break  # the master is gone
                fds = array.array("i")
                for _level, _kind, payload in ancillary:
                    fds.frombytes(payload[: len(payload) - len(payload) % 4])
                sock = socket.socket(fileno=fds[0])
                sock.setblocking(False)
                nursery.start_soon(self.serve_client, sock, data[1:])
            nursery.cancel_scope.cancel()
        self.journal.close()


class Master:
    """Answers the opening handshake and hands the connection over."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir
        self.documents: dict[str, trio.socket.SocketType] = {}
        self.locks: dict[str, trio.Lock] = {}
        self.processes: list[trio.Process] = []

    async def document(self, name: str) -> trio.socket.SocketType:
        async with self.locks.setdefault(name, trio.Lock()):
            control = self.documents.get(name)
            if control is None:
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                command = [sys.executable, __file__, "--document", str(theirs.fileno()), name]
                process = await trio.lowlevel.open_process(
                    [*command, self.data_dir], pass_fds=(theirs.fileno(),)
                )
                theirs.close()
                self.processes.append(process)
                control = self.documents[name] = trio.socket.from_stdlib_socket(ours)
            return control

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            await self._hand_over(stream)
        except (OSError, KeyError, IndexError, trio.BrokenResourceError) as exc:
            print(f"handoff prototype: connection dropped: {exc!r}", file=sys.stderr)
        finally:
            await trio.aclose_forcefully(stream)

    async def _hand_over(self, stream: trio.SocketStream) -> None:
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            received += chunk
        head, _, rest = received.partition(b"\r\n\r\n")
        request, *lines = head.split(b"\r\n")
        headers = {
            key.strip().lower(): value.strip()
            for key, _, value in (line.partition(b":") for line in lines)
        }
        name = urllib.parse.unquote(request.split(b" ")[1].decode().rsplit("/", 1)[1])
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
            + accept_token(headers[b"sec-websocket-key"])
            + b"\r\n\r\n"
        )
        control = await self.document(name)
        descriptor = array.array("i", [stream.socket.fileno()])
        await control.sendmsg([b"c" + rest], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, descriptor)])


async def serve(port: int, data_dir: str) -> None:
    master = Master(data_dir)
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    bound = listeners[0].socket.getsockname()[1]
    print(f"serving on http://127.0.0.1:{bound}/", file=sys.stderr, flush=True)
    try:
        await trio.serve_listeners(master.handle, listeners)
    finally:
        for process in master.processes:
            process.kill()


def main() -> None:
    if sys.argv[1:2] == ["--document"]:
        fd, name, data_dir = int(sys.argv[2]), sys.argv[3], sys.argv[4]
        trio.run(DocumentProcess(name, data_dir).run, fd)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--data-dir", required=True)
    options = parser.parse_args()
    trio.run(serve, options.port, options.data_dir)


if __name__ == "__main__":
    main()
