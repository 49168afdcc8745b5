"""One child's life: its states, in order."""

from __future__ import annotations

import enum


class State(enum.Enum):
    """Where a context is in its life."""

    #: The process is being started.
    SPAWNING = "spawning"
    #: The link is up and the bootstrap sent; the child is loading its target.
    CREATED = "created"
    #: The child said it is ready; its target is running.
    READY = "ready"
    #: Shutdown has begun (SHUTDOWN sent, or the link closed).
    STOPPING = "stopping"
    #: The process has exited and been reaped.
    EXITED = "exited"
