"""The collab server's documents, clients and close codes on the control socket's
``GET /metrics``, read with prometheus-client's own parser."""

from __future__ import annotations

from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families

from examples.collab.clients import CLOSE_INVALID_NAME, CLOSE_NORMAL

from .servers import TIMEOUT, closed_with, running, ws_url
from .yclient import connect


async def scrape(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


async def test_documents_clients_and_close_codes_are_metrics(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    async with running(tmp_path, control=path) as server:
        with trio.fail_after(TIMEOUT):
            async with (
                connect(ws_url(server, "one")) as a,
                connect(ws_url(server, "one")) as b,
                connect(ws_url(server, "two")) as c,
            ):
                for client in (a, b, c):
                    await client.synced.wait()
                found = await scrape(path)
                assert found[("collab_documents", ())] == 2
                assert found[("collab_clients", ())] == 3
                assert found[("collab_clients_caught_up_total", ())] == 0
                # The supervisor's own figures are on the same page.
                assert found[("nursery_procs_children", (("state", "ready"),))] >= 2
            async with connect(ws_url(server, ".bad"), sync=False) as bad:
                assert (await closed_with(bad))[0] == CLOSE_INVALID_NAME
            await server.wait_until(lambda: server.client_count == 0)
            found = await scrape(path)
            assert found[("collab_clients", ())] == 0
            closes = {
                labels[0][1]: value
                for (name, labels), value in found.items()
                if name == "collab_client_closes_total"
            }
            assert closes == {str(CLOSE_NORMAL): 3, str(CLOSE_INVALID_NAME): 1}
