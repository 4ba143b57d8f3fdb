"""The Prometheus source's reading of /api/v1/targets and its failures, against an HTTP server
on 127.0.0.1 that answers what Prometheus 2.42 answers (the real Prometheus is in
tests/integration/test_discovery_prometheus.py); failures keep the last good exporters."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from query_testing import make_config, serve_aiohttp

from procfleet.testing import free_port
from query.config import PrometheusSD
from query.discovery import Discovery, DiscoveryError
from query.sources import PrometheusSource


def target(address: str, *, job: str = "procfleet", scheme: str = "http",
           path: str = "/metrics", **labels: str) -> dict[str, Any]:
    """One active target as Prometheus 2.42 lists it."""
    return {
        "discoveredLabels": {"__address__": address, "__metrics_path__": path,
                             "__scheme__": scheme, "__scrape_interval__": "15s",
                             "__meta_filepath": "/etc/prometheus/targets/x.yml", "job": job,
                             **labels},
        "labels": {"instance": address, "job": job, **labels},
        "scrapePool": job,
        "scrapeUrl": f"{scheme}://{address}{path}",
        "globalUrl": f"{scheme}://{address}{path}",
        "lastError": "", "lastScrape": "2026-01-15T10:30:00Z", "lastScrapeDuration": 0.01,
        "health": "up", "scrapeInterval": "15s", "scrapeTimeout": "10s",
    }


def answer(*targets: dict[str, Any]) -> dict[str, Any]:
    return {"status": "success", "data": {"activeTargets": list(targets),
                                          "droppedTargets": []}}


@dataclass
class FakePrometheus:
    url: str
    status: int = 200
    body: Any = field(default_factory=lambda: answer())
    queries: list[str] = field(default_factory=list)


@pytest.fixture
def prometheus_api() -> Iterator[FakePrometheus]:
    fake = FakePrometheus("")

    async def targets(request: web.Request) -> web.Response:
        fake.queries.append(request.query_string)
        return web.Response(status=fake.status, body=json.dumps(fake.body).encode(),
                            content_type="application/json")

    with serve_aiohttp({"/api/v1/targets": targets}) as fake.url:
        yield fake


def prometheus_config(url: str, exporters: list | None = None, **settings: Any):
    return make_config(exporters or [], exporter_token="exp-token",
                       exporter_token_scope={"sources": ["static", "prometheus"]},
                       prometheus={"url": url, "job": "procfleet", **settings})


def test_targets_of_the_job_with_their_labels(prometheus_api) -> None:
    prometheus_api.body = answer(
        target("10.0.0.1:9256", hostname="web-01", group="web.prod"),
        target("10.0.0.2:9256", group="web.dev", maintenance="true"),
        target("10.0.1.1:443", scheme="https", path="/procfleet/metrics", hostname="db-01"),
        target("10.0.0.9:9100", job="node"),  # another job
        dict(target("10.0.0.3:9256"), labels={"instance": "10.0.0.3:9256", "job": "renamed"}),
    )
    discovery = Discovery.from_config(prometheus_config(prometheus_api.url))
    assert prometheus_api.queries == ["state=active"]
    fleet = discovery.fleet.by_hostname
    assert sorted(fleet) == ["10.0.0.2", "10.0.0.3", "db-01", "web-01"]
    web01 = fleet["web-01"]
    assert web01.url == "http://10.0.0.1:9256"
    assert dict(web01.labels) == {"instance": "10.0.0.1:9256", "job": "procfleet",
                                  "group": "web.prod"}
    assert web01.source == "prometheus" and web01.origin == prometheus_api.url
    assert web01.token == "exp-token"
    assert fleet["10.0.0.2"].maintenance
    assert fleet["db-01"].url == "https://10.0.1.1:443/procfleet"
    assert fleet["10.0.0.3"].labels["job"] == "renamed"  # its scrape pool is the job
    assert discovery.reload_stats()["prometheus"].successes == 1


def test_unreachable_at_start_is_no_configuration_error(prometheus_api) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    discovery = Discovery.from_config(prometheus_config(
        url, [{"hostname": "static-01", "url": "http://10.9.9.9:9256"}]))
    assert [e.hostname for e in discovery.fleet.exporters] == ["static-01"]
    assert discovery.reload_stats()["prometheus"].failures == 1


def test_failures_keep_the_last_good_targets(prometheus_api, caplog) -> None:
    prometheus_api.body = answer(target("10.0.0.1:9256", hostname="web-01"))
    discovery = Discovery.from_config(prometheus_config(prometheus_api.url))
    good = discovery.fleet
    for status, body, reason in [
        (503, {"status": "error"}, "HTTP 503"),
        (200, "<html>", "not a Prometheus targets answer"),
        (200, answer(target("10.0.0.1:9256", hostname="x"), target("10.0.0.2:9256",
                                                                   hostname="x")),
         "hostname 'x' is both http://10.0.0.1:9256 and http://10.0.0.2:9256"),
        (200, answer(target("[::1]:9256")), "give the target a hostname label"),
    ]:
        prometheus_api.status, prometheus_api.body = status, body
        assert not discovery.refresh()
        assert discovery.fleet is good
        assert reason in caplog.records[-1].fields["reason"].args[0]
    assert discovery.reload_stats()["prometheus"].failures == 4
    prometheus_api.status, prometheus_api.body = 200, answer(
        target("10.0.0.1:9256", hostname="web-01"), target("10.0.0.2:9256", hostname="web-02"))
    assert discovery.refresh()
    assert [e.hostname for e in discovery.fleet.exporters] == ["web-01", "web-02"]


def test_a_conflict_with_static_leaves_the_prometheus_targets_out(prometheus_api) -> None:
    prometheus_api.body = answer(target("10.0.0.1:9256", hostname="web-01"),
                                 target("10.0.0.2:9256", hostname="web-02"))
    discovery = Discovery.from_config(prometheus_config(
        prometheus_api.url, [{"hostname": "web-01", "url": "http://10.9.9.9:9256"}]))
    assert [(e.hostname, e.source) for e in discovery.fleet.exporters] == [("web-01", "static")]
    prometheus_api.body = answer(target("10.0.0.2:9256", hostname="web-02"))
    assert discovery.refresh()
    assert [e.hostname for e in discovery.fleet.exporters] == ["web-01", "web-02"]


def test_a_hanging_prometheus_is_cut_at_the_timeout() -> None:
    with socket.socket() as hang:  # listens, never accepts: the request is never answered
        hang.bind(("127.0.0.1", 0))
        hang.listen(8)
        url = f"http://127.0.0.1:{hang.getsockname()[1]}"
        source = PrometheusSource(PrometheusSD(url=url, job="procfleet", timeout=0.3))
        started = time.monotonic()
        with pytest.raises(DiscoveryError, match=r"timeout after 0\.3 s"):
            source.poll(force=True)
        assert time.monotonic() - started < 5.0  # a deadline, not a measurement
