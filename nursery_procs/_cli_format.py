"""How the ``nursery-procs`` command shows the control API's answers to people."""

from __future__ import annotations

from collections.abc import Callable
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


def _describe_isolation(in_force: dict[str, Any]) -> str:
    words = []
    for name, value in in_force.items():
        if value is True:
            words.append(name)
        elif name == "address_space":
            words.append(f"{name} {_size(value)}")
        elif isinstance(value, list | tuple):
            words.append(f"{name} {' '.join(value)}")
        else:
            words.append(f"{name} {value}")
    return ", ".join(words)


def _describe_context(node: dict[str, Any]) -> str:
    parts = [f"id {node.get('id')}", f"pid {node.get('pid')}", str(node.get("state"))]
    if node.get("session") is not None:
        parts.append(f"session {node['session']!r}")
    if node.get("isolation"):
        parts.append(f"isolated: {_describe_isolation(node['isolation'])}")
    if node.get("uptime") is not None:
        parts.append(f"up {_duration(node['uptime'])}")
    if node.get("rss_bytes") is not None:
        parts.append(f"rss {_size(node['rss_bytes'])}")
    if node.get("pss_bytes") is not None:
        parts.append(f"pss {_size(node['pss_bytes'])}")
    if node.get("merged_bytes"):
        parts.append(f"merged {_size(node['merged_bytes'])}")
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


def _latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return _duration(seconds)


def _timeout(seconds: float | None) -> str:
    return "none" if seconds is None else _duration(seconds)


#: The columns of the pools table: header, statistic, how it is shown.
_POOL_COLUMNS: Final[tuple[tuple[str, str, Callable[[Any], str]], ...]] = (
    *((name, name, str) for name in ("spare", "max", "idle", "busy", "starting", "stopping")),
    *((name, name, str) for name in ("waiting", "sessions")),
    ("idle_timeout", "idle_timeout", _timeout),
    ("take_median", "take_latency_median", _latency),
)


def format_pools(pools: list[dict[str, Any]]) -> str:
    """Pools (as ``GET /pools`` or ``PUT /pools/<name>`` answer them) as a table."""
    if not pools:
        return "no pools"
    rows = [["name", *(header for header, _, _ in _POOL_COLUMNS)]]
    for pool in pools:
        stats = pool.get("statistics", {})
        name = str(pool.get("name")) + (" (closed)" if pool.get("closed") else "")
        rows.append([name, *(show(stats.get(key)) for _, key, show in _POOL_COLUMNS)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def format_stopping(context: dict[str, Any]) -> str:
    text = f"stopping {_describe_context(context)}"
    below = len(context.get("children", []))
    if below:
        text += f" and the {below} context(s) it started"
    return text
