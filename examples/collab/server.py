"""The collaborative editing server: one port, one child process per document.

Run it from the repository root::

    python -m examples.collab                  # http://127.0.0.1:8080/
    python examples/collab/server.py --port 9000 --data-dir /var/lib/collab

What it shows of nursery_procs:

* **A pool of prespawned children, shared by key.** Every document is a keyed session
  of one pool (:meth:`nursery_procs.Pool.session`): the first client of a document
  takes an idle child, later ones share it, and it outlives its last client by
  ``--linger`` seconds. A pooled child starts blank; the first message it gets names
  its document (:mod:`examples.collab.kit`).
* **Pumps that end quietly.** Bytes move between clients and children with
  :func:`nursery_procs.forward`: each client's messages, tagged with its id, into its
  document's queue; the queue into the child, everything waiting as one batch; the
  child's batches out to the clients they name, each broadcast framed once for all
  of them. When either side of a pump has gone, the pump just ends, and the code
  around it says what that means for the client (the close codes below).
* **Crashes that do not spread.** A document child that dies takes only its own
  clients with it (1011); the next connection gets a fresh child, which restores the
  document from its journal.
* **A shutdown that is a deadline.** SIGTERM or SIGINT (through
  :func:`nursery_procs.open_signal_shutdown`), :meth:`CollabServer.stop`, or
  cancelling :func:`serve` stops accepting, tells every client 1001, and gives the
  connections until a deadline to finish; then the pool shuts every child down
  gracefully (each saves its document) and the supervisor reaps them.

The master never decodes what clients send. The page and its files, the HTTP front,
the clients and their limits, the WebSocket framing and the batches to and from the
children are in :mod:`~examples.collab.static_files`, :mod:`~examples.collab.front`,
:mod:`~examples.collab.clients`, :mod:`~examples.collab.websocket` and
:mod:`~examples.collab.protocol`.

Close codes a client can see:

====  ===================================================================
1000  normal close
1001  the server is shutting down
1003  the client sent a text frame, or bytes that are not y-websocket
1008  the client is over its rate limit or publishes too many awareness states
1011  the document's process died (reconnecting restores the document)
1012  the document's process was stopped while clients were connected
1013  try again later: too many clients, a client that does not read what it
      is sent, or no document process could be had within ``--start-timeout``
4400  invalid document name (the page does not reconnect)
4413  a message over ``--max-message-size`` (the page does not reconnect)
4422  the document's storage cannot be opened (the page does not reconnect)
====  ===================================================================
"""

from __future__ import annotations

import array
import contextlib
import functools
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``examples`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import attrs
import trio

import nursery_procs
from examples.collab import front
from examples.collab.clients import (
    CLOSE_DOCUMENT_DIED,
    CLOSE_GOING_AWAY,
    CLOSE_SERVICE_RESTART,
    CLOSE_TRY_AGAIN,
    REASON_BUSY,
    REASON_DIED,
    REASON_SHUTDOWN,
    REASON_STOPPED,
    Client,
    Clients,
)
from examples.collab.connections import CLIENT_HEADER, HandOff
from examples.collab.kit import open_message, serve_pooled_document
from examples.collab.metrics import CollabCollector
from examples.collab.protocol import valid_close_code
from examples.collab.settings import Settings, parse_args
from examples.collab.static_files import StaticFiles

__all__ = ["CollabServer", "Settings", "main", "serve"]

log = logging.getLogger("collab")

#: What the fork server imports before it forks a document child. pycrdt's
#: ``Doc`` makes an anyio lock, and anyio imports its Trio backend when it is first
#: used: preloaded here, or every document child would import it on its first
#: document (about 10 ms, and memory of its own). Then the fork server serves a
#: document and two handed clients once itself
#: (:func:`~examples.collab.connections.rehearse`), so that the children share that
#: code ready to run instead of each setting it up.
PRELOAD = (
    "pycrdt",
    "anyio._backends._trio",
    "examples.collab.kit",
    "examples.collab.connections:rehearse",
)


@attrs.define(eq=False)
class Document:
    """A document's child, as the master sees it: where its clients are handed over,
    and the clients handed to it.

    The child is untrusted: every message from it is checked before the master acts on
    it, and one it does not expect is logged and dropped.
    """

    name: str
    ctx: nursery_procs.Context
    #: The message that names the document to a fresh child.
    opening: object
    #: Called whenever a client is handed over or released.
    on_change: Callable[[], None]
    #: The child's channel has ended (it exited or died): no new clients.
    ended: bool = False
    _side: trio.socket.SocketType | None = None
    _ready: trio.Event = attrs.Factory(trio.Event)
    _handed: dict[int, Client] = attrs.Factory(dict)

    def __len__(self) -> int:
        return len(self._handed)

    async def run(self) -> nursery_procs.ContextDied | None:
        """Talk to the child until its channel ends; then close the clients still
        handed to it: 1011 if it died (returned), else 1012."""
        died = None
        try:
            await self.ctx.send(self.opening)
            while True:
                try:
                    message = await self.ctx.receive()
                except nursery_procs.WireError as exc:  # one bad message, not a dead child
                    log.warning("document %r sent an undecodable message: %s", self.name, exc)
                    continue
                await self._on_message(message)
        except (trio.EndOfChannel, _HandOffRefused):
            pass
        except nursery_procs.ContextDied as exc:
            died = exc
        finally:
            self.ended = True
            self._ready.set()
            if self._side is not None:
                self._side.close()
            code, reason = (CLOSE_DOCUMENT_DIED, REASON_DIED)
            if died is None:
                code, reason = (CLOSE_SERVICE_RESTART, REASON_STOPPED)
            for client in self._handed.values():
                client.handed = False  # back in this process's hands
                client.request_close(code, reason)
                client.released.set()
            self._handed.clear()
            self.on_change()
        return died

    async def _on_message(self, message: object) -> None:
        match message:
            case ["listening", str() as path] if self._side is None:
                side = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                try:
                    await side.connect(path)
                except OSError as exc:
                    side.close()
                    log.error("document %r: cannot reach its child at %s: %s", self.name, path, exc)
                    raise _HandOffRefused from exc
                self._side = side
                self._ready.set()
            case ["left", int() as client_id, int() as code, str() as reason, int() as resyncs] if (
                valid_close_code(code) or code in (1005, 1006)
            ) and resyncs >= 0:
                client = self._handed.pop(client_id, None)
                if client is None:
                    log.warning("document %r: a client it does not have left", self.name)
                    return
                client.closed_by_child(code, reason, resyncs)
                self.on_change()
            case _:
                log.warning("document %r sent an unexpected message: %.200r", self.name, message)

    async def hand_over(
        self, client: Client, close_timeout: float, drain_deadline: Callable[[], float]
    ) -> None:
        """Hand *client*'s connection to the child, and wait until the child has closed
        it or is gone.

        **Cancellation** (the client is to be closed, for example by a stop): the child
        is asked to close it with the client's close code, and given *close_timeout*
        (and a second) to do so, shielded, but not past ``drain_deadline()``.
        """
        await self._ready.wait()
        side = self._side
        if self.ended or side is None:
            client.request_close(CLOSE_DOCUMENT_DIED, REASON_DIED)
            return
        sock = client.socket
        header = CLIENT_HEADER.pack(client.id) + sock.take_buffered()
        descriptor = array.array("i", [sock.stream.socket.fileno()])
        self._handed[client.id] = client
        self.on_change()
        try:
            await side.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, descriptor)])
            client.handed = True
        except OSError as exc:
            log.warning("document %r: client %d not handed over: %s", self.name, client.id, exc)
            self._release(client)
            client.request_close(CLOSE_DOCUMENT_DIED, REASON_DIED)
            return
        try:
            await client.released.wait()
        except trio.Cancelled:
            with trio.CancelScope(shield=True) as shield:
                shield.deadline = min(trio.current_time() + close_timeout + 1, drain_deadline())
                if not self.ended and not client.released.is_set():
                    request = ["close", client.id, client.close_code or CLOSE_GOING_AWAY]
                    with contextlib.suppress(nursery_procs.ContextDied, trio.ClosedResourceError):
                        await self.ctx.send([*request, client.close_reason])
                    await client.released.wait()
            raise
        finally:
            self._release(client)

    def _release(self, client: Client) -> None:
        if self._handed.pop(client.id, None) is not None:
            self.on_change()


class _HandOffRefused(Exception):
    """The child's hand-off socket could not be reached."""


class CollabServer:
    """The running server; :func:`serve` reports it once it accepts connections."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: The bound port (useful with ``port=0``).
        self.port = 0
        self.supervisor: nursery_procs.Supervisor | None = None
        self.pool: nursery_procs.Pool | None = None
        self.clients = Clients(settings, self._notify)
        self._front = front.Front(settings, StaticFiles.from_dir(settings.static_dir))
        self._data_dir = str(Path(settings.data_dir).resolve())
        self._documents: dict[int, Document] = {}
        #: Where document children listen for the clients handed to them (mode 0700;
        #: made when the server starts).
        self._handoff_dir = ""
        self._changed = trio.Event()
        #: Where the documents' pumps run (set while running).
        self._document_tasks: trio.Nursery

    # -- introspection -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host = self.settings.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def client_count(self) -> int:
        return len(self.clients)

    def documents(self) -> dict[str, nursery_procs.Context]:
        """The open documents and their children."""
        return {doc.name: doc.ctx for doc in self._documents.values() if not doc.ended}

    def clients_of(self, name: str) -> int:
        return sum(len(d) for d in self._documents.values() if d.name == name)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until *predicate()* is true; it is checked whenever a client comes or goes
        and whenever a document opens or closes."""
        while not predicate():
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def stop(self) -> None:
        """Begin a graceful stop: clients get 1001, documents are saved, children reaped."""
        self._front.stop()

    # -- the server's life ---------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[CollabServer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until :meth:`stop`, or until cancelled: a cancellation from outside
        starts the same graceful stop, bounded by the settings' timeouts."""
        async with trio.open_nursery() as guard:
            guard.start_soon(self._stop_when_cancelled)
            with trio.CancelScope(shield=True):
                await self._run(task_status)
            guard.cancel_scope.cancel()

    async def _stop_when_cancelled(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.stop()

    async def _run(self, task_status: trio.TaskStatus[CollabServer]) -> None:
        await trio.Path(self._data_dir).mkdir(parents=True, exist_ok=True)
        self._handoff_dir = tempfile.mkdtemp(prefix="collab-handoff-")
        try:
            await self._run_in(task_status)
        finally:
            shutil.rmtree(self._handoff_dir, ignore_errors=True)

    async def _run_in(self, task_status: trio.TaskStatus[CollabServer]) -> None:
        settings = self.settings
        # Document children fork from a server that has already imported pycrdt and
        # the document code, so a new document costs a fork, not an interpreter.
        policy = nursery_procs.Policy(merge_pages=settings.merge_pages)
        async with nursery_procs.open_supervisor(preload=PRELOAD, policy=policy) as supervisor:
            self.supervisor = supervisor
            async with (
                trio.open_nursery() as self._document_tasks,
                nursery_procs.open_pool(
                    supervisor,
                    serve_pooled_document,
                    name="collab",
                    spare=settings.spare,
                    max=settings.max_docs,
                    linger=settings.linger,
                    # A document child parses bytes from browsers: nothing it sends
                    # is unpickled here, and its messages are checked on arrival.
                    trusted=False,
                    isolation=settings.isolation,
                ) as self.pool,
                self._open_control(supervisor),
            ):
                await self._serve(task_status)
            # The pool has shut every document child down (each saved its document).
        log.info("stopped")

    @contextlib.asynccontextmanager
    async def _open_control(self, supervisor: nursery_procs.Supervisor) -> AsyncIterator[None]:
        if self.settings.control is None:
            yield
            return
        collectors = [CollabCollector(self)]
        async with nursery_procs.open_control(
            supervisor, self.settings.control, collectors=collectors
        ) as path:
            log.info("control socket at %s", path)
            yield

    async def _serve(self, task_status: trio.TaskStatus[CollabServer]) -> None:
        settings = self.settings
        listeners = await trio.open_tcp_listeners(settings.port, host=settings.host)
        self.port = listeners[0].socket.getsockname()[1]
        log.info("serving on %s/ (documents in %s; pid %d)", self.url, self._data_dir, os.getpid())
        task_status.started(self)
        serve_client = functools.partial(self.clients.serve, edit=self._edit)
        await self._front.serve(listeners, serve_client, on_stop=self.clients.stop)

    # -- the pool-session pattern --------------------------------------------------------------

    async def _edit(self, client: Client, name: str) -> None:
        """Hand *client* to document *name*'s child, sharing it with the document's
        other clients while *client* stays."""
        assert self.pool is not None
        with trio.move_on_after(self.settings.start_timeout) as waiting:
            try:
                async with self.pool.session(name) as ctx:
                    waiting.deadline = math.inf  # got the child: no more time limit
                    doc = self._document_for(ctx, name)
                    await doc.hand_over(
                        client, self.settings.close_timeout, lambda: self._front.drain_deadline
                    )
            except nursery_procs.PoolClosed:
                client.request_close(CLOSE_GOING_AWAY, REASON_SHUTDOWN)
        if waiting.cancelled_caught:
            log.warning("client %d: no child for %r within the start timeout", client.id, name)
            client.request_close(CLOSE_TRY_AGAIN, REASON_BUSY)

    def _document_for(self, ctx: nursery_procs.Context, name: str) -> Document:
        doc = self._documents.get(ctx.id)
        if doc is None:
            opening = open_message(name, self._data_dir, self._handoff())
            doc = Document(name, ctx, opening, self._notify)
            self._documents[ctx.id] = doc
            self._document_tasks.start_soon(self._run_document, doc, name=f"document {name!r}")
            log.info("document %r opened in %s (pid %s)", name, ctx.name, ctx.pid)
            self._notify()
        return doc

    def _handoff(self) -> HandOff:
        settings = self.settings
        return HandOff(
            folder=self._handoff_dir,
            master_pid=os.getpid(),
            max_message_size=settings.max_message_size,
            client_queue=settings.client_queue,
            max_messages_per_second=settings.max_messages_per_second,
            message_burst=settings.message_burst,
            close_timeout=settings.close_timeout,
        )

    async def _run_document(self, doc: Document) -> None:
        died = await doc.run()
        self._notify()
        status = await doc.ctx.wait_exited()
        del self._documents[doc.ctx.id]
        self._notify()
        ctx, how = doc.ctx, nursery_procs.describe_exit(status)
        if died is not None:
            log.warning(
                "document %r: its process %s (pid %s) died: %s", doc.name, ctx.name, ctx.pid, how
            )
        else:
            log.info("document %r closed (pid %s, %s)", doc.name, ctx.pid, how)


# -- entry points ---------------------------------------------------------------------------------


async def serve(
    settings: Settings | None = None,
    *,
    handle_signals: bool = False,
    task_status: trio.TaskStatus[CollabServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server until :meth:`CollabServer.stop`, until cancelled, or (if
    *handle_signals*) until SIGTERM, SIGINT or SIGHUP; report the :class:`CollabServer`
    once it accepts connections.

    Use it as ``server = await nursery.start(serve, Settings(port=0))``.

    **Cancellation:** starts a graceful stop, bounded by the settings' timeouts.
    """
    server = CollabServer(settings or Settings())
    if not handle_signals:
        await server.run(task_status=task_status)
        return
    async with nursery_procs.open_signal_shutdown() as shutdown:
        await server.run(task_status=task_status)
    if shutdown.received is not None:
        log.info("%s: stopped", shutdown.received.name)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    refused: list[OSError] = []
    try:
        trio.run(functools.partial(serve, settings, handle_signals=True))
    except* OSError as group:
        # The port is taken, the data folder or control socket path is refused:
        # say what, without a traceback.
        refused = _leaves(group)
    for error in refused:
        print(f"collab: {error}", file=sys.stderr)
    return 1 if refused else 0


def _leaves(group: BaseExceptionGroup[OSError]) -> list[OSError]:
    return [
        leaf
        for member in group.exceptions
        for leaf in (_leaves(member) if isinstance(member, BaseExceptionGroup) else [member])
    ]


if __name__ == "__main__":
    sys.exit(main())
