"""Isolated children: limits, no_new_privs, namespaces, a read-only file system,
for both start methods, and what is reported as in force."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
from pathlib import Path

import process_targets
import pytest
import targets
import trio
from programs import run_script

import nursery_procs
from nursery_procs import ChildStartError, ContextDied, Isolation, Policy

SCRIPTS = Path(__file__).parent / "scripts"

pytestmark = pytest.mark.parametrize("start_method", ["exec", "forkserver"])

EVERYTHING = Isolation(
    open_files=256,
    cpu_time=600,
    processes=4096,
    address_space=1 << 30,
    no_new_privs=True,
    user=True,
    pid=True,
    mount=True,
    network=True,
)


async def test_an_isolated_child_cannot_reach_127_0_0_1(start_method: str) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    try:
        async with nursery_procs.open_supervisor(start_method=start_method) as sup:
            free = await sup.start_child(None)
            walled = await sup.start_child(None, isolation=Isolation(network=True))
            assert await free.call(process_targets.connect, port) == "connected"
            refused = await walled.call(process_targets.connect, port)
    finally:
        for listener in listeners:
            await listener.aclose()
    assert refused == f"OSError: [Errno {errno.ENETUNREACH}] Network is unreachable"


async def test_an_isolated_child_writes_only_where_it_may(
    start_method: str, tmp_path: Path
) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    isolation = Isolation(read_only=True, writable_paths=[str(allowed)])
    async with nursery_procs.open_supervisor(start_method=start_method) as sup:
        ctx = await sup.start_child(None, isolation=isolation)
        assert await ctx.call(process_targets.write_file, str(allowed / "yes")) == "written"
        refused = f"OSError: errno {errno.EROFS}"
        assert await ctx.call(process_targets.write_file, str(tmp_path / "no")) == refused
        assert await ctx.call(process_targets.write_file, "/tmp/nursery-procs-no") == refused
        in_force = ctx.statistics().isolation
    assert (allowed / "yes").read_text() == "from the child\n"
    assert not (tmp_path / "no").exists()
    assert in_force == isolation


async def test_a_memory_bomb_is_stopped_by_its_limit_and_named(start_method: str) -> None:
    isolation = Isolation(address_space=512 << 20)
    with pytest.raises(ContextDied, match=r"address-space limit") as info:
        async with nursery_procs.open_supervisor(start_method=start_method) as sup:
            await sup.start_child(process_targets.allocate_forever, isolation=isolation)
            await trio.sleep_forever()
    assert f"Isolation.address_space={512 << 20} bytes" in str(info.value)
    assert isinstance(info.value.__cause__, MemoryError)


async def test_a_cpu_hog_is_ended_by_its_limit_and_named(start_method: str) -> None:
    with pytest.raises(ContextDied, match=r"CPU time limit") as info:
        async with nursery_procs.open_supervisor(start_method=start_method) as sup:
            await sup.start_child(process_targets.spin_forever, isolation=Isolation(cpu_time=1))
            await trio.sleep_forever()
    assert info.value.returncode == -signal.SIGXCPU


async def test_open_files_are_limited(start_method: str) -> None:
    async with nursery_procs.open_supervisor(start_method=start_method) as sup:
        ctx = await sup.start_child(None, isolation=Isolation(open_files=64))
        opened, error = await ctx.call(process_targets.open_until_refused)
        assert opened < 64
        assert error == f"OSError: errno {errno.EMFILE}"
        # Refused, not broken: the child goes on answering.
        assert await ctx.call(targets.add, 1, 2) == 3


async def test_everything_at_once_and_what_is_in_force(start_method: str) -> None:
    async with nursery_procs.open_supervisor(start_method=start_method) as sup:
        ctx = await sup.start_child(None, isolation=EVERYTHING)
        pid, visible, uid_map, no_new_privs = await ctx.call(process_targets.process_view)
        assert ctx.statistics().isolation == EVERYTHING
        unconfined = await sup.start_child(None)
        assert unconfined.statistics().isolation == Isolation()
    # The first process of its own PID namespace, seeing only its own processes;
    # root inside its user namespace, the master's user outside.
    assert pid == 1
    assert 1 in visible and os.getpid() not in visible
    assert uid_map == f"0 {os.getuid()} 1"
    assert no_new_privs == "1"
    assert ctx.returncode == 0


async def test_a_pid_namespace_takes_every_process_along_even_on_a_crash(
    start_method: str,
) -> None:
    async with nursery_procs.open_supervisor(start_method=start_method) as sup:
        ctx = await sup.start_child(None, isolation=Isolation(pid=True), raise_on_crash=False)
        inner = await ctx.call(process_targets.start_descendants)
        # Pids inside the namespace mean nothing here: find them by parent link.
        outer = _descendants(ctx.pid or 0)
        assert len(outer) == 4  # the relay, pid 1, the grandchild and the daemon
        pidfds = [os.pidfd_open(pid) for pid in outer]
        try:
            # It ends without cleaning anything up (no SIGKILL: pid 1 of a
            # namespace cannot send itself one).
            with pytest.raises(ContextDied):
                await ctx.call(targets.die_with_stderr, "crashing", 3)
            with trio.fail_after(10):
                for fd in pidfds:
                    await trio.lowlevel.wait_readable(fd)
        finally:
            for fd in pidfds:
                os.close(fd)
    assert len(inner) == 2
    assert ctx.returncode == 3


async def test_escalation_reaches_a_child_in_a_pid_namespace(start_method: str) -> None:
    policy = Policy(grace_period=0.2, kill_after=0.5)
    isolation = Isolation(pid=True)
    async with nursery_procs.open_supervisor(start_method=start_method, policy=policy) as sup:
        stuck = await sup.start_child(targets.block_forever, isolation=isolation)
        stubborn = await sup.start_child(targets.ignore_sigterm_and_block, isolation=isolation)
        await stuck.aclose()
        await stubborn.aclose()
    # Its relay passes SIGTERM on, and dies of it as the child did.
    assert stuck.returncode == -signal.SIGTERM
    assert stubborn.returncode == -signal.SIGKILL


async def test_isolation_is_refused_unless_fallback_is_allowed(start_method: str) -> None:
    # In a user namespace of our own whose quota of network namespaces is 0, the
    # kernel refuses to make one, as it would in a locked-down container.
    shell = 'echo 0 > /proc/sys/user/max_net_namespaces && exec "$@"'
    outcomes = {}
    for fallback in ("no", "yes"):
        script = [sys.executable, str(SCRIPTS / "isolation_fallback.py"), start_method, fallback]
        done = await trio.run_process(
            ["unshare", "--user", "--map-root-user", "sh", "-c", shell, "sh", *script],
            capture_stdout=True,
            capture_stderr=True,
        )
        outcomes[fallback] = json.loads(done.stdout.decode().splitlines()[-1])
    assert "cannot make a network namespace" in outcomes["no"]["error"]
    assert "No space left on device" in outcomes["no"]["error"]
    # Allowed to fall back: it started without one, and says so.
    assert outcomes["yes"] == {"answer": 6, "network": False, "nnp": True}


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"open_files": 0}, ValueError, "open_files must be a positive integer"),
        ({"cpu_time": 1.5}, ValueError, "cpu_time must be a positive integer"),
        ({"address_space": True}, ValueError, "address_space must be a positive integer"),
        ({"read_only": True, "writable_paths": "/tmp"}, TypeError, "not the string"),
        ({"read_only": True, "writable_paths": ["relative"]}, ValueError, "absolute"),
        ({"writable_paths": ["/tmp"]}, ValueError, "needs read_only"),
    ],
)
async def test_bad_isolation_is_refused(
    start_method: str, options: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Isolation(**options)  # type: ignore[arg-type]


async def test_isolation_must_be_an_isolation(start_method: str) -> None:
    async with nursery_procs.open_supervisor(start_method=start_method) as sup:
        with pytest.raises(TypeError, match="must be an Isolation"):
            await sup.start_child(None, isolation={"network": True})  # type: ignore[arg-type]
        assert sup.statistics().started_total == 0


async def test_a_refused_namespace_fails_the_start_with_the_reason(start_method: str) -> None:
    # A read-only view of a path that does not exist cannot be made.
    isolation = Isolation(read_only=True, writable_paths=["/nonexistent/nursery-procs"])
    async with nursery_procs.open_supervisor(start_method=start_method) as sup:
        with pytest.raises(ChildStartError, match="cannot mount /nonexistent"):
            await sup.start_child(None, isolation=isolation)


def _children(pid: int) -> list[int]:
    """*pid*'s children, made by any of its threads."""
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]


def _descendants(pid: int) -> list[int]:
    """*pid* and everything below it."""
    found = []
    frontier = [pid]
    while frontier:
        found.extend(frontier)
        frontier = [child for parent in frontier for child in _children(parent)]
    return found


async def test_a_sigkilled_master_leaves_nothing_in_pid_namespaces(start_method: str) -> None:
    script = SCRIPTS / "descendants_master.py"
    async with run_script(script, start_method, "pid") as (master, stdout):
        with trio.fail_after(60):
            words = (await stdout.line()).decode().split()
        assert words[0] == "ready", "the master exited before its children were ready"
        pids = [int(word) for word in words[1:]]
        assert len(pids) == 2 + 2 * 3  # two relays; below each: pid 1 and two descendants
        pidfds = [os.pidfd_open(pid) for pid in pids]
        try:
            master.kill()
            await master.wait()
            with trio.fail_after(10):
                for fd in pidfds:
                    await trio.lowlevel.wait_readable(fd)
        finally:
            for fd in pidfds:
                os.close(fd)
