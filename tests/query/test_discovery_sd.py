"""GET /sd: the known exporters in Prometheus http_sd format, behind node:read."""

from __future__ import annotations

import falcon.testing
from query_testing import make_config

from query.app import create_app
from query.auth import key_hash
from query.discovery import Discovery, Exporter
from query.fanout import Fanout
from query.sd import http_sd

NODE_KEY = "node-reader-key"
PROCESS_KEY = "process-reader-key"
EXPORTERS = [
    {"hostname": "web-01", "url": "http://10.0.0.1:9256", "labels": {"group": "web.prod"}},
    {"hostname": "db-01", "url": "https://10.0.1.21:9256/procfleet",
     "labels": {"group": "db.prod", "data-center": "eu", "9rack": "r1"}, "maintenance": True},
]


def _client(config, fanouts: list[Fanout]) -> falcon.testing.TestClient:
    fanout = Fanout.from_config(config)
    fanouts.append(fanout)
    return falcon.testing.TestClient(create_app(config, fanout=fanout))


def test_sd_serves_http_sd_groups_behind_node_read(check_doc) -> None:
    config = make_config(EXPORTERS, auth={"enabled": True, "api_keys": [
        {"name": "nodes", "sha256": key_hash(NODE_KEY), "permissions": ["node:read"]},
        {"name": "lookups", "sha256": key_hash(PROCESS_KEY), "permissions": ["process:read"]},
    ]})
    fanouts: list[Fanout] = []
    try:
        client = _client(config, fanouts)
        assert client.simulate_get("/sd").status_code == 401
        forbidden = client.simulate_get("/sd", headers={"X-API-Key": PROCESS_KEY})
        assert forbidden.status_code == 403
        check_doc("/sd", forbidden)
        result = client.simulate_get("/sd", headers={"Authorization": f"Bearer {NODE_KEY}"})
    finally:
        for fanout in fanouts:
            fanout.close()
    assert result.status_code == 200
    assert result.headers["content-type"] == "application/json"
    check_doc("/sd", result)
    assert result.json == [
        {"targets": ["10.0.1.21:9256"],
         "labels": {"group": "db.prod", "data_center": "eu", "_9rack": "r1",
                    "hostname": "db-01", "maintenance": "true", "__scheme__": "https",
                    "__metrics_path__": "/procfleet/metrics"}},
        {"targets": ["10.0.0.1:9256"], "labels": {"group": "web.prod", "hostname": "web-01"}},
    ]


def test_sd_leaves_job_and_instance_to_the_scraping_prometheus() -> None:
    exporter = Exporter("web-01", "http://10.0.0.1:9256", source="prometheus",
                        labels={"job": "procfleet", "instance": "10.0.0.1:9256", "dc": "eu"})
    assert http_sd(Discovery.of([exporter]).fleet.exporters) == [
        {"targets": ["10.0.0.1:9256"], "labels": {"dc": "eu", "hostname": "web-01"}}]


def test_sd_is_an_empty_list_with_no_exporters(make_client) -> None:
    client = make_client(make_config([]))
    result = client.simulate_get("/sd")
    assert (result.status_code, result.json) == (200, [])


def test_openapi_documents_sd_like_node(openapi_doc) -> None:
    operation = openapi_doc["paths"]["/sd"]["get"]
    assert set(operation["responses"]) == {"200", "400", "401", "403"}
    assert "node:read" in operation["description"]
    assert "security" not in operation  # the document's default: a key is needed
