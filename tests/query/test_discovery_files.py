"""file_sd discovery against real files: JSON and YAML, globs, change, break, fix, conflicts."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
import yaml
from query_testing import make_config

from query.discovery import Discovery, DiscoveryError
from query.sources import read_file_sd

WEB = [{"targets": ["10.0.0.1:9256", "web-02.example.net:9256"], "labels": {"group": "web.prod"}},
       {"targets": ["10.0.3.17:9256"],
        "labels": {"hostname": "db-01", "group": "db.prod", "maintenance": "true",
                   "__scheme__": "https", "__meta_ignored": "x"}}]


def write(path: Path, text: str) -> None:
    """Write `text` and move the mtime forward, so a rewrite within one clock tick is seen."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    stamp = max(time.time_ns(), before + 1_000_000_000)
    os.utime(path, ns=(stamp, stamp))


def files_config(*patterns: str, exporters: list | None = None, interval: float = 5.0):
    return make_config(exporters or [], file_sd=list(patterns),
                       discovery={"refresh_interval": interval})


def hostnames(discovery: Discovery) -> list[str]:
    return [e.hostname for e in discovery.fleet.exporters]


def test_yaml_and_json_files_through_a_glob(tmp_path) -> None:
    write(tmp_path / "web.yml", yaml.safe_dump(WEB))
    write(tmp_path / "batch.json", json.dumps([{"targets": ["127.0.0.1:9300"],
                                                "labels": {"hostname": "batch-01"}}]))
    write(tmp_path / "notes.txt", "not a target file")
    discovery = Discovery.from_config(
        files_config(str(tmp_path / "*.yml"), str(tmp_path / "*.json"),
                     exporters=[{"hostname": "static-01", "url": "http://10.9.9.9:9256"}]))
    by_name = discovery.fleet.by_hostname
    assert hostnames(discovery) == ["10.0.0.1", "batch-01", "db-01", "static-01",
                                    "web-02.example.net"]
    web = by_name["web-02.example.net"]
    assert (web.url, dict(web.labels), web.maintenance, web.source) == (
        "http://web-02.example.net:9256", {"group": "web.prod"}, False, "file_sd")
    assert web.origin == str(tmp_path / "web.yml")
    db = by_name["db-01"]
    assert db.url == "https://10.0.3.17:9256"
    assert dict(db.labels) == {"group": "db.prod"}  # hostname, maintenance and __ are fields
    assert db.maintenance
    assert by_name["batch-01"].url == "http://127.0.0.1:9300"
    assert by_name["static-01"].source == "static"


def test_relative_patterns_are_relative_to_the_config_file(tmp_path) -> None:
    (tmp_path / "targets").mkdir()
    write(tmp_path / "targets" / "a.yaml", "- targets: ['10.1.1.1:9256']\n")
    (tmp_path / "query.yml").write_text("auth: {enabled: false}\nexporters: []\n"
                                        "file_sd: [targets/*.yaml]\n")
    from query.config import load
    config = load(tmp_path / "query.yml")
    assert config.file_sd[0].files == (str(tmp_path / "targets" / "*.yaml"),)
    assert hostnames(Discovery.from_config(config)) == ["10.1.1.1"]


@pytest.mark.parametrize("text, problem", [
    ("- targets: [10.0.0.1:9256\n", "YAML syntax error at line 2"),
    ("{targets: []}\n", "must be a list of target groups"),
    ("- targets: '10.0.0.1:9256'\n", "[0].targets: must be a list of host:port"),
    ("- targets: ['10.0.0.1:99999']\n", "[0].targets[0]: target '10.0.0.1:99999' has an "
                                        "invalid port"),
    ("- targets: ['http://10.0.0.1:9256']\n", "must be host:port"),
    ("- targets: ['[::1]:9256']\n", "give the target a hostname label"),
    ("- targets: ['a:1']\n  labels: {group: [web]}\n", "[0].labels.group: must be a string"),
    ("- targets: ['a:1']\n  labels: {bad-name: x}\n", "[0].labels.bad-name: invalid label name"),
    ("- targets: ['a:1']\n  labels: {maintenance: soon}\n", "maintenance must be true or false"),
    ("- targets: ['a:1']\n  lables: {}\n", "[0].lables: unknown key"),
    ("- targets: ['a:1', 'b:1']\n  labels: {hostname: same}\n",
     "hostname 'same' is already defined"),
])
def test_a_bad_file_at_start_is_a_configuration_error_naming_file_and_problem(
        tmp_path, text: str, problem: str) -> None:
    path = tmp_path / "bad.yml"
    write(path, text)
    with pytest.raises(DiscoveryError) as raised:
        Discovery.from_config(files_config(str(tmp_path / "*.yml")))
    assert str(path) in str(raised.value)
    assert problem in str(raised.value)


def test_json_syntax_error_names_line_and_column(tmp_path) -> None:
    path = tmp_path / "bad.json"
    write(path, '[{"targets": ["a:1"],}]')
    with pytest.raises(DiscoveryError, match=r"bad.json: JSON syntax error at line 1, column"):
        read_file_sd(str(path))


def test_empty_file_and_no_match_are_no_targets(tmp_path) -> None:
    write(tmp_path / "empty.yml", "")
    discovery = Discovery.from_config(files_config(str(tmp_path / "*.yml"),
                                                   str(tmp_path / "none" / "*.json")))
    assert hostnames(discovery) == []


def test_a_hostname_in_static_and_a_file_is_a_configuration_error(tmp_path) -> None:
    write(tmp_path / "a.yml", "- targets: ['10.0.0.1:9256']\n  labels: {hostname: web-01}\n")
    config = files_config(str(tmp_path / "*.yml"),
                          exporters=[{"hostname": "web-01", "url": "http://10.0.0.2:9256"}])
    with pytest.raises(DiscoveryError, match=r"'web-01' is defined by both static .* and "
                                             r"file_sd \(.*a\.yml\)"):
        Discovery.from_config(config)


def test_write_change_break_fix_and_a_new_file(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="query.discovery")
    first = tmp_path / "team-a.yml"
    write(first, "- targets: ['10.0.0.1:9256']\n  labels: {hostname: a-01, group: a}\n")
    discovery = Discovery.from_config(files_config(str(tmp_path / "team-*.yml")))
    assert hostnames(discovery) == ["a-01"]
    assert discovery.refresh(force=False)  # nothing changed: nothing re-read
    assert discovery.reload_stats()["file_sd"].successes == 1

    write(first, "- targets: ['10.0.0.1:9256', '10.0.0.2:9256']\n  labels: {group: a}\n")
    assert discovery.refresh(force=False)
    assert hostnames(discovery) == ["10.0.0.1", "10.0.0.2"]
    assert discovery.fleet.by_hostname["10.0.0.2"].labels == {"group": "a"}

    good = discovery.fleet
    write(first, "- targets: ['10.0.0.1:9256'\n")  # broken mid-edit
    assert not discovery.refresh(force=False)
    assert discovery.fleet is good  # the last good set stays
    stats = discovery.reload_stats()["file_sd"]
    assert (stats.successes, stats.failures) == (2, 1)
    failure = [r for r in caplog.records if r.levelno == logging.ERROR][-1]
    assert failure.fields["source"] == "file_sd"
    assert str(first) in str(failure.fields["reason"])
    assert "YAML syntax error" in str(failure.fields["reason"])
    assert discovery.refresh(force=False)  # the same broken file is not reported again
    assert discovery.reload_stats()["file_sd"].failures == 1

    write(first, "- targets: ['10.0.0.1:9256']\n  labels: {hostname: a-01, group: a}\n")
    write(tmp_path / "team-b.yml", "- targets: ['10.0.1.1:9256']\n  labels: {hostname: b-01}\n")
    assert discovery.refresh(force=False)
    assert hostnames(discovery) == ["a-01", "b-01"]

    (tmp_path / "team-b.yml").unlink()
    assert discovery.refresh(force=False)
    assert hostnames(discovery) == ["a-01"]
    assert discovery.reload_stats()["file_sd"].last_success is not None


def test_a_conflict_on_reload_keeps_the_last_good_set_until_resolved(tmp_path) -> None:
    write(tmp_path / "a.yml", "- targets: ['10.0.0.1:9256']\n  labels: {hostname: a-01}\n")
    config = files_config(str(tmp_path / "*.yml"),
                          exporters=[{"hostname": "web-01", "url": "http://10.0.0.9:9256"}])
    discovery = Discovery.from_config(config)
    good = discovery.fleet
    write(tmp_path / "b.yml", "- targets: ['10.0.0.2:9256']\n  labels: {hostname: web-01}\n")
    assert not discovery.refresh(force=False)
    assert discovery.fleet is good
    assert discovery.reload_stats()["file_sd"].failures == 1
    write(tmp_path / "b.yml", "- targets: ['10.0.0.2:9256']\n  labels: {hostname: web-02}\n")
    assert discovery.refresh(force=False)
    assert hostnames(discovery) == ["a-01", "web-01", "web-02"]


def test_health_of_exporters_that_left_is_forgotten(tmp_path) -> None:
    path = tmp_path / "a.yml"
    write(path, "- targets: ['10.0.0.1:9256', '10.0.0.2:9256']\n")
    discovery = Discovery.from_config(files_config(str(tmp_path / "*.yml")))
    discovery.health.record("10.0.0.2", valid=True, error=None)
    discovery.health.record("10.0.0.1", valid=False, error="connection refused")
    write(path, "- targets: ['10.0.0.1:9256']\n")
    assert discovery.refresh(force=False)
    assert discovery.health.get("10.0.0.1").last_error == "connection refused"
    assert discovery.health.get("10.0.0.2").status == "unknown"


def test_background_thread_picks_up_changes_without_a_request(tmp_path) -> None:
    path = tmp_path / "a.yml"
    write(path, "- targets: ['10.0.0.1:9256']\n")
    discovery = Discovery.from_config(files_config(str(tmp_path / "*.yml"), interval=0.05))
    discovery.start()
    try:
        write(tmp_path / "b.yml", "- targets: ['10.0.0.2:9256']\n")
        deadline = time.monotonic() + 10
        while hostnames(discovery) != ["10.0.0.1", "10.0.0.2"]:
            assert time.monotonic() < deadline, hostnames(discovery)
            time.sleep(0.02)
    finally:
        discovery.close()
