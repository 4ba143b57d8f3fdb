"""Discovery with a real Prometheus, both ways.

In: the query service, configured with `prometheus: {url, job}`, learns the exporters of a
real Prometheus's `procfleet` job (real exporters, started as users start them) and resolves
`_all` and `group:` selectors to them for a real child's pid.
Out: the same Prometheus, with `http_sd_configs` pointed at the query service's `GET /sd`
(authorised with a node:read key), scrapes those exporters with their hostname label.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from integration_testing import (
    PROMETHEUS,
    PROMTOOL,
    REPO,
    SCRAPE_INTERVAL,
    VENV_BIN,
    Exporter,
    PrometheusAPI,
    QueryService,
    keygen,
    spawn_child,
    wait_until,
)

import query.config
from procfleet.testing import free_port, running, terminate

JOB = "procfleet"
SD_JOB = "procfleet-via-query-sd"
GROUPS = ("sd.web", "sd.db")  # the group label of exporters[0] and exporters[1]


@dataclass(frozen=True)
class Stack:
    prometheus: PrometheusAPI
    query: QueryService


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, exporters: list[Exporter],
          exporter_token: str) -> Iterator[Stack]:
    """Prometheus scraping the exporters (job procfleet, static targets with hostname and
    group labels) and the query service from /sd; the query service discovering from it."""
    tmp = tmp_path_factory.mktemp("discovery")
    key, key_entry = keygen("sd-lookups", "process:read")
    node_key, node_entry = keygen("sd-prometheus", "node:read")
    token_file = tmp / "procfleet.token"
    token_file.write_text(exporter_token + "\n")
    token_file.chmod(0o600)
    prometheus_port, query_port = free_port(), free_port()
    query_url = f"http://127.0.0.1:{query_port}"
    scrape_auth = {"type": "Bearer", "credentials_file": str(token_file)}
    prometheus_config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL,
                   "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [
            {"job_name": JOB, "authorization": scrape_auth,
             "static_configs": [{"targets": [e.instance],
                                 "labels": {"hostname": e.hostname, "group": group}}
                                for e, group in zip(exporters, GROUPS, strict=True)]},
            {"job_name": SD_JOB, "authorization": dict(scrape_auth),
             # `type: Bearer` spelled out: 2.42's http_sd sends the bare key without it.
             "http_sd_configs": [{"url": f"{query_url}/sd", "refresh_interval": "1s",
                                  "authorization": {"type": "Bearer",
                                                    "credentials": node_key}}]},
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config))
    prometheus_url = f"http://127.0.0.1:{prometheus_port}"
    query_config = {
        "timeouts": {"exporter": 2.0, "request": 5.0},
        "exporter_token": exporter_token,
        "auth": {"enabled": True, "api_keys": [key_entry, node_entry]},
        # The fleet-wide token goes to static exporters only; this job's get it as its own.
        "prometheus": {"url": prometheus_url, "job": JOB, "refresh_interval": 1,
                       "timeout": 5, "token": exporter_token},
    }
    (tmp / "query.yml").write_text(yaml.safe_dump(query_config))
    with ExitStack() as started:
        started.enter_context(running(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:"
             f"{prometheus_port}", "--log.level=warn", "--storage.tsdb.retention.time=1h"],
            ready_url=f"{prometheus_url}/-/ready", log=tmp / "prometheus.log", timeout=30))
        started.enter_context(running(
            [str(VENV_BIN / "python"), "-m", "query", "--config", str(tmp / "query.yml"),
             "--listen", f"127.0.0.1:{query_port}"],
            ready_url=f"{query_url}/healthz", log=tmp / "query.log"))
        yield Stack(PrometheusAPI(prometheus_url),
                    QueryService(query_url, key, node_key, f"127.0.0.1:{query_port}"))


def get(stack: Stack, path: str, key: str) -> requests.Response:
    with requests.Session() as session:
        return session.get(f"{stack.query.url}{path}", timeout=10,
                           headers={"Authorization": f"Bearer {key}"})


def known(stack: Stack) -> dict[str, dict]:
    """GET /node as {hostname: node}, once the query service has every exporter."""
    def nodes() -> dict[str, dict] | None:
        body = get(stack, "/node", stack.query.node_key).json()
        found = {n["hostname"]: n for n in body["exporters"]}
        return found if len(found) == 2 else None

    return wait_until(nodes, timeout=20, what="the query service to learn both exporters")


def test_the_query_service_knows_what_prometheus_scrapes(stack: Stack,
                                                         exporters: list[Exporter]) -> None:
    nodes = known(stack)
    assert set(nodes) == {e.hostname for e in exporters}
    for exporter, group in zip(exporters, GROUPS, strict=True):
        node = nodes[exporter.hostname]
        assert node["url"] == exporter.url
        assert node["source"] == "prometheus"
        assert node["labels"] == {"instance": exporter.instance, "job": JOB, "group": group}


def test_all_and_group_selectors_find_a_real_child(stack: Stack, exporters: list[Exporter]
                                                   ) -> None:
    known(stack)
    child = spawn_child("sdlookup")
    try:
        everyone = sorted(e.hostname for e in exporters)
        for target, expected in [("_all", everyone), ("group:sd", everyone),
                                 ("group:sd.db", [exporters[1].hostname]),
                                 (exporters[0].hostname, [exporters[0].hostname])]:
            response = get(stack, f"/node/{target}/process/{child.pid}", stack.query.key)
            assert response.status_code == 200, (target, response.text)
            results = response.json()["results"]
            assert [r["hostname"] for r in results] == expected, target
            assert all(r["status"] == "ok" and r["process"]["pid"] == child.pid
                       for r in results), results
    finally:
        terminate(child, grace=5)
    gone = get(stack, f"/node/{exporters[0].hostname}/process/{child.pid}", stack.query.key)
    assert gone.status_code == 404 and gone.json()["error"] == "process not found"


def test_prometheus_scrapes_the_exporters_that_sd_serves(stack: Stack,
                                                         exporters: list[Exporter]) -> None:
    known(stack)
    assert get(stack, "/sd", stack.query.key).status_code == 403  # process:read only
    served = get(stack, "/sd", stack.query.node_key)
    assert served.headers["Content-Type"] == "application/json"
    assert sorted(served.json(), key=lambda g: g["labels"]["hostname"]) == [
        {"targets": [e.instance], "labels": {"hostname": e.hostname, "group": group}}
        for e, group in zip(exporters, GROUPS, strict=True)]

    def sd_targets_up() -> dict[str, dict] | None:
        targets = {t["labels"]["instance"]: t for t in stack.prometheus.targets()
                   if t["scrapePool"] == SD_JOB}
        up = len(targets) == 2 and all(t["health"] == "up" for t in targets.values())
        return targets if up else None

    targets = wait_until(sd_targets_up, timeout=30,
                         what=f"Prometheus to scrape the {SD_JOB} targets from /sd")
    for exporter, group in zip(exporters, GROUPS, strict=True):
        labels = targets[exporter.instance]["labels"]
        assert (labels["hostname"], labels["group"], labels["job"]) == (
            exporter.hostname, group, SD_JOB)
    wait_until(lambda: stack.prometheus.values(f'up{{job="{SD_JOB}"}}') ==
               {e.instance: 1.0 for e in exporters}, timeout=20,
               what=f"up == 1 for every {SD_JOB} target")
    hostnames = stack.prometheus.label_values("hostname", f'up{{job="{SD_JOB}"}}')
    assert sorted(hostnames) == sorted(e.hostname for e in exporters)


def test_prometheus_reloads_are_counted(stack: Stack) -> None:
    known(stack)
    with requests.Session() as session:
        text = session.get(f"{stack.query.url}/metrics", timeout=10,
                           headers={"X-API-Key": stack.query.node_key}).text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines()
                 if line.startswith("procfleet_query_discovery_"))
    assert float(lines['procfleet_query_discovery_reloads_total{result="success",'
                       'source="prometheus"}']) >= 1
    assert float(lines['procfleet_query_discovery_last_reload_success_timestamp_seconds{'
                       'source="prometheus"}']) > 1e9


def test_discovery_doc_snippets_load_and_pass_promtool(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    text = readme.split("### Discovery", 1)[1].split("\n## ", 1)[0]
    query_block, prometheus_block = re.findall(r"^```yaml\n(.*?)^```", text, re.S | re.M)
    config = query.config.parse(dict(yaml.safe_load(query_block), auth={"enabled": False}))
    assert config.prometheus is not None and config.prometheus.job == JOB
    for name in ("procfleet.token", "procfleet-query.key"):
        (tmp_path / name).write_text("a-secret\n")
    path = tmp_path / "prometheus.yml"
    path.write_text(prometheus_block.replace("/etc/prometheus/", f"{tmp_path}/"))
    result = subprocess.run([PROMTOOL, "check", "config", str(path)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_query_unit_reloads_with_sighup_and_the_shipped_config_loads() -> None:
    unit = (REPO / "config" / "systemd" / "procfleet-query.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit.splitlines()
    shipped = yaml.safe_load((REPO / "config" / "query.yml").read_text())
    uncommented = "\n".join(line.removeprefix("# ") for line in
                            (REPO / "config" / "query.yml").read_text().splitlines()
                            if line.startswith(("# file_sd", "# prometheus:", "#   ",
                                                "# discovery:")))
    extra = yaml.safe_load(uncommented)
    config = query.config.parse({**shipped, **extra})
    assert config.file_sd and config.prometheus is not None
