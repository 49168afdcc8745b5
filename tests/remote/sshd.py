"""A real OpenSSH server on 127.0.0.1, for the remote tests and benchmark, and
a "remote" Python that has neither nursery_procs nor trio.

The server gets its own host key, a per-run authorized key and known_hosts file
in a temporary folder, and a free port. Host keys are checked (the client knows
this server's key and no other). Its sessions get a home folder of their own
(so the machine's own login scripts do not run) and, if given, the leak
plugin's marker, so that a remote process a test leaves behind fails that test
like a local one.
"""

from __future__ import annotations

import ctypes
import getpass
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import nursery_procs
from nursery_procs.testing._leaks import MARKER_ENV

_PR_SET_PDEATHSIG = 1
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
#: The remote side's Python: this interpreter, isolated from every environment
#: variable and without site-packages, so that it cannot import nursery_procs,
#: trio or the tests' modules; they must be shipped to it.
REMOTE_PYTHON = f"{shlex.quote(os.path.realpath(sys.executable))} -I -S"


class SSHServer(NamedTuple):
    """A running test sshd and what a client needs to reach it."""

    port: int
    user: str
    folder: Path
    client_key: Path
    known_hosts: Path
    process: subprocess.Popen[bytes]

    def via(self, **overrides: object) -> nursery_procs.SSH:
        """``ssh(...)`` for this server (options may be overridden)."""
        settings: dict[str, object] = {
            "port": self.port,
            "python": REMOTE_PYTHON,
            "identity_file": self.client_key,
            "config_file": os.devnull,
            "options": {
                "IdentitiesOnly": "yes",
                "UserKnownHostsFile": str(self.known_hosts),
                "StrictHostKeyChecking": "yes",
                "ConnectTimeout": "20",
            },
        }
        settings.update(overrides)
        return nursery_procs.ssh(f"{self.user}@127.0.0.1", **settings)  # type: ignore[arg-type]

    def settings(self) -> dict[str, object]:
        """:meth:`via`'s settings as plain data, for a script of its own."""
        via = self.via()
        return {
            "destination": via.destination,
            "port": via.port,
            "python": via.python,
            "identity_file": via.identity_file,
            "config_file": via.config_file,
            "options": dict(via.options),
        }

    def ssh_argv(self, *command: str) -> list[str]:
        """A plain ``ssh`` command line to this server (not shared)."""
        via = self.via()
        return [*via.command(), via.destination, *command]

    def connection_pids(self) -> list[int]:
        """The server's per-connection processes (its listener's children)."""
        return children_of(self.process.pid)


def children_of(pid: int) -> list[int]:
    """The children of process *pid* (started by any of its threads)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )


def _die_with_parent() -> None:
    """In the new sshd, before exec: SIGTERM it if the test process dies (a run
    killed before its teardown). The thread that starts it is the main one,
    which lives as long as the process."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_listening(fifo: int, process: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until sshd listens: it writes its pid file (here a FIFO) once its
    sockets are bound; a pidfd tells if it exited instead."""
    pidfd = os.pidfd_open(process.pid)
    try:
        poller = select.poll()
        poller.register(fifo, select.POLLIN)
        poller.register(pidfd, select.POLLIN)
        ready = dict(poller.poll(30_000))
    finally:
        os.close(pidfd)
    if fifo not in ready or not os.read(fifo, 64).strip().isdigit():
        process.kill()
        process.wait()
        raise RuntimeError(f"sshd did not start: {log.read_text()}")


def available() -> bool:
    """Whether this machine has the OpenSSH server and client."""
    return os.path.exists(SSHD) and shutil.which("ssh") is not None


@contextmanager
def running_sshd(marker: str | None = None) -> Iterator[SSHServer]:
    """Run a test sshd until the block ends; its sessions carry the leak
    plugin's *marker*, if given."""
    folder = Path(tempfile.mkdtemp(prefix="nursery-procs-sshd-"))
    home = folder / "home"
    home.mkdir()
    _keygen(folder / "host_key")
    _keygen(folder / "client_key")
    shutil.copy(folder / "client_key.pub", folder / "authorized_keys")
    port = _free_port()
    host_key = (folder / "host_key.pub").read_text().split()
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    user = getpass.getuser()
    session_env = f"HOME={home}" + (f" {MARKER_ENV}={marker}" if marker else "")
    config = folder / "sshd_config"
    config.write_text(
        f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {folder / 'host_key'}\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "PermitRootLogin prohibit-password\n"
        # The keys live in a temporary folder under /tmp, which other users may write.
        "StrictModes no\n"
        f"PidFile {folder / 'sshd.pid'}\n"
        "MaxStartups 100\n"
        f"SetEnv {session_env}\n"
        "LogLevel VERBOSE\n"
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # its privilege separation folder
    # The server itself is not the tests' descendant as far as the leak check
    # goes: its sessions carry the marker (SetEnv), it does not.
    env = {k: v for k, v in os.environ.items() if k != MARKER_ENV}
    log = folder / "sshd.log"
    os.mkfifo(folder / "sshd.pid")
    fifo = os.open(folder / "sshd.pid", os.O_RDONLY | os.O_NONBLOCK)
    process = subprocess.Popen(
        [SSHD, "-D", "-E", str(log), "-f", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    try:
        try:
            _wait_listening(fifo, process, log)
        finally:
            os.close(fifo)
        yield SSHServer(port, user, folder, folder / "client_key", folder / "known_hosts", process)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(folder, ignore_errors=True)
