"""How the ``nursery-procs`` command shows the control API's answers to people."""

from __future__ import annotations

from typing import Any, Final


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _size(value: int | None) -> str:
    if value is None:
        return "?"
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} GiB"  # pragma: no cover - the loop always returns


def _describe_context(node: dict[str, Any]) -> str:
    parts = [f"id {node.get('id')}", f"pid {node.get('pid')}", str(node.get("state"))]
    if node.get("uptime") is not None:
        parts.append(f"up {_duration(node['uptime'])}")
    if node.get("rss_bytes") is not None:
        parts.append(f"rss {_size(node['rss_bytes'])}")
    if node.get("messages_in") is not None:
        parts.append(f"msgs {node['messages_in']} in/{node['messages_out']} out")
    return f"{node.get('name')} ({', '.join(parts)})"


def format_tree(root: dict[str, Any]) -> str:
    """A ``pstree``-like drawing of the context tree answered by ``GET /contexts``."""
    lines = [_describe_context(root)]

    def walk(children: list[dict[str, Any]], prefix: str) -> None:
        for index, child in enumerate(children):
            last = index == len(children) - 1
            lines.append(f"{prefix}{'└── ' if last else '├── '}{_describe_context(child)}")
            walk(child.get("children", []), prefix + ("    " if last else "│   "))

    walk(root.get("children", []), "")
    return "\n".join(lines)


def format_status(status: dict[str, Any]) -> str:
    """The answer of ``GET /status``, for people."""
    counts = status.get("counts", {})
    by_state = counts.get("contexts", {})
    states = ", ".join(f"{n} {state}" for state, n in by_state.items() if n) or "none"
    stats = status.get("statistics", {})
    return "\n".join(
        [
            f"supervisor {status.get('name')} (context {status.get('context_id')}, "
            f"pid {status.get('pid')}), up {_duration(status.get('uptime'))}",
            f"contexts: {counts.get('contexts_total', 0)} ({states})",
            f"pools:    {counts.get('pools', 0)}",
            f"children: {stats.get('running', 0)} running, {stats.get('starting', 0)} starting, "
            f"{stats.get('stopping', 0)} stopping",
            f"totals:   {stats.get('started_total', 0)} started, "
            f"{stats.get('failed_starts', 0)} failed to start, "
            f"{stats.get('exited_total', 0)} exited, {stats.get('crashed_total', 0)} crashed",
        ]
    )


_POOL_COLUMNS: Final = (
    "spare",
    "max",
    "idle",
    "busy",
    "starting",
    "stopping",
    "waiting",
    "sessions",
    "idle_timeout",
)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_pools(pools: list[dict[str, Any]]) -> str:
    """The pools answered by ``GET /pools``, as a table."""
    if not pools:
        return "no pools"
    header = ["name", *_POOL_COLUMNS]
    rows = [header]
    for pool in pools:
        stats = pool.get("statistics", {})
        row = [str(pool.get("name"))]
        row += [_cell(stats.get(column)) for column in _POOL_COLUMNS]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def format_pool(pool: dict[str, Any]) -> str:
    stats = pool.get("statistics", {})
    lines = [f"pool {pool.get('name')}" + (" (closed)" if pool.get("closed") else "")]
    lines += [f"  {key}: {'-' if value is None else value}" for key, value in stats.items()]
    return "\n".join(lines)


def format_stopping(context: dict[str, Any]) -> str:
    text = f"stopping {_describe_context(context)}"
    below = len(context.get("children", []))
    if below:
        text += f" and the {below} context(s) it started"
    return text
