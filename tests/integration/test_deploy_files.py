"""The deployment files hold what they promise: the systemd units start the installed console
scripts with hardening, and the YAML in docs/deploy.md loads with the real loaders and
passes promtool, so the walkthrough can be pasted."""

from __future__ import annotations

import hashlib
import re
import shlex
import subprocess
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml
from integration_testing import PROMTOOL, REPO

import exporter.config
import query.config

UNITS = REPO / "config" / "systemd"
DEPLOY = REPO / "docs" / "deploy.md"
HARDENING = {
    "DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
    "ProtectHome": "yes", "PrivateTmp": "yes", "RestrictSUIDSGID": "yes",
}


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Every `Key=value` of a unit file (keys may repeat, as SystemCallFilter does)."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def doc_blocks(language: str) -> dict[str, str]:
    """Fenced blocks of docs/deploy.md in `language`, by their first line (a path comment)."""
    text = DEPLOY.read_text()
    blocks = re.findall(rf"^ *```{language}\n(.*?)^ *```", text, flags=re.S | re.M)
    found = {}
    for block in blocks:
        block = textwrap.dedent(block)  # blocks inside list items are indented
        found[block.splitlines()[0]] = block
    return found


@pytest.mark.parametrize(("unit", "script", "config"), [
    ("procfleet-exporter.service", "procfleet-exporter", "/etc/procfleet/exporter.yml"),
    ("procfleet-query.service", "procfleet-query", "/etc/procfleet/query.yml"),
])
def test_units_start_the_console_scripts_hardened(unit: str, script: str, config: str) -> None:
    settings = unit_settings(UNITS / unit)
    argv = shlex.split(settings["ExecStart"][0])
    assert Path(argv[0]).name == script
    assert script in {ep.name for ep in entry_points(group="console_scripts")}
    assert argv[1:] == ["--config", config]
    for key, value in HARDENING.items():
        assert settings.get(key) == [value], f"{unit}: {key}"
    assert settings["WantedBy"] == ["multi-user.target"]
    assert any(v.startswith("~") and "@debug" in v for v in settings["SystemCallFilter"])


def test_exporter_unit_keeps_proc_visible_and_only_the_documented_capabilities() -> None:
    settings = unit_settings(UNITS / "procfleet-exporter.service")
    assert settings["AmbientCapabilities"] == settings["CapabilityBoundingSet"] == [
        "CAP_DAC_READ_SEARCH CAP_SYS_PTRACE"]
    # Each would hide the other users' processes the exporter exists to read.
    for hiding in ("PrivateUsers", "ProtectProc", "ProcSubset"):
        assert hiding not in settings, hiding


def test_query_unit_has_no_capabilities() -> None:
    settings = unit_settings(UNITS / "procfleet-query.service")
    assert settings["CapabilityBoundingSet"] == [""]
    assert settings["AmbientCapabilities"] == [""]


def test_deploy_doc_exporter_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "exporter.yml"
    path.write_text(doc_blocks("yaml")["# /etc/procfleet/exporter.yml"])
    config = exporter.config.load(path)
    assert config.listen == ("0.0.0.0", 9256)
    assert config.auth.enabled and config.metrics.per_process_top_n == 10


def test_deploy_doc_query_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "query.yml"
    path.write_text(doc_blocks("yaml")["# /etc/procfleet/query.yml"])
    config = query.config.load(path)
    assert [e.hostname for e in config.exporters] == ["web-01", "web-02"]


def test_deploy_doc_token_matches_its_hash() -> None:
    # The walkthrough's example token and token_sha256 belong together, as printed.
    blocks = doc_blocks("yaml")
    token = yaml.safe_load(blocks["# /etc/procfleet/query.yml"])["exporter_token"]
    digest = yaml.safe_load(blocks["# /etc/procfleet/exporter.yml"])["auth"]["token_sha256"]
    assert hashlib.sha256(token.encode()).hexdigest() == digest


def test_deploy_doc_prometheus_snippets_pass_promtool(tmp_path: Path) -> None:
    blocks = doc_blocks("yaml")
    scrape = blocks["# /etc/prometheus/prometheus.yml (the scrape_configs part)"]
    targets = blocks["# /etc/prometheus/targets/procfleet-web.yml"]
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "procfleet-web.yml").write_text(targets)
    (tmp_path / "procfleet.token").write_text("a-token\n")
    for name in ("rules", "alerts"):  # the `sudo install` lines of the walkthrough
        (tmp_path / f"procfleet-{name}.yml").write_text(
            (REPO / "config" / "prometheus" / f"{name}.yml").read_text())
    config = tmp_path / "prometheus.yml"
    config.write_text(scrape.replace("/etc/prometheus/", f"{tmp_path}/"))
    result = subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr  # the file_sd file was found
    listed = yaml.safe_load(targets)
    assert all(entry["labels"]["hostname"] for entry in listed)


def test_deploy_doc_names_the_community_dashboards() -> None:
    text = DEPLOY.read_text()
    assert "grafana.com/grafana/dashboards/249" in text
    assert "grafana.com/grafana/dashboards/4202" in text
