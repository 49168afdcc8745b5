"""Functions that the worker pool tests run in workers (importable by name there)."""

from __future__ import annotations

import os
import signal
import socket
import threading

import trio


def connect_and_wait(path: str) -> int:
    """Tell the test (over its Unix socket) that the call runs, with our pid; return
    our pid once the test hangs up."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        sock.sendall(b"%d\n" % os.getpid())
        sock.recv(1)
    return os.getpid()


async def async_getpid() -> int:
    await trio.lowlevel.checkpoint()
    return os.getpid()


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def identity(data: bytes) -> bytes:
    return data


def thread_name() -> str:
    """The name of the thread the call runs on."""
    return threading.current_thread().name


def unpicklable_result() -> object:
    return threading.Lock()


def exit_the_worker() -> None:
    raise SystemExit(3)
