"""The real service re-reads file_sd files when they change and its YAML on SIGHUP; a reload
that fails keeps the last good exporters, is logged naming the file, and is counted."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import yaml
from query_testing import KNOWN_PID, PROCESS, Service
from test_discovery_files import write

from procfleet.testing import wait_until
from query.auth import key_hash

NODE_KEY = "reload-test-node-key"


def query_yaml(fakes, targets: Path, *, static: list[str], interval: float) -> str:
    return yaml.safe_dump({
        "auth": {"enabled": True, "api_keys": [
            {"name": "ops", "sha256": key_hash(NODE_KEY),
             "permissions": ["node:read", "process:read"]}]},
        "timeouts": {"exporter": 1.0, "request": 2.0},
        "exporters": [{"hostname": name, "url": fakes.url("ok")} for name in static],
        "file_sd": [str(targets / "*.yml")],
        "discovery": {"refresh_interval": interval},
    })


def file_targets(fakes, *hostnames: str) -> str:
    address = fakes.url("ok").removeprefix("http://")
    return yaml.safe_dump([{"targets": [address], "labels": {"hostname": h, "group": "files"}}
                           for h in hostnames])


def nodes(service: Service) -> list[str]:
    status, _, body = service.get("/node", {"X-API-Key": NODE_KEY})
    assert status == 200, body
    return [n["hostname"] for n in body["exporters"]]


def metric(service: Service, line_start: str) -> float | None:
    _, _, body = service.get("/metrics", {"X-API-Key": NODE_KEY})
    for line in body.decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_sighup_rereads_the_yaml_and_the_files(fake_exporters, start_service, tmp_path
                                               ) -> None:
    targets = tmp_path / "targets"
    targets.mkdir()
    write(targets / "a.yml", file_targets(fake_exporters, "file-01"))
    # A long interval: in this test only SIGHUP re-reads anything.
    service = start_service(query_yaml(fake_exporters, targets, static=["static-01"],
                                       interval=3600))
    config_path = Path(service.process.args[service.process.args.index("--config") + 1])
    assert nodes(service) == ["file-01", "static-01"]
    status, _, body = service.get(f"/node/group:files/process/{KNOWN_PID}",
                                  {"X-API-Key": NODE_KEY})
    assert status == 200
    assert body["results"] == [{"hostname": "file-01", "status": "ok", "process": PROCESS}]

    write(targets / "b.yml", file_targets(fake_exporters, "file-02"))
    config_path.write_text(query_yaml(fake_exporters, targets,
                                      static=["static-01", "static-02"], interval=3600))
    service.process.send_signal(signal.SIGHUP)
    wait_until(lambda: nodes(service) == ["file-01", "file-02", "static-01", "static-02"],
               what="the reload to add static-02 and file-02")
    assert metric(service, 'procfleet_query_discovery_reloads_total{result="success",'
                           'source="config"}') == 1.0

    config_path.write_text("auth: {enabled: false}\nexporters: [{hostname: x}]\n")
    service.process.send_signal(signal.SIGHUP)
    wait_until(lambda: metric(service, 'procfleet_query_discovery_reloads_total{'
                                       'result="failure",source="config"}') == 1.0,
               what="the failed reload to be counted")
    assert nodes(service) == ["file-01", "file-02", "static-01", "static-02"]
    failure = [line for line in service.log().splitlines()
               if "configuration reload failed" in line]
    assert len(failure) == 1
    assert "level=error" in failure[0] and str(config_path) in failure[0]
    assert "exporters[0].url: is required" in failure[0]

    # A hostname twice between the YAML and a file: the reload fails, nothing changes.
    config_path.write_text(query_yaml(fake_exporters, targets, static=["file-01"],
                                      interval=3600))
    service.process.send_signal(signal.SIGHUP)
    wait_until(lambda: metric(service, 'procfleet_query_discovery_reloads_total{'
                                       'result="failure",source="config"}') == 2.0,
               what="the conflicting reload to be counted")
    assert nodes(service) == ["file-01", "file-02", "static-01", "static-02"]
    assert "'file-01' is defined by both static" in service.log()
    assert service.stop() == 0
    assert "Traceback" not in service.log()


def test_changed_files_are_picked_up_and_a_broken_one_keeps_the_last_good_set(
        fake_exporters, start_service, tmp_path) -> None:
    targets = tmp_path / "targets"
    targets.mkdir()
    write(targets / "a.yml", file_targets(fake_exporters, "file-01"))
    service = start_service(query_yaml(fake_exporters, targets, static=[], interval=0.1))
    assert nodes(service) == ["file-01"]

    write(targets / "a.yml", file_targets(fake_exporters, "file-01", "file-02"))
    wait_until(lambda: nodes(service) == ["file-01", "file-02"], what="file-02 to appear")
    write(targets / "new.yml", file_targets(fake_exporters, "file-03"))
    wait_until(lambda: nodes(service) == ["file-01", "file-02", "file-03"],
               what="the glob to pick up new.yml")

    write(targets / "a.yml", "- targets: [oops\n")
    failures = 'procfleet_query_discovery_reloads_total{result="failure",source="file_sd"}'
    wait_until(lambda: metric(service, failures) == 1.0, what="the broken file to be counted")
    assert nodes(service) == ["file-01", "file-02", "file-03"]
    logged = [line for line in service.log().splitlines() if "source=file_sd" in line]
    assert len(logged) == 1 and "level=error" in logged[0]
    assert f"{targets / 'a.yml'}: YAML syntax error" in logged[0]
    assert metric(service, 'procfleet_query_discovery_last_reload_success_timestamp_seconds'
                           '{source="file_sd"}') > 1e9

    write(targets / "a.yml", file_targets(fake_exporters, "file-01"))
    wait_until(lambda: nodes(service) == ["file-01", "file-03"], what="the fixed file to load")
    status, _, body = service.get(f"/node/_all/process/{KNOWN_PID}", {"X-API-Key": NODE_KEY})
    assert status == 200 and [r["status"] for r in body["results"]] == ["ok", "ok"]
    assert service.stop() == 0


def test_a_broken_file_at_start_exits_2_naming_it(tmp_path) -> None:
    (tmp_path / "bad.yml").write_text("- targets: ['10.0.0.1:9256']\n  labels: {x: [1]}\n")
    config = tmp_path / "query.yml"
    config.write_text(f"auth: {{enabled: false}}\nfile_sd: ['{tmp_path}/*.yml']\n")
    result = subprocess.run([sys.executable, "-m", "query", "--config", str(config),
                             "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert f"{tmp_path / 'bad.yml'}: [0].labels.x: must be a string" in result.stderr
    assert "Traceback" not in result.stderr
