"""The collab server's own figures on the control socket's ``GET /metrics``: a
prometheus-client collector, passed to :func:`nursery_procs.open_control`, that reads
the live server at each scrape (nothing is counted twice or kept in step by hand).

=====================================  ===============================================
``collab_documents``                   documents open (each in its own child)
``collab_clients``                     WebSocket clients connected
``collab_client_closes_total{code}``   clients closed, by WebSocket close code (1006:
                                       the connection broke without a close frame)
``collab_clients_caught_up_total``     times a client fell behind and was sent the
                                       whole document in one message
=====================================  ===============================================

The supervisor's own figures (children, pools, links) are on the same page, under
``nursery_procs_``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from .clients import Clients

__all__ = ["CollabCollector"]


class _Server(Protocol):
    clients: Clients

    def documents(self) -> Mapping[str, object]: ...


class CollabCollector:
    """A prometheus-client collector of one collab server's documents and clients."""

    def __init__(self, server: _Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        clients = self.server.clients
        yield GaugeMetricFamily(
            "collab_documents", "Documents open.", value=len(self.server.documents())
        )
        yield GaugeMetricFamily(
            "collab_clients", "WebSocket clients connected.", value=len(clients)
        )
        closes = CounterMetricFamily(
            "collab_client_closes", "Clients closed, by WebSocket close code.", labels=["code"]
        )
        for code, count in sorted(clients.closes.items()):
            closes.add_metric([str(code)], count)
        yield closes
        yield CounterMetricFamily(
            "collab_clients_caught_up",
            "Times a client fell behind and was sent the whole document in one message.",
            value=clients.caught_up,
        )
