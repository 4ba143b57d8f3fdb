"""The fan-out verifies each exporter's certificate against the CA of its source: real
exporters served over TLS (--web.config.file) with certificates made at test time, asked by a
real query service, unicast (blocking client) and broadcast (asyncio client)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from tls_fixtures import TLSSet, web_config_text

from procfleet.configcheck import ConfigError
from procfleet.testing import (
    EXPORTER,
    Server,
    free_port,
    start_exporter,
    start_query,
    wait_until,
)
from query import config as query_config
from query.auth import key_hash
from query.sources import sources_for

TOKEN = "tls-exporter-token"
KEY = "pfq_fanout-tls-key"
PID = os.getpid()  # the test process: both exporters see it in /proc


@pytest.fixture(scope="module")
def exporters(tls_set: TLSSet, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[dict[str, Server]]:
    """`plain`: TLS and a token; `mtls`: TLS that requires a client certificate of the CA."""
    tmp = tmp_path_factory.mktemp("tls-exporters")
    token_config = yaml.safe_dump({"auth": {"token_sha256": hashlib.sha256(
        TOKEN.encode()).hexdigest()}})
    plain_web = tmp / "plain-web.yml"
    plain_web.write_text(web_config_text(tls_set))
    mtls_web = tmp / "mtls-web.yml"
    mtls_web.write_text(web_config_text(tls_set, extra_tls=(
        f"client_auth_type: RequireAndVerifyClientCert\nclient_ca_file: {tls_set.ca.cert}\n")))
    started: dict[str, Server] = {}
    try:
        started["plain"] = start_exporter(tmp, "--web.config.file", str(plain_web),
                                          config=token_config, ca_file=tls_set.ca.cert)
        started["mtls"] = _start_mtls(tmp, mtls_web, tls_set)
        yield started
    finally:
        for server in started.values():
            server.stop()


def _start_mtls(tmp: Path, web: Path, tls_set: TLSSet) -> Server:
    """Started by hand: readiness needs a client certificate, which Server's check lacks."""
    port = free_port()
    server = Server([EXPORTER, "--listen", f"127.0.0.1:{port}", "--web.config.file", str(web)],
                    port, tmp / f"mtls-{port}.log", ca_file=tls_set.ca.cert)
    cert = (str(tls_set.client.cert), str(tls_set.client.key))
    wait_until(lambda: requests.get(f"{server.url}/healthz", cert=cert, timeout=5,
                                    verify=str(tls_set.ca.cert)).ok,
               retry_on=(OSError,), timeout=20, what="the mTLS exporter")
    return server


def query_config_for(exporters: dict[str, Server], tls: TLSSet) -> dict[str, Any]:
    plain = f"https://127.0.0.1:{exporters['plain'].port}"
    mtls = f"https://127.0.0.1:{exporters['mtls'].port}"
    ca = {"ca_file": str(tls.ca.cert)}
    client = {**ca, "cert_file": str(tls.client.cert), "key_file": str(tls.client.key)}
    return {
        "timeouts": {"exporter": 5.0, "request": 10.0},
        "auth": {"enabled": True, "api_keys": [
            {"name": "t", "sha256": key_hash(KEY), "permissions": ["process:read"]}]},
        "exporters": [
            {"hostname": "good", "url": plain, "token": TOKEN, "tls": ca},
            {"hostname": "by-name", "url": f"https://localhost:{exporters['plain'].port}",
             "token": TOKEN, "tls": {**ca, "server_name": "localhost"}},
            {"hostname": "wrong-ca", "url": plain, "token": TOKEN,
             "tls": {"ca_file": str(tls.other_ca.cert)}},
            {"hostname": "wrong-name", "url": plain, "token": TOKEN,
             "tls": {**ca, "server_name": "elsewhere.test"}},
            {"hostname": "system-cas", "url": plain, "token": TOKEN},
            {"hostname": "mtls", "url": mtls, "tls": client},
            {"hostname": "mtls-no-cert", "url": mtls, "tls": ca},
        ],
    }


@pytest.fixture(scope="module")
def query(exporters: dict[str, Server], tls_set: TLSSet,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("tls-query")
    server = start_query(tmp, yaml.safe_dump(query_config_for(exporters, tls_set)))
    yield server
    server.stop()


def lookup(query: Server, target: str) -> requests.Response:
    return requests.get(f"{query.url}/node/{target}/process/{PID}", timeout=30,
                        headers={"X-API-Key": KEY})


@pytest.mark.parametrize("target", ["good", "by-name", "mtls"])
def test_unicast_verifies_the_exporter_with_its_sources_ca(query: Server, target: str) -> None:
    answer = lookup(query, target)
    assert answer.status_code == 200, answer.text
    [result] = answer.json()["results"]
    assert result["status"] == "ok" and result["process"]["pid"] == PID


@pytest.mark.parametrize("target, reason", [
    ("wrong-ca", "TLS certificate not trusted: unable to get local issuer certificate"),
    ("wrong-name", "TLS certificate not trusted: Hostname mismatch"),
    ("system-cas", "TLS certificate not trusted: unable to get local issuer certificate"),
    ("mtls-no-cert", "connection failed"),
])
def test_unicast_to_an_untrusted_exporter_fails_naming_why(query: Server, target: str,
                                                           reason: str) -> None:
    answer = lookup(query, target)
    assert answer.status_code == 500, answer.text
    body = answer.json()
    assert body["error"] == "exporter failed"
    assert target in body["details"] and reason in body["details"], body["details"]


def test_broadcast_gives_each_exporter_its_own_verdict(query: Server) -> None:
    answer = requests.get(f"{query.url}/node/_all/process/{PID}", timeout=30,
                          headers={"X-API-Key": KEY})
    assert answer.status_code == 200, answer.text
    results = {r["hostname"]: r for r in answer.json()["results"]}
    assert {h for h, r in results.items() if r["status"] == "ok"} == {"good", "by-name", "mtls"}
    assert "TLS certificate not trusted" in results["wrong-ca"]["error"]
    assert "Hostname mismatch" in results["wrong-name"]["error"]
    assert "TLS certificate not trusted" in results["system-cas"]["error"]
    assert results["mtls-no-cert"]["status"] == "failed"


def test_tls_keys_are_checked_at_load_with_their_paths(tls_set: TLSSet, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        query_config.parse({
            "auth": {"enabled": False},
            "exporters": [
                {"hostname": "a", "url": "http://127.0.0.1:1", "tls": {"ca_file": str(
                    tls_set.ca.cert)}},
                {"hostname": "b", "url": "https://127.0.0.1:1",
                 "tls": {"ca_file": str(tmp_path / "nope.crt"), "cert_file": str(
                     tls_set.client.cert), "verify": False}},
                {"hostname": "c", "url": "https://127.0.0.1:1",
                 "tls": {"ca_file": str(tls_set.server.key)}},
            ],
            "file_sd": [{"files": ["x.yml"], "tls": {"server_name": "not a name"}}],
            "prometheus": {"url": "http://127.0.0.1:9090", "job": "j", "tls": "yes"},
        }, source="q.yml")
    text = "\n".join(raised.value.problems)
    for expected in (
        "exporters[0].tls: is for https:// exporters",
        "exporters[1].tls.ca_file: no such file",
        "exporters[1].tls: cert_file and key_file go together",
        "exporters[1].tls.verify: unknown key",
        "exporters[2].tls: cannot use its CA or client certificate",
        "file_sd[0].tls.server_name: must be a host name",
        "prometheus.tls: must be a mapping",
    ):
        assert expected in text, f"{expected!r} missing from:\n{text}"


def test_file_sd_exporters_carry_their_entrys_tls(tls_set: TLSSet, tmp_path: Path) -> None:
    sd = tmp_path / "sd.yml"
    sd.write_text(yaml.safe_dump([{"targets": ["127.0.0.1:9443"],
                                   "labels": {"__scheme__": "https", "hostname": "sd-1"}}]))
    sd.chmod(0o644)
    config = query_config.parse({
        "auth": {"enabled": False},
        "file_sd": [{"files": [str(sd)], "tls": {"ca_file": "ca/procfleet-test-CA.crt"}}],
    }, base_dir=tls_set.dir)
    [_, file_sd] = sources_for(config)
    [exporter] = file_sd.poll(True) or []
    assert exporter.url == "https://127.0.0.1:9443"
    assert exporter.tls is not None and exporter.tls.ca_file == str(tls_set.ca.cert)
