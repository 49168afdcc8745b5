"""Where a context runs when it is not on this host: :func:`ssh` and its value.

``start_child(..., via=ssh("user@host"))`` starts the child through the
system's OpenSSH client (see :mod:`nursery_procs._ssh_connections` for how,
and ``docs/remote.rst``).
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from typing import Final

import attrs

from . import _importer

#: Options the connection manages itself.
_MANAGED: Final = frozenset(("controlmaster", "controlpath", "controlpersist", "batchmode"))
_OPTION_NAME: Final = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")


def _check_options(
    instance: object, attribute: attrs.Attribute[tuple[tuple[str, str], ...]], value: object
) -> None:
    for name, setting in value:  # type: ignore[attr-defined]
        if not isinstance(name, str) or not _OPTION_NAME.match(name):
            raise ValueError(f"ssh option names are words like 'ServerAliveInterval', not {name!r}")
        if not isinstance(setting, str) or "\n" in setting:
            raise ValueError(f"the ssh option {name} needs a one-line value, not {setting!r}")
        lowered = name.lower()
        if lowered in _MANAGED:
            raise ValueError(f"the ssh option {name} is set by nursery_procs (see docs/remote.rst)")
        if lowered == "stricthostkeychecking" and setting.lower() in ("no", "off"):
            raise ValueError(
                "host key checking stays on: add the host's key to a known_hosts file "
                "(UserKnownHostsFile=...) instead of StrictHostKeyChecking=no"
            )


def _check_destination(instance: object, attribute: attrs.Attribute[str], value: object) -> None:
    if not isinstance(value, str) or not value or value.startswith("-") or value != value.strip():
        raise ValueError(f"destination is a host name like 'user@host', not {value!r}")


def _check_port(instance: object, attribute: attrs.Attribute[int | None], value: object) -> None:
    if value is not None and (type(value) is not int or not 0 < value < 65536):
        raise ValueError(f"port must be an int from 1 to 65535, not {value!r}")


def _check_word(instance: object, attribute: attrs.Attribute[str], value: object) -> None:
    if not isinstance(value, str) or not value.strip() or "\n" in value:
        raise ValueError(f"{attribute.name} must be a one-line command, not {value!r}")


def _check_sessions(instance: object, attribute: attrs.Attribute[int], value: object) -> None:
    if type(value) is not int or value < 3:
        raise ValueError(f"max_sessions must be an int >= 3, not {value!r}")


def _check_path(instance: object, attribute: attrs.Attribute[str | None], value: object) -> None:
    if value is not None and (not isinstance(value, str) or not value or "\n" in value):
        raise ValueError(f"{attribute.name} must be a path, not {value!r}")


@attrs.frozen
class SSH:
    """How to start contexts on another host through OpenSSH (made by :func:`ssh`;
    pass it as ``via=``)."""

    #: The host, as ``ssh`` takes it: ``host``, ``user@host`` or an alias of
    #: ``~/.ssh/config``.
    destination: str = attrs.field(validator=_check_destination)
    #: The port of its SSH server (default: ssh's own choice, usually 22).
    port: int | None = attrs.field(default=None, validator=_check_port)
    #: The command that runs Python 3.11 or newer there (a shell command line).
    python: str = attrs.field(default="python3", validator=_check_word)
    #: A private key file (``ssh -i``); default: the agent and ssh's config.
    identity_file: str | None = attrs.field(default=None, validator=_check_path)
    #: An ssh configuration file (``ssh -F``); default: the user's own.
    config_file: str | None = attrs.field(default=None, validator=_check_path)
    #: More ``-o Name=value`` options, in order.
    options: tuple[tuple[str, str], ...] = attrs.field(default=(), validator=_check_options)
    #: The ssh client to run.
    ssh_command: str = attrs.field(default="ssh", validator=_check_word)
    #: Sessions the host's SSH server allows on one connection (its
    #: ``MaxSessions``); beyond ``max_sessions - 2`` contexts (a session is the
    #: connection's own, one is kept for signals) another connection is made.
    max_sessions: int = attrs.field(default=10, validator=_check_sessions)

    @property
    def connection(self) -> SSH:
        """What identifies the connection (contexts started with different Python
        commands on one host share it)."""
        return attrs.evolve(self, python="python3")

    def command(self, *ssh_options: str) -> list[str]:
        """``ssh`` with this value's options and *ssh_options* (no destination yet)."""
        argv = [self.ssh_command, "-o", "BatchMode=yes", "-T"]
        if self.config_file is not None:
            argv += ["-F", self.config_file]
        if self.identity_file is not None:
            argv += ["-i", self.identity_file]
        if self.port is not None:
            argv += ["-p", str(self.port)]
        for name, setting in self.options:
            argv += ["-o", f"{name}={setting}"]
        return [*argv, *ssh_options]

    def remote_command(self) -> str:
        """The command line the remote shell runs for a new context."""
        return f"exec {self.python} -c {shlex.quote(_importer.STAGE1)} -"


def ssh(
    destination: str,
    *,
    port: int | None = None,
    python: str = "python3",
    identity_file: str | os.PathLike[str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
    options: Mapping[str, str] | None = None,
    ssh_command: str = "ssh",
    max_sessions: int = 10,
) -> SSH:
    """Start contexts on another host through the system's ``ssh`` command: pass the
    result as ``via=`` to :meth:`Supervisor.start_child` (or ``open_child``, or a
    pool).

    The user's own ssh configuration, agent and known hosts apply, and host keys
    are always checked (a host whose key is not known cannot be reached). The host
    needs only Python 3.11 or newer: nursery_procs and its dependencies are sent
    to it (see :doc:`remote`).

    Args:
        destination: ``host``, ``user@host``, or an alias from the ssh config.
        port: the SSH server's port.
        python: the command that runs Python there, for example
            ``"/opt/python3.12/bin/python3"`` or ``"python3 -I"``.
        identity_file: a private key file (``ssh -i``).
        config_file: an ssh configuration file instead of the user's (``ssh -F``).
        options: more ssh options (``-o Name=value``), for example
            ``{"ServerAliveInterval": "5"}`` so that a host that drops off the
            network is noticed. ``ControlMaster``, ``ControlPath``,
            ``ControlPersist`` and ``BatchMode`` are set by nursery_procs, and
            ``StrictHostKeyChecking=no`` is refused.
        ssh_command: the ssh client to run.
        max_sessions: how many sessions the host's SSH server allows on one
            connection (its ``MaxSessions``, 10 unless its configuration says
            otherwise): up to ``max_sessions - 2`` contexts share a connection,
            and more make another.

    Raises:
        ValueError: a value is not valid (the message says which).
    """
    return SSH(
        destination,
        port,
        python,
        None if identity_file is None else os.fspath(identity_file),
        None if config_file is None else os.fspath(config_file),
        tuple((options or {}).items()),
        ssh_command,
        max_sessions,
    )
