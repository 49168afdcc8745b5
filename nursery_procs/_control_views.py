"""The control API's views: what each path shows of a supervisor, and what it changes.

Reads go to the live objects at each request (nothing is kept); changes go
through the objects' own API: :meth:`Context.aclose` to stop a context,
:meth:`Pool.resize` (and its validation) to resize a pool.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio

from ._context import Context, context_by_id
from ._control_http import Reply, Request, error_reply, json_reply
from ._control_metrics import SupervisorCollector, render
from ._control_schema import BadRequest, match, parse_json, pool_changes, split_target
from ._errors import PoolClosed
from ._lifecycle import State
from ._pool import Pool, pools_of
from ._procmem import Memory, memory_of_each
from ._supervisor import Supervisor

if TYPE_CHECKING:  # prometheus-client is imported when a server starts
    from prometheus_client.registry import CollectorRegistry

log = logging.getLogger("nursery_procs.control")


# -- reading the tree ------------------------------------------------------------


_UNKNOWN: Final = Memory(None, None, None)


def _memory_fields(memory: Memory) -> dict[str, int | None]:
    return {"rss_bytes": memory.rss, "pss_bytes": memory.pss, "merged_bytes": memory.merged}


async def _local_memory(supervisor: Supervisor) -> dict[int, Memory]:
    """The memory of this process and of each direct child's, by pid."""
    pids = [os.getpid(), *(ctx.pid for ctx in supervisor.children if ctx.pid is not None)]
    return await memory_of_each(pids)


@attrs.define(eq=False)
class _Node:
    id: int
    data: dict[str, Any]
    parent_id: int | None
    children: list[_Node] = attrs.field(factory=list)

    def render(self) -> dict[str, Any]:
        out = dict(self.data)
        out["children"] = [child.render() for child in sorted(self.children, key=_node_key)]
        return out


def _node_key(node: _Node) -> int:
    return node.id


_NO_TRAFFIC = {"messages_in": None, "messages_out": None, "bytes_in": None, "bytes_out": None}


def _context_data(ctx: Context, session: str | None, memory: Memory) -> dict[str, Any]:
    stats = ctx.statistics()
    return {
        "id": ctx.id,
        "name": ctx.name,
        "parent_id": ctx.parent_id,
        "pid": ctx.pid,
        "state": ctx.state.value,
        "direct": True,
        "session": session,
        "isolation": stats.isolation.in_force() if stats.isolation is not None else None,
        "uptime": stats.uptime,
        **_memory_fields(memory),
        "messages_in": stats.messages_in,
        "messages_out": stats.messages_out,
        "bytes_in": stats.bytes_in,
        "bytes_out": stats.bytes_out,
    }


def _deeper_data(context_id: int, name: str, parent_id: int, pid: int) -> dict[str, Any]:
    # Known through route announcements only: no link here, so no traffic; and its
    # pid may be of another host, so its memory is not read here.
    return {
        "id": context_id,
        "name": name,
        "parent_id": parent_id,
        "pid": pid,
        "state": State.READY.value,
        "direct": False,
        "session": None,
        "isolation": None,
        "uptime": None,
        **_memory_fields(_UNKNOWN),
        **_NO_TRAFFIC,
    }


def _root_data(supervisor: Supervisor, memory: Memory) -> dict[str, Any]:
    router = supervisor.router
    return {
        "id": router.id,
        "name": router.name,
        "parent_id": None,
        "pid": os.getpid(),
        "state": State.READY.value,
        "direct": False,
        "session": None,
        "isolation": None,
        "uptime": trio.current_time() - supervisor.started_at,
        **_memory_fields(memory),
        **_NO_TRAFFIC,
    }


def _session_keys(supervisor: Supervisor) -> dict[int, str]:
    """The session key (as text) of each pooled child that serves a session, by id."""
    return {
        ctx.id: key if isinstance(key, str) else repr(key)
        for pool in pools_of(supervisor).values()
        for key, ctx in pool.sessions().items()
    }


def _nodes(supervisor: Supervisor, memory: dict[int, Memory]) -> tuple[_Node, dict[int, _Node]]:
    """The root node (this process) and every context it knows, linked as a tree;
    *memory*: the local processes' memory, by pid."""
    router = supervisor.router
    root = _Node(router.id, _root_data(supervisor, memory.get(os.getpid(), _UNKNOWN)), None)
    nodes: dict[int, _Node] = {}
    sessions = _session_keys(supervisor)
    for ctx in supervisor.children:
        known = memory.get(ctx.pid, _UNKNOWN) if ctx.pid is not None else _UNKNOWN
        nodes[ctx.id] = _Node(ctx.id, _context_data(ctx, sessions.get(ctx.id), known), router.id)
    for info in list(router.directory.values()):
        if info.id not in nodes and info.id != router.id:
            nodes[info.id] = _Node(
                info.id, _deeper_data(info.id, info.name, info.parent_id, info.pid), info.parent_id
            )
    for node in nodes.values():
        parent = nodes.get(node.parent_id) if node.parent_id is not None else None
        # A context whose parent is not known (yet) hangs under the root.
        (parent or root).children.append(node)
    return root, nodes


def _find(supervisor: Supervisor, name: str, memory: dict[int, Memory]) -> _Node:
    """The oldest context called *name* (direct children first), with its subtree."""
    _root, nodes = _nodes(supervisor, memory)
    matches = [node for node in nodes.values() if node.data["name"] == name]
    if not matches:
        raise BadRequest(f"no context named {name!r}", 404)
    return min(matches, key=lambda node: (not node.data["direct"], node.id))


def _pool_data(pool: Pool) -> dict[str, Any]:
    return {
        "name": pool.name,
        "closed": pool.closed,
        "statistics": attrs.asdict(pool.statistics()),
    }


def _status(supervisor: Supervisor) -> dict[str, Any]:
    _root, nodes = _nodes(supervisor, {})  # counts only: no memory read
    by_state = {state.value: 0 for state in State}
    for node in nodes.values():
        by_state[node.data["state"]] += 1
    router = supervisor.router
    return {
        "pid": os.getpid(),
        "context_id": router.id,
        "name": router.name,
        "uptime": trio.current_time() - supervisor.started_at,
        "counts": {
            "contexts": by_state,
            "contexts_total": len(nodes),
            "pools": len(pools_of(supervisor)),
        },
        "statistics": attrs.asdict(supervisor.statistics()),
    }


# -- the views -----------------------------------------------------------------------

_View = Callable[["ControlAPI", "str | None", bytes], Awaitable[Reply]]


@attrs.define(eq=False)
class ControlAPI:
    """The control API of one supervisor, as an app for :class:`HTTPServer`.

    Contexts stopped on a client's request are closed in *tasks*, so that the
    answer comes at once and the stop goes on after the client has left.
    ``GET /metrics`` renders *metrics*.
    """

    supervisor: Supervisor
    tasks: trio.Nursery
    metrics: CollectorRegistry
    #: The supervisor's collector in *metrics*, given the children's memory before
    #: each scrape.
    collector: SupervisorCollector

    async def __call__(self, request: Request) -> Reply:
        try:
            return await self._dispatch(request)
        except BadRequest as exc:
            return error_reply(exc.status, str(exc))
        except Exception:
            log.exception("control request %s %r failed", request.method, request.target)
            return error_reply(500, "internal error in the control server (see its log)")

    async def _dispatch(self, request: Request) -> Reply:
        segments = split_target(request.target)
        kind, name, allowed = match(segments, request.target.decode("ascii"))
        if request.method not in allowed:
            return error_reply(
                405,
                f"method {request.method} is not allowed here; allowed: {', '.join(allowed)}",
                (("Allow", ", ".join(allowed)),),
            )
        view = _VIEWS[(request.method, kind)]
        return await view(self, name, request.body)

    async def get_status(self, name: str | None, body: bytes) -> Reply:
        return json_reply(200, _status(self.supervisor))

    async def get_metrics(self, name: str | None, body: bytes) -> Reply:
        self.collector.memory = await _local_memory(self.supervisor)
        text, content_type = render(self.metrics)
        return Reply(200, text, content_type)

    async def get_contexts(self, name: str | None, body: bytes) -> Reply:
        memory = await _local_memory(self.supervisor)
        if name is None:
            root, _by_id = _nodes(self.supervisor, memory)
            return json_reply(200, root.render())
        return json_reply(200, _find(self.supervisor, name, memory).render())

    async def delete_contexts(self, name: str | None, body: bytes) -> Reply:
        assert name is not None  # the route has a name
        node = _find(self.supervisor, name, await _local_memory(self.supervisor))
        ctx = context_by_id(node.id)
        self.tasks.start_soon(_close, ctx, name=f"control: stop {ctx.name}")
        data = node.render()
        if data["state"] not in (State.STOPPING.value, State.EXITED.value):
            data["state"] = State.STOPPING.value
        return json_reply(202, data)

    def _pool(self, name: str) -> Pool:
        pool = pools_of(self.supervisor).get(name)
        if pool is None:
            raise BadRequest(f"no pool named {name!r}", 404)
        return pool

    async def get_pools(self, name: str | None, body: bytes) -> Reply:
        if name is None:
            pools = [_pool_data(pool) for _, pool in sorted(pools_of(self.supervisor).items())]
            return json_reply(200, {"pools": pools})
        return json_reply(200, _pool_data(self._pool(name)))

    async def put_pools(self, name: str | None, body: bytes) -> Reply:
        assert name is not None  # the route has a name
        pool = self._pool(name)
        changes = pool_changes(parse_json(body))
        try:
            pool.resize(**changes)
        except (ValueError, TypeError) as exc:
            raise BadRequest(str(exc)) from None
        except PoolClosed as exc:
            raise BadRequest(str(exc), 409) from None
        log.info("pool %r resized to %s over the control socket", name, changes)
        return json_reply(200, _pool_data(pool))


_VIEWS: dict[tuple[str, str], _View] = {
    ("GET", "status"): ControlAPI.get_status,
    ("GET", "metrics"): ControlAPI.get_metrics,
    ("GET", "contexts"): ControlAPI.get_contexts,
    ("DELETE", "contexts"): ControlAPI.delete_contexts,
    ("GET", "pools"): ControlAPI.get_pools,
    ("PUT", "pools"): ControlAPI.put_pools,
}


async def _close(ctx: Context) -> None:
    try:
        await ctx.aclose()
    except Exception:
        log.exception("stopping %r for the control socket failed", ctx)
