"""Worker pools: real workers for reuse, limits and faults; a fake clock for timing."""

from __future__ import annotations

import ctypes
import math
import os
import signal
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pool_targets
import pytest
import trio
import trio.testing
from dead import wait_until_dead_unreaped

import nursery_procs
from nursery_procs import ContextDied, PoolClosed, WireError, WorkerPool, open_worker_pool
from nursery_procs.testing import open_fake_supervisor


class Calls:
    """A Unix socket on which :func:`pool_targets.connect_and_wait` says it runs."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.listener = trio.socket.socket(trio.socket.AF_UNIX)
        self.held: list[trio.SocketStream] = []

    async def __aenter__(self) -> Calls:
        await self.listener.bind(self.path)
        self.listener.listen()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for stream in self.held:
            await stream.aclose()
        self.listener.close()

    async def running(self) -> int:
        """Wait until one more call runs; return its worker's pid."""
        sock, _ = await self.listener.accept()
        stream = trio.SocketStream(sock)
        self.held.append(stream)
        data = b""
        while not data.endswith(b"\n"):
            data += await stream.receive_some()
        return int(data)

    async def release(self, index: int) -> None:
        await self.held[index].aclose()


async def run_all(workers: WorkerPool, count: int) -> list[int]:
    return [await workers.run(os.getpid) for _ in range(count)]


@pytest.fixture
async def workers() -> AsyncIterator[WorkerPool]:
    async with (
        nursery_procs.open_supervisor() as sup,
        open_worker_pool(sup, limit=2, name="workers") as pool,
    ):
        with trio.fail_after(60):
            yield pool


async def test_workers_are_reused(workers: WorkerPool) -> None:
    pids = await run_all(workers, 5)
    assert len(set(pids)) == 1
    assert await workers.run(pool_targets.async_getpid) == pids[0]
    stats = workers.statistics()
    assert (stats.total_spawned, stats.takes, stats.idle, stats.busy) == (1, 6, 1, 0)
    assert workers.name == "workers" and not workers.closed


async def test_errors_keep_their_type_and_the_worker(workers: WorkerPool) -> None:
    pid = await workers.run(os.getpid)
    with pytest.raises(ValueError, match="no good"):
        await workers.run(pool_targets.raise_value_error, "no good")
    assert await workers.run(os.getpid) == pid


async def test_a_worker_dying_mid_call(workers: WorkerPool) -> None:
    pid = await workers.run(os.getpid)
    with pytest.raises(ContextDied):
        await workers.run(pool_targets.die)
    fresh = await workers.run(os.getpid)
    assert fresh != pid
    assert workers.statistics().total_spawned == 2


async def test_max_uses_retires_a_worker() -> None:
    async with (
        nursery_procs.open_supervisor() as sup,
        open_worker_pool(sup, limit=1, max_uses=2) as workers,
    ):
        with trio.fail_after(60):
            pids = await run_all(workers, 5)
        assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4]
        stats = workers.statistics()
        assert (stats.retired_after_max_uses, stats.total_spawned) == (2, 3)
        assert workers.max_uses == 2


async def test_concurrency_limit(workers: WorkerPool, tmp_path: Path) -> None:
    results: list[int] = []

    async def call() -> None:
        results.append(await workers.run(pool_targets.connect_and_wait, calls.path))

    async with Calls(tmp_path / "calls") as calls, trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(call)
        first, second = await calls.running(), await calls.running()
        assert first != second
        assert workers.limiter.borrowed_tokens == 2
        assert workers.limiter.statistics().tasks_waiting == 1
        assert workers.statistics().busy == 2
        await calls.release(0)
        # The third call gets the worker that just came back.
        assert await calls.running() == first
        await calls.release(1)
        await calls.release(2)
    assert sorted(results) == sorted([first, second, first])
    assert workers.statistics().total_spawned == 2


async def test_kill_on_cancel_replaces_the_worker(tmp_path: Path) -> None:
    async with (
        nursery_procs.open_supervisor() as sup,
        open_worker_pool(sup, limit=1, name="workers") as workers,
        Calls(tmp_path / "calls") as calls,
    ):
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                cancelled = trio.CancelScope()

                async def call() -> None:
                    with cancelled:
                        await workers.run(
                            pool_targets.connect_and_wait, calls.path, kill_on_cancel=True
                        )

                nursery.start_soon(call)
                pid = await calls.running()
                cancelled.cancel()
            assert cancelled.cancelled_caught
            killed = sup.context_by_name("workers-1")
            assert killed is not None and killed.pid == pid
            assert await killed.wait_exited() == -signal.SIGKILL
            assert await workers.run(os.getpid) != pid
        assert workers.statistics().total_spawned == 2


async def test_run_after_close() -> None:
    async with nursery_procs.open_supervisor() as sup, open_worker_pool(sup) as workers:
        pass
    assert workers.closed
    with pytest.raises(PoolClosed):
        await workers.run(os.getpid)
    with pytest.raises(trio.ClosedResourceError):
        await workers.run(os.getpid)


def test_the_default_limit_is_the_cpu_count() -> None:
    async def main() -> int:
        async with nursery_procs.open_supervisor() as sup, open_worker_pool(sup) as workers:
            return workers.limiter.total_tokens  # type: ignore[return-value]

    assert trio.run(main) == os.cpu_count()


@pytest.mark.parametrize(
    ("options", "error", "named"),
    [
        ({"limit": 0}, ValueError, "limit"),
        ({"limit": 2.0}, TypeError, "limit"),
        ({"max_uses": 0}, ValueError, "max_uses"),
        ({"max_uses": "3"}, TypeError, "max_uses"),
        ({"idle_timeout": -1}, ValueError, "idle_timeout"),
        ({"spare": 3, "limit": 2}, ValueError, "spare"),
    ],
)
async def test_invalid_settings(
    options: dict[str, object], error: type[Exception], named: str
) -> None:
    async with open_fake_supervisor() as (sup, processes):
        with pytest.raises(error, match=named):
            async with open_worker_pool(sup, **options):  # type: ignore[arg-type]
                pass  # pragma: no cover
    assert processes == []


# -- fake clock ------------------------------------------------------------------


async def test_idle_workers_retire_after_idle_timeout(autojump_clock: trio.abc.Clock) -> None:
    async with (
        open_fake_supervisor(call=lambda fn, args: "done") as (sup, processes),
        open_worker_pool(sup, limit=4, idle_timeout=10) as workers,
    ):
        assert await workers.run(os.getpid) == "done"
        t0 = trio.current_time()
        assert workers.statistics().idle == 1
        await trio.sleep(10 - 0.001)
        assert workers.statistics().idle == 1
        await trio.sleep(0.001)
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == t0 + 10
        stats = workers.statistics()
        assert (stats.idle, stats.stopping, stats.total_spawned) == (0, 0, 1)
        assert processes[0].returncode == 0
        # The next call starts a fresh worker.
        assert await workers.run(os.getpid) == "done"
        assert len(processes) == 2


async def test_no_idle_timeout_keeps_workers(autojump_clock: trio.abc.Clock) -> None:
    async with (
        open_fake_supervisor(call=lambda fn, args: 1) as (sup, _),
        open_worker_pool(sup, idle_timeout=math.inf) as workers,
    ):
        await workers.run(os.getpid)
        await trio.sleep(10_000)
        assert workers.statistics().idle == 1
        assert workers.settings.idle_timeout is None


async def test_cancelled_async_call_keeps_its_worker(autojump_clock: trio.abc.Clock) -> None:
    async def slow(fn: object, args: tuple[object, ...]) -> str:
        await trio.sleep(100)
        return "late"  # pragma: no cover

    async with (
        open_fake_supervisor(call=slow) as (sup, processes),
        open_worker_pool(sup, limit=1) as workers,
    ):
        with trio.move_on_after(1):
            await workers.run(os.getpid)
        stats = workers.statistics()
        assert (stats.idle, stats.busy, stats.total_spawned) == (1, 0, 1)
        assert processes[0].returncode is None


async def test_a_worker_killed_between_calls_is_not_used(workers: WorkerPool) -> None:
    pid = await workers.run(os.getpid)
    descriptors = len(os.listdir("/proc/self/fd"))
    os.kill(pid, signal.SIGKILL)
    wait_until_dead_unreaped(pid)
    assert await workers.run(os.getpid) != pid
    assert workers.statistics().idle_deaths == 1
    # The dead worker's direct channel was closed as the new one's opened.
    await trio.testing.wait_all_tasks_blocked()
    assert len(os.listdir("/proc/self/fd")) == descriptors


# -- direct calls ------------------------------------------------------------------


def _kernel_lends_descriptors() -> bool:
    """Whether this machine lets a process take a descriptor out of its child
    (``pidfd_getfd``: Linux 5.6, and no seccomp or Yama policy against it), asked
    of the kernel directly, with a child of this test's own."""
    libc = ctypes.CDLL(None, use_errno=True)
    child = subprocess.Popen(["sleep", "60"], stdin=subprocess.PIPE)
    try:
        pidfd = os.pidfd_open(child.pid)
        try:
            taken = libc.syscall(438, pidfd, 0, 0)  # SYS_pidfd_getfd
        finally:
            os.close(pidfd)
        if taken < 0:
            return False
        os.close(taken)
        return True
    finally:
        child.kill()
        child.wait()
        assert child.stdin is not None
        child.stdin.close()


direct_calls = pytest.mark.skipif(
    not _kernel_lends_descriptors(),
    reason="the kernel refuses pidfd_getfd here: worker pools call over the link",
)


@direct_calls
async def test_sync_calls_go_direct_and_async_ones_over_the_link(workers: WorkerPool) -> None:
    assert await workers.run(pool_targets.thread_name) == "nursery_procs direct calls"
    assert await workers.run(pool_targets.async_getpid) == await workers.run(os.getpid)
    # A name is resolved in the worker, so only the worker knows if it is async: link.
    assert await workers.run("pool_targets:thread_name") == "MainThread"
    assert workers.statistics().total_spawned == 1


@direct_calls
async def test_what_cannot_be_pickled_is_a_clear_error_and_loses_no_worker(
    workers: WorkerPool,
) -> None:
    pid = await workers.run(os.getpid)
    with pytest.raises(WireError, match="cannot pickle the call"):
        await workers.run(pool_targets.identity, threading.Lock())  # type: ignore[arg-type]
    with pytest.raises(WireError, match="cannot pickle the result"):
        await workers.run(pool_targets.unpicklable_result)
    assert await workers.run(os.getpid) == pid
    assert await workers.run(pool_targets.identity, b"x" * 3_000_000) == b"x" * 3_000_000


async def test_a_cancelled_direct_call_is_waited_for(workers: WorkerPool, tmp_path: Path) -> None:
    async with Calls(tmp_path / "calls") as calls:
        with trio.fail_after(60):
            order: list[str] = []
            async with trio.open_nursery() as nursery:
                cancelled = trio.CancelScope()

                async def call() -> None:
                    with cancelled:
                        await workers.run(pool_targets.connect_and_wait, calls.path)
                    order.append("returned")

                nursery.start_soon(call)
                pid = await calls.running()
                cancelled.cancel()
                await trio.testing.wait_all_tasks_blocked()
                order.append("released")  # a sync function cannot be interrupted
                await calls.release(0)
            assert order == ["released", "returned"]
            assert cancelled.cancelled_caught
            assert await workers.run(os.getpid) == pid  # the worker is kept


async def test_system_exit_in_a_call_ends_the_worker_as_over_the_link(
    workers: WorkerPool,
) -> None:
    pid = await workers.run(os.getpid)
    with trio.fail_after(30), pytest.raises(ContextDied, match="SystemExit: 3"):
        await workers.run(pool_targets.exit_the_worker)
    assert await workers.run(os.getpid) != pid


async def test_untrusted_workers_are_called_over_the_link() -> None:
    async with (
        nursery_procs.open_supervisor() as sup,
        open_worker_pool(sup, limit=1, trusted=False) as workers,
    ):
        assert await workers.run(pool_targets.thread_name) == "MainThread"


async def test_a_supervisor_says_whether_its_children_are_fakes() -> None:
    async with nursery_procs.open_supervisor() as real, open_fake_supervisor() as (fake, _):
        assert (real.fake, fake.fake) == (False, True)
