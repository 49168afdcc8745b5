"""The collab server's settings, and the command line that maps onto them one to one."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import attrs

import nursery_procs

__all__ = ["STATIC_DIR", "Settings", "parse_args"]

#: The page, its script and its style sheet.
STATIC_DIR = Path(__file__).resolve().parent / "static"


@attrs.frozen
class Settings:
    """Everything the server can be told, checked when it is made."""

    host: str = "127.0.0.1"
    #: 0 picks a free port (see :attr:`~examples.collab.server.CollabServer.port`).
    port: int = 8080
    data_dir: Path = Path("data")
    #: WebSocket clients at once, in all.
    max_clients: int = 1000
    #: WebSocket clients at once on one document.
    max_clients_per_doc: int = 100
    #: Seconds a document's child outlives its last client.
    linger: float = 2.0
    #: Document children started ahead of time.
    spare: int = 2
    #: Document children at once in all: in use, spare, starting and stopping.
    max_docs: int = 100
    #: Seconds a new client may wait for its document's child.
    start_timeout: float = 10.0
    #: The largest WebSocket message accepted from a client (a document, or an offline
    #: state, of 16 MiB syncs with room to spare).
    max_message_size: int = 32 * 1024 * 1024
    #: Messages waiting for one client before it counts as behind: they are dropped and
    #: it gets one message with the whole document instead (closed as too slow if it
    #: falls behind again before it has read that message).
    client_queue: int = 1024
    #: Messages a client may send a second, on average (0: no limit); over it, the
    #: client is closed with 1008.
    max_messages_per_second: float = 200.0
    #: Messages a client may send at once above that rate.
    message_burst: int = 2000
    #: Seconds to read an HTTP request head (and between keep-alive requests).
    http_timeout: float = 10.0
    #: Seconds for the WebSocket opening handshake.
    handshake_timeout: float = 10.0
    #: Seconds for a WebSocket closing handshake (then the connection is dropped).
    close_timeout: float = 2.0
    #: Seconds clients get to be closed on shutdown before they are dropped.
    shutdown_timeout: float = 5.0
    #: A Unix socket path for the supervisor's control API, if wanted.
    control: Path | None = None
    #: Confine document children (see :attr:`isolation`): no network, no new
    #: privileges, and at most :attr:`memory_limit` bytes of address space each.
    isolate: bool = True
    #: Address space (bytes) a document child may map when :attr:`isolate` is on
    #: (0: no limit). An idle child maps about 200 MiB; the rest is room for the
    #: largest documents (a 32 MiB message and its decoded state).
    memory_limit: int = 2 * 1024**3
    #: Let the kernel merge the identical memory pages of document children
    #: (:attr:`nursery_procs.Policy.merge_pages`): an idle document then costs
    #: about a third of the memory, while root runs ``ksmd``.
    merge_pages: bool = False
    static_dir: Path = STATIC_DIR

    def __attrs_post_init__(self) -> None:
        for name in ("max_clients", "max_clients_per_doc", "max_docs", "client_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.spare < 0 or self.spare > self.max_docs:
            raise ValueError("spare must be between 0 and max_docs")
        if self.max_messages_per_second < 0 or self.message_burst < 1:
            raise ValueError("max_messages_per_second must be >= 0 and message_burst >= 1")
        if self.memory_limit < 0:
            raise ValueError("memory_limit must be >= 0")
        if self.max_message_size < 1024:
            raise ValueError("max_message_size must be >= 1024")
        for name in ("linger", "start_timeout", "http_timeout", "handshake_timeout"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0")

    @property
    def isolation(self) -> nursery_procs.Isolation | None:
        """How document children are confined: they parse bytes from browsers, so
        they get no network (an empty network namespace, inside a user namespace
        when the server is not root), ``no_new_privs`` and a memory limit. Where the
        kernel refuses a namespace (a container without the right), a child starts
        without it; ``nursery-procs tree`` and the statistics show what is in force."""
        if not self.isolate:
            return None
        return nursery_procs.Isolation(
            network=True,
            user=os.geteuid() != 0,
            no_new_privs=True,
            address_space=self.memory_limit or None,
            allow_fallback=True,
        )


def _parser() -> argparse.ArgumentParser:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m examples.collab",
        description="Collaborative text editing: one process per document.",
    )
    add = parser.add_argument
    add("--host", default=defaults.host, help="address to listen on")
    add("--port", type=int, default=defaults.port, help="port (0: any free one)")
    add("--data-dir", type=Path, default=defaults.data_dir, help="where documents are stored")
    add("--max-clients", type=int, default=defaults.max_clients)
    add("--max-clients-per-doc", type=int, default=defaults.max_clients_per_doc)
    add(
        "--linger",
        type=float,
        default=defaults.linger,
        help="seconds a document's process outlives its last client",
    )
    add("--spare", type=int, default=defaults.spare, help="document processes started ahead")
    add(
        "--max-docs",
        type=int,
        default=defaults.max_docs,
        help="document processes at once (in use, spare, starting, stopping)",
    )
    add(
        "--start-timeout",
        type=float,
        default=defaults.start_timeout,
        help="seconds a client waits for its document's process",
    )
    add("--max-message-size", type=int, default=defaults.max_message_size)
    add(
        "--client-queue",
        type=int,
        default=defaults.client_queue,
        help="messages waiting for a client before it is caught up with one message",
    )
    add(
        "--max-messages-per-second",
        type=float,
        default=defaults.max_messages_per_second,
        help="messages a client may send a second on average (0: no limit)",
    )
    add("--message-burst", type=int, default=defaults.message_burst)
    add("--control", type=Path, default=None, help="serve the control API on this Unix socket")
    add(
        "--no-isolation",
        dest="isolate",
        action="store_false",
        help="run document processes unconfined (network, no memory limit)",
    )
    add(
        "--memory-limit",
        type=_mebibytes,
        default=defaults.memory_limit,
        metavar="MIB",
        help="address space per document process, in MiB (0: no limit)",
    )
    add(
        "--merge-pages",
        action="store_true",
        help="let the kernel merge document processes' identical pages (KSM: needs ksmd)",
    )
    add("--log-level", default="INFO")
    return parser


def _mebibytes(text: str) -> int:
    return int(text) * 1024 * 1024


def parse_args(argv: list[str] | None = None) -> Settings:
    """The settings the command line asks for (exits with a usage error on bad values),
    with logging configured at ``--log-level``."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    options = vars(args)
    del options["log_level"]
    try:
        return Settings(**options)
    except ValueError as exc:
        parser.error(str(exc))
