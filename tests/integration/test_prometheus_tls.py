"""A real Prometheus scrapes an exporter over TLS with basic auth, as it scrapes a node_exporter
with the same --web.config.file: `scheme: https`, `tls_config.ca_file` and `basic_auth`.

Two more jobs scrape the same exporter wrongly (a wrong password, a CA that did not sign its
certificate), so the test sees the exporter refuse what it must refuse.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from integration_testing import PROMETHEUS, PrometheusAPI, wait_until
from tls_fixtures import PASSWORD, USER, TLSSet, password_hash, web_config_text

from procfleet.testing import Server, basic_auth_header, free_port, running, start_exporter


@pytest.fixture(scope="module")
def tls_exporter(tls_set: TLSSet, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("prom-tls-exporter")
    web = tmp / "web.yml"
    # Cost 10, as `htpasswd -nBC 10` makes them for node_exporter.
    web.write_text(web_config_text(tls_set, users={USER: password_hash(cost=10)}))
    server = start_exporter(tmp, "--web.config.file", str(web), hostname="tls-host",
                            ca_file=tls_set.ca.cert, headers=basic_auth_header(USER, PASSWORD))
    yield server
    server.stop()


def scrape_job(name: str, target: str, ca: Path, password_file: Path) -> dict:
    return {"job_name": name, "scheme": "https", "scrape_interval": "1s",
            "scrape_timeout": "1s", "static_configs": [{"targets": [target]}],
            "tls_config": {"ca_file": str(ca)},
            "basic_auth": {"username": USER, "password_file": str(password_file)}}


@pytest.fixture(scope="module")
def prometheus(tls_exporter: Server, tls_set: TLSSet,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusAPI]:
    tmp = tmp_path_factory.mktemp("prom-tls")
    good, wrong = tmp / "password", tmp / "wrong-password"
    good.write_text(PASSWORD + "\n")  # Prometheus trims the trailing newline
    wrong.write_text("not the password\n")
    for secret in (good, wrong):
        secret.chmod(0o600)
    target = f"127.0.0.1:{tls_exporter.port}"
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [
                  scrape_job("tls", target, tls_set.ca.cert, good),
                  scrape_job("tls-wrong-password", target, tls_set.ca.cert, wrong),
                  scrape_job("tls-other-ca", target, tls_set.other_ca.cert, good)]}
    config_file = tmp / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [PROMETHEUS, f"--config.file={config_file}", f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
            "--storage.tsdb.retention.time=1h"]
    with running(argv, ready_url=f"http://127.0.0.1:{port}/-/ready",
                 log=tmp / "prometheus.log", timeout=30):
        api = PrometheusAPI(f"http://127.0.0.1:{port}")

        def every_job_scraped() -> bool:
            targets = api.targets()
            return len(targets) == 3 and all(t["health"] != "unknown" for t in targets)

        wait_until(every_job_scraped, timeout=30, what="a scrape of every job")
        yield api


def targets_by_job(api: PrometheusAPI) -> dict[str, dict]:
    return {t["labels"]["job"]: t for t in api.targets()}


def test_prometheus_scrapes_the_exporter_over_tls_with_basic_auth(
        prometheus: PrometheusAPI) -> None:
    target = targets_by_job(prometheus)["tls"]
    assert target["health"] == "up", target["lastError"]
    assert target["scrapeUrl"].startswith("https://127.0.0.1:")
    # The exporter's own series, stored: the scrape was parsed, not only connected.
    series = wait_until(
        lambda: prometheus.values('sum(namedprocess_namegroup_num_procs{job="tls"})'),
        timeout=20, what="the exporter's series in Prometheus")
    assert list(series.values())[0] >= 1


def test_a_wrong_password_is_refused(prometheus: PrometheusAPI) -> None:
    target = targets_by_job(prometheus)["tls-wrong-password"]
    assert target["health"] == "down"
    assert "401" in target["lastError"], target["lastError"]


def test_a_ca_that_did_not_sign_the_certificate_is_refused(prometheus: PrometheusAPI) -> None:
    target = targets_by_job(prometheus)["tls-other-ca"]
    assert target["health"] == "down"
    assert "certificate" in target["lastError"], target["lastError"]
