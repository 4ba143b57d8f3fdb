"""GET /metrics names every exporter: behind node:read with auth on, unless
`auth.protect_metrics: false` (the exporter's key of the same name and meaning)."""

from __future__ import annotations

import pytest
from query_testing import KNOWN_PID, exporter_entries, make_config

from query.auth import key_hash

NODE_KEY = "metrics-test-node-key"
PROCESS_KEY = "metrics-test-process-key"
KEYS = [{"name": "nodes", "sha256": key_hash(NODE_KEY), "permissions": ["node:read"]},
        {"name": "lookups", "sha256": key_hash(PROCESS_KEY), "permissions": ["process:read"]}]


def _client(fake_exporters, make_client, **auth):
    config = make_config(exporter_entries(fake_exporters, "ok", "refused"),
                         auth={"enabled": True, "api_keys": KEYS, **auth})
    client = make_client(config)
    # A failure by exporter, so the exposition names one: what the protection is for.
    client.simulate_get(f"/node/_all/process/{KNOWN_PID}", headers={"X-API-Key": PROCESS_KEY})
    return client


def test_metrics_need_node_read_by_default(fake_exporters, make_client, check_doc) -> None:
    client = _client(fake_exporters, make_client)
    anonymous = client.simulate_get("/metrics")
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    assert "refused" not in anonymous.text
    check_doc("/metrics", anonymous)
    wrong = client.simulate_get("/metrics", headers={"X-API-Key": "not-a-key"})
    assert wrong.status_code == 401
    forbidden = client.simulate_get("/metrics", headers={"X-API-Key": PROCESS_KEY})
    assert forbidden.status_code == 403
    assert "node:read" in forbidden.json["details"] and "refused" not in forbidden.text
    check_doc("/metrics", forbidden)
    allowed = client.simulate_get("/metrics", headers={"Authorization": f"Bearer {NODE_KEY}"})
    assert allowed.status_code == 200
    check_doc("/metrics", allowed)
    assert 'procfleet_query_exporter_failures_total{exporter="refused"' in allowed.text


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": PROCESS_KEY}])
def test_protect_metrics_false_leaves_metrics_open(fake_exporters, make_client, check_doc,
                                                   headers) -> None:
    client = _client(fake_exporters, make_client, protect_metrics=False)
    result = client.simulate_get("/metrics", headers=headers)
    assert result.status_code == 200
    check_doc("/metrics", result)
    assert 'exporter="refused"' in result.text
    # Only /metrics opens: /node keeps its permission.
    assert client.simulate_get("/node").status_code == 401


def test_metrics_open_when_auth_is_off(fake_exporters, make_client) -> None:
    config = make_config(exporter_entries(fake_exporters, "ok"))  # auth off, protect default
    assert config.auth.protect_metrics
    assert make_client(config).simulate_get("/metrics").status_code == 200
