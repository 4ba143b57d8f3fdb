"""Discovery trusts only what it was told to: no redirects followed by the Prometheus client,
no discovery or configuration file other users can change, no exporter token sent outside its
scope."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from query_testing import KNOWN_PID, PROCESS, make_config, serve_aiohttp

from procfleet.configcheck import ConfigError
from procfleet.testing import free_port
from query.config import Config, PrometheusSD, load
from query.discovery import Discovery, DiscoveryError
from query.sources import PrometheusSource


@dataclass
class Recorder:
    """A real HTTP server on 127.0.0.1 that notes every request and answers `status`."""

    url: str = ""
    status: int = 200
    location: str = ""
    body: bytes = b""
    hits: list[str] = field(default_factory=list)
    authorization: list[str | None] = field(default_factory=list)


@pytest.fixture
def recorders() -> Iterator[list[Recorder]]:
    started: list[tuple[http.server.ThreadingHTTPServer, threading.Thread]] = []
    made: list[Recorder] = []

    def make() -> Recorder:
        recorder = Recorder()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                recorder.hits.append(self.path)
                recorder.authorization.append(self.headers.get("Authorization"))
                self.send_response(recorder.status)
                if recorder.location:
                    self.send_header("Location", recorder.location)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(recorder.body)))
                self.end_headers()
                self.wfile.write(recorder.body)

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        started.append((server, thread))
        recorder.url = f"http://127.0.0.1:{server.server_address[1]}"
        made.append(recorder)
        return recorder

    yield [make() for _ in range(2)]
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


TARGETS = json.dumps({"status": "success", "data": {"activeTargets": [
    {"labels": {"instance": "10.0.0.1:9256", "job": "procfleet", "hostname": "web-01"},
     "scrapePool": "procfleet", "scrapeUrl": "http://10.0.0.1:9256/metrics"}]}}).encode()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_prometheus_redirects_are_not_followed(recorders, status: int) -> None:
    prometheus, elsewhere = recorders
    elsewhere.body = TARGETS  # a valid answer: following the redirect would "work"
    prometheus.status = status
    prometheus.location = f"{elsewhere.url}/api/v1/targets?state=active"
    source = PrometheusSource(PrometheusSD(url=prometheus.url, job="procfleet", timeout=5))
    with pytest.raises(DiscoveryError, match=rf"HTTP {status} redirect to .* not followed"):
        source.poll(force=True)
    assert prometheus.hits == ["/api/v1/targets?state=active"]
    assert elsewhere.hits == []


def test_the_same_server_answering_directly_is_read(recorders) -> None:
    # The control for the test above: the recorder serves a valid answer when asked directly.
    prometheus, _ = recorders
    prometheus.body = TARGETS
    source = PrometheusSource(PrometheusSD(url=prometheus.url, job="procfleet", timeout=5))
    assert [e.hostname for e in source.poll(force=True) or ()] == ["web-01"]


# -- files other users could change or read ------------------------------------------------

STRANGER = 54321  # a uid and gid with no passwd entry: nobody this service trusts


def write_targets(path: Path, hostname: str = "web-01", address: str = "10.0.0.1:9256"
                  ) -> Path:
    path.write_text(yaml.safe_dump([{"targets": [address], "labels": {"hostname": hostname}}]))
    return path


def files_config(pattern: Path, **discovery: Any) -> Config:
    return make_config([], file_sd=[str(pattern)], discovery=discovery or None)


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory every user can enter (pytest's own tmp dirs are 0700): for read checks."""
    path = Path(tempfile.mkdtemp(prefix="procfleet-trust-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.parametrize(("change", "problem"), [
    (lambda p: p.chmod(0o646), r"writable by every user \(mode 0646\)"),
    (lambda p: (p.chmod(0o664), os.chown(p, -1, STRANGER)),
     rf"writable by group {STRANGER} \(mode 0664\)"),
    (lambda p: os.chown(p, STRANGER, -1), rf"owned by uid {STRANGER}"),
    (lambda p: p.parent.chmod(0o777), r"targets: writable by every user \(mode 0777\) without "
                                      r"the sticky bit"),
    (lambda p: p.parent.chmod(0o1777), r"targets: writable by every user \(mode 1777\), so "
                                       r"anyone may add files"),
    (lambda p: (p.parent.chmod(0o775), os.chown(p.parent, -1, STRANGER)),
     rf"targets: writable by group {STRANGER}"),
    (lambda p: os.chown(p.parent, STRANGER, -1), rf"targets: the directory is owned by uid "
                                                 rf"{STRANGER}"),
])
def test_a_file_sd_file_others_could_change_is_refused(tmp_path: Path, change, problem: str
                                                       ) -> None:
    (tmp_path / "targets").mkdir()
    path = write_targets(tmp_path / "targets" / "web.yml")
    change(path)
    with pytest.raises(DiscoveryError, match=problem) as caught:
        Discovery.from_config(files_config(tmp_path / "targets" / "*.yml"))
    assert str(path) in str(caught.value)
    assert "discovery.allow_insecure_files" in str(caught.value)


@pytest.mark.parametrize("change", [
    lambda p: p.chmod(0o600),
    lambda p: p.chmod(0o664),  # group write for root's group (gid 0): the admins
    lambda p: p.parent.parent.chmod(0o1777),  # sticky above the glob's own directory
])
def test_a_file_only_root_can_change_is_loaded(tmp_path: Path, change) -> None:
    (tmp_path / "targets").mkdir()
    path = write_targets(tmp_path / "targets" / "web.yml")
    change(path)
    discovery = Discovery.from_config(files_config(tmp_path / "targets" / "*.yml"))
    assert list(discovery.fleet.by_hostname) == ["web-01"]


def test_allow_insecure_files_loads_with_a_warning(tmp_path: Path, caplog) -> None:
    path = write_targets(tmp_path / "web.yml")
    path.chmod(0o666)
    discovery = Discovery.from_config(files_config(tmp_path / "*.yml",
                                                   allow_insecure_files=True))
    assert list(discovery.fleet.by_hostname) == ["web-01"]
    warned = [r for r in caplog.records if r.levelname == "WARNING"
              and r.getMessage().startswith("INSECURE file_sd file")]
    assert warned and warned[0].fields["file"] == str(path)
    assert "writable by every user" in warned[0].fields["problem"]


def test_a_file_made_writable_later_keeps_the_last_good_set(tmp_path: Path) -> None:
    path = write_targets(tmp_path / "web.yml")
    discovery = Discovery.from_config(files_config(tmp_path / "*.yml"))
    good = discovery.fleet
    path.chmod(0o666)  # only the mode changes: no new mtime, still noticed
    assert not discovery.refresh(force=False)
    assert discovery.fleet is good
    assert discovery.reload_stats()["file_sd"].failures == 1
    path.chmod(0o644)
    assert discovery.refresh(force=False)


def config_text(**extra: Any) -> str:
    return yaml.safe_dump({"auth": {"enabled": False}, "exporters": [
        {"hostname": "web-01", "url": "http://10.0.0.1:9256"}], **extra})


@pytest.mark.parametrize(("mode", "extra", "problem"), [
    (0o646, {}, r"writable by every user \(mode 0646\)"),
    (0o644, {"exporter_token": "fleet-secret"}, r"holds a secret .* readable by every user"),
    (0o644, {"prometheus": {"url": "http://127.0.0.1:9", "job": "p", "token": "t"}},
     r"holds a secret"),
    (0o644, {"file_sd": [{"files": "x/*.yml", "token": "t"}]}, r"holds a secret"),
])
def test_a_config_file_others_could_change_or_read_is_refused(
        reachable_dir: Path, mode: int, extra: dict, problem: str) -> None:
    path = reachable_dir / "query.yml"
    path.write_text(config_text(**extra))
    path.chmod(mode)
    with pytest.raises(ConfigError, match=problem) as caught:
        load(path)
    assert str(path) in str(caught.value) and "--allow-insecure-config" in str(caught.value)
    assert "fleet-secret" not in str(caught.value)


@pytest.mark.parametrize(("mode", "extra"), [
    (0o644, {}),  # no token in it: others may read it
    (0o640, {"exporter_token": "fleet-secret"}),  # root:procfleet 0640, as deployed
    (0o600, {"exporter_token": "fleet-secret"}),
])
def test_a_config_file_kept_as_deployed_loads(reachable_dir: Path, mode: int, extra: dict
                                              ) -> None:
    path = reachable_dir / "query.yml"
    path.write_text(config_text(**extra))
    path.chmod(mode)
    assert load(path).exporters[0].hostname == "web-01"


def test_a_secret_behind_a_closed_directory_is_not_readable(tmp_path: Path) -> None:
    # pytest's tmp directories are 0700: others cannot reach a 0644 file inside.
    path = tmp_path / "query.yml"
    path.write_text(config_text(exporter_token="fleet-secret"))
    path.chmod(0o644)
    assert load(path).exporter_token == "fleet-secret"


def test_allow_insecure_config_loads_with_a_warning(reachable_dir: Path, caplog) -> None:
    path = reachable_dir / "query.yml"
    path.write_text(config_text(exporter_token="fleet-secret"))
    path.chmod(0o666)
    assert load(path, allow_insecure=True).exporter_token == "fleet-secret"
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("INSECURE configuration" in m and "writable by every user" in m for m in warned)
    assert any("readable by every user" in m for m in warned)


def test_the_command_line_refuses_an_insecure_config(reachable_dir: Path) -> None:
    path = reachable_dir / "query.yml"
    path.write_text(config_text())
    path.chmod(0o666)
    result = subprocess.run([sys.executable, "-m", "query", "--config", str(path), "--listen",
                             f"127.0.0.1:{free_port()}"], capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert f"{path}: writable by every user (mode 0666)" in result.stderr
    assert "Traceback" not in result.stderr


# -- which exporters get which token -------------------------------------------------------

@dataclass
class RecordingExporter:
    """A real asyncio (aiohttp) exporter on 127.0.0.1 that notes each call's Authorization."""

    address: str = ""
    seen: list[tuple[str, str | None]] = field(default_factory=list)  # (Host, Authorization)


@pytest.fixture
def recording_exporter() -> Iterator[RecordingExporter]:
    recorder = RecordingExporter()

    async def process(request: web.Request) -> web.Response:
        recorder.seen.append((request.path, request.headers.get("Authorization")))
        return web.json_response(PROCESS)

    with serve_aiohttp({"/process/{pid}": process}) as url:
        recorder.address = url.removeprefix("http://")
        yield recorder


def tokens_received(recording_exporter: RecordingExporter, prometheus: Recorder,
                    tmp_path: Path, make_client, config: dict[str, Any]
                    ) -> dict[str, str | None]:
    """Ask the exporter of each source for a pid; the Authorization each call carried.

    All four exporters are the one recording server: static-01 (static), from-a and from-b
    (file_sd files a/ and b/) and from-prometheus (the active target of a Prometheus job).
    """
    address = recording_exporter.address
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_targets(tmp_path / "a" / "a.yml", "from-a", address)
    write_targets(tmp_path / "b" / "b.yml", "from-b", address)
    prometheus.body = json.dumps({"status": "success", "data": {"activeTargets": [
        {"labels": {"instance": address, "job": "procfleet", "hostname": "from-prometheus"},
         "scrapePool": "procfleet", "scrapeUrl": f"http://{address}/metrics"}]}}).encode()
    settings = {"exporter_token": "fleet-token", "file_sd": ["{a}", "{b}"],
                "prometheus": {"url": "{prometheus}", "job": "procfleet"}, **config}
    text = json.dumps(settings)
    for name, value in (("{a}", str(tmp_path / "a" / "*.yml")),
                        ("{b}", str(tmp_path / "b" / "*.yml")),
                        ("{prometheus}", prometheus.url),
                        ("{port}", address.rsplit(":", 1)[1])):
        text = text.replace(name, value)
    settings = json.loads(text)
    client = make_client(make_config([{"hostname": "static-01", "url": f"http://{address}"}],
                                     **settings))
    received: dict[str, str | None] = {}
    for hostname in ("static-01", "from-a", "from-b", "from-prometheus"):
        recording_exporter.seen.clear()
        result = client.simulate_get(f"/node/{hostname}/process/{KNOWN_PID}")
        assert result.status_code == 200, result.text
        assert len(recording_exporter.seen) == 1
        received[hostname] = recording_exporter.seen[0][1]
    return received


FLEET = "Bearer fleet-token"
ALL_SOURCES = ["static", "file_sd", "prometheus"]


@pytest.mark.parametrize(("config", "expected"), [
    # By default only static exporters get the fleet-wide token.
    ({}, {"static-01": FLEET, "from-a": None, "from-b": None, "from-prometheus": None}),
    ({"exporter_token_scope": {"sources": ["static", "file_sd"]}},
     {"static-01": FLEET, "from-a": FLEET, "from-b": FLEET, "from-prometheus": None}),
    ({"exporter_token_scope": {"sources": ["prometheus"]}},
     {"static-01": None, "from-a": None, "from-b": None, "from-prometheus": FLEET}),
    # A token per file_sd entry and for the prometheus source; entry a has none.
    ({"file_sd": ["{a}", {"files": ["{b}"], "token": "b-token"}],
      "prometheus": {"url": "{prometheus}", "job": "procfleet", "token": "p-token"}},
     {"static-01": FLEET, "from-a": None, "from-b": "Bearer b-token",
      "from-prometheus": "Bearer p-token"}),
    # URL origins narrow the sources' scope: the port must match (default 80 for http).
    ({"exporter_token_scope": {"sources": ALL_SOURCES, "urls": ["http://127.0.*"]}},
     {"static-01": None, "from-a": None, "from-b": None, "from-prometheus": None}),
    ({"exporter_token_scope": {"sources": ["static", "file_sd"],
                               "urls": ["http://127.0.*:{port}"]}},
     {"static-01": FLEET, "from-a": FLEET, "from-b": FLEET, "from-prometheus": None}),
    ({"exporter_token_scope": {"sources": ALL_SOURCES, "urls": ["http://localhost:{port}"]}},
     {"static-01": None, "from-a": None, "from-b": None, "from-prometheus": None}),
])
def test_each_exporter_gets_only_the_token_in_its_scope(
        recording_exporter, recorders, tmp_path, make_client, config, expected) -> None:
    prometheus, _ = recorders
    assert tokens_received(recording_exporter, prometheus, tmp_path, make_client,
                           config) == expected
