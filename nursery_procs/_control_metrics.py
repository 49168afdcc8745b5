"""``GET /metrics``: the supervisor's figures in Prometheus text format.

A custom collector reads the live objects (the supervisor, its children, its
pools) at each scrape, so nothing is counted twice or kept in step by hand.
Each control server has its own registry (never the library's global one),
holding that collector and the application's own collectors.

prometheus-client is imported when a server is set up, not with the package:
every child process imports nursery_procs, and the library takes about 40 ms
to import, which children that never serve metrics should not pay.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from ._lifecycle import State
from ._pool import Pool, pools_of
from ._procmem import Memory
from ._supervisor import Supervisor

if TYPE_CHECKING:  # imported lazily at run time (see above)
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector, CollectorRegistry

#: The prefix of every metric this collector makes.
PREFIX = "nursery_procs_"


class SupervisorCollector:
    """A prometheus-client collector of one supervisor's live figures."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        #: The memory of the children's processes, read (off the event loop) just
        #: before each scrape by whoever renders it; by pid.
        self.memory: dict[int, Memory] = {}

    def collect(self) -> Iterator[Metric]:
        yield from self._children()
        yield from self._links()
        yield self._memory()
        pools = sorted(pools_of(self.supervisor).items())
        yield from _pool_metrics([pool for _, pool in pools])

    def _children(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        by_state = Counter(ctx.state for ctx in self.supervisor.children)
        children = GaugeMetricFamily(
            PREFIX + "children", "Direct children, by state.", labels=["state"]
        )
        for state in State:
            children.add_metric([state.value], by_state[state])
        yield children
        stats = self.supervisor.statistics()
        for name, value, text in (
            ("child_starts", stats.started_total, "Children started (each incarnation)."),
            ("child_failed_starts", stats.failed_starts, "Children that failed to start."),
            ("child_exits", stats.exited_total, "Children that exited."),
            ("child_crashes", stats.crashed_total, "Children that exited abnormally."),
            ("child_restarts", stats.restarts_total, "Children restarted by their policy."),
        ):
            yield CounterMetricFamily(PREFIX + name, text, value=value)

    def _links(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily

        labels = ["context", "id", "direction"]
        messages = CounterMetricFamily(
            PREFIX + "link_messages", "Messages on each direct child's link.", labels=labels
        )
        payload = CounterMetricFamily(
            PREFIX + "link_bytes", "Payload bytes on each direct child's link.", labels=labels
        )
        for ctx in self.supervisor.children:
            stats = ctx.statistics()
            for direction, count, size in (
                ("in", stats.messages_in, stats.bytes_in),
                ("out", stats.messages_out, stats.bytes_out),
            ):
                messages.add_metric([ctx.name, str(ctx.id), direction], count)
                payload.add_metric([ctx.name, str(ctx.id), direction], size)
        yield messages
        yield payload

    def _memory(self) -> Metric:
        from prometheus_client.metrics_core import GaugeMetricFamily

        memory = GaugeMetricFamily(
            PREFIX + "child_memory_bytes",
            "Memory of each direct child's process: resident (rss), its proportional "
            "share (pss), and merged with identical pages of others (merged).",
            labels=["context", "id", "kind"],
        )
        for ctx in self.supervisor.children:
            figures = self.memory.get(ctx.pid) if ctx.pid is not None else None
            if figures is None:
                continue
            kinds = (("rss", figures.rss), ("pss", figures.pss), ("merged", figures.merged))
            for kind, size in kinds:
                if size is not None:
                    memory.add_metric([ctx.name, str(ctx.id), kind], size)
        return memory


_POOL_GAUGES = (
    ("waiting", "Callers waiting for a child of the pool."),
    ("sessions", "Live keyed sessions of the pool."),
    ("spare", "Setting: idle children the pool keeps ready."),
    ("max", "Setting: the most children the pool has."),
)
_POOL_COUNTERS = (
    ("total_spawned", "pool_spawned", "Children the pool started successfully."),
    ("spawn_failures", "pool_spawn_failures", "Start attempts of the pool that failed."),
    ("idle_deaths", "pool_idle_deaths", "Idle children of the pool that died."),
    ("takes", "pool_takes", "Children the pool handed out."),
)


def _pool_metrics(pools: list[Pool]) -> Iterator[Metric]:
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

    snapshots = [(pool.name, pool.statistics()) for pool in pools]
    children = GaugeMetricFamily(
        PREFIX + "pool_children", "Children of the pool, by state.", labels=["pool", "state"]
    )
    for name, stats in snapshots:
        for state in ("idle", "busy", "starting", "stopping"):
            children.add_metric([name, state], getattr(stats, state))
    yield children
    for field, text in _POOL_GAUGES:
        gauge = GaugeMetricFamily(PREFIX + "pool_" + field, text, labels=["pool"])
        for name, stats in snapshots:
            gauge.add_metric([name], getattr(stats, field))
        yield gauge
    latency = GaugeMetricFamily(
        PREFIX + "pool_take_latency_median_seconds",
        "Median wait for a child of the pool, over its last 1000 takes.",
        labels=["pool"],
    )
    for name, stats in snapshots:
        latency.add_metric([name], stats.take_latency_median)
    yield latency
    for field, metric, text in _POOL_COUNTERS:
        counter = CounterMetricFamily(PREFIX + metric, text, labels=["pool"])
        for name, stats in snapshots:
            counter.add_metric([name], getattr(stats, field))
        yield counter


def metrics_registry(
    supervisor: Supervisor, collectors: Iterable[Collector]
) -> tuple[CollectorRegistry, SupervisorCollector]:
    """A registry of its own for one control server: the supervisor's figures and
    the application's *collectors*; and the supervisor's collector, whose
    :attr:`~SupervisorCollector.memory` the server refreshes before each scrape.

    Raises:
        ValueError: two collectors make a metric of the same name.
    """
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=True)
    ours = SupervisorCollector(supervisor)
    for collector in (ours, *collectors):
        registry.register(collector)
    return registry, ours


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry's metrics now, in Prometheus text format, and its content type."""
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(registry), CONTENT_TYPE_LATEST
