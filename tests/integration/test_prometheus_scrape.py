"""A real Prometheus scraping real exporters: targets up, and PromQL over our series is right."""

from __future__ import annotations

import subprocess

import requests
from integration_testing import (
    IDLE_CHILDREN,
    PROMETHEUS_CONFIG,
    PROMTOOL,
    Exporter,
    Groups,
    PrometheusAPI,
    QueryService,
    spawn_child,
    wait_until,
)

from procfleet.testing import terminate


def test_shipped_prometheus_config_passes_promtool() -> None:
    result = subprocess.run([PROMTOOL, "check", "config", str(PROMETHEUS_CONFIG)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_exporter_exposition_passes_promtool(exporters: list[Exporter],
                                             exporter_token: str) -> None:
    body = requests.get(f"{exporters[0].url}/metrics", timeout=10,
                        headers={"Authorization": f"Bearer {exporter_token}"}).text
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_exporter_target_is_up_with_its_file_sd_labels(
        prometheus: PrometheusAPI, exporters: list[Exporter]) -> None:
    targets = {t["labels"]["instance"]: t for t in prometheus.targets()
               if t["labels"]["job"] == "procfleet"}
    assert set(targets) == {e.instance for e in exporters}
    for exporter in exporters:
        target = targets[exporter.instance]
        assert target["health"] == "up", target["lastError"]
        assert target["labels"]["hostname"] == exporter.hostname
    assert prometheus.values('up{job="procfleet"}') == {e.instance: 1.0 for e in exporters}


def test_metrics_need_the_token_that_prometheus_sends(exporters: list[Exporter]) -> None:
    # The targets being up (above) shows the credentials_file lines work; without them, 401.
    assert requests.get(f"{exporters[0].url}/metrics", timeout=5).status_code == 401


def test_num_procs_counts_the_children_spawned(prometheus: PrometheusAPI,
                                               exporters: list[Exporter],
                                               groups: Groups) -> None:
    expr = f'namedprocess_namegroup_num_procs{{groupname="{groups.idle}"}}'
    expected = {e.instance: float(IDLE_CHILDREN) for e in exporters}
    wait_until(lambda: prometheus.values(expr) == expected, timeout=10,
               what=f"{expr} == {IDLE_CHILDREN} on every exporter")
    busy = f'namedprocess_namegroup_num_procs{{groupname="{groups.busy}"}}'
    assert prometheus.values(busy) == {e.instance: 1.0 for e in exporters}


def test_num_procs_follows_a_child_that_starts_and_is_reaped(
        prometheus: PrometheusAPI, exporters: list[Exporter], groups: Groups) -> None:
    expr = f'namedprocess_namegroup_num_procs{{groupname="{groups.idle}"}}'
    child = spawn_child(groups.idle)
    try:
        more = {e.instance: float(IDLE_CHILDREN + 1) for e in exporters}
        wait_until(lambda: prometheus.values(expr) == more, timeout=10,
                   what=f"{expr} == {IDLE_CHILDREN + 1}")
    finally:
        terminate(child, grace=5)
    back = {e.instance: float(IDLE_CHILDREN) for e in exporters}
    wait_until(lambda: prometheus.values(expr) == back, timeout=10,
               what=f"{expr} back to {IDLE_CHILDREN} after the child was reaped")


def test_cpu_counters_rise_for_the_busy_child_only(prometheus: PrometheusAPI,
                                                   exporters: list[Exporter],
                                                   groups: Groups) -> None:
    def rate(group: str) -> dict[str, float]:
        return prometheus.values(
            f'sum by (instance) (rate(namedprocess_namegroup_cpu_seconds_total'
            f'{{groupname="{group}"}}[5s]))')

    # A spinning child uses about one CPU second per second; allow a loaded machine.
    wait_until(lambda: (r := rate(groups.busy)) and len(r) == len(exporters)
               and min(r.values()) > 0.2, timeout=15, what="busy group's CPU rate > 0.2")
    idle = rate(groups.idle)
    assert set(idle) == {e.instance for e in exporters}
    assert max(idle.values()) < 0.2, idle
    increase = prometheus.values(
        f'increase(namedprocess_namegroup_cpu_seconds_total'
        f'{{groupname="{groups.busy}",mode="user"}}[10s])')
    assert min(increase.values()) > 0.5, increase


def test_per_process_series_name_the_busy_child(prometheus: PrometheusAPI,
                                                exporters: list[Exporter], groups: Groups,
                                                tagged_children: dict) -> None:
    busy_pid = str(tagged_children["busy"][0].pid)
    expr = (f'procfleet_process_cpu_seconds_total{{instance="{exporters[0].instance}",'
            f'groupname="{groups.busy}"}}')

    def pids() -> set[str]:
        return {s["metric"]["pid"] for s in prometheus.query(expr)}

    assert wait_until(pids, timeout=10, what=f"{expr} present") == {busy_pid}
    # The second exporter runs with the defaults: no per-process series.
    assert prometheus.query(
        f'procfleet_process_cpu_seconds_total{{instance="{exporters[1].instance}"}}') == []


def test_exporter_health_series(prometheus: PrometheusAPI, exporters: list[Exporter]) -> None:
    for expr in ("procfleet_scrape_duration_seconds", "procfleet_build_info",
                 'procfleet_read_errors_total{kind="vanished"}'):
        assert set(prometheus.values(expr)) == {e.instance for e in exporters}, expr
    # Group counters never go backwards, so Prometheus sees no resets.
    resets = prometheus.values('sum by (instance) '
                               '(resets(namedprocess_namegroup_cpu_seconds_total[1m]))')
    assert resets == {e.instance: 0.0 for e in exporters}


def test_query_service_job_scrapes_its_own_metrics(prometheus: PrometheusAPI,
                                                   query_service: QueryService) -> None:
    assert prometheus.values('up{job="procfleet-query"}') == {query_service.instance: 1.0}
    names = prometheus.label_values("__name__", '{job="procfleet-query"}')
    assert any(not n.startswith(("up", "scrape_")) for n in names), names
