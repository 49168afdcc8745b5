"""Faults with contexts on another host, against a real sshd: the ssh client
dying, the connection dropping, failed authentication, an unknown host key, a
Python too old or missing there, a master killed, a child that will not stop."""

from __future__ import annotations

import json
import os
import signal
import tempfile
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing
from programs import run_script

import nursery_procs
from nursery_procs import ChildStartError, ContextDied, MessageUndeliverable, Policy, SSHError
from nursery_procs.testing import wait_process_gone

from . import targets
from .sshd import REMOTE_PYTHON, SSHServer, children_of

MASTER = Path(__file__).parent / "scripts" / "remote_master.py"


async def _request_fails(ctx: nursery_procs.Context, errors: list[BaseException]) -> None:
    try:
        await ctx.request("never answered")
    except ContextDied as exc:
        errors.append(exc)


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    pending = [pid]
    while pending:
        children = children_of(pending.pop())
        found += children
        pending += children
    return found


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


async def test_the_ssh_client_dying_fails_its_context_at_once(sshd: SSHServer) -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(
            targets.serve_never, name="cut", via=sshd.via(), raise_on_crash=False
        )
        remote_pid = (await ctx.call(targets.where))["pid"]
        errors: list[BaseException] = []
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_request_fails, ctx, errors)
                await trio.testing.wait_all_tasks_blocked()
                assert ctx.pid is not None
                os.kill(ctx.pid, signal.SIGKILL)  # the local ssh client
            await wait_process_gone(remote_pid)
        assert len(errors) == 1 and errors[0].name == "cut"
        assert ctx.returncode == -signal.SIGKILL


async def test_the_host_dropping_off_fails_every_context_on_it(sshd: SSHServer) -> None:
    async with nursery_procs.open_supervisor() as sup:
        contexts = [
            await sup.start_child(
                targets.serve_never, name=f"on-host-{i}", via=sshd.via(), raise_on_crash=False
            )
            for i in range(2)
        ]
        remote_pids = [(await ctx.call(targets.where))["pid"] for ctx in contexts]
        errors: list[BaseException] = []
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for ctx in contexts:
                    nursery.start_soon(_request_fails, ctx, errors)
                await trio.testing.wait_all_tasks_blocked()
                # The server's side of the connection goes (all of it but the
                # contexts' own processes), as when the host drops off.
                (connection,) = sshd.connection_pids()
                gone = [connection, *(p for p in _descendants(connection) if "sshd" in _command(p))]
                for pid in gone:
                    os.kill(pid, signal.SIGKILL)
            for pid in remote_pids:
                await wait_process_gone(pid)
        assert sorted(e.name for e in errors) == ["on-host-0", "on-host-1"]
        # The next child on that host gets a new connection.
        again = await sup.start_child(targets.serve_echo, name="again", via=sshd.via())
        assert await again.request("back") == "back"


async def test_a_refused_key_is_a_start_error(sshd: SSHServer, tmp_path: Path) -> None:
    await trio.run_process(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "stranger")]
    )
    via = sshd.via(identity_file=tmp_path / "stranger")
    async with nursery_procs.open_supervisor() as sup:
        with trio.fail_after(30), pytest.raises(ChildStartError) as caught:
            await sup.start_child(None, name="refused", via=via)
        assert sup.statistics().failed_starts == 1
    assert isinstance(caught.value.__cause__, SSHError)
    assert "Permission denied" in str(caught.value.__cause__)
    assert "could not connect" in str(caught.value)


async def test_an_unknown_host_key_is_refused(sshd: SSHServer, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    options = {
        "IdentitiesOnly": "yes",
        "UserKnownHostsFile": str(empty),
        "StrictHostKeyChecking": "yes",
    }
    async with nursery_procs.open_supervisor() as sup:
        with trio.fail_after(30), pytest.raises(ChildStartError) as caught:
            await sup.start_child(None, name="stranger", via=sshd.via(options=options))
    assert "Host key verification failed" in str(caught.value.__cause__)


def test_bad_ssh_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="host key checking stays on"):
        nursery_procs.ssh("host", options={"StrictHostKeyChecking": "no"})
    with pytest.raises(ValueError, match="set by nursery_procs"):
        nursery_procs.ssh("host", options={"ControlPath": "/tmp/x"})
    with pytest.raises(ValueError, match="destination"):
        nursery_procs.ssh("-oProxyCommand=evil")
    with pytest.raises(ValueError, match="port"):
        nursery_procs.ssh("host", port=0)
    with pytest.raises(ValueError, match="python"):
        nursery_procs.ssh("host", python="")
    with pytest.raises(ValueError, match="option names"):
        nursery_procs.ssh("host", options={"Bad Name": "1"})
    with pytest.raises(ValueError, match="max_sessions"):
        nursery_procs.ssh("host", max_sessions=2)
    with pytest.raises(TypeError, match="via must be"):
        nursery_procs._process.StartOptions(via="host")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="isolation is not available"):
        nursery_procs._process.StartOptions(
            isolation=nursery_procs.Isolation(network=True), via=nursery_procs.ssh("host")
        )


async def test_a_missing_ssh_command_is_a_start_error(sshd: SSHServer) -> None:
    async with nursery_procs.open_supervisor() as sup:
        with pytest.raises(ChildStartError) as caught:
            await sup.start_child(None, via=sshd.via(ssh_command="/nonexistent/ssh"))
    assert isinstance(caught.value.__cause__, SSHError)
    assert "cannot run '/nonexistent/ssh'" in str(caught.value)


def _old_pythons() -> list[str]:
    """Real Pythons older than 3.11 on this machine (pyenv's, or on PATH)."""
    found = []
    for folder in sorted(Path(os.path.expanduser("~/.pyenv/versions")).glob("*")):
        python = folder / "bin" / "python"
        if python.exists() and folder.name.split(".")[:2] < ["3", "11"]:
            found.append(str(python))
    return found


async def test_a_python_too_old_there_is_a_start_error(sshd: SSHServer, tmp_path: Path) -> None:
    # This Python pretending to be 3.9, running the first stage as it was sent.
    fake = tmp_path / "old_python.py"
    fake.write_text(
        "import sys\n"
        "sys.version_info = (3, 9, 18, 'final', 0)\n"
        "sys.version = '3.9.18 (pretend)'\n"
        "code = sys.argv[2]\n"
        "sys.argv = ['-c', *sys.argv[3:]]\n"
        "exec(code)\n"
    )
    pythons = [f"{REMOTE_PYTHON} {fake}", *_old_pythons()[:1]]
    async with nursery_procs.open_supervisor() as sup:
        for python in pythons:
            with trio.fail_after(30), pytest.raises(ChildStartError) as caught:
                await sup.start_child(None, name="old", via=sshd.via(python=python))
            message = str(caught.value)
            assert "its Python is too old: 3.11 or newer is needed" in message
            assert "3.11 or newer is needed" in "\n".join(caught.value.stderr_tail)


async def test_a_missing_python_there_is_a_start_error(sshd: SSHServer) -> None:
    async with nursery_procs.open_supervisor() as sup:
        with trio.fail_after(30), pytest.raises(ChildStartError) as caught:
            await sup.start_child(None, name="none", via=sshd.via(python="/nonexistent/python3"))
    assert "the Python command was not found there" in str(caught.value)


async def test_a_stuck_remote_child_is_signalled_through_the_connection(
    sshd: SSHServer,
) -> None:
    policy = Policy(grace_period=0.5, kill_after=5.0)
    async with nursery_procs.open_supervisor(policy=policy) as sup:
        ctx = await sup.start_child(targets.block_the_loop, name="stuck", via=sshd.via())
        remote = ctx._owned().life.process
        remote_pid = remote.remote_pid  # type: ignore[union-attr]
        with trio.fail_after(20):
            await ctx.aclose()
            await wait_process_gone(remote_pid)
        assert ctx.returncode == -signal.SIGTERM


async def test_a_remote_child_that_ignores_sigterm_is_killed(sshd: SSHServer) -> None:
    policy = Policy(grace_period=0.3, kill_after=0.5)
    async with nursery_procs.open_supervisor(policy=policy) as sup:
        ctx = await sup.start_child(targets.ignore_sigterm_and_block, name="deaf", via=sshd.via())
        remote = ctx._owned().life.process
        remote_pid = remote.remote_pid  # type: ignore[union-attr]
        with trio.fail_after(20):
            await ctx.aclose()
            await wait_process_gone(remote_pid)
        assert ctx.returncode == -signal.SIGKILL


async def test_a_remote_child_is_restarted_by_its_policy(sshd: SSHServer, tmp_path: Path) -> None:
    marker = tmp_path / "crashed"
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(
            targets.crash_once, str(marker), name="phoenix", via=sshd.via(), restart="transient"
        )
        with trio.fail_after(30):
            while sup.statistics().restarts_total == 0:
                await ctx.wait_ready()
                await trio.lowlevel.checkpoint()
            await ctx.wait_ready()
        assert marker.read_text() == "crashed"
        assert (await ctx.call(targets.where))["isolated"] == 1


async def test_an_unknown_handle_there_gets_a_dead_reply(sshd: SSHServer) -> None:
    async with nursery_procs.open_supervisor() as sup:
        ctx = await sup.start_child(None, name="deadend", via=sshd.via())
        router = nursery_procs.current_router()
        with pytest.raises(MessageUndeliverable, match=f"no handle 555 in context {ctx.id}"):
            await router.asking.request(ctx.id, 555, "anyone?")


async def test_a_sigkilled_master_leaves_nothing_running_there(sshd: SSHServer) -> None:
    async with run_script(MASTER, json.dumps(sshd.settings())) as (master, stdout):
        with trio.fail_after(60):
            words = (await stdout.line()).decode().split()
        assert words[:1] == ["ready"], "the master exited before its remote children were up"
        remote_pids = [int(w) for w in words[1:]]
        assert len(remote_pids) == 3
        ssh_pids = [p for p in _descendants(master.pid) if "ssh" in _command(p)]
        assert ssh_pids, "no ssh client under the master"
        master.kill()
        await master.wait()
        # The remote side sees its input hang up and ends within about a second,
        # even the context whose event loop is stuck (its watchdog sees it), and
        # so does every ssh process the master had started. The bound leaves
        # room for a loaded machine.
        with trio.fail_after(10):
            for pid in [*remote_pids, *ssh_pids]:
                await wait_process_gone(pid)
    # Its private folder for the connection's control socket could not be
    # removed by a killed process: the next one that needs such a folder does.
    (left,) = await trio.Path(tempfile.gettempdir()).glob(f"nursery-procs-ssh-{master.pid}-*")
    async with nursery_procs.open_supervisor() as sup:
        await sup.start_child(None, name="next", via=sshd.via())
        assert not await left.exists()
