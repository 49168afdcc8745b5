"""Children's stdout, stderr and :mod:`logging` records, delivered to the parent's logging.

Every line and record is logged under ``nursery_procs.child.<name>`` with the
child's pid as the record's ``process`` (so ``%(process)d`` shows it) and the
extra attributes ``child_name``, ``child_pid`` and ``child_stream`` (``"stdout"``,
``"stderr"`` or ``"logging"``; for records, ``child_logger`` is the logger name
used in the child).
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

import trio

from ._errors import map_stream_errors

#: Lines of stderr kept for error messages.
STDERR_TAIL_LINES = 20
_MAX_LINE = 64 * 1024


def child_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"nursery_procs.child.{name}")


def emit(
    logger: logging.Logger,
    level: int,
    text: str,
    *,
    pid: int | None,
    name: str,
    stream: str,
    created: float | None = None,
    exc_text: str | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Log *text* under *logger* as if the child's process had logged it."""
    if not logger.isEnabledFor(level):
        return
    record = logger.makeRecord(logger.name, level, "(child)", 0, "%s", (text,), None)
    if pid is not None:
        record.process = pid
    record.processName = name
    record.child_name = name
    record.child_pid = pid
    record.child_stream = stream
    if created is not None:
        record.created = created
        record.msecs = (created - int(created)) * 1000
    if exc_text:
        record.exc_text = exc_text
    if extra:
        record.__dict__.update(extra)
    logger.handle(record)


async def pump_lines(
    pipe: trio.abc.ReceiveStream,
    *,
    logger: logging.Logger,
    level: int,
    name: str,
    pid: int | None,
    stream: str,
    tail: collections.deque[str] | None = None,
) -> None:
    """Log every line read from *pipe* until end of file; a last partial line too."""
    pending = b""
    async with pipe:
        while True:
            chunk = b""
            with map_stream_errors(None):  # a broken pipe ends the output too
                chunk = bytes(await pipe.receive_some(65536))
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if len(pending) > _MAX_LINE:
                lines.append(pending)
                pending = b""
            for line in lines:
                _log_line(line, logger, level, name, pid, stream, tail)
    if pending:
        _log_line(pending, logger, level, name, pid, stream, tail)


def _log_line(
    raw: bytes,
    logger: logging.Logger,
    level: int,
    name: str,
    pid: int | None,
    stream: str,
    tail: collections.deque[str] | None,
) -> None:
    text = raw.decode("utf-8", "replace").rstrip("\r")
    if tail is not None:
        tail.append(text)
    emit(logger, level, text, pid=pid, name=name, stream=stream)


def new_tail() -> collections.deque[str]:
    return collections.deque(maxlen=STDERR_TAIL_LINES)


class ForwardingHandler(logging.Handler):
    """The child's root handler: queues records for the parent (thread-safe).

    The runtime drains the queue into LOG messages; what is still queued when
    the child exits is sent before its link closes.
    """

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        super().__init__()
        self.queue: collections.deque[tuple[str, int, str, float, str | None]] = collections.deque()
        self.wakeup = trio.Event()
        #: Set when the child is exiting: the sender drains the queue and stops.
        self.closing = False
        self._token = token
        self._trio_thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            exc_text = None
            if record.exc_info:
                exc_text = logging.Formatter().formatException(record.exc_info)
            elif record.exc_text:
                exc_text = record.exc_text
            self.queue.append((record.name, record.levelno, text, record.created, exc_text))
            if threading.get_ident() == self._trio_thread:
                self.wakeup.set()
            else:
                self._token.run_sync_soon(self.wakeup.set)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)
