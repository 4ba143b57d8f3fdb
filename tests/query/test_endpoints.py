"""GET /node, /healthz, /metrics, /openapi.json, and the document in step with the routes."""

from __future__ import annotations

import uuid
from datetime import datetime

import falcon
import pytest
from query_testing import KNOWN_PID, exporter_entries, make_config

from query.app import create_app
from query.fanout import Fanout


@pytest.fixture
def client(fake_exporters, make_client):
    entries = exporter_entries(fake_exporters, "ok", "refused")
    entries.append({"hostname": "resting", "url": fake_exporters.url("ok"),
                    "labels": {"group": "web.prod", "rack": "r1"}, "maintenance": True,
                    "token": "sekrit"})
    return make_client(make_config(entries))


def test_node_lists_exporters_with_labels_and_last_seen_health(client, check_doc) -> None:
    before = client.simulate_get("/node")
    assert before.status_code == 200
    check_doc("/node", before)
    assert [n["hostname"] for n in before.json["exporters"]] == ["ok", "refused", "resting"]
    assert all(n["health"] == {"status": "unknown"} for n in before.json["exporters"])
    resting = before.json["exporters"][2]
    assert resting["labels"] == {"group": "web.prod", "rack": "r1"}
    assert resting["maintenance"] is True and resting["source"] == "static"
    assert "sekrit" not in before.text

    client.simulate_get(f"/node/_all/process/{KNOWN_PID}")
    after = client.simulate_get("/node")
    check_doc("/node", after)
    health = {n["hostname"]: n["health"] for n in after.json["exporters"]}
    assert health["ok"]["status"] == "up"
    datetime.strptime(health["ok"]["last_seen"], "%Y-%m-%dT%H:%M:%SZ")
    assert health["refused"]["status"] == "down"
    assert health["refused"]["last_error"] == "connection refused"
    assert "last_seen" not in health["refused"]
    assert health["resting"] == {"status": "unknown"}  # maintenance: never called


def test_node_filtered_by_target(client) -> None:
    result = client.simulate_get("/node", params={"target": "group:web"})
    assert [n["hostname"] for n in result.json["exporters"]] == ["resting"]
    assert client.simulate_get("/node", params={"target": "_x"}).status_code == 400


def test_healthz(client, check_doc) -> None:
    result = client.simulate_get("/healthz")
    assert result.json == {"status": "ok", "version": "0.1.0", "exporters": 3}
    uuid.UUID(result.headers["X-Request-Id"])
    check_doc("/healthz", result)


def test_metrics_count_requests_by_route_and_code_and_failures_by_kind(client, check_doc
                                                                       ) -> None:
    client.simulate_get(f"/node/_all/process/{KNOWN_PID}")
    client.simulate_get("/node/ok/process/abc")
    result = client.simulate_get("/metrics")
    assert result.status_code == 200
    check_doc("/metrics", result)
    text = result.text
    assert ('procfleet_query_request_duration_seconds_count{code="200",'
            'route="/node/{hostname}/process/{pid}"} 1.0') in text
    assert ('procfleet_query_request_duration_seconds_count{code="400",'
            'route="/node/{hostname}/process/{pid}"} 1.0') in text
    assert ('procfleet_query_exporter_failures_total{exporter="refused",kind="unreachable"} 1.0'
            in text)
    assert "procfleet_query_exporters 3.0" in text
    assert 'procfleet_query_build_info{version="0.1.0"} 1.0' in text


def _routes(app: falcon.App) -> set[tuple[str, str]]:
    """(template, METHOD) for every responder a resource defines, walking falcon's router."""
    found = set()
    stack = list(app._router._roots)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.resource is not None:
            for method in falcon.COMBINED_METHODS:
                if hasattr(node.resource, f"on_{method.lower()}"):
                    found.add((node.uri_template, method))
    return found


def test_openapi_document_and_routes_agree(openapi_doc) -> None:
    config = make_config([])
    with Fanout.from_config(config) as fanout:
        app = create_app(config, fanout=fanout)
        documented = {(path, method.upper()) for path, item in openapi_doc["paths"].items()
                      for method in item}
        assert _routes(app) == documented
        served = falcon.testing.TestClient(app).simulate_get("/openapi.json")
    assert served.json == openapi_doc
    assert openapi_doc["openapi"].startswith("3.")


def test_every_operation_documents_its_error_codes(openapi_doc) -> None:
    for template in ("/node/{hostname}/process/{pid}", "/node/{hostname}/process"):
        responses = openapi_doc["paths"][template]["get"]["responses"]
        assert set(responses) == {"200", "400", "401", "403", "404", "500"}
    assert set(openapi_doc["paths"]["/node"]["get"]["responses"]) == {"200", "400", "401",
                                                                       "403"}
    for public in ("/healthz", "/openapi.json"):
        assert openapi_doc["paths"][public]["get"]["security"] == []
    # open or node:read, as auth.protect_metrics says
    assert openapi_doc["paths"]["/metrics"]["get"]["security"][0] == {}


def test_every_ref_resolves(openapi_doc) -> None:
    def refs(node):
        if isinstance(node, dict):
            if "$ref" in node:
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in refs(openapi_doc):
        node = openapi_doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
