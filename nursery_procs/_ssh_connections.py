"""Contexts on other hosts, started through the system's OpenSSH client.

``start_child(..., via=ssh("user@host"))`` runs ``ssh user@host exec python3 -c
STAGE1 -``: the first stage says hello on its standard output, the parent sends
the second stage and the runtime bundle (see :mod:`nursery_procs._importer`),
and from then on the session's standard input and output carry the child's
link, as a socketpair does for a local child. ssh's standard error carries the
remote side's output to the parent's logs.

Every context on one host shares one SSH connection: the supervisor runs one
OpenSSH *ControlMaster* per host, with its control socket in a private folder,
and each context is a session multiplexed over it (no new TCP connection, key
exchange or authentication). The master's own session reads its standard
input, so that if the parent dies, the master's session ends, and with it the
master once its last context has gone.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterable
from functools import partial
from typing import Final

import trio

from . import _importer
from ._errors import HandshakeError, SSHError
from ._module_server import ModuleServer, ShippedSpawn, Shipping, server_for
from ._process import ExecProcess, Policy, kill_and_reap
from ._router import Router
from ._ssh import SSH
from ._stdio import new_tail, pump_lines

log = logging.getLogger("nursery_procs.ssh")

#: What the master's session prints once it is up (its control socket listens
#: by then), and then it waits for its standard input to close.
_READY: Final = "nursery_procs-ssh-ready"
_MASTER_COMMAND: Final = f"echo {_READY}; exec cat >/dev/null"
#: How much a remote shell may print before the runtime says hello (login noise).
_MAX_NOISE: Final = 64 * 1024
#: How long a remote ``kill`` may take before the local ssh client is killed.
_SIGNAL_TIMEOUT: Final = 5.0


class RemoteProcess:
    """A context's process on another host, as the supervisor sees it: the local
    ssh client (which exits when the remote process does) and the remote process
    group, which :meth:`terminate` and :meth:`kill` signal through the host's
    connection."""

    def __init__(self, process: trio.Process, master: _Master) -> None:
        self._client = ExecProcess.wrap(process)
        self._master = master
        #: The remote runtime's pid and process group, once it said hello.
        self.remote_pid: int | None = None
        self.remote_pgid: int | None = None
        self._signalled: int | None = None
        self._released = False
        self.stderr = process.stderr
        #: Its standard output carries the link, not output to log.
        self.stdout: trio.abc.ReceiveStream | None = None

    @property
    def pid(self) -> int:
        """The local ssh client's pid."""
        return self._client.pid

    @property
    def returncode(self) -> int | None:
        """The remote exit status (as ssh reports it); minus the signal number if
        it was ended by a signal sent from here (ssh itself reports 255)."""
        code = self._client.returncode
        if code == 255 and self._signalled is not None:
            return -self._signalled
        return code

    def poll_exited(self) -> bool:
        """Whether the ssh client has exited (it does once the remote side has)."""
        return self._client.poll_exited()

    async def wait(self) -> int:
        await self._client.wait()
        if not self._released:
            self._released = True
            self._master.contexts -= 1  # its session is free again
        code = self.returncode
        assert code is not None
        return code

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self._client.returncode is not None:
            return
        if self.remote_pgid is None or not self._master.up:
            # Nothing runs there yet, or the connection is gone: ending the ssh
            # client closes the session, whose end the remote side watches.
            self._client.kill()
            return
        self._master.nursery.start_soon(self._signal_remotely, signum)

    async def _signal_remotely(self, signum: int) -> None:
        """Signal the remote process group through the connection; if that fails
        or (for SIGKILL) once it is done, end the local client too."""
        self._signalled = signum
        argv = self._master.client_command(f"kill -{signum} -- -{self.remote_pgid}")
        failed = True
        with trio.move_on_after(_SIGNAL_TIMEOUT):
            try:
                result = await trio.run_process(
                    argv,
                    stdin=subprocess.DEVNULL,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
            except OSError as exc:  # ssh itself could not run
                why = str(exc)
            else:
                failed = result.returncode != 0
                why = result.stderr.decode(errors="replace").strip()
            if failed:
                destination = self._master.key.destination
                log.info("could not signal %s on %s: %s", self.remote_pgid, destination, why)
        if failed or signum == signal.SIGKILL:
            with trio.move_on_after(_SIGNAL_TIMEOUT if not failed else 0):
                await self._client.wait()
            self._client.kill()


class _Master:
    """One host's OpenSSH ControlMaster, shared by the contexts started there."""

    def __init__(self, key: SSH, path: str, nursery: trio.Nursery) -> None:
        self.key = key
        self.path = path
        self.nursery = nursery
        self.process: trio.Process | None = None
        self.up = False
        #: The contexts running over this connection (sessions in use).
        self.contexts = 0
        self.stderr_tail = new_tail()
        self.done = trio.Event()

    def client_command(self, remote_command: str) -> list[str]:
        """``ssh`` running *remote_command* over this connection."""
        return [
            *self.key.command("-S", self.path, "-o", "ControlMaster=no"),
            self.key.destination,
            remote_command,
        ]

    async def run(self, policy: Policy, *, task_status: trio.TaskStatus[None]) -> None:
        """Connect; report once the control socket is up; run until ssh exits.

        Raises (before it reports): :class:`SSHError` if ssh cannot connect.
        """
        argv = [
            *self.key.command("-S", self.path, "-o", "ControlMaster=yes"),
            "-o",
            "ControlPersist=no",
            self.key.destination,
            _MASTER_COMMAND,
        ]
        try:
            process = self.process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                process_group=0,
            )
        except OSError as exc:
            self.done.set()
            raise SSHError(self.key.destination, f"cannot run {argv[0]!r}: {exc}") from None
        assert process.stdout is not None and process.stderr is not None
        why: str | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._log_stderr, process.stderr)
                why = await self._wait_ready(process.stdout, policy)
                if why is None:
                    self.up = True
                    task_status.started()
                    code = await process.wait()
                    self.up = False
                    log.info("connection to %s ended (ssh %s)", self.key.destination, _status(code))
                    nursery.cancel_scope.cancel()
                else:
                    # Let its last words reach the tail.
                    with trio.move_on_after(policy.drain_timeout):
                        await process.wait()
                    await kill_and_reap(process)
                    nursery.cancel_scope.deadline = trio.current_time() + policy.drain_timeout
        finally:
            self.up = False
            with trio.CancelScope(shield=True):
                if self.process is not None:
                    await kill_and_reap(self.process)
                    for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
                        if pipe is not None:
                            await pipe.aclose()
            self.done.set()
        if why is not None:
            raise SSHError(
                self.key.destination,
                f"could not connect ({_status(self.process.returncode)}; {why})",
                self.process.returncode,
                tuple(self.stderr_tail),
            )

    async def _wait_ready(self, stdout: trio.abc.ReceiveStream, policy: Policy) -> str | None:
        """``None`` once the master is up, else why it is not."""
        try:
            with trio.fail_after(policy.ready_timeout):
                await _read_until(stdout, _READY.encode(), self.key.destination)
        except trio.TooSlowError:
            return f"not connected within {policy.ready_timeout} s"
        except HandshakeError as exc:
            return str(exc)
        return None

    async def _log_stderr(self, stderr: trio.abc.ReceiveStream) -> None:
        await pump_lines(
            stderr,
            logger=log,
            level=logging.WARNING,
            name=f"ssh {self.key.destination}",
            pid=self.process.pid if self.process else None,
            stream="stderr",
            tail=self.stderr_tail,
        )

    async def aclose(self, grace: float) -> None:
        """End the master's session; once no context uses it, ssh exits."""
        process = self.process
        if process is not None and process.returncode is None and process.stdin is not None:
            await process.stdin.aclose()
            with trio.move_on_after(grace):
                await self.done.wait()
            await kill_and_reap(process)
        await self.done.wait()


class SSHConnections:
    """The SSH connections of one supervisor: one ControlMaster per host, their
    control sockets in a private folder, closed with the supervisor."""

    def __init__(self, nursery: trio.Nursery, policy: Policy) -> None:
        self._nursery = nursery
        self._policy = policy
        self._folder: str | None = None
        self._masters: dict[SSH, list[_Master]] = {}
        self._locks: dict[SSH, trio.Lock] = {}
        self._stage2: bytes | None = None
        #: SSH connections made (a connection made again after it was lost counts twice).
        self.connected_total = 0

    async def _master(self, key: SSH) -> _Master:
        """A connection to *key*'s host with a session free for a new context:
        its server allows ``max_sessions`` sessions on one connection, of which
        the master's own takes one and signals may need another."""
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            masters = self._masters.setdefault(key, [])
            masters[:] = [m for m in masters if m.up]
            for master in masters:
                if master.contexts < key.max_sessions - 2:
                    master.contexts += 1
                    return master
            if self._folder is None:
                self._folder = _control_folder()
            path = os.path.join(self._folder, str(self.connected_total))
            master = _Master(key, path, self._nursery)
            await self._nursery.start(partial(master.run, self._policy))
            masters.append(master)
            self.connected_total += 1
            master.contexts += 1
            return master

    async def spawn(self, via: SSH, *, router: Router, preload: Iterable[str] = ()) -> ShippedSpawn:
        """Start a context's process on *via*'s host (connecting first if need be).

        Raises:
            SSHError: the host cannot be reached.
        """
        master = await self._master(via.connection)
        try:
            process = await trio.lowlevel.open_process(
                master.client_command(via.remote_command()),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                process_group=0,
            )
        except BaseException:
            master.contexts -= 1
            raise
        assert process.stdin is not None and process.stdout is not None
        remote = RemoteProcess(process, master)
        server = server_for(router)
        shipping = Shipping(server, bundle=(), preload=preload, other_host=True)
        start = partial(self._start_runtime, via, remote, process, server, shipping)
        shipping.set_before_link(start)
        stream = trio.StapledStream(process.stdin, process.stdout)
        return ShippedSpawn(remote, stream, shipping=shipping)

    async def _start_runtime(
        self,
        via: SSH,
        remote: RemoteProcess,
        process: trio.Process,
        server: ModuleServer,
        shipping: Shipping,
    ) -> None:
        """Wait for the first stage's hello; send the second stage and the bundle."""
        assert process.stdin is not None and process.stdout is not None
        try:
            hello = await _read_until(
                process.stdout, _importer.HELLO_MARKER + b" ", via.destination
            )
        except HandshakeError:
            await process.wait()
            raise HandshakeError(
                f"the runtime did not start there: {_why_failed(process.returncode)}"
            ) from None
        pid, pgid, magic = _parse_hello(hello)
        remote.remote_pid, remote.remote_pgid = pid, pgid
        names, bundle = server.runtime_bundle(code=magic == importlib.util.MAGIC_NUMBER.hex())
        if self._stage2 is None:
            self._stage2 = _importer.stage2_source()
        data = _importer.frame(self._stage2) + _importer.frame(bundle)
        shipping.pusher.sent.update(names)
        server.bytes_sent += len(data)
        await process.stdin.send_all(data)
        log.debug("runtime sent to %s (pid %d): %d bytes", via.destination, pid, len(data))

    async def aclose(self) -> None:
        """Close every connection (their contexts are closed already) and the folder."""
        async with trio.open_nursery() as nursery:
            for masters in self._masters.values():
                for master in masters:
                    nursery.start_soon(master.aclose, self._policy.kill_after)
        self._masters.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


_FOLDER_PREFIX: Final = "nursery-procs-ssh-"


def _control_folder() -> str:
    """A new private folder (0700: nobody else may use or replace the control
    sockets) named after this process; folders left by processes of this user
    that are gone (killed before they could remove theirs) are removed."""
    base = tempfile.gettempdir()
    for entry in os.scandir(base):
        owner, _, _ = entry.name.removeprefix(_FOLDER_PREFIX).partition("-")
        if not entry.name.startswith(_FOLDER_PREFIX) or not owner.isdigit():
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.getuid() or _alive(int(owner)):
                continue
        except OSError:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{_FOLDER_PREFIX}{os.getpid()}-", dir=base)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _read_until(stream: trio.abc.ReceiveStream, marker: bytes, destination: str) -> bytes:
    """Read lines until one starts with *marker*; return the rest of that line.
    Lines before it (a login script's noise) are logged."""
    buffer = b""
    while True:
        line, found, rest = buffer.partition(b"\n")
        if found:
            if line.startswith(marker):
                if rest:
                    raise HandshakeError(f"unexpected output after the hello: {rest[:80]!r}")
                return line[len(marker) :]
            log.info("%s said: %s", destination, line.decode(errors="replace"))
            buffer = rest
            continue
        if len(buffer) > _MAX_NOISE:
            raise HandshakeError(f"no hello in the first {_MAX_NOISE} bytes of output")
        chunk = await stream.receive_some()
        if not chunk:
            raise HandshakeError("end of output before the hello")
        buffer += chunk


def _parse_hello(hello: bytes) -> tuple[int, int, str]:
    try:
        pid, pgid, magic = hello.decode("ascii").split()
        return int(pid), int(pgid), magic
    except ValueError:
        raise HandshakeError(f"malformed hello: {hello[:80]!r}") from None


def _status(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def _why_failed(returncode: int | None) -> str:
    """What ssh's exit status says about a runtime that did not start."""
    reasons = {
        255: "ssh exited with status 255: the connection failed or was refused",
        127: "the Python command was not found there (exit status 127)",
        126: "the Python command cannot be run there (exit status 126)",
        _importer.EXIT_PYTHON_TOO_OLD: "its Python is too old: 3.11 or newer is needed",
        _importer.EXIT_BUNDLE_TRUNCATED: "the runtime bundle was cut short",
    }
    if returncode in reasons:
        return reasons[returncode]
    return f"ssh {_status(returncode)}"
