"""A module tests give a fork server to preload: on import it leaves behind the
kinds of process state that a forked child must not inherit."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

#: Handlers on the root logger and on a logger of its own.
logging.getLogger().addHandler(logging.NullHandler())
logging.getLogger("preloaded").addHandler(logging.StreamHandler())
#: Signal handlers and dispositions, and a blocked signal.
signal.signal(signal.SIGUSR1, lambda signum, frame: None)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
#: The logging module's lock, held as if another thread were logging during a fork.
logging._lock.acquire()  # type: ignore[attr-defined]
#: An open file.
OPENED = Path(__file__).open()  # noqa: SIM115 - kept open on purpose
