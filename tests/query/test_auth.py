"""API keys: 401 without or with an unknown key, 403 without the permission, checked first."""

from __future__ import annotations

import pytest
from query_testing import KNOWN_PID, exporter_entries, make_config

from query.auth import key_hash, new_key

READER = new_key()
NODE_READER = new_key()
BOTH = new_key()
ROUTE = "/node/{hostname}/process/{pid}"


@pytest.fixture
def client(fake_exporters, make_client):
    keys = [
        {"name": "reader", "sha256": key_hash(READER), "permissions": ["process:read"]},
        {"name": "nodes", "sha256": key_hash(NODE_READER).upper(), "permissions": ["node:read"]},
        {"name": "both", "sha256": key_hash(BOTH), "permissions": ["process:read", "node:read"]},
    ]
    config = make_config(exporter_entries(fake_exporters, "ok"),
                         auth={"enabled": True, "api_keys": keys})
    return make_client(config)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _assert_401(result, error: str) -> None:
    assert result.status_code == 401
    assert result.headers["WWW-Authenticate"].startswith("Bearer")
    assert result.json["error"] == error and result.json["code"] == 401
    assert result.json["details"]


@pytest.mark.parametrize("headers", [
    {"Authorization": f"Bearer {READER}"},
    {"X-API-Key": READER},
    {"Authorization": f"bearer  {READER} "},
    {"Authorization": f"Bearer {READER}", "X-API-Key": READER},  # the same key twice is fine
    {"Authorization": f"Bearer {BOTH}"},
])
def test_valid_key_with_permission(client, headers) -> None:
    result = client.simulate_get(f"/node/ok/process/{KNOWN_PID}", headers=headers)
    assert result.status_code == 200, result.json


@pytest.mark.parametrize("headers, error", [
    ({}, "API key required"),
    ({"Authorization": ""}, "API key required"),
    ({"Authorization": "Bearer"}, "API key required"),
    ({"Authorization": f"Basic {READER}"}, "API key required"),
    ({"X-API-Key": ""}, "API key required"),
    ({"Authorization": "Bearer pfq_not-a-real-key"}, "invalid API key"),
    ({"X-API-Key": READER[:-1]}, "invalid API key"),
    ({"X-API-Key": key_hash(READER)}, "invalid API key"),  # the hash is not the key
    ({"Authorization": f"Bearer {READER}", "X-API-Key": BOTH}, "API key required"),
])
def test_missing_or_unknown_key_is_401(client, headers, error, check_doc) -> None:
    result = client.simulate_get(f"/node/ok/process/{KNOWN_PID}", headers=headers)
    _assert_401(result, error)
    check_doc(ROUTE, result)


def test_both_headers_with_different_keys_say_so(client) -> None:
    result = client.simulate_get(f"/node/ok/process/{KNOWN_PID}",
                                 headers={"Authorization": f"Bearer {READER}",
                                          "X-API-Key": BOTH})
    assert "different keys" in result.json["details"]


def test_key_without_permission_is_403_without_listing_its_permissions(client, check_doc
                                                                       ) -> None:
    result = client.simulate_get(f"/node/ok/process/{KNOWN_PID}", headers=_bearer(NODE_READER))
    assert result.status_code == 403
    assert result.json["error"] == "forbidden" and result.json["code"] == 403
    assert "process:read" in result.json["details"]  # what is needed ...
    assert "node:read" not in result.json["details"]  # ... never what the key has
    check_doc(ROUTE, result)
    nodes = client.simulate_get("/node", headers=_bearer(READER))
    assert nodes.status_code == 403
    assert "process:read" not in nodes.json["details"]
    check_doc("/node", nodes)


def test_node_needs_node_read(client, check_doc) -> None:
    result = client.simulate_get("/node", headers={"X-API-Key": NODE_READER})
    assert result.status_code == 200
    check_doc("/node", result)


@pytest.mark.parametrize("path", [
    "/node/ok/process/abc",  # bad pid
    "/node/_bogus/process/1",  # bad target
    "/node/nosuchhost/process/1",  # target not found
    "/node/ok/process?sort=bogus",
    "/node?target=_bad",
    "/no/such/route",
])
def test_auth_comes_before_anything_else(client, path) -> None:
    route, _, query = path.partition("?")
    _assert_401(client.simulate_get(route, query_string=query), "API key required")
    result = client.simulate_get(route, query_string=query, headers=_bearer(NODE_READER))
    if route.startswith("/node/"):
        assert result.status_code == 403
    assert client.simulate_post(route, query_string=query).status_code == 401


@pytest.mark.parametrize("path", ["/healthz", "/openapi.json"])  # /metrics: test_metrics_auth
def test_public_endpoints(client, path) -> None:
    assert client.simulate_get(path).status_code == 200


def test_key_names_are_logged_never_keys(client, caplog) -> None:
    caplog.set_level("INFO")
    client.simulate_get(f"/node/ok/process/{KNOWN_PID}", headers=_bearer(READER))
    client.simulate_get(f"/node/ok/process/{KNOWN_PID}", headers=_bearer("pfq_wrong"))
    logged = [r for r in caplog.records if r.name == "query.app"]
    assert logged[0].fields["key"] == "reader"
    text = caplog.text + " ".join(str(r.__dict__) for r in caplog.records)
    assert READER not in text and "pfq_wrong" not in text
