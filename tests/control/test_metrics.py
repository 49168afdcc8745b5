"""``GET /metrics``: Prometheus text read by prometheus-client's own parser."""

from __future__ import annotations

import prometheus_client
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import nursery_procs
from nursery_procs._control import open_control
from nursery_procs._control_client import request_raw
from nursery_procs._ksm import merged_pages
from nursery_procs._pool import open_pool

from .conftest import curl, exists, needs_curl, serving

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of the exposition, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


@needs_curl
async def test_metrics_show_children_pools_and_links_as_they_are(sock_path: str) -> None:
    async with serving(sock_path) as sup:
        echo = await sup.start_child(None, name="echo")
        async with open_pool(sup, None, name="docs", spare=1, max=3) as pool:
            await pool.wait_idle()
            async with pool.session("notes.md"):
                await pool.wait_idle()
                answer = await curl(sock_path, "/metrics")
                assert answer.status == 200
                assert answer.headers["content-type"].startswith("text/plain")
                found = samples(answer.body)
                stats = sup.statistics()
                pool_stats = pool.statistics()

        assert value(found, "nursery_procs_children", state="ready") == 3
        assert value(found, "nursery_procs_children", state="stopping") == 0
        assert value(found, "nursery_procs_child_starts_total") == stats.started_total == 3
        assert value(found, "nursery_procs_child_failed_starts_total") == 0
        assert value(found, "nursery_procs_child_crashes_total") == 0
        assert value(found, "nursery_procs_child_restarts_total") == 0

        assert value(found, "nursery_procs_pool_children", pool="docs", state="idle") == 1
        assert value(found, "nursery_procs_pool_children", pool="docs", state="busy") == 1
        assert value(found, "nursery_procs_pool_sessions", pool="docs") == 1
        assert value(found, "nursery_procs_pool_waiting", pool="docs") == 0
        assert value(found, "nursery_procs_pool_max", pool="docs") == 3
        assert value(found, "nursery_procs_pool_takes_total", pool="docs") == pool_stats.takes
        latency = value(found, "nursery_procs_pool_take_latency_median_seconds", pool="docs")
        assert latency == pool_stats.take_latency_median > 0

        link = echo.statistics()
        labels = {"context": "echo", "id": str(echo.id)}
        assert value(found, "nursery_procs_link_messages_total", **labels, direction="in") >= 1
        assert value(found, "nursery_procs_link_bytes_total", **labels, direction="out") == (
            link.bytes_out
        )
        rss = value(found, "nursery_procs_child_memory_bytes", **labels, kind="rss")
        pss = value(found, "nursery_procs_child_memory_bytes", **labels, kind="pss")
        assert 0 < pss <= rss
        # Nothing was marked for merging (merge_pages is off): none, where the kernel says.
        merged = frozenset({**labels, "kind": "merged"}.items())
        reported = merged_pages(echo.pid or 0) is not None
        assert found.get(("nursery_procs_child_memory_bytes", merged)) == (0 if reported else None)


async def test_the_application_adds_its_own_metrics(sock_path: str) -> None:
    clients = prometheus_client.Gauge("collab_clients", "Connected clients.", registry=None)
    closes = prometheus_client.Counter(
        "collab_closes", "WebSocket closes.", ["code"], registry=None
    )
    clients.set(7)
    closes.labels(code="1000").inc(2)
    async with serving(sock_path, collectors=[clients, closes]):
        status, content_type, text = await trio.to_thread.run_sync(lambda: _request_text(sock_path))
    assert status == 200 and content_type.startswith("text/plain")
    found = samples(text)
    assert value(found, "collab_clients") == 7
    assert value(found, "collab_closes_total", code="1000") == 2
    assert value(found, "nursery_procs_children", state="ready") == 0
    # Nothing went to the library's global registry.
    assert prometheus_client.REGISTRY.get_sample_value("nursery_procs_child_starts_total") is None


def _request_text(path: str) -> tuple[int, str, str]:
    status, content_type, data = request_raw(path, "GET", "/metrics")
    return status, content_type, data.decode()


async def test_a_collector_clashing_with_ours_is_refused(sock_path: str) -> None:
    clash = prometheus_client.Gauge("nursery_procs_children", "Mine.", registry=None)
    async with nursery_procs.open_supervisor() as sup:
        with pytest.raises(ValueError, match="nursery_procs_children"):
            async with open_control(sup, sock_path, collectors=[clash]):
                pytest.fail("served with two metrics of one name")  # pragma: no cover
    assert not exists(sock_path)
