"""Session fixtures: tagged children, two real exporters, and a real Prometheus scraping them.

Everything is started once per session (Prometheus needs a few scrapes before rates exist)
and stopped in teardown. The exporters run with a bearer token, so Prometheus scrapes them
through the `authorization: credentials_file` lines of config/prometheus.yml.
"""

from __future__ import annotations

import hashlib
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml
from integration_testing import (
    IDLE_CHILDREN,
    PROMETHEUS,
    PROMETHEUS_CONFIG,
    SCRAPE_INTERVAL,
    VENV_BIN,
    Exporter,
    Groups,
    PrometheusAPI,
    QueryService,
    keygen,
    spawn_child,
    wait_until,
)

from procfleet.testing import free_port, running, terminate


@pytest.fixture(scope="session")
def groups() -> Groups:
    # Unique per session so that concurrent runs on one machine do not count each other.
    suffix = secrets.token_hex(4)
    return Groups(idle=f"idle{suffix}", busy=f"busy{suffix}")


@pytest.fixture(scope="session")
def tagged_children(groups: Groups) -> Iterator[dict[str, list[subprocess.Popen[bytes]]]]:
    """IDLE_CHILDREN sleeping children and one busy one, visible in /proc before yielding."""
    spawned: dict[str, list[subprocess.Popen[bytes]]] = {"idle": [], "busy": []}
    try:
        for _ in range(IDLE_CHILDREN):
            spawned["idle"].append(spawn_child(groups.idle))
        spawned["busy"].append(spawn_child(groups.busy, busy=True))
        yield spawned
    finally:
        for children in spawned.values():
            for child in children:
                terminate(child, grace=5)


@pytest.fixture(scope="session")
def exporter_token() -> str:
    return secrets.token_urlsafe(24)


def exporter_config(token: str, *, per_process: bool) -> dict:
    """process-exporter style groups: tagged children by tag, everything else by comm."""
    config: dict = {
        "groups": [
            {"name": "{{.Matches.tag}}", "cmdline": ["procfleet-itest-(?P<tag>[a-z0-9]+)"]},
            {"name": "{{.Comm}}", "cmdline": [".+"]},
        ],
        "auth": {"token_sha256": hashlib.sha256(token.encode()).hexdigest()},
    }
    if per_process:
        config["metrics"] = {"per_process_top_n": 5, "per_process_by": "cpu"}
    return config


@pytest.fixture(scope="session")
def exporters(tmp_path_factory: pytest.TempPathFactory, exporter_token: str,
              tagged_children: dict) -> Iterator[list[Exporter]]:
    """Two exporters on free ports, started as users start them; the first has per-process
    series on (the dashboard's top-N panels need them), the second the defaults."""
    tmp = tmp_path_factory.mktemp("exporters")
    started: list[Exporter] = []
    with ExitStack() as stack:
        for i, per_process in enumerate((True, False)):
            port = free_port()
            hostname = f"itest-{i}"
            config = tmp / f"exporter-{i}.yml"
            config.write_text(yaml.safe_dump(exporter_config(exporter_token,
                                                             per_process=per_process)))
            argv = [str(VENV_BIN / "procfleet-exporter"), "--listen", f"127.0.0.1:{port}",
                    "--config", str(config), "--hostname", hostname]
            stack.enter_context(running(argv, ready_url=f"http://127.0.0.1:{port}/healthz",
                                log=tmp / f"exporter-{i}.log"))
            started.append(Exporter(f"http://127.0.0.1:{port}", f"127.0.0.1:{port}", hostname))
        yield started


@pytest.fixture(scope="session")
def query_service(tmp_path_factory: pytest.TempPathFactory, exporters: list[Exporter],
                  exporter_token: str) -> Iterator[QueryService]:
    """`python -m query` on a free port, knowing the two exporters plus one in maintenance
    and one that refuses connections (hosts sort as: itest-0, itest-1, itest-2, itest-3)."""
    tmp = tmp_path_factory.mktemp("query")
    key, key_entry = keygen("itest", "process:read")
    node_key, node_entry = keygen("itest-nodes", "node:read")
    static = [{"hostname": e.hostname, "url": e.url, "labels": {"group": f"itest.{i}"}}
              for i, e in enumerate(exporters)]
    static.append({"hostname": "itest-2", "url": exporters[0].url,
                   "labels": {"group": "itest.maint"}, "maintenance": True})
    static.append({"hostname": "itest-3", "url": f"http://127.0.0.1:{free_port()}",
                   "labels": {"group": "itest.gone"}})
    config = {
        "timeouts": {"exporter": 2.0, "request": 5.0},
        "exporter_token": exporter_token,
        "auth": {"enabled": True, "api_keys": [key_entry, node_entry]},
        "exporters": static,
    }
    config_file = tmp / "query.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [str(VENV_BIN / "python"), "-m", "query", "--config", str(config_file),
            "--listen", f"127.0.0.1:{port}"]
    url = f"http://127.0.0.1:{port}"
    with running(argv, ready_url=f"{url}/healthz", log=tmp / "query.log"):
        yield QueryService(url, key, node_key, f"127.0.0.1:{port}")


def prometheus_config(exporters: list[Exporter], query: QueryService, token_file: Path,
                      sd_file: Path, query_key_file: Path) -> dict:
    """config/prometheus.yml made fit for the test: 1 s scrapes, the token lines switched on
    (the exporter token, and a node:read key for the query service's protected /metrics),
    the static example targets replaced by the test's, the file_sd glob pointed at `sd_file`,
    the shipped rule files loaded from the repository (their paths are relative to it)."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / f) for f in config["rule_files"]]
    config["global"].update(scrape_interval=SCRAPE_INTERVAL, scrape_timeout=SCRAPE_INTERVAL,
                            evaluation_interval=SCRAPE_INTERVAL)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["procfleet"]
    job.pop("static_configs")
    job["authorization"] = {"type": "Bearer", "credentials_file": str(token_file)}
    job["file_sd_configs"] = [{"files": [str(sd_file)], "refresh_interval": "1s"}]
    sd_file.write_text(yaml.safe_dump([
        {"targets": [e.instance], "labels": {"hostname": e.hostname}} for e in exporters]))
    query_job = jobs["procfleet-query"]
    query_job["static_configs"] = [{"targets": [query.instance]}]
    # The query service's /metrics needs a node:read key (auth.protect_metrics defaults on):
    # the commented authorization lines of the job, switched on.
    query_job["authorization"] = {"type": "Bearer", "credentials_file": str(query_key_file)}
    assert set(jobs) == {"procfleet", "procfleet-query"}, "a new job in prometheus.yml?"
    return config


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory, exporters: list[Exporter],
               query_service: QueryService, exporter_token: str) -> Iterator[PrometheusAPI]:
    """/usr/bin/prometheus on a free port with a temporary TSDB, scraping the exporters;
    yields once every target is up and has been scraped at least three times."""
    tmp = tmp_path_factory.mktemp("prometheus")
    token_file = tmp / "procfleet.token"
    token_file.write_text(exporter_token + "\n")
    token_file.chmod(0o600)
    query_key_file = tmp / "procfleet-query.key"
    query_key_file.write_text(query_service.node_key + "\n")
    query_key_file.chmod(0o600)
    config_file = tmp / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(
        prometheus_config(exporters, query_service, token_file,
                          tmp / "targets-procfleet.yml", query_key_file)))
    port = free_port()
    argv = [PROMETHEUS, f"--config.file={config_file}", f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
            "--storage.tsdb.retention.time=1h"]
    url = f"http://127.0.0.1:{port}"
    with running(argv, ready_url=f"{url}/-/ready", log=tmp / "prometheus.log", timeout=30):
        api = PrometheusAPI(url)
        instances = {e.instance for e in exporters} | {query_service.instance}

        def all_up() -> bool:
            healthy = {t["labels"]["instance"] for t in api.targets() if t["health"] == "up"}
            return instances <= healthy

        wait_until(all_up, timeout=20, what="every target up in Prometheus")
        # Three scrapes, so that rate() over a few seconds has samples everywhere.
        def scraped_thrice() -> bool:
            counts = api.values("count_over_time(up[1m])")
            return set(counts) >= instances and min(counts.values()) >= 3

        wait_until(scraped_thrice, timeout=20, what="three scrapes of every target")
        yield api
