"""What reaches the log when exporters fail or discovery finds nobody: each failed exporter
named with its reason at warning level, rate-limited and bounded; the request line counting
the exporters asked; warnings for an empty fleet and a file_sd pattern matching no file."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from query_testing import KNOWN_PID, exporter_entries, make_config

from procfleet.testing import wait_until
from query.discovery import Discovery
from query.failurelog import ExporterFailureLog
from query.fanout import Result


def fields(record: logging.LogRecord) -> dict[str, Any]:
    return dict(getattr(record, "fields", {}))


def failure_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [fields(r) for r in caplog.records
            if r.name == "query.failurelog" and r.levelno == logging.WARNING]


def request_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [fields(r) for r in caplog.records if r.name == "query.app" and r.msg == "request"]


class Clock:
    """A clock the test moves by hand, so intervals are decided without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_failing_unicast_names_the_exporter_and_the_reason(fake_exporters, make_client,
                                                             caplog) -> None:
    caplog.set_level(logging.INFO)
    client = make_client(make_config(exporter_entries(fake_exporters, "ok", "refused",
                                                      "error")))
    assert client.simulate_get(f"/node/refused/process/{KNOWN_PID}").status_code == 500
    assert failure_lines(caplog) == [{"exporter": "refused", "kind": "unreachable",
                                      "reason": "connection refused"}]
    assert request_lines(caplog)[-1] | {"exporters": 1, "failed": 1} == request_lines(caplog)[-1]

    assert client.simulate_get(f"/node/_all/process/{KNOWN_PID}").status_code == 200
    lines = failure_lines(caplog)[1:]
    assert [(line["exporter"], line["kind"]) for line in lines] == [("error", "bad_status")]
    assert "500" in lines[0]["reason"]  # "refused" was named a moment ago: not again yet
    assert (request_lines(caplog)[-1]["exporters"], request_lines(caplog)[-1]["failed"]) == (3, 2)


def test_a_unicast_not_found_counts_the_exporter_it_asked(fake_exporters, make_client,
                                                          caplog) -> None:
    caplog.set_level(logging.INFO)
    client = make_client(make_config(exporter_entries(fake_exporters, "ok")))
    assert client.simulate_get("/node/ok/process/7").status_code == 404
    assert request_lines(caplog)[-1]["exporters"] == 1  # was 0: the 404 dropped its result
    assert failure_lines(caplog) == []  # a valid answer is no exporter failure


def test_one_line_per_exporter_per_interval_then_the_suppressed_count(caplog) -> None:
    caplog.set_level(logging.WARNING)
    clock = Clock()
    failures = ExporterFailureLog(interval=60.0, clock=clock)
    timeout = Result("web-01", "timeout", "timeout after 2.0 s")
    for _ in range(50):
        failures.exporter_results([timeout, Result("web-02", "ok", data={})])
    assert failure_lines(caplog) == [{"exporter": "web-01", "kind": "timeout",
                                      "reason": "timeout after 2.0 s"}]
    clock.now += 59.0
    failures.exporter_results([Result("web-01", "rejected", "circuit open")])
    assert len(failure_lines(caplog)) == 1
    clock.now += 1.0
    failures.exporter_results([Result("web-01", "unreachable", "connection refused")])
    assert failure_lines(caplog)[1] == {"exporter": "web-01", "kind": "unreachable",
                                        "reason": "connection refused", "suppressed": 50}


def test_at_most_max_exporters_are_named_per_interval(caplog) -> None:
    caplog.set_level(logging.WARNING)
    clock = Clock()
    failures = ExporterFailureLog(interval=10.0, max_exporters=3, clock=clock)
    failures.exporter_results([Result(f"web-{i:02}", "timeout", "timeout after 2.0 s")
                               for i in range(10)])
    assert [line["exporter"] for line in failure_lines(caplog)] == ["web-00", "web-01",
                                                                    "web-02"]
    assert len(failures._quiet) == 3
    clock.now += 10.0
    failures.exporter_results([Result("web-09", "timeout", "timeout after 2.0 s")])
    last = failure_lines(caplog)[-1]
    assert (last["exporter"], last["others_suppressed"]) == ("web-09", 7)
    assert len(failures._quiet) == 3


def test_a_long_reason_is_cut(caplog) -> None:
    caplog.set_level(logging.WARNING)
    ExporterFailureLog().exporter_results([Result("web-01", "bad_body", "x" * 5000)])
    assert len(failure_lines(caplog)[0]["reason"]) == 300


def _config_file(path: Path, file_sd: str, exporters: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"auth": {"enabled": False}, "exporters": exporters,
                                    "file_sd": [file_sd]}))
    return path


def test_empty_fleet_and_unmatched_pattern_warn_at_start_and_on_reload(tmp_path: Path,
                                                                       caplog) -> None:
    from query import config as query_config
    caplog.set_level(logging.WARNING)
    targets = tmp_path / "targets"
    targets.mkdir(mode=0o700)
    config_path = _config_file(tmp_path / "query.yml", str(targets / "*.yml"), [])
    discovery = Discovery.from_config(query_config.load(config_path))
    warnings = [(r.name, r.getMessage(), fields(r)) for r in caplog.records]
    assert ("query.sources", "file_sd pattern matches no file",
            {"pattern": str(targets / "*.yml")}) in warnings
    assert [f for name, _, f in warnings if name == "query.discovery"] == [
        {"when": "start", "sources": "static,file_sd"}]

    caplog.clear()
    discovery._load_config = lambda: query_config.load(config_path)
    assert discovery.reload()
    assert {r.name for r in caplog.records} == {"query.sources", "query.discovery"}
    assert fields(caplog.records[-1])["when"] == "reload"

    caplog.clear()
    (targets / "a.yml").write_text(yaml.safe_dump([{"targets": ["127.0.0.1:9"],
                                                    "labels": {"hostname": "web-01"}}]))
    assert discovery.reload()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert [e.hostname for e in discovery.fleet.exporters] == ["web-01"]


def test_the_real_service_warns_on_stderr_at_start_and_on_sighup(start_service,
                                                                  tmp_path: Path) -> None:
    targets = tmp_path / "none"
    targets.mkdir(mode=0o700)
    pattern = str(targets / "*.json")
    service = start_service(yaml.safe_dump({"auth": {"enabled": False}, "exporters": [],
                                            "file_sd": [pattern]}))
    start = service.log()
    assert "level=warning logger=query.discovery msg=\"discovery knows no exporters" in start
    assert f"msg=\"file_sd pattern matches no file\" pattern={pattern}" in start
    service.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "when=reload" in service.log(), timeout=15,
               what="the reload's warning")
    assert service.log().count("file_sd pattern matches no file") == 2
