"""Both services' `/` pages: public HTML that links every endpoint a browser can open, each
link a documented route, and the one query-parameter rule on `/` too."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from importlib import resources
from typing import Any
from urllib.parse import urljoin, urlsplit

import falcon.testing
import pytest

import exporter.app
import exporter.config
import query.app
import query.config
from query import openapi as query_openapi
from query.fanout import Fanout

SECRET = "pfq_landing-test-key"
CREDENTIALS = {"Authorization": f"Bearer {SECRET}"}
DIGEST = hashlib.sha256(SECRET.encode()).hexdigest()


@pytest.fixture(params=["exporter", "query"])
def service(request: pytest.FixtureRequest) -> Iterator[tuple[falcon.testing.TestClient,
                                                              dict[str, Any]]]:
    """(a client of the service with authentication on, its OpenAPI document)."""
    if request.param == "exporter":
        config = exporter.config.from_mapping({"auth": {"token_sha256": DIGEST}})
        yield (falcon.testing.TestClient(exporter.app.create_app(config)),
               json.loads(resources.files("exporter").joinpath("openapi.json").read_text()))
        return
    config = query.config.parse({
        "auth": {"enabled": True, "api_keys": [
            {"name": "landing", "sha256": DIGEST, "permissions": ["process:read",
                                                                    "node:read"]}]},
        "exporters": [{"hostname": "nowhere", "url": "http://127.0.0.1:9"}],
        "timeouts": {"exporter": 0.5, "request": 1.0}})
    with Fanout.from_config(config) as fanout:
        yield (falcon.testing.TestClient(query.app.create_app(config, fanout=fanout)),
               query_openapi.document())


def _matches(path: str, template: str) -> bool:
    pattern = re.sub(r"\\\{[a-z]+\\\}", "[^/]+", re.escape(template))
    return re.fullmatch(pattern, path) is not None


def test_landing_page_is_public_html_linking_every_plain_get(service) -> None:
    client, document = service
    page = client.simulate_get("/")  # no credentials: the page is public on both
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    links = {urlsplit(urljoin("http://host/", href)).path
             for href in re.findall(r'href="([^"]+)"', page.text)}
    gets = [path for path, item in document["paths"].items() if "get" in item]
    assert document["paths"]["/"]["get"]["security"] == []
    plain = {path for path in gets if "{" not in path} - {"/"}
    assert plain <= links, f"not linked from /: {sorted(plain - links)}"
    assert "/openapi.json" in links
    for link in links:
        assert any(_matches(link, template) for template in gets), link
        followed = client.simulate_get(link, headers=CREDENTIALS)
        # A routed path: whatever it answers, it is not the unknown-path 404.
        assert followed.status_code in (200, 404, 500), (link, followed.text)
        assert b'"error": "not found"' not in followed.content, link


def test_landing_page_takes_no_query_parameter(service) -> None:
    client, _ = service
    answer = client.simulate_get("/", params={"x": "1"})
    assert answer.status_code == 400
    assert answer.json["error"] == "invalid query parameter"
    assert "'x'" in answer.json["details"]


def test_query_landing_page_says_the_path_parameter_takes_any_target() -> None:
    config = query.config.parse({"auth": {"enabled": False}, "exporters": []})
    with Fanout.from_config(config) as fanout:
        page = falcon.testing.TestClient(query.app.create_app(config, fanout=fanout))
        text = page.simulate_get("/").text
    assert "/node/{hostname}/process/{pid}" in text
    for target in ("web-01", "_any", "_all", "group:web"):
        assert f"<code>{target}</code>" in text
