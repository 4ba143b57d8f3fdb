"""config/prometheus/{rules,alerts}.yml: promtool accepts them, their unit tests pass and
cover every rule, they name series the services really export, and a real Prometheus loads
them from config/prometheus.yml, records per-group CPU and raises an alert from live data."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import requests
import yaml
from integration_testing import (
    PROMETHEUS_CONFIG,
    PROMTOOL,
    REPO,
    Exporter,
    Groups,
    PrometheusAPI,
    QueryService,
    wait_until,
)

RULES_DIR = REPO / "config" / "prometheus"
RULE_FILES = [RULES_DIR / "rules.yml", RULES_DIR / "alerts.yml"]
UNIT_TESTS = sorted((RULES_DIR / "tests").glob("*.yml"))
# Series Prometheus makes itself for every target, not exported by procfleet.
SCRAPE_SERIES = {"up", "scrape_duration_seconds"}
PROMQL_WORDS = {"and", "or", "unless", "offset", "bool"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO)


def rules() -> list[dict[str, Any]]:
    found = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            found.extend(group["rules"])
    return found


def series_names(expr: str) -> set[str]:
    """Metric names an expression reads: what is left once strings, label matchers, ranges
    and label lists (`by (…)`, `on (…)`, …) are gone, minus function names and keywords."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]"
                  r"|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    names = set(re.findall(r"(?<![\w:.])[a-zA-Z_:][\w:]*(?![\w:])(?!\s*\()", bare))
    return names - PROMQL_WORDS


def exposed_names(body: str) -> set[str]:
    """Every sample and `# TYPE` name of an exposition (a labelled counter with no sample
    yet still has its TYPE line)."""
    names = set()
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            name = line.split()[2]
            names.update({name, f"{name}_total"})
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_rule_files_pass_promtool_check() -> None:
    result = promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_FILES)


def test_rule_unit_tests_pass() -> None:
    assert UNIT_TESTS, "no promtool unit tests under config/prometheus/tests/"
    result = promtool("test", "rules", *map(str, UNIT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout + result.stderr


def test_every_rule_has_unit_tests_that_fire_it_and_keep_it_quiet() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    recorded: set[str] = set()
    for path in UNIT_TESTS:
        spec = yaml.safe_load(path.read_text())
        assert {str((path.parent / f).resolve()) for f in spec["rule_files"]} <= {
            str(f) for f in RULE_FILES}
        for case in spec["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
            for check in case.get("promql_expr_test", []):
                recorded.update(series_names(check["expr"]))
    alerts = {r["alert"] for r in rules() if "alert" in r}
    records = {r["record"] for r in rules() if "record" in r}
    assert alerts - fired == set(), "alerts no unit test fires"
    # A down service is tested quiet through its sibling's case (one up series each).
    assert alerts - quiet - {"ProcfleetQueryServiceDown"} == set(), "alerts never tested quiet"
    assert records - recorded == set(), "recording rules no unit test evaluates"


def test_every_rule_has_a_severity_and_a_summary() -> None:
    for rule in rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_rules_read_series_the_services_export(exporters: list[Exporter],
                                               exporter_token: str,
                                               query_service: QueryService) -> None:
    exported = exposed_names(requests.get(
        f"{exporters[0].url}/metrics", timeout=10,
        headers={"Authorization": f"Bearer {exporter_token}"}).text)
    exported |= exposed_names(requests.get(  # protected: auth.protect_metrics is on
        f"{query_service.url}/metrics", timeout=10,
        headers={"Authorization": f"Bearer {query_service.node_key}"}).text)
    recorded = {r["record"] for r in rules() if "record" in r}
    read = set().union(*(series_names(r["expr"]) for r in rules()))
    unknown = read - exported - recorded - SCRAPE_SERIES
    assert not unknown, f"rules read series nobody exports: {sorted(unknown)}"
    # The checker sees the names: it is not vacuously happy.
    assert "namedprocess_namegroup_worst_fd_ratio" in read & exported
    assert "procfleet_query_exporter_failures_total" in read & exported


def test_shipped_config_loads_both_rule_files() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert [(PROMETHEUS_CONFIG.parent / f).resolve() for f in config["rule_files"]] == [
        p.resolve() for p in RULE_FILES]
    for doc in (REPO / "README.md", REPO / "docs" / "deploy.md"):
        text = doc.read_text()
        assert "config/prometheus/alerts.yml" in text and "config/prometheus/rules.yml" in text, (
            f"{doc.name} does not point at the rule files")


def test_real_prometheus_loads_the_rules(prometheus: PrometheusAPI) -> None:
    response = requests.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()
    loaded = {r["name"]: r for g in response["data"]["groups"] for r in g["rules"]}
    expected = {r.get("alert") or r["record"] for r in rules()}
    assert set(loaded) == expected
    bad = {name: r.get("lastError") for name, r in loaded.items() if r["health"] == "err"}
    assert not bad, bad
    assert {Path(g["file"]).resolve() for g in response["data"]["groups"]} == {
        p.resolve() for p in RULE_FILES}


def test_recorded_cpu_percent_shows_the_busy_child(prometheus: PrometheusAPI,
                                                   exporters: list[Exporter],
                                                   groups: Groups) -> None:
    expr = (f'instance_groupname:namedprocess_namegroup_cpu_percent:rate1m'
            f'{{groupname="{groups.busy}"}}')
    # The busy child spins on one core; on a loaded machine it gets less, but never none.
    values = wait_until(lambda: {k: v for k, v in prometheus.values(expr).items() if v > 0},
                        timeout=20, what=f"recorded CPU% of {groups.busy} on every exporter")
    assert set(values) == {e.instance for e in exporters}
    assert all(0 < v <= 110 for v in values.values()), values
    idle = prometheus.values(expr.replace(groups.busy, groups.idle))
    assert set(idle) == {e.instance for e in exporters}
    assert all(idle[k] < values[k] for k in idle), (idle, values)


def test_failing_exporter_raises_the_query_alert(prometheus: PrometheusAPI,
                                                 query_service: QueryService) -> None:
    """itest-3 refuses connections: lookups through the query service fail, the counter
    grows between scrapes, and the alert goes pending in the real Prometheus."""
    counter = ('procfleet_query_exporter_failures_total'
               '{job="procfleet-query", exporter="itest-3", kind="unreachable"}')

    def lookup() -> None:
        requests.get(f"{query_service.url}/node/itest-3/process/1", timeout=10,
                     headers={"Authorization": f"Bearer {query_service.key}"})

    def scraped_value() -> float | None:
        values = prometheus.values(counter)
        return next(iter(values.values())) if values else None

    lookup()
    before = wait_until(scraped_value, timeout=20, what=f"{counter} in Prometheus")
    # increase() needs the counter to grow between two samples Prometheus took.
    lookup()
    wait_until(lambda: (scraped_value() or 0) > before, timeout=20,
               what=f"{counter} above {before}")
    alert = ('ALERTS{alertname="ProcfleetQueryExporterFailing", exporter="itest-3", '
             'kind="unreachable"}')
    found = wait_until(lambda: prometheus.query(alert), timeout=20, what=alert)
    assert found[0]["metric"]["alertstate"] in ("pending", "firing")
    assert found[0]["metric"]["severity"] == "warning"
