"""Configuration: defaults, and every problem named by its key path."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from query.config import ConfigError, default_config, load, parse

KEY = {"name": "grafana", "sha256": "a" * 64, "permissions": ["process:read"]}
EXPORTER = {"hostname": "web-01", "url": "http://10.0.0.1:9256"}


def test_full_file(tmp_path) -> None:
    path = tmp_path / "query.yml"
    path.write_text(f"""
listen: 0.0.0.0:8081
threads: 4
log_level: warning
timeouts: {{exporter: 1.5, request: 3}}
fanout: {{max_in_flight: 64, max_body_bytes: 65536}}
exporter_token: global-token
auth:
  enabled: true
  api_keys:
    - {{name: grafana, sha256: "{'A' * 64}", permissions: [process:read, node:read]}}
exporters:
  - {{hostname: web-01, url: "http://10.0.0.1:9256/", labels: {{group: web.prod, rack: 12}}}}
  - {{hostname: web-02, url: "https://10.0.0.2:9256", maintenance: true, token: own}}
""")
    config = load(path)
    assert config.listen == "0.0.0.0:8081"
    assert config.threads == 4 and config.log_level == "warning"
    assert (config.timeouts.exporter, config.timeouts.request) == (1.5, 3.0)
    assert config.fanout.max_in_flight == 64 and config.fanout.max_body_bytes == 65536
    assert config.auth.enabled
    assert config.auth.api_keys[0].sha256 == "a" * 64  # normalised to lower case
    assert config.auth.api_keys[0].permissions == {"process:read", "node:read"}
    web1, web2 = config.exporters
    assert web1.url == "http://10.0.0.1:9256"  # trailing slash dropped
    assert dict(web1.labels) == {"group": "web.prod", "rack": "12"}
    assert web2.maintenance and web2.token == "own"
    assert config.exporter_token == "global-token"
    assert "global-token" not in repr(config) and "own" not in repr(web2)


def test_defaults_of_a_minimal_file() -> None:
    config = parse({"auth": {"api_keys": [KEY]}})
    assert config.listen == "127.0.0.1:8080"
    assert (config.timeouts.exporter, config.timeouts.request) == (2.0, 5.0)
    assert config.fanout.max_in_flight == 1024
    assert config.auth.enabled and config.exporters == ()
    assert config.auth.protect_metrics  # /metrics needs node:read unless said otherwise


def test_built_in_default_is_this_host_on_loopback() -> None:
    config = default_config()
    assert not config.auth.enabled
    assert config.listen.startswith("127.0.0.1:")
    (local,) = config.exporters
    assert local.url == "http://127.0.0.1:9256"
    assert local.hostname == socket.gethostname()


@pytest.mark.parametrize("data, expected", [
    ([1, 2], "the top level must be a mapping"),
    ({"auth": {"api_keys": [KEY]}, "bogus": 1}, "bogus: unknown key"),
    ({"auth": {"api_keys": [KEY]}, "file_sd": ["x"]}, "file_sd[0]: 'x' must end in .json"),
    ({"auth": {"api_keys": [KEY]}, "file_sd": [3]}, "file_sd[0]: must be a non-empty file"),
    ({"auth": {"api_keys": [KEY]}, "prometheus": {"url": "http://p:9090"}},
     "prometheus.job: is required"),
    ({"auth": {"api_keys": [KEY]}, "prometheus": {"url": "ftp://p", "job": "j"}},
     "prometheus.url: must be an http:// or https:// URL"),
    ({"auth": {"api_keys": [KEY]}, "prometheus": {"url": "http://p", "job": "j", "timeout": 0}},
     "prometheus.timeout: must be > 0"),
    ({"auth": {"api_keys": [KEY]}, "discovery": {"refresh_interval": "5s"}},
     "discovery.refresh_interval: must be an integer or a number"),
    ({"auth": {"api_keys": [KEY]}, "discovery": {"every": 5}}, "discovery.every: unknown key"),
    ({"auth": {"api_keys": [KEY]}, "discovery": {"allow_insecure_files": "yes"}},
     "discovery.allow_insecure_files: must be a boolean"),
    ({"auth": {"api_keys": [KEY]}, "file_sd": [{"token": "t"}]},
     "file_sd[0].files: is required"),
    ({"auth": {"api_keys": [KEY]}, "file_sd": [{"files": ["a.yml", "b"], "token": "t"}]},
     "file_sd[0].files[1]: 'b' must end in .json"),
    ({"auth": {"api_keys": [KEY]}, "file_sd": [{"files": "a.yml", "token": "t u"}]},
     "file_sd[0].token: must be a non-empty string without spaces"),
    ({"auth": {"api_keys": [KEY]}, "file_sd": [{"files": "a.yml", "tokn": "t"}]},
     "file_sd[0].tokn: unknown key"),
    ({"auth": {"api_keys": [KEY]}, "file_sd": ["/a.yml", {"files": "/a.yml", "token": "t"}]},
     "file_sd[1].files[0]: '/a.yml' is already file_sd[0]"),
    ({"auth": {"api_keys": [KEY]}, "prometheus": {"url": "http://p", "job": "j", "token": ""}},
     "prometheus.token: must be a non-empty string"),
    ({"auth": {"api_keys": [KEY]}, "exporter_token_scope": {"sources": ["consul"]}},
     "exporter_token_scope.sources[0]: unknown source 'consul'"),
    ({"auth": {"api_keys": [KEY]}, "exporter_token_scope": {"sources": "static"}},
     "exporter_token_scope.sources: must be a list"),
    ({"auth": {"api_keys": [KEY]}, "exporter_token_scope": {"who": 1}},
     "exporter_token_scope.who: unknown key"),
    ({"auth": {"api_keys": [KEY]}, "exporter_token_scope": {"urls": ["ftp://x"]}},
     "exporter_token_scope.urls[0]: must be scheme://host[:port]"),
    ({"auth": {"api_keys": [KEY]}, "exporter_token_scope": {"urls": ["http://x/y"]}},
     "exporter_token_scope.urls[0]: must be scheme://host[:port]"),
    ({"auth": {"api_keys": [KEY]}, "exporter_token_scope": {"urls": ["http://u@x"]}},
     "exporter_token_scope.urls[0]: must be scheme://host[:port]"),
    ({"auth": {"api_keys": [KEY]}, "exporter_token_scope": {"urls": ["http://x:99999"]}},
     "exporter_token_scope.urls[0]: port must be 1 to 65535"),
    ({"auth": {"api_keys": [KEY]}, "listen": "8080"}, "listen: listen address must be HOST:PORT"),
    ({"auth": {"api_keys": [KEY]}, "threads": 0}, "threads: must be 1 to 1024"),
    ({"auth": {"api_keys": [KEY]}, "log_level": "loud"}, "log_level: must be one of"),
    ({"auth": {"api_keys": [KEY]}, "timeouts": {"exporter": 0}}, "timeouts.exporter: must be > 0"),
    ({"auth": {"api_keys": [KEY]}, "timeouts": {"request": "5s"}},
     "timeouts.request: must be an integer or a number, got str"),
    ({"auth": {"api_keys": [KEY]}, "timeouts": {"exporter": 6}},
     "timeouts.exporter: must not exceed timeouts.request"),
    ({"auth": {"api_keys": [KEY]}, "timeouts": {"connect": 1}}, "timeouts.connect: unknown key"),
    ({"auth": {"api_keys": [KEY]}, "fanout": {"max_in_flight": 0}},
     "fanout.max_in_flight: must be at least 1"),
    ({"auth": {"api_keys": [KEY]}, "fanout": {"max_buffered_bytes": 1048576}},
     "fanout.max_buffered_bytes: must be at least the largest answer allowed "
     "(max_body_bytes, max_list_body_bytes: 16777216), got 1048576"),
    ({}, "auth.api_keys: must list at least one key when auth.enabled is true"),
    ({"auth": {"enabled": "no"}}, "auth.enabled: must be a boolean, got str"),
    ({"auth": {"api_keys": [KEY], "protect_metrics": "no"}},
     "auth.protect_metrics: must be a boolean, got str"),
    ({"auth": {"api_keys": [KEY, "x"]}}, "auth.api_keys[1]: must be a mapping"),
    ({"auth": {"api_keys": [{**KEY, "sha256": "abc"}]}},
     "auth.api_keys[0].sha256: must be 64 hexadecimal digits"),
    ({"auth": {"api_keys": [{**KEY, "sha256": None}]}}, "auth.api_keys[0].sha256: is required"),
    ({"auth": {"api_keys": [{**KEY, "name": ""}]}}, "auth.api_keys[0].name: is required"),
    ({"auth": {"api_keys": [KEY, {**KEY, "sha256": "b" * 64}]}},
     "auth.api_keys[1].name: duplicate of auth.api_keys[0].name"),
    ({"auth": {"api_keys": [KEY, {**KEY, "name": "other"}]}},
     "auth.api_keys[1].sha256: same key as auth.api_keys[0]"),
    ({"auth": {"api_keys": [{**KEY, "permissions": ["process:write"]}]}},
     "auth.api_keys[0].permissions[0]: unknown permission 'process:write'"),
    ({"auth": {"api_keys": [{**KEY, "permissions": []}]}},
     "auth.api_keys[0].permissions: must not be empty"),
    ({"auth": {"api_keys": [{"name": "x", "sha256": "c" * 64}]}},
     "auth.api_keys[0].permissions: is required"),
    ({"auth": {"api_keys": [{**KEY, "key": "plain"}]}}, "auth.api_keys[0].key: unknown key"),
    ({"auth": {"enabled": False}, "exporters": {"web-01": {}}}, "exporters: must be a list"),
    ({"auth": {"enabled": False}, "exporters": [EXPORTER, "web-02"]},
     "exporters[1]: must be a mapping"),
    ({"auth": {"enabled": False}, "exporters": [{"url": "http://x:1"}]},
     "exporters[0].hostname: is required"),
    ({"auth": {"enabled": False}, "exporters": [{**EXPORTER, "hostname": "_all"}]},
     "exporters[0].hostname: must start with a letter or digit ('_' begins target keywords)"),
    ({"auth": {"enabled": False}, "exporters": [{**EXPORTER, "hostname": "web 01"}]},
     "exporters[0].hostname: must be letters, digits, '.', '-' and '_'"),
    # One hostname grammar for both services (procfleet.hostnames): these were valid here.
    ({"auth": {"enabled": False}, "exporters": [{**EXPORTER, "hostname": "-web"}]},
     "exporters[0].hostname: must start with a letter or digit, got '-web'"),
    ({"auth": {"enabled": False}, "exporters": [{**EXPORTER, "hostname": ".web"}]},
     "exporters[0].hostname: must start with a letter or digit, got '.web'"),
    ({"auth": {"enabled": False}, "exporters": [{**EXPORTER, "hostname": "a" * 254}]},
     "exporters[0].hostname: must be at most 253 characters, got 254"),
    ({"auth": {"enabled": False}, "exporters": [EXPORTER, EXPORTER]},
     "exporters[1].hostname: 'web-01' is already exporters[0]"),
    ({"auth": {"enabled": False}, "exporters": [{"hostname": "a"}]},
     "exporters[0].url: is required"),
    ({"auth": {"enabled": False}, "exporters": [{**EXPORTER, "url": "ftp://x"}]},
     "exporters[0].url: must be an http:// or https:// URL"),
    ({"auth": {"enabled": False}, "exporters": [{**EXPORTER, "url": "http://x:99999"}]},
     "exporters[0].url: 'http://x:99999' is not a URL"),
    ({"auth": {"enabled": False}, "exporters": [{**EXPORTER, "url": "http://u:p@x:1"}]},
     "exporters[0].url: must not hold credentials"),
    ({"auth": {"enabled": False}, "exporters": [{**EXPORTER, "labels": ["a"]}]},
     "exporters[0].labels: must be a mapping"),
    ({"auth": {"enabled": False}, "exporters": [{**EXPORTER, "labels": {"group": "web prod"}}]},
     "exporters[0].labels.group: invalid label value 'web prod'"),
    ({"auth": {"enabled": False}, "exporters": [{**EXPORTER, "labels": {"gr:p": "web"}}]},
     "exporters[0].labels.gr:p: invalid label key"),
    ({"auth": {"enabled": False}, "exporters": [{**EXPORTER, "labels": {"a": {"b": 1}}}]},
     "exporters[0].labels.a: must be a string, got dict"),
    ({"auth": {"enabled": False}, "exporters": [{**EXPORTER, "maintenance": "yes"}]},
     "exporters[0].maintenance: must be a boolean"),
    ({"auth": {"enabled": False}, "exporters": [{**EXPORTER, "token": "has space"}]},
     "exporters[0].token: must be a non-empty string"),
    ({"auth": {"enabled": False}, "exporters": [{**EXPORTER, "tags": {}}]},
     "exporters[0].tags: unknown key"),
])
def test_problems_are_named_by_key_path(data: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(data, source="q.yml")
    assert any(p.startswith(expected) for p in caught.value.problems), caught.value.problems
    assert str(caught.value).startswith("invalid configuration in q.yml:")


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        parse({"listen": 1, "timeouts": {"exporter": -1}, "auth": {"api_keys": ["x"]},
               "exporters": [{"hostname": "_x", "url": "nope"}]})
    assert len(caught.value.problems) == 5, caught.value.problems


def test_unreadable_and_invalid_yaml(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read file"):
        load(tmp_path / "missing.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("exporters: [\n")
    with pytest.raises(ConfigError, match="YAML syntax error"):
        load(bad)


@pytest.mark.parametrize("name", ["query.yml", "query-fleet-example.yml"])
def test_shipped_config_files_load(name: str, tmp_path: Path) -> None:
    # Installed as the deployment guide says: readable by the owner only (one holds a token).
    path = tmp_path / name
    path.write_bytes((Path(__file__).resolve().parents[2] / "config" / name).read_bytes())
    path.chmod(0o600)
    config = load(path)
    assert config.auth.enabled and config.exporters


@pytest.mark.parametrize(("pattern", "url", "matches"), [
    ("https://*.prod.example.net", "https://web-01.prod.example.net", True),
    ("https://*.prod.example.net", "https://web-01.prod.example.net:443/procfleet", True),
    ("https://*.prod.example.net", "http://web-01.prod.example.net:443", False),
    ("https://*.prod.example.net", "https://web-01.prod.example.net:9256", False),
    ("https://*.prod.example.net:9256", "https://WEB-01.Prod.Example.Net:9256", True),
    ("https://*.prod.example.net", "https://prod.example.net", False),
    ("https://*.prod.example.net", "https://evil.net/x.prod.example.net", False),
    ("http://*.example.net:9256", "http://evil.com:80/a.example.net:9256", False),
    ("http://10.0.*:9256", "http://10.0.3.17:9256", True),
])
def test_token_scope_url_patterns_match_origins_only(pattern: str, url: str, matches: bool
                                                     ) -> None:
    config = parse({"auth": {"enabled": False}, "exporter_token": "t",
                    "exporter_token_scope": {"urls": [pattern]}})
    assert config.exporter_token_scope.covers("static", url) is matches
    assert (config.exporter_token_for("static", url) == "t") is matches
    assert config.exporter_token_for("file_sd", url) is None  # not a source in scope
    assert config.exporter_token_for("file_sd", url, "own") == "own"
